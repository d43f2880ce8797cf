"""Real node processes on loopback with real TLS: convergence over static peers, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for
from meshpos.site.sitedir import Site, init_site


@pytest.fixture
def procs(tmp_path: Path):
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop_all()


def _sale_ids(node: Path) -> set[str]:
    return {s["id"] for s in client.running(node).sales()}


def test_five_node_processes_with_static_peers_converge(tmp_path: Path, site: Site, procs) -> None:
    ports = free_ports(5)
    nodes = []
    for i in range(5):
        peers = [f"127.0.0.1:{ports[i - 1]}"] if i else []  # a line: multi-hop is needed
        path = tmp_path / f"t{i}"
        enroll_one_step(site, path, "terminal", f"T{i}", listen=f"127.0.0.1:{ports[i]}", peers=peers)
        nodes.append(path)
    expected = set()
    for i, path in enumerate(nodes):  # sales taken before the mesh exists
        with client.open_node(path) as stopped:
            expected.add(stopped.sell(100 + i)["id"])
    for i, path in enumerate(nodes):
        procs.start_node(f"t{i}", path, "--no-mdns")
    for i, path in enumerate(nodes):  # and while it runs
        expected.add(client.running(path, timeout=10).sell(200 + i)["id"])
    wait_for(lambda: all(_sale_ids(p) == expected for p in nodes), 60,
             "ledgers did not converge: " + str({p.name: len(_sale_ids(p)) for p in nodes}))
    status = client.running(nodes[2]).status()
    peers = {link["peer_name"] for link in status["peers"]["links"] if link["state"] == "open"}
    # its static neighbours; peer exchange (protocols/peer-exchange.md) may add ring links to the others
    assert {"T1", "T3"} <= peers


def test_other_site_and_revoked_nodes_are_refused(tmp_path: Path, site: Site, procs) -> None:
    p1, p_other, p_rev = free_ports(3)
    t1 = tmp_path / "t1"
    enroll_one_step(site, t1, "terminal", "T1", listen=f"127.0.0.1:{p1}")
    other_site = init_site(tmp_path / "other-site", "Another fair")
    intruder = tmp_path / "intruder"
    enroll_one_step(other_site, intruder, "terminal", "Intruder", listen=f"127.0.0.1:{p_other}",
                    peers=[f"127.0.0.1:{p1}"])
    revoked = tmp_path / "revoked"
    enroll_one_step(site, revoked, "terminal", "Stolen", listen=f"127.0.0.1:{p_rev}", peers=[f"127.0.0.1:{p1}"])
    with client.open_node(t1) as stopped:
        stopped.ingest(site.revoke(site.find_node("Stolen"), "stolen"))
    with client.open_node(intruder) as stopped:
        intruder_sale = stopped.sell(100)["id"]
    with client.open_node(revoked) as stopped:
        stolen_sale = stopped.sell(100)["id"]
    procs.start_node("t1", t1, "--no-mdns")
    procs.start_node("intruder", intruder, "--no-mdns")
    procs.start_node("revoked", revoked, "--no-mdns")
    log = procs.children["t1"].log_path
    intruder_log = procs.children["intruder"].log_path

    def other_site_refused() -> bool:
        text = log.read_text() + intruder_log.read_text()
        return "refused link" in text and ("another site" in text or "not issued by this site" in text
                                           or "CERTIFICATE_VERIFY_FAILED" in text)
    wait_for(other_site_refused, 30, "no refusal of the other site's node was logged")
    wait_for(lambda: "revoked" in log.read_text(), 30, "t1 did not log the revoked node's refusal")
    own = client.running(t1).sell(300)["id"]
    assert _sale_ids(t1) == {own}
    assert intruder_sale not in _sale_ids(t1) and stolen_sale not in _sale_ids(t1)
