"""Peer selection: bounded fan-out, a connected multi-hop mesh, back-off."""

from __future__ import annotations

import random

from meshpos.replication.planner import BACKOFF_MAX, PeerInfo, PeerPlanner, keep_link, ring_targets


def _ids(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}" for _ in range(n)]


def _links(ids: list[str]) -> set[frozenset[str]]:
    return {frozenset((me, t)) for me in ids for t in ring_targets(me, set(ids))}


def _connected(ids: list[str], links: set[frozenset[str]]) -> bool:
    adj: dict[str, set[str]] = {i: set() for i in ids}
    for link in links:
        a, b = tuple(link)
        adj[a].add(b)
        adj[b].add(a)
    seen, todo = {ids[0]}, [ids[0]]
    while todo:
        for nxt in adj[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen == set(ids)


def test_hundred_terminals_hold_a_bounded_connected_mesh() -> None:
    ids = _ids(100)
    links = _links(ids)
    assert len(links) <= 300 < 4950
    assert _connected(ids, links)
    degree = {i: sum(1 for link in links if i in link) for i in ids}
    assert max(degree.values()) <= 12


def test_mesh_stays_connected_when_one_node_leaves() -> None:
    ids = _ids(30, seed=7)
    for gone in ids[:5]:
        rest = [i for i in ids if i != gone]
        assert _connected(rest, _links(rest))


def test_small_sites_are_fully_linked() -> None:
    ids = _ids(3)
    assert len(_links(ids)) == 3


def test_simultaneous_dials_keep_exactly_one_link() -> None:
    a, b = "0000000000000001", "0000000000000002"
    assert keep_link(a, b, initiated_by_me=True) and keep_link(b, a, initiated_by_me=False)
    assert not keep_link(a, b, initiated_by_me=False) and not keep_link(b, a, initiated_by_me=True)


def test_backoff_grows_and_resets_after_a_stable_link() -> None:
    planner = PeerPlanner("0000000000000001", rng=random.Random(0))
    peer = PeerInfo("0000000000000002", ("127.0.0.1",), 7000)
    planner.seen(peer)
    assert planner.to_dial(0.0) == [peer]
    delays = []
    now = 0.0
    for _ in range(10):
        planner.dial_failed(peer.node_id, now)
        nxt = planner.backoff[peer.node_id].next_try
        delays.append(nxt - now)
        assert planner.to_dial(now) == []
        now = nxt
        assert planner.to_dial(now) == [peer]
    assert delays[1] > delays[0] and max(delays) <= BACKOFF_MAX * 1.25
    planner.link_up(peer.node_id, now)
    assert planner.to_dial(now) == []
    planner.link_down(peer.node_id, now + 60)
    assert planner.backoff[peer.node_id].next_try - (now + 60) <= 0.5 * 1.25
