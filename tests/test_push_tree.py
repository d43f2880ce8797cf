"""Push trees (link protocol version 4, protocols/link.md "Push trees"): the eager/lazy state
machine alone (sans-IO, time passed in), its frames, and nodes joined in memory by real
SyncSessions whose clock the test moves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import automerge.core as am
import pytest

from meshpos.domain.errors import ProtocolError
from meshpos.infra.clock import FakeClock
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock
from meshpos.replication.memnet import MemLink, MemNetwork
from meshpos.replication.planner import ring_targets
from meshpos.replication.pushtree import (ANNOUNCE_DELAY, GRAFT_TIMEOUT, ORIGIN_LIMIT, GraftDue, PushTree,
                                         change_hash, origin_of)
from meshpos.replication.sync import SyncConfig, SyncSession
from meshpos.wire import link as lp
from meshpos.wire.link import MAX_ORIGINS
from meshpos.wire.link_frames import FrameDecoder, FrameType

H1, H2, H3 = (bytes([i]) * 32 for i in (1, 2, 3))
O = "a" * 16


# -- the state machine ---------------------------------------------------------------------

def test_links_start_eager_and_a_duplicate_asks_for_a_prune_once() -> None:
    tree: PushTree[str] = PushTree()
    assert tree.eager("x", O)
    assert tree.pushed("x", O, new=True) is False  # news: nothing to say
    assert tree.pushed("x", O, new=False) is True  # a duplicate: answer with PRUNE
    assert tree.pushed("x", O, new=False) is False  # asked already: no second PRUNE
    assert tree.pushed("x", "b" * 16, new=False) is True and tree.pushed("y", O, new=False) is True
    assert tree.eager("x", O)  # what we push on x is the peer's to decide, by its own PRUNE


def test_prune_and_graft_frames_received_switch_the_link() -> None:
    tree: PushTree[str] = PushTree()
    tree.prune("x", O)
    assert not tree.eager("x", O)
    tree.graft("x", O)
    assert tree.eager("x", O)



def test_prunes_of_made_up_origins_are_bounded_per_link(tmp_path: Path) -> None:
    """Red team: every PRUNE origin a peer named went into a set of its link, whether any such
    node existed or not: a peer sending well-formed PRUNEs of made-up node ids (256 a frame, as
    many frames as it liked) grew the node's memory without bound. Past ORIGIN_LIMIT per link
    they are ignored, and the link stays eager for them."""
    tree: PushTree[str] = PushTree(origin_limit=3)
    for i in range(5):
        tree.prune("x", f"{i:016x}")
    assert [tree.eager("x", f"{i:016x}") for i in range(5)] == [False] * 3 + [True] * 2
    assert tree.prunes_ignored == 2
    tree.prune("x", f"{0:016x}")  # one it is lazy for already: no change, nothing ignored
    tree.graft("x", f"{1:016x}")
    tree.prune("x", f"{4:016x}")  # a graft made room
    assert not tree.eager("x", f"{4:016x}") and tree.prunes_ignored == 2 and tree.eager("y", f"{0:016x}")
    clock = wall_clock()
    a, b = _nodes(tmp_path, clock, 2)
    net = MemNetwork()
    link = net.connect(a.replicator, b.replicator)
    _settle(net, clock, 1.0)  # the link opens (version 4)
    sa = _session(link, a)
    made_up = [f"{i:016x}" for i in range(ORIGIN_LIMIT + 2 * MAX_ORIGINS)]
    sa.receive_data(b"".join(lp.encode_event(lp.Prune(tuple(made_up[k:k + MAX_ORIGINS])))
                             for k in range(0, len(made_up), MAX_ORIGINS)))
    assert not sa.closed
    assert sum(not a.replicator.tree.eager(sa, o) for o in made_up) == ORIGIN_LIMIT
    assert a.replicator.tree.prunes_ignored == 2 * MAX_ORIGINS

def test_an_announced_change_that_arrives_in_time_is_not_pulled() -> None:
    tree: PushTree[str] = PushTree(graft_timeout=1.0)
    tree.announced("x", f"{O}/000000", [H1], now=10.0)
    assert tree.next_deadline() == 11.0
    assert tree.due(10.9) == []
    tree.saw([H1])  # pushed by the tree meanwhile
    assert tree.due(11.5) == [] and tree.next_deadline() == float("inf")


def test_an_announced_change_that_does_not_arrive_grafts_each_announcer_in_turn() -> None:
    tree: PushTree[str] = PushTree(graft_timeout=1.0)
    shard = f"{O}/000000"
    assert tree.pushed("x", O, new=False)  # we had asked x's peer for announcements only
    tree.announced("x", shard, [H1, H2], now=0.0)
    tree.announced("y", shard, [H1], now=0.4)
    assert tree.due(0.99) == []
    assert tree.due(1.0) == [GraftDue("x", shard)]  # one pull per link and shard, for both hashes
    assert tree.due(1.5) == []
    assert tree.due(2.0) == [GraftDue("y", shard)]  # H1 still missing: the next announcer
    assert tree.due(3.0) == []  # nobody else announced it: given up (SUMMARY repairs it)
    assert tree.wanted == 0 and tree.grafts == 2
    assert tree.pushed("x", O, new=False) is True  # grafted: a later duplicate prunes it again


def test_seen_changes_are_not_wanted_and_old_ones_are_forgotten() -> None:
    tree: PushTree[str] = PushTree(seen_limit=2)
    tree.saw([H1, H2])
    tree.announced("x", f"{O}/000000", [H1, H2], now=0.0)
    assert tree.wanted == 0
    tree.saw([H3])  # H1 drops out
    assert not tree.seen(H1) and tree.seen(H2) and tree.seen(H3)


def test_announcements_past_the_bound_are_ignored() -> None:
    """A peer announcing made-up hashes by the thousand costs bounded memory and pulls."""
    tree: PushTree[str] = PushTree(graft_timeout=1.0, wanted_limit=3)
    tree.announced("x", f"{O}/000000", [bytes([i]) * 32 for i in range(10)], now=0.0)
    assert tree.wanted == 3 and tree.ignored == 7
    assert tree.due(1.0) == [GraftDue("x", f"{O}/000000")]
    assert tree.due(2.0) == [] and tree.wanted == 0  # given up: room again
    tree.announced("x", f"{O}/000000", [H1], now=2.0)
    assert tree.wanted == 1



def test_a_timer_costs_what_is_due_not_what_is_awaited() -> None:
    """Red team: due() scanned every awaited hash whenever one timer was due, so a peer announcing
    made-up hashes spread over time (16,384 awaited, one falling due every 30 us) made every turn
    of the node's loop scan 16,384 entries: the loop saturated (tools/bench_pushtree_flood.py)."""
    tree: PushTree[str] = PushTree()
    n = tree.wanted_limit
    hashes = [i.to_bytes(32, "big") for i in range(n)]
    for i, h in enumerate(hashes):
        tree.announced("evil", f"{O}/000000", [h], now=i * (GRAFT_TIMEOUT / n))
    tree.saw(hashes[1:101])  # a hundred came after all: their timers are stale now
    assert tree.next_deadline() == GRAFT_TIMEOUT
    assert tree.due(GRAFT_TIMEOUT) == [GraftDue("evil", f"{O}/000000")]
    assert tree.timers_run == 1  # one timer due: one looked at, not 16,384
    tree.due(GRAFT_TIMEOUT + 101 * (GRAFT_TIMEOUT / n))
    assert tree.timers_run == 102 and tree.wanted == n - 100  # the 100 stale ones cost one look each
    assert tree.next_deadline() == GRAFT_TIMEOUT + 102 * (GRAFT_TIMEOUT / n)
    tree.due(2 * GRAFT_TIMEOUT + 101 * (GRAFT_TIMEOUT / n))  # every timer due: the two grafted ones end
    assert tree.wanted == n - 102  # nobody else announced them: forgotten after their one try

def test_a_closed_link_is_forgotten() -> None:
    tree: PushTree[str] = PushTree(graft_timeout=1.0)
    tree.prune("x", O)
    tree.pushed("x", O, new=False)
    tree.announced("x", f"{O}/000000", [H1], now=0.0)
    tree.drop_link("x")
    assert tree.eager("x", O) and tree.pushed("x", O, new=False) is True
    assert tree.due(5.0) == [] and tree.wanted == 0


def test_a_closed_link_that_was_the_last_eager_way_in_is_mended_on_another_link() -> None:
    """Every other open link was pruned for O: the closed link was this node's only eager way in
    for O, so O is grafted at once on all of the others (and counted eager there again here: the
    peer of one of them may get O only through this node); an origin some other link still
    brings eagerly, or one the closed link was pruned for too, needs nothing."""
    P = "b" * 16
    Q = "c" * 16
    tree: PushTree[str] = PushTree()
    for link in ("y", "z"):
        for origin in (O, P):
            assert tree.pushed(link, origin, new=False)  # duplicates: both pruned for O and P
    assert tree.pushed("x", Q, new=False) and tree.pushed("y", Q, new=False)  # Q: x and y pruned, z eager
    mend = tree.drop_link("x", ["x", "y", "z"])
    assert sorted(mend) == [("y", O), ("y", P), ("z", O), ("z", P)]  # not Q: z still brings it
    assert tree.mended == 4
    for link, origin in mend:  # a later duplicate there may be pruned again
        assert tree.pushed(link, origin, new=False)
    assert tree.drop_link("y", ["z"]) == []  # z was never pruned for Q: eager for it
    assert PushTree[str]().drop_link("x", []) == []  # no other link: nothing to graft on


def test_change_hash_is_automerges_own() -> None:
    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "k", am.ScalarType.Str, "v")
    (change,) = doc.get_changes([])
    assert change_hash(change.bytes) == doc.get_heads()[0]
    assert origin_of(f"{O}/000003") == O


# -- frames --------------------------------------------------------------------------------

def test_tree_frames_round_trip() -> None:
    shard = f"{O}/000001"
    for event in (lp.Ihave(((shard, (H1, H2)), (f"{'b' * 16}/000000", (H3,)))),
                  lp.Prune((O, "b" * 16)), lp.Graft((O,))):
        dec = FrameDecoder()
        dec.receive_data(lp.encode_event(event))
        frame = dec.next_frame()
        assert frame is not None and lp.decode_frame(frame) == event


@pytest.mark.parametrize("event", [
    lp.Ihave(()), lp.Ihave(((f"{O}/000001", ()),)), lp.Ihave(((f"{O}/000001", (b"short",)),)),
    lp.Ihave(((f"{O}/000001", (H1,)), (f"{O}/000001", (H2,)))), lp.Prune(()), lp.Graft(("b" * 16, O)),
    lp.Prune(("not a node id",))])
def test_malformed_tree_frames_are_refused_on_send(event: lp.Sendable) -> None:
    with pytest.raises(ProtocolError):
        lp.encode_event(event)


@pytest.mark.parametrize("payload", [
    b"", b"\x17" + f"{O}/000001".encode() + b"\x00\x01" + bytes(31),  # a hash cut short
    b"\x17" + f"{O}/000001".encode() + b"\x00\x00",  # no hash
    b'{"origins":["bbbbbbbbbbbbbbbb","aaaaaaaaaaaaaaaa"]}'])
def test_malformed_tree_payloads_close_the_link(payload: bytes) -> None:
    a, _ = _pair((1, 2, 3, 4), (1, 2, 3, 4))
    frame_type = FrameType.PRUNE if payload.startswith(b"{") else FrameType.IHAVE
    a.receive_data(len(payload).to_bytes(4, "big") + bytes([frame_type]) + payload, 1.0)
    assert a.closed and "bad" in (a.close_reason or "")


def test_tree_frames_are_refused_below_version_4() -> None:
    a, b = _pair((1, 2, 3, 4), (1, 2, 3))
    assert a.version == b.version == 3
    with pytest.raises(ProtocolError):
        a.send(lp.Prune((O,)))
    payload = lp.encode_event(lp.Graft((O,)))
    b.receive_data(payload, 1.0)
    assert b.closed and "version-3" in (b.close_reason or "")


def _pair(va: tuple[int, ...], vb: tuple[int, ...]) -> tuple[lp.LinkConnection, lp.LinkConnection]:
    ha = lp.Hello(va, "0" * 16, "1" * 16, "terminal")
    hb = lp.Hello(vb, "0" * 16, "2" * 16, "terminal")
    a, b = lp.LinkConnection(ha, 0.0), lp.LinkConnection(hb, 0.0)
    a.receive_data(b.start(), 0.0)
    b.receive_data(a.start(), 0.0)
    a.events(), b.events()
    return a, b


# -- nodes in memory -------------------------------------------------------------------------

def _nodes(tmp_path: Path, clock: FakeClock, n: int, versions: list[tuple[int, ...]] | None = None) -> list[SimNode]:
    site = make_site(tmp_path / "site")
    versions = versions or [lp.SUPPORTED_VERSIONS] * n
    return [SimNode.open(enroll(site, tmp_path / f"n{i}", f"t{i}"), clock, SyncConfig(versions=versions[i]))
            for i in range(n)]


def _settle(net: MemNetwork, clock: FakeClock, seconds: float = 3.0, step: float = 0.05) -> None:
    """Let time pass: every session's timers run (announcements, grafts), bytes move."""
    net.pump()
    for _ in range(int(seconds / step)):
        clock.advance(step)
        for link in list(net.links):
            for s in (link.a, link.b):
                if not s.closed and s.next_deadline() <= clock.monotonic():
                    s.tick()
        net.pump()


def _session(link: MemLink, node: SimNode) -> SyncSession:
    return link.a if link.a.replicator is node.replicator else link.b


def _pushed(node: SimNode) -> tuple[int, int]:
    """Changes received in PUSH frames by ``node``, and of those, the ones it held already."""
    health = node.replicator.health()
    return sum(h.changes_pushed_in for h in health), sum(h.changes_pushed_dup for h in health)


def _frames(link: MemLink, tap: list[tuple[SyncSession, FrameType]]) -> None:
    """Record the type of every frame each end of ``link`` writes."""
    for s in (link.a, link.b):
        send = s.data_to_send

        def record(budget: int | None = None, s: SyncSession = s, send=send) -> bytes:  # type: ignore[no-untyped-def]
            data = send(budget)
            dec = FrameDecoder()
            dec.receive_data(data)
            while (frame := dec.next_frame()) is not None:
                tap.append((s, frame.type))
            return data

        s.data_to_send = record  # type: ignore[method-assign]


def test_a_triangle_prunes_to_one_copy_per_sale(tmp_path: Path) -> None:
    """A-B, A-C, B-C: A's first sale reaches C twice (from A, and from B which has no tree yet);
    C prunes one of them for A's shards, and every later sale of A arrives at C once, the other
    link carrying only IHAVE announcements."""
    clock = wall_clock()
    a, b, c = _nodes(tmp_path, clock, 3)
    net = MemNetwork()
    ab, ac, bc = (net.connect(x.replicator, y.replicator) for x, y in ((a, b), (a, c), (b, c)))
    _settle(net, clock, 1.0)
    a.core.sell(100)
    _settle(net, clock)
    pushed0, dup0 = _pushed(c)
    assert dup0 >= 1  # the first sale came twice and pruned a link
    tap: list[tuple[SyncSession, FrameType]] = []
    for link in (ab, ac, bc):
        _frames(link, tap)
    sold = []
    for i in range(10):
        sold.append(a.core.sell(200 + i)["id"])
        _settle(net, clock, 0.2)
    assert set(sold) <= c.sale_ids() and set(sold) <= b.sale_ids()
    pushed, dup = _pushed(c)
    assert (pushed - pushed0, dup - dup0) == (10, 0)  # once each, no copy
    to_c = [t for s, t in tap if s in (_session(ac, a), _session(bc, b))]
    assert to_c.count(FrameType.PUSH) == 10 and FrameType.IHAVE in to_c
    assert FrameType.GRAFT not in [t for _, t in tap]  # nothing was missing: no pull
    assert a.entries() == b.entries() == c.entries()


@dataclass
class _Triangle:
    """A-B, A-C, B-C after A's first sales: C takes A's sales from one link (``eager``)."""
    clock: FakeClock
    net: MemNetwork
    a: SimNode
    b: SimNode
    c: SimNode
    ab: MemLink
    ac: MemLink
    bc: MemLink
    eager: MemLink

    @classmethod
    def formed(cls, tmp_path: Path) -> "_Triangle":
        clock = wall_clock()
        a, b, c = _nodes(tmp_path, clock, 3)
        net = MemNetwork()
        ab, ac, bc = (net.connect(x.replicator, y.replicator) for x, y in ((a, b), (a, c), (b, c)))
        _settle(net, clock, 1.0)
        for i in range(3):
            a.core.sell(100 + i)
            _settle(net, clock)
        eager = [link for link, peer in ((ac, a), (bc, b))
                 if peer.replicator.tree.eager(_session(link, peer), a.core.node_id)]
        assert len(eager) == 1  # a tree: one link pushes A's sales to C, the other announces them
        return cls(clock, net, a, b, c, ab, ac, bc, eager[0])


def test_a_change_announced_but_not_pushed_is_pulled_by_graft(tmp_path: Path) -> None:
    """Once C takes A's sales from one link only, the PUSH of a sale on that link is lost: the
    IHAVE on the other link makes C pull the sale from its announcer after the graft timeout,
    and that link is eager for A from then on."""
    t = _Triangle.formed(tmp_path)
    clock, net, a, b, c, ab, ac, bc, eager = t.clock, t.net, t.a, t.b, t.c, t.ab, t.ac, t.bc, t.eager
    origin = a.core.node_id
    lazy = bc if eager is ac else ac
    lazy_peer = b if lazy is bc else a
    sender = _session(eager, a if eager is ac else b)
    lost = a.core.sell(300)["id"]
    if eager is bc:
        ab.deliver()  # A's push reaches B, which pushes it on to C
    assert any(f == FrameType.PUSH for f in _types(sender.data_to_send()))  # ... and that PUSH is lost
    net.pump()
    assert lost not in c.sale_ids()
    clock.advance(ANNOUNCE_DELAY)
    _settle(net, clock, 0.2)  # the IHAVE arrives
    assert lost not in c.sale_ids()
    _settle(net, clock, GRAFT_TIMEOUT + 0.5)
    assert lost in c.sale_ids()
    assert c.replicator.tree.grafts >= 1
    assert lazy_peer.replicator.tree.eager(_session(lazy, lazy_peer), origin)  # the GRAFT reached it
    assert a.entries() == b.entries() == c.entries()


def _types(data: bytes) -> list[FrameType]:
    dec = FrameDecoder()
    dec.receive_data(data)
    out = []
    while (frame := dec.next_frame()) is not None:
        out.append(frame.type)
    return out


def test_a_version_3_node_in_the_mesh_gets_every_push(tmp_path: Path) -> None:
    """B speaks versions 1-3 only: its links run version 3 (no tree frames ever reach it, which
    would close them) and it still receives and relays every sale."""
    clock = wall_clock()
    a, b, c = _nodes(tmp_path, clock, 3, versions=[lp.SUPPORTED_VERSIONS, (1, 2, 3), lp.SUPPORTED_VERSIONS])
    net = MemNetwork()
    links = [net.connect(x.replicator, y.replicator) for x, y in ((a, b), (a, c), (b, c))]
    _settle(net, clock, 1.0)
    assert [link.a.version for link in links] == [3, lp.SUPPORTED_VERSIONS[-1], 3]
    sold = []
    for i in range(6):
        sold.append((a, b, c)[i % 3].core.sell(100 + i)["id"])
        _settle(net, clock, 1.0)
    assert all(not link.a.closed and not link.b.closed for link in links)
    for node in (a, b, c):
        assert set(sold) <= node.sale_ids()
    assert a.entries() == b.entries() == c.entries()


def test_a_ring_planner_mesh_gets_each_sale_about_once(tmp_path: Path) -> None:
    """8 nodes linked as the planner links them, each selling in turn: once the trees have
    formed (a few sales of each origin), the changes a node receives in PUSH frames are about one
    per sale; version 3 brought most sales over every link but one."""
    clock = wall_clock()
    nodes = _nodes(tmp_path, clock, 8)
    ids = {n.core.node_id: n for n in nodes}
    net = MemNetwork()
    pairs = {frozenset((me, peer)) for me in ids for peer in ring_targets(me, set(ids))}
    for pair in sorted(sorted(p) for p in pairs):
        net.connect(ids[pair[0]].replicator, ids[pair[1]].replicator)
    _settle(net, clock, 1.0)
    for rnd in range(4):  # warm-up: the trees form
        for node in nodes:
            node.core.sell(100 + rnd)
            _settle(net, clock, 0.5)
    before = [_pushed(n) for n in nodes]
    sold = []
    for rnd in range(3):
        for node in nodes:
            sold.append(node.core.sell(200 + rnd)["id"])
            _settle(net, clock, 0.5)
    _settle(net, clock, 3.0)
    for node in nodes:
        assert set(sold) <= node.sale_ids()
    received = sum(_pushed(n)[0] - b[0] for n, b in zip(nodes, before))
    per_sale_per_node = received / len(sold) / (len(nodes) - 1)  # the seller receives none
    assert per_sale_per_node <= 1.1
    assert all(n.entries() == nodes[0].entries() for n in nodes)


def test_announcements_wait_for_their_delay_even_while_pushes_flow(tmp_path: Path) -> None:
    """All three sell; a link that pushes one origin's sales and announces another's writes
    one IHAVE per ANNOUNCE_DELAY, not one along with every PUSH (each costs a frame to build,
    parse and look up at the receiver), and every sale still reaches every node."""
    clock = wall_clock()
    a, b, c = _nodes(tmp_path, clock, 3)
    net = MemNetwork()
    ab, ac, bc = (net.connect(x.replicator, y.replicator) for x, y in ((a, b), (a, c), (b, c)))
    _settle(net, clock, 1.0)
    for i in range(3):  # the trees form
        for k, node in enumerate((a, b, c)):
            node.core.sell(100 + 10 * k + i)
            _settle(net, clock)
    tap: list[tuple[SyncSession, FrameType]] = []
    for link in (ab, ac, bc):
        _frames(link, tap)
    sold = []
    seconds, step = 2 * ANNOUNCE_DELAY, 0.05
    for i in range(int(seconds / step)):
        sold.append((a, b, c)[i % 3].core.sell(200 + i)["id"])
        _settle(net, clock, step, step)
    _settle(net, clock, ANNOUNCE_DELAY + 0.5)
    writers = {s for s, _ in tap}
    pushes = {s: sum(1 for w, t in tap if w is s and t == FrameType.PUSH) for s in writers}
    ihaves = {s: sum(1 for w, t in tap if w is s and t == FrameType.IHAVE) for s in writers}
    mixed = [s for s in writers if pushes[s] >= 10 and ihaves[s] >= 1]
    print([(s.replicator.node_id[:4], s.label[:4], pushes[s], ihaves[s]) for s in writers])
    assert mixed  # some link pushes one origin and announces the other
    for s in writers:
        assert ihaves[s] <= seconds / ANNOUNCE_DELAY + 2, [(pushes[w], ihaves[w]) for w in writers]
    assert FrameType.GRAFT not in [t for _, t in tap]
    for node in (a, b, c):
        assert set(sold) <= node.sale_ids()
    assert a.entries() == b.entries() == c.entries()


def test_a_node_whose_eager_link_closes_grafts_at_once_and_misses_no_push(tmp_path: Path) -> None:
    """A triangle whose trees have formed: C takes A's sales from one link, the other is pruned.
    That link closes (the planner closing a surplus link, a peer gone). C grafts A's origin on
    its remaining link at once, so A's next sale reaches C in a PUSH well before any
    announcement could (ANNOUNCE_DELAY) and without a pull. Before, it came only by IHAVE and
    graft, ANNOUNCE_DELAY + GRAFT_TIMEOUT later, on every node whose eager link had closed."""
    t = _Triangle.formed(tmp_path)
    clock, net, a, b, c, ac, bc, closing = t.clock, t.net, t.a, t.b, t.c, t.ac, t.bc, t.eager
    origin = a.core.node_id
    remaining, remaining_peer = (bc, b) if closing is ac else (ac, a)
    assert not remaining_peer.replicator.tree.eager(_session(remaining, remaining_peer), origin)
    closing.cut()
    net.pump()
    assert c.replicator.tree.mended == 1
    assert remaining_peer.replicator.tree.eager(_session(remaining, remaining_peer), origin)  # the GRAFT arrived
    grafts = c.replicator.tree.grafts
    pushed0, _ = _pushed(c)
    sale = a.core.sell(400)["id"]
    _settle(net, clock, ANNOUNCE_DELAY / 4)
    assert sale in c.sale_ids()
    assert _pushed(c)[0] > pushed0 and c.replicator.tree.grafts == grafts  # pushed, not pulled
    assert a.entries() == b.entries() == c.entries()


def test_a_compressed_change_is_named_by_the_hash_of_the_chunk_as_pushed() -> None:
    """protocols/link.md: a change hash is SHA-256 of the chunk as carried in PUSH. A sale's change
    is carried compressed (type 2), and its hash is not Automerge's own head hash."""
    import hashlib

    import automerge.core as am

    from meshpos.replication.pushtree import change_hash

    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "sale", am.ScalarType.Bytes, b"x" * 400)
    change = doc.get_changes([])[0]
    pushed, raw = change.bytes, change.raw_bytes
    assert pushed[8] == 2 and raw[8] == 1  # carried compressed; Automerge hashes the raw form
    assert change_hash(pushed) == hashlib.sha256(pushed[8:]).digest() != bytes(change.hash)
    assert change_hash(raw) == bytes(change.hash)
