"""The inspector on loopback (real node processes, real TLS): statuses through the mesh, a stopped
node and the partition it makes, and proof that nodes refuse everything an inspector sends."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trio

from meshpos.wire import envelope
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.replication.link_driver import LinkEndpoint, connect_link
from meshpos.node import client
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.site.nodedir import NodeDir
from meshpos.apps.procs import ProcessGroup, wait_for
from meshpos.site.sitedir import Site
from meshpos.replication.sync import Replicator
from tests.helpers import run_cli
from tests.test_mesh_loopback import free_ports


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    group.env["MESHPOS_STATUS_INTERVAL"] = "1"
    yield group
    group.stop_all()


def inspect(inspector: Path, *extra: str, wait: float = 3.0) -> dict[str, Any]:
    proc = run_cli("inspect", str(inspector), "--no-mdns", "--json", "--wait", str(wait), *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def poll(inspector: Path, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str,
         *extra: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = inspect(inspector, *extra)
        if cond(view):
            return view
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {json.dumps(view, indent=1)[:3000]}")


def by_name(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in view["nodes"]}


def test_inspector_sees_nodes_beyond_its_links_and_reports_a_partition(
        tmp_path: Path, site: Site, procs: ProcessGroup) -> None:
    pg, p1, p2 = free_ports(3)
    g, t1, t2 = tmp_path / "g", tmp_path / "t1", tmp_path / "t2"
    enroll_one_step(site, g, "gateway", "G", listen=f"127.0.0.1:{pg}")
    enroll_one_step(site, t1, "terminal", "T1", listen=f"127.0.0.1:{p1}", peers=[f"127.0.0.1:{pg}"])
    enroll_one_step(site, t2, "terminal", "T2", listen=f"127.0.0.1:{p2}", peers=[f"127.0.0.1:{p1}"])
    insp = tmp_path / "insp"
    enroll_one_step(site, insp, "inspector", "Inspector", peers=[f"127.0.0.1:{p2}"])  # a link to T2 only
    sales = {"G": 1, "T1": 2, "T2": 3}
    for name, path in (("G", g), ("T1", t1), ("T2", t2)):
        core = NodeCore.open(path)
        try:
            for i in range(sales[name]):  # card sales: pending until the switch settles them
                core.sell(100 * (i + 1), card=core.seal_card("4111111111111111", "1230"))
            core.sell(5_000)  # and a cash sale each: final when taken, in no pending count
        finally:
            core.close()
        procs.start_node(name, path, "--no-mdns", "--no-peer-exchange")  # keep the line G - T1 - T2

    def whole(view: dict[str, Any]) -> bool:
        nodes = by_name(view)
        return (set(nodes) == {"G", "T1", "T2"} and all(n["reachable"] for n in nodes.values())
                and {k: n["pending"] for k, n in nodes.items()} == sales and not view["warnings"])
    view = poll(insp, whole, 60, "the whole mesh with its pending counts", "--graph", str(tmp_path / "mesh.dot"))
    nodes = by_name(view)
    assert nodes["T2"]["linked"] and not nodes["G"]["linked"]  # G is seen through the gossip only
    assert nodes["T2"]["rtt_ms"] is not None
    assert nodes["T1"]["pending_amount_minor"] == 300 and view["totals"]["pending"] == 6
    assert view["partition"] is False and view["edges"] == [["G", "T1"], ["T1", "T2"]]
    dot = (tmp_path / "mesh.dot").read_text()
    assert dot.startswith("graph meshpos") and '"G" -- "T1"' in dot
    proc = run_cli("inspect", str(insp), "--no-mdns", "--wait", "1", "--graph", str(tmp_path / "mesh.svg"))
    if shutil.which("dot"):
        assert proc.returncode == 0 and "<svg" in (tmp_path / "mesh.svg").read_text()
    else:
        assert proc.returncode != 0 and "apt-get install graphviz" in proc.stderr

    # T1 dies: G can no longer reach T2 nor us; a partition
    procs.kill("T1", signal.SIGKILL)
    view = poll(insp, lambda v: not by_name(v)["T1"]["reachable"] and not by_name(v)["G"]["reachable"]
                and v["partition"], 60, "T1 and G unreachable and a partition")
    assert by_name(view)["T2"]["reachable"]
    assert any(w.startswith("partition:") for w in view["warnings"]), view["warnings"]
    assert any("T1 is unreachable" in w for w in by_name(view)["T1"]["warnings"])
    text = run_cli("inspect", str(insp), "--no-mdns", "--wait", "2").stdout
    assert "partition" in text and "NO" in text

    # T1 back: the warnings clear
    procs.start_node("T1", t1, "--no-mdns", "--no-peer-exchange")
    poll(insp, whole, 90, "the mesh to be whole again")


async def _push(writer: NodeCore, identity: Path, port: int, status: bytes | None, seconds: float = 3.0) -> None:
    """Link to 127.0.0.1:port with ``identity``'s certificate, offering everything ``writer``'s ledger holds."""
    nd = NodeDir(identity)
    cfg = nd.config()
    replicator = Replicator(writer.ledger, cfg.site_id, cfg.node_id, cfg.role, SYSTEM_CLOCK)
    endpoint = LinkEndpoint.from_files(replicator, writer.roster, writer.ca_cert, nd.cert_path, nd.key_path,
                                       nd.ca_path.read_bytes(), SYSTEM_CLOCK)
    async with trio.open_nursery() as nursery:
        session = await nursery.start(connect_link, endpoint, "127.0.0.1", port)
        assert session is not None, "link refused"
        with trio.fail_after(10):
            while session.conn.peer is None:
                await trio.sleep(0.01)
        if status is not None:
            assert session.send_status(status)
        for shard in writer.ledger.shards():
            session.local_change(shard)  # and SYNC every shard, on top of the SNAPSHOTs of LinkUp
        await trio.sleep(seconds)
        replicator.detach("done")
        nursery.cancel_scope.cancel()


async def test_nodes_refuse_everything_an_inspector_sends(tmp_path: Path, site: Site, procs: ProcessGroup) -> None:
    pa, pb = free_ports(2)
    a, b, x = tmp_path / "a", tmp_path / "b", tmp_path / "x"
    enroll_one_step(site, a, "terminal", "A", listen=f"127.0.0.1:{pa}")
    enroll_one_step(site, b, "terminal", "B", listen=f"127.0.0.1:{pb}", peers=[f"127.0.0.1:{pa}"])
    enroll_one_step(site, x, "terminal", "X")  # never runs: its sale is known to the pusher only
    insp, y = tmp_path / "insp", tmp_path / "y"
    enroll_one_step(site, insp, "inspector", "Inspector")
    enroll_one_step(site, y, "terminal", "Y")
    procs.start_node("A", a, "--no-mdns")
    procs.start_node("B", b, "--no-mdns")
    core = NodeCore.open(x)
    try:
        sale = core.sell(4_200)["id"]
        status = envelope.seal("status", core.node_id, {"status": {"at": core.clock.now_ms(), "role": "terminal",
                                                                   "name": "X"}}, core.key)

        def holders() -> list[str]:
            return [n for n, p in (("A", a), ("B", b))
                    if sale in {s["id"] for s in client.running(p).sales()}]

        def statuses(path: Path) -> set[str]:
            return {s["node_id"] for s in client.running(path).statuses()}

        # a genuine, valid sale (and a genuine status of X), offered by an inspector: refused by every node
        for port in (pa, pb):
            await _push(core, insp, port, status)
        await trio.sleep(1.0)
        assert holders() == []
        assert core.node_id not in statuses(a) | statuses(b)
        for path in (a, b):
            entries = client.running(path).status()["ledger"]["entries"]
            assert entries == 3, f"{path.name} took entries from the inspector"  # its cert, A's and B's

        # the same offered by an enrolled terminal is taken and spreads: the refusal above was the role's
        await _push(core, y, pa, status)
        wait_for(lambda: holders() == ["A", "B"], 30, "the terminal's push did not spread")
        assert core.node_id in statuses(a)
    finally:
        core.close()


async def test_a_status_tells_only_what_its_certificate_says(tmp_path: Path, site: Site, procs: ProcessGroup) -> None:
    """A terminal's status that says it is the gateway, or an inspector, shows the terminal as its certificate
    names it; a status dated 30 days ahead (that would keep its node "fresh" for a month) is refused."""
    (pa,) = free_ports(1)
    a, x, y, insp = tmp_path / "a", tmp_path / "x", tmp_path / "y", tmp_path / "insp"
    enroll_one_step(site, a, "terminal", "A", listen=f"127.0.0.1:{pa}")
    enroll_one_step(site, x, "terminal", "X")
    enroll_one_step(site, y, "terminal", "Y")
    enroll_one_step(site, insp, "inspector", "Inspector", peers=[f"127.0.0.1:{pa}"])
    procs.start_node("A", a, "--no-mdns")
    for path, name, role, ahead_ms in ((x, "A", "inspector", 0), (y, "Y", "terminal", 30 * 24 * 3_600_000)):
        core = NodeCore.open(path)
        try:
            status = envelope.seal("status", core.node_id, {"status": {
                "at": core.clock.now_ms() + ahead_ms, "role": role, "name": name, "every_ms": 1000}}, core.key)
            await _push(core, path, pa, status, seconds=1.0)
        finally:
            core.close()
    x_id, y_id = NodeDir(x).config().node_id, NodeDir(y).config().node_id

    def settled(view: dict[str, Any]) -> bool:
        ids = {n["node_id"] for n in view["nodes"]}
        return {x_id, y_id} <= ids and by_name(view).get("A", {}).get("reachable", False)
    view = poll(insp, settled, 30, "A, X and Y in the inspector's view")
    nodes = {n["node_id"]: n for n in view["nodes"]}
    assert (nodes[x_id]["name"], nodes[x_id]["role"]) == ("X", "terminal")  # not a second "A", not hidden
    assert nodes[x_id]["status_age_s"] is not None  # its status (of a valid time) was taken
    assert [n["name"] for n in view["nodes"]].count("A") == 1
    assert nodes[y_id]["status_age_s"] is None and not nodes[y_id]["fresh"]  # the future status was refused
    assert y_id not in {s["node_id"] for s in client.running(a).statuses()}
