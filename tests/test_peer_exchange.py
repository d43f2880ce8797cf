"""Peer exchange (protocols/peer-exchange.md): nodes learn where the site's other nodes listen
from those nodes' own signed statuses, gossiped over the authenticated links.

Unit tests of the bounds (meshpos.replication.peerx), then real node processes on loopback
without mDNS, each terminal configured with the gateway's address only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from meshpos.apps.procs import ProcessGroup, free_ports, wait_for
from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.replication.peerx import (HINT_SLACK_S, MAX_ADDRESSES, DialBudget, PeerHints, address_for, hint_from_status,
                                       judge_answer, on_loopback, usable_address)
from meshpos.replication.planner import PeerInfo
from meshpos.site.sitedir import Site
from meshpos.wire.status import StatusBody

NODE = "0123456789abcdef"


def hint(role: str, status: dict) -> PeerInfo | None:
    """The hint in a status signed with these members (read as every node reads a status)."""
    return hint_from_status(NODE, role, StatusBody.from_json({"at": 1, **status}))


def test_a_hint_takes_only_ip_literals_a_sane_port_and_a_role_that_listens() -> None:
    info = hint("terminal", {"addresses": ["10.0.0.5", "fe80::1"], "port": 7420,
                                               "uplink": {"state": "up"}})
    assert info == PeerInfo(NODE, ("10.0.0.5", "fe80::1"), 7420, "terminal", True)
    for bad in ("example.org", "224.0.0.251", "0.0.0.0", "255.255.255.255", "ff02::fb", "::", 7, None,
                "10.0.0.1; rm -rf", "x" * 100):
        assert usable_address(bad) is None, bad
    assert hint("terminal", {"addresses": ["example.org", "224.0.0.1"], "port": 1}) is None
    for port in (0, 65536, "7420", True, None):
        assert hint("terminal", {"addresses": ["10.0.0.5"], "port": port}) is None
    assert hint("inspector", {"addresses": ["10.0.0.5"], "port": 7420}) is None
    many = hint("gateway", {"addresses": [f"10.0.0.{i}" for i in range(1, 60)] + ["10.0.0.1"],
                                              "port": 9})
    assert many is not None and len(many.addresses) == MAX_ADDRESSES


def test_hints_are_bounded_and_expire_with_their_status() -> None:
    hints = PeerHints("me", max_nodes=2)
    a = PeerInfo("a", ("10.0.0.1",), 1)
    assert hints.offer(a, "a", now=0, ttl_s=30)
    assert not hints.offer(a, "a", now=1, ttl_s=30)  # the same hint renewed: nothing to re-plan
    assert hints.offer(PeerInfo("b", ("10.0.0.2",), 1), "b", now=5, ttl_s=30)
    assert not hints.offer(PeerInfo("c", ("10.0.0.3",), 1), "c", now=1, ttl_s=30) and hints.refused == 1
    assert not hints.offer(PeerInfo("me", ("10.0.0.9",), 1), "me", now=1, ttl_s=30)  # never ourselves
    assert hints.expire(30.5) == [] and hints.expire(32) == ["a"] and hints.nodes() == ["b"]  # renewed at 1
    assert hints.offer(None, "b", now=2, ttl_s=30) and hints.nodes() == []  # a status without address



def test_a_replayed_history_keeps_a_hint_alive_only_as_long_as_it_spans() -> None:
    """Red team: a hint's life was counted from each status's arrival, so a hostile relay replaying
    a departed node's recorded statuses, each newer than the last, kept its stale address a dial
    target for ever. A hint now lives no longer than its signer's clock advanced since the first
    status of it we took (plus the ttl and HINT_SLACK_S), whatever arrives when."""
    a = PeerInfo("a", ("10.0.0.1",), 1)
    live = PeerHints("me")
    for k in range(1000):  # a live node: a status every 10 s, its clock running with ours
        live.offer(a, "a", now=10.0 * k, ttl_s=30, at=5_000_000 + 10_000 * k)
    assert live.expire(10.0 * 999 + 29) == [] and live.nodes() == ["a"]
    replayed = PeerHints("me")
    recorded = [5_000_000 + 10_000 * k for k in range(30)]  # 290 s of a node's statuses
    alive_at = []
    for k, at in enumerate(recorded):  # replayed one every 25 s: each newer, each "fresh" on arrival
        now = 25.0 * k
        replayed.offer(a, "a", now=now, ttl_s=30, at=at)
        replayed.expire(now + 1)
        if replayed.nodes():
            alive_at.append(now)
    bound = 290 + 30 + HINT_SLACK_S
    assert alive_at and max(alive_at) <= bound < 25.0 * 29
    assert replayed.nodes() == [] and replayed.expire(1e6) == []
    # the anchor outlives the hint: once expired, an old status does not start its life again
    assert not replayed.offer(a, "a", now=2000.0, ttl_s=30, at=recorded[-1] + 1) and replayed.nodes() == []

def test_dials_to_hinted_nodes_are_rate_limited() -> None:
    budget = DialBudget(rate=2.0, burst=4)
    assert [budget.take(0.0) for _ in range(6)] == [True] * 4 + [False] * 2
    assert budget.take(0.5) and not budget.take(0.5)
    assert sum(budget.take(10.0 + k * 0.01) for k in range(100)) == 4 + 1  # a burst, then 2/s
    info = PeerInfo(NODE, ("10.0.0.1", "10.0.0.2"), 1)
    assert [address_for(info, f) for f in range(3)] == ["10.0.0.1", "10.0.0.2", "10.0.0.1"]


def test_the_certificate_decides_and_a_stale_address_never_replaces_a_working_link() -> None:
    assert judge_answer("a", "a", {"b"}) == "wanted"
    assert judge_answer("a", "b", {"c"}) == "other"  # b answered at a's old address: a link to b, kept
    assert judge_answer("a", "b", {"b", "c"}) == "close"  # we hold a link to b already: the new one goes
    assert judge_answer("a", None, set()) == "close"


# -- real processes ------------------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop_all()


def _open_links(node: Path) -> set[str]:
    status = client.running(node).status()
    return {link["peer_name"] for link in status["peers"]["links"] if link["state"] == "open"}


def _sales(node: Path) -> set[str]:
    return {s["id"] for s in client.running(node).sales()}


def test_terminals_that_know_only_the_gateway_find_each_other_and_mesh_without_it(
        tmp_path: Path, site: Site, procs: ProcessGroup) -> None:
    ports = free_ports(5)
    gateway = tmp_path / "gw"
    enroll_one_step(site, gateway, "gateway", "GW", listen=f"127.0.0.1:{ports[0]}")
    terminals = []
    for i in range(1, 5):
        path = tmp_path / f"t{i}"
        enroll_one_step(site, path, "terminal", f"T{i}", listen=f"127.0.0.1:{ports[i]}",
                        peers=[f"127.0.0.1:{ports[0]}"])
        terminals.append(path)
    procs.env["MESHPOS_STATUS_INTERVAL"] = "2"
    procs.start_node("gw", gateway, "--no-mdns")
    for i, path in enumerate(terminals, 1):
        procs.start_node(f"t{i}", path, "--no-mdns")
    ids = {p.name: client.running(p).status()["node_id"] for p in [gateway, *terminals]}

    def hinted(p: Path) -> set[str]:
        return set(client.running(p).status()["peers"]["hinted"])

    wait_for(lambda: all(hinted(p) >= set(ids.values()) - {ids[p.name]} for p in terminals), 60,
             lambda: "the terminals did not learn every node's address: "
                     + str({p.name: sorted(hinted(p)) for p in terminals}))
    names = {f"T{i}" for i in range(1, 5)}
    # the ring planner dials the terminals it learnt of: links that no configuration asked for
    wait_for(lambda: all(_open_links(p) & (names - {p.name.upper()}) for p in terminals), 60,
             lambda: "no terminal-to-terminal link: " + str({p.name: sorted(_open_links(p)) for p in terminals}))
    status = client.running(terminals[0]).status()
    assert status["peers"]["static"] == [f"127.0.0.1:{ports[0]}"] and status["peers"]["discovered"] == []

    procs.stop("gw")  # the only configured address is gone: the terminals still reach each other
    wait_for(lambda: all(_open_links(p) <= names and _open_links(p) for p in terminals), 60, "links to GW remain")
    sold = {client.running(p).sell(100 + i)["id"] for i, p in enumerate(terminals)}
    wait_for(lambda: all(sold <= _sales(p) for p in terminals), 60,
             lambda: "sales did not spread without the gateway: " + str({p.name: len(_sales(p) & sold)
                                                                        for p in terminals}))


def test_a_hint_naming_loopback_is_taken_only_by_a_node_that_is_on_loopback_itself() -> None:
    """Red team: a hostile enrolled node signed a status whose addresses were 127.0.0.1 (and ::1)
    with the port of some local service; every node of the site then dialled its OWN loopback
    there (a TLS hello to, say, a local database or admin port), from every device at the fair.
    Now a loopback address is dropped from a hint unless the receiver's own configuration (its
    listen address or a static peer) is on loopback: a site on one machine, as in the demo."""
    status = {"addresses": ["127.0.0.1", "::1", "127.9.9.9"], "port": 5432}
    assert hint("terminal", status) is None  # nothing else left: no hint at all
    mixed = hint("terminal", {"addresses": ["127.0.0.1", "10.0.0.5"], "port": 7420})
    assert mixed is not None and mixed.addresses == ("10.0.0.5",)
    taken = hint_from_status(NODE, "terminal", StatusBody.from_json({"at": 1, **status}), loopback_ok=True)
    assert taken is not None and taken.addresses == ("127.0.0.1", "::1", "127.9.9.9")
    assert on_loopback(["127.0.0.1:7420"]) and on_loopback(["0.0.0.0:7420", "[::1]:7420"])
    assert on_loopback(["localhost:7420"])
    assert not on_loopback(["0.0.0.0:7420", "10.0.0.1:7420"]) and not on_loopback([]) and not on_loopback(["x"])
