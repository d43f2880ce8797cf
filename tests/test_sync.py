"""Replication sessions joined in memory (no sockets)."""

from __future__ import annotations

import logging
from pathlib import Path

import automerge.core as am
import pytest

from meshpos.wire import envelope
from meshpos.ledger.ledger import entry_bytes
from meshpos.replication.memnet import MemNetwork
from meshpos.wire.shards import shard_name
from meshpos.wire.link_frames import FrameDecoder, FrameType
from meshpos.wire.link import Hello, LinkConnection, Push, Sync, Snapshot
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock
from meshpos.replication.sync import MAX_ORPHAN_PUSHES, SyncConfig


@pytest.fixture
def clock():  # type: ignore[no-untyped-def]
    return wall_clock()


def _nodes(tmp_path: Path, clock, n: int, roles: list[str] | None = None,  # type: ignore[no-untyped-def]
           config: SyncConfig = SyncConfig()) -> list[SimNode]:
    site = make_site(tmp_path / "site")
    roles = roles or ["terminal"] * n
    return [SimNode.open(enroll(site, tmp_path / f"n{i}", f"t{i}", roles[i]), clock, config) for i in range(n)]


def assert_identical(nodes: list[SimNode]) -> None:
    first = nodes[0]
    for other in nodes[1:]:
        assert other.entries() == first.entries()
        assert other.core.ledger.summary() == first.core.ledger.summary()
        assert other.sale_ids() == first.sale_ids()


def test_two_nodes_bootstrap_by_snapshot_then_sync(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    a, b = _nodes(tmp_path, clock, 2)
    sold = [a.core.sell(100 + i)["id"] for i in range(5)]
    net = MemNetwork()
    link = net.connect(a.replicator, b.replicator)
    net.pump()
    assert_identical([a, b])
    assert set(sold) <= b.sale_ids()
    assert link.a.health().snapshots_sent >= 1
    # After link up, a new sale on either end crosses by the sync protocol.
    s1 = b.core.sell(777)["id"]
    s2 = a.core.sell(778)["id"]
    net.pump()
    assert {s1, s2} <= a.sale_ids() and {s1, s2} <= b.sale_ids()
    assert_identical([a, b])
    h = link.b.health()
    assert h.entries_received >= 6 and h.entries_rejected == 0 and h.peer_node == a.core.node_id


def test_line_of_ten_nodes_converges(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    nodes = _nodes(tmp_path, clock, 10)
    net = MemNetwork()
    for left, right in zip(nodes, nodes[1:]):
        net.connect(left.replicator, right.replicator)
    net.pump()
    ids = [nodes[0].core.sell(100 + i)["id"] for i in range(3)]
    ids += [nodes[-1].core.sell(200 + i)["id"] for i in range(3)]
    net.pump()
    ids.append(nodes[0].core.sell(300)["id"])
    ids.append(nodes[-1].core.sell(301)["id"])
    ids.append(nodes[4].core.sell(302)["id"])
    net.pump()
    assert_identical(nodes)
    for node in nodes:
        assert set(ids) <= node.sale_ids()


def test_restart_resumes(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    a, b = _nodes(tmp_path, clock, 2)
    net = MemNetwork()
    link = net.connect(a.replicator, b.replicator)
    a.core.sell(100)
    net.pump()
    link.cut()
    b = b.reopen(clock)
    sid = a.core.sell(101)["id"]
    b.core.sell(102)
    net.connect(a.replicator, b.replicator)
    net.pump()
    assert sid in b.sale_ids()
    assert_identical([a, b])


def _hostile_peer(victim: SimNode, attacker: SimNode, clock, versions: tuple[int, ...] = (1,)):  # type: ignore[no-untyped-def]
    """A raw protocol end speaking as ``attacker`` (a real enrolled node) with its own Automerge forks."""
    rep = attacker.replicator
    conn = LinkConnection(Hello(versions, rep.site_id, rep.node_id, rep.role, {}), clock.monotonic())
    session = victim.replicator.open_session(label="hostile", expect_node=rep.node_id)
    session.receive_data(conn.start())
    conn.receive_data(session.data_to_send(), clock.monotonic())
    return conn, session


def _exchange(conn, session, docs, states, clock, rounds: int = 20) -> None:  # type: ignore[no-untyped-def]
    for _ in range(rounds):
        out = bytearray()
        for shard, doc in docs.items():
            msg = doc.generate_sync_message(states[shard])
            if msg is not None:
                out += conn.send(Sync(shard, msg.encode()))
        if out:
            session.receive_data(bytes(out))
        back = session.data_to_send()
        if not back and not out:
            return
        conn.receive_data(back, clock.monotonic())
        for ev in conn.events():
            if isinstance(ev, Sync) and ev.shard in docs:
                docs[ev.shard].receive_sync_message(states[ev.shard], am.Message.decode(ev.data))
            elif isinstance(ev, Snapshot) and ev.shard not in docs:
                docs[ev.shard] = am.Document.load(ev.data)
                states[ev.shard] = am.SyncState()


def test_hostile_peer_deletes_and_overwrites_are_reasserted(tmp_path: Path, clock, caplog) -> None:  # type: ignore[no-untyped-def]
    victim, attacker = _nodes(tmp_path, clock, 2)
    sold = [victim.core.sell(100 + i)["id"] for i in range(4)]
    net = MemNetwork()
    net.connect(victim.replicator, attacker.replicator)
    net.pump()  # the attacker is an enrolled peer holding the victim's shard
    before = victim.entries()
    shard = next(s for s in victim.core.ledger.shards() if s.startswith(victim.core.node_id))
    doc = am.Document.load(victim.core.ledger.snapshot(shard))
    doc.set_actor(bytes.fromhex(attacker.core.node_id) + b"\x01" * 8)
    keys = sorted(k for k in doc.keys(am.ROOT) if k.startswith("sale/"))
    forged_body = dict(envelope.decode(entry_bytes(doc.get(am.ROOT, keys[1]))).body, amount_minor=1)
    forged = envelope.seal("sale", victim.core.node_id, forged_body, attacker.core.key)  # wrong key
    with doc.transaction() as tx:
        tx.delete(am.ROOT, keys[0])
        tx.put(am.ROOT, keys[1], am.ScalarType.Bytes, forged)
        tx.put(am.ROOT, "sale/feedfacefeedface-1", am.ScalarType.Bytes, b"not an envelope")
    conn, session = _hostile_peer(victim, attacker, clock)
    docs, states = {shard: doc}, {shard: am.SyncState()}
    caplog.set_level(logging.WARNING)
    _exchange(conn, session, docs, states, clock)
    assert victim.entries() == before
    assert {s["id"] for s in victim.core.sales()} == victim.sale_ids() and set(sold) <= victim.sale_ids()
    assert all(row["amount_minor"] != 1 for row in victim.core.store.sales())
    assert "feedfacefeedface-1" not in str(victim.sale_ids())
    # the victim's re-assertion flowed back: the attacker's document holds the true entries again
    for key in keys[:2]:
        assert entry_bytes(docs[shard].get(am.ROOT, key)) == dict(before)[key]
    h = session.health()
    assert h.entries_rejected >= 1 and h.entries_reasserted >= 2
    assert "re-asserting" in caplog.text


def test_peer_past_rejection_threshold_is_cut_off(tmp_path: Path, clock, caplog) -> None:  # type: ignore[no-untyped-def]
    victim, attacker = _nodes(tmp_path, clock, 2)
    victim.core.ingest(attacker.core.ledger.raw(f"cert/{attacker.core.node_id}"), "peer")  # a shard it may write
    shard = f"{attacker.core.node_id}/000009"
    doc = am.Document(bytes.fromhex(attacker.core.node_id) + b"\x02" * 8)
    with doc.transaction() as tx:
        for i in range(40):
            tx.put(am.ROOT, f"sale/{attacker.core.node_id}-{i + 1000}", am.ScalarType.Bytes, b"junk%d" % i)
    conn, session = _hostile_peer(victim, attacker, clock)
    caplog.set_level(logging.WARNING)
    _exchange(conn, session, {shard: doc}, {shard: am.SyncState()}, clock)
    assert session.closed and "invalid entries" in (session.close_reason or "")
    assert "invalid entries" in caplog.text
    assert session not in victim.replicator.sessions
    assert not any(k.endswith("-1000") for k, _ in victim.entries())


def test_read_only_inspector_is_served_but_never_trusted(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    term, insp = _nodes(tmp_path, clock, 2, ["terminal", "inspector"])
    sid = term.core.sell(500)["id"]
    net = MemNetwork()
    link = net.connect(term.replicator, insp.replicator)
    net.pump()
    assert sid in insp.sale_ids()
    assert link.a.read_only and link.a.health().read_only
    # the inspector's own cert entry (its shard) never enters the terminal through this link
    assert not any(k == f"cert/{insp.core.node_id}" for k, _ in term.entries())
    sid2 = term.core.sell(501)["id"]
    net.pump()
    assert sid2 in insp.sale_ids()


def _frame_types(data: bytes) -> list[FrameType]:
    dec = FrameDecoder()
    dec.receive_data(data)
    types = []
    while (frame := dec.next_frame()) is not None:
        types.append(frame.type)
    return types


def test_a_new_sale_crosses_a_link_as_one_push_frame_with_no_answer(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    a, b = _nodes(tmp_path, clock, 2)
    a.core.sell(100)
    net = MemNetwork()
    link = net.connect(a.replicator, b.replicator)
    net.pump()
    assert link.a.conn.version >= 3  # PUSH (version 3) and up
    seen: list[bytes] = []

    def record(data: bytes) -> bytes:
        seen.append(data)
        return data

    back = link.bytes_ba
    sid = a.core.sell(101)["id"]
    net.pump(mangle=record)
    assert sid in b.sale_ids()
    assert link.bytes_ba == back  # B answers nothing: its digest matched A's
    assert [t for data in seen for t in _frame_types(data)] == [FrameType.PUSH]
    assert_identical([a, b])


def test_push_with_a_missing_dependency_is_repaired_by_sync(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    a, b = _nodes(tmp_path, clock, 2)
    net = MemNetwork()
    link = net.connect(a.replicator, b.replicator)
    net.pump()
    lost = a.core.sell(100)["id"]
    assert link.a.data_to_send()  # the PUSH of the first sale never reaches B
    later = a.core.sell(101)["id"]
    net.pump()
    assert {lost, later} <= b.sale_ids()
    assert_identical([a, b])


def test_mixed_link_versions_converge(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    """A version-2 node (sync only) between version-3 nodes relays both ways."""
    site = make_site(tmp_path / "site")
    versions = [(1, 2, 3), (1, 2), (1, 2, 3), (1, 2, 3)]
    nodes = [SimNode.open(enroll(site, tmp_path / f"n{i}", f"t{i}"), clock, SyncConfig(versions=v))
             for i, v in enumerate(versions)]
    net = MemNetwork()
    links = [net.connect(x.replicator, y.replicator) for x, y in zip(nodes, nodes[1:])]
    net.pump()
    assert [link.a.conn.version for link in links] == [2, 2, 3]
    ids = [nodes[0].core.sell(100)["id"], nodes[3].core.sell(200)["id"], nodes[1].core.sell(300)["id"]]
    net.pump()
    assert_identical(nodes)
    for node in nodes:
        assert set(ids) <= node.sale_ids()


def test_peer_pushing_changes_that_never_apply_is_cut_off(tmp_path: Path, clock, caplog) -> None:  # type: ignore[no-untyped-def]
    victim, attacker = _nodes(tmp_path, clock, 2)
    doc = am.Document(bytes.fromhex(attacker.core.node_id) + b"\x03" * 8)
    for i in range(2):
        with doc.transaction() as tx:
            tx.put(am.ROOT, f"junk/{i}", am.ScalarType.Bytes, b"x")
    orphan = doc.get_changes([])[1].bytes  # its dependency is never sent
    shard = shard_name(attacker.core.node_id, 9 * 256)
    conn, session = _hostile_peer(victim, attacker, clock, versions=(3,))
    caplog.set_level(logging.WARNING)
    for _ in range(MAX_ORPHAN_PUSHES + 1):
        session.receive_data(conn.send(Push(shard, b"\x01" * 8, (orphan,))))
        assert session.data_to_send() is not None
    assert session.closed and "do not apply" in (session.close_reason or "")
    assert session not in victim.replicator.sessions


def test_push_from_a_read_only_peer_is_ignored(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    term, insp, other = _nodes(tmp_path, clock, 3, ["terminal", "inspector", "terminal"])
    net = MemNetwork()
    link = net.connect(term.replicator, insp.replicator)
    net.pump()
    before = term.entries()
    sid = other.core.sell(100)["id"]  # a valid sale the terminal has not seen, carried by the inspector
    key, raw = next((k, r) for k, r in other.entries() if sid in k)
    shard = shard_name(insp.core.node_id, 5 * 256)  # a new shard: the change needs nothing else
    doc = am.Document(bytes.fromhex(insp.core.node_id) + b"\x04" * 8)
    with doc.transaction() as tx:
        tx.put(am.ROOT, key, am.ScalarType.Bytes, raw)
    changes = [c.bytes for c in doc.get_changes([])]
    link.a.receive_data(link.b.conn.send(Push(shard, b"\x00" * 8, tuple(changes))))
    assert not link.a.closed
    assert term.entries() == before and sid not in term.sale_ids()
    assert shard not in term.core.ledger.docs and not term.core.store.parked()  # not even held for later


class _Links:
    """Status gossip reduced to what forwarding reads: who each node says it is linked to."""

    def __init__(self, links: dict[str, frozenset[str]]) -> None:
        self.links = links

    def known(self) -> list[bytes]:
        return []

    def received(self, raw: bytes, session) -> None:  # type: ignore[no-untyped-def]
        pass

    def links_of(self, node_id: str) -> frozenset[str]:
        return self.links.get(node_id, frozenset())


def test_no_push_to_a_neighbour_of_the_peer_it_came_from(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    """A-B, A-C, B-C: a sale of A reaches B and C from A; B does not send it on to C, which A's
    status says A is linked to. Without that status (stale, or none), B does. (Version-3 links:
    on version 4 the push trees decide, tests/test_push_tree.py.)"""
    a, b, c = _nodes(tmp_path, clock, 3, config=SyncConfig(versions=(1, 2, 3)))
    ids = [n.core.node_id for n in (a, b, c)]
    net = MemNetwork()
    ab, ac, bc = (net.connect(x.replicator, y.replicator) for x, y in ((a, b), (a, c), (b, c)))
    net.pump()
    for trusted in (True, False):
        links = {ids[0]: frozenset(ids[1:])} if trusted else {}
        for node in (a, b, c):
            node.replicator.gossip = _Links(links)
        before = bc.bytes_ab
        sid = a.core.sell(100)["id"]
        ab.deliver()  # A's pushes reach B first
        net.pump()
        assert sid in c.sale_ids()
        assert (bc.bytes_ab == before) is trusted
        assert_identical([a, b, c])


def test_status_is_not_relayed_to_the_neighbours_of_the_peer_it_came_from(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    a, b, c, d = _nodes(tmp_path, clock, 4)
    net = MemNetwork()
    ab = net.connect(a.replicator, b.replicator)
    for other in (c, d):
        net.connect(b.replicator, other.replicator)
    net.pump()
    from_a = ab.b  # B's end of the link to A
    b.replicator.gossip = _Links({a.core.node_id: frozenset({b.core.node_id, c.core.node_id})})
    assert b.replicator.broadcast_status(b"{}", exclude=from_a) == 1  # D only: A sent it to C itself
    b.replicator.gossip = _Links({})
    assert b.replicator.broadcast_status(b"{}", exclude=from_a) == 2
