"""Draining a link (link protocol version 5, protocols/link.md "Draining a link"): the end that
closes a link it no longer needs (the planner's surplus links) says DRAIN first, both ends graft
elsewhere what the link brought them eagerly, the peer answers DRAIN, and the link closes with
nothing in flight. The state machine alone, the push tree alone, nodes joined in memory by real
SyncSessions, and two nodes over real TLS on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from meshpos.domain.errors import ProtocolError
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock
from meshpos.replication.link_driver import connect_link
from meshpos.replication.memnet import MemLink, MemNetwork
from meshpos.replication.pushtree import ANNOUNCE_DELAY, PushTree
from meshpos.replication.sync import SyncSession
from meshpos.wire import link as lp
from meshpos.wire.link_frames import FrameType, encode_frame

from test_push_tree import _frames, _nodes, _pushed, _session, _settle, _Triangle
from test_tls import FAST, endpoint, serve, wait_for

SITE = "a" * 16
SHARD = "0123456789abcdef/000000"
T = lp.Timeouts(hello=10, idle=45, keepalive=15, frame=60, drain=2)
O, P, Q = "a" * 16, "b" * 16, "c" * 16


def _pair(va: tuple[int, ...] = lp.SUPPORTED_VERSIONS,
          vb: tuple[int, ...] = lp.SUPPORTED_VERSIONS) -> tuple[lp.LinkConnection, lp.LinkConnection]:
    a = lp.LinkConnection(lp.Hello(va, SITE, "1" * 16, "terminal"), 0.0, timeouts=T)
    b = lp.LinkConnection(lp.Hello(vb, SITE, "2" * 16, "terminal"), 0.0, timeouts=T)
    ha, hb = a.start(), b.start()
    b.receive_data(ha, 0.0)
    a.receive_data(hb, 0.0)
    a.events(), b.events()
    return a, b


def _push(i: int) -> lp.Push:
    return lp.Push(SHARD, bytes(8), (bytes([i]) * 10,))


# -- the state machine ---------------------------------------------------------------------

def test_a_drain_is_answered_and_the_first_end_closes_on_the_answer() -> None:
    """A drains: it still pushes until B's answer, but sends nothing else; B takes A's DRAIN
    and the pushes after it, writes its own pushes waiting, answers DRAIN and sends no PUSH
    after that. A closes on the answer (every frame B sent is in): GOODBYE, not an error."""
    a, b = _pair()
    assert a.version == lp.DRAIN_VERSION
    wire = a.drain(1.0, "surplus link")
    assert a.draining and a.may_push and a.drain(1.0) == b""  # once
    wire += a.send(_push(1))  # pushing goes on until the answer
    with pytest.raises(ProtocolError):
        a.send(lp.Sync(SHARD, b"\x42"))
    with pytest.raises(ProtocolError):
        a.send(lp.Status(b"{}"))
    b.receive_data(wire, 1.1)
    assert b.events() == [lp.Drain("surplus link"), _push(1)]
    assert b.draining and b.may_push and not b.closed
    answer = b.send(_push(2)) + b.drain(1.1, "answer")  # what it had waiting, then its DRAIN
    assert not b.may_push
    with pytest.raises(ProtocolError):
        b.send(_push(3))
    answer += b.send(lp.Ping(9))  # keep-alive still allowed
    a.receive_data(answer, 1.2)
    events = a.events()
    assert events[0] == _push(2)
    assert events[1] == lp.Closed("link drained", by_peer=False, error=False) and a.closed
    b.receive_data(a.send(lp.Goodbye("link drained")), 1.3)
    assert b.events() == [lp.Closed("link drained", by_peer=True, error=False)]


def test_a_drain_not_answered_closes_after_the_drain_timeout() -> None:
    """A peer that never answers (or never says GOODBYE after its answer) cannot keep a
    draining link open: each end closes T.drain after its own DRAIN, without an error."""
    a, b = _pair()
    b.receive_data(a.drain(0.0), 0.1)
    b.events()
    b.drain(0.1)
    assert a.tick(T.drain - 0.01) == b"" and not a.closed
    assert a.next_deadline() <= T.drain + 0.01
    a.tick(T.drain)
    closed = a.events()[-1]
    assert isinstance(closed, lp.Closed) and not closed.error and "not answered" in closed.reason
    b.tick(0.1 + T.drain)  # the answering end, its GOODBYE never came
    closed = b.events()[-1]
    assert isinstance(closed, lp.Closed) and not closed.error and "no GOODBYE" in closed.reason


@pytest.mark.parametrize("event", [lp.Sync(SHARD, b"\x42"), lp.Have({SHARD: bytes(8)}), lp.Prune((O,)),
                                   lp.Status(b"{}")], ids=lambda e: type(e).__name__)
def test_frames_the_peer_may_not_send_after_its_drain_close_the_link(event: lp.Sendable) -> None:
    a, b = _pair()
    b.receive_data(a.drain(0.0), 0.0)
    b.events()
    b.receive_data(lp.encode_event(event), 0.1)
    closed = b.events()[-1]
    assert isinstance(closed, lp.Closed) and closed.error and "after the peer's DRAIN" in closed.reason
    a2, b2 = _pair()
    b2.receive_data(a2.drain(0.0) + encode_frame(FrameType.DRAIN, b""), 0.0)  # a second DRAIN
    assert isinstance(b2.events()[-1], lp.Closed) and b2.closed


def test_both_ends_draining_at_once_close_cleanly() -> None:
    a, b = _pair()
    wa, wb = a.drain(0.0), b.drain(0.0)
    a.receive_data(wb, 0.1)
    b.receive_data(wa, 0.1)
    assert a.events() == [lp.Closed("link drained")] and b.events() == [lp.Closed("link drained")]


def test_a_version_4_link_gets_no_drain_frame_and_lingers() -> None:
    """An older peer does not know frame type 14: it ends the link at once on an unknown type
    (protocols/link.md, "Frames"). So DRAIN goes only on version-5 links; on an older one
    ``drain`` sends nothing, pushes go on, and the link closes T.drain later (a GOODBYE that
    peer knows), and a DRAIN that arrives on a version-4 link is a protocol error."""
    a, b = _pair(lp.SUPPORTED_VERSIONS, (1, 2, 3, 4))
    assert a.version == b.version == 4
    assert a.drain(0.0) == b"" and a.draining and a.may_push
    b.receive_data(a.send(_push(1)), 0.1)
    assert b.events() == [_push(1)]
    a.tick(T.drain)
    closed = a.events()[-1]
    assert isinstance(closed, lp.Closed) and not closed.error and "version-4 link" in closed.reason
    b.receive_data(a.send(lp.Goodbye(closed.reason)), T.drain)
    assert b.events() == [lp.Closed(closed.reason, by_peer=True)]
    a, b = _pair(lp.SUPPORTED_VERSIONS, (1, 2, 3, 4))
    b.receive_data(encode_frame(FrameType.DRAIN, b""), 0.0)
    closed = b.events()[-1]
    assert isinstance(closed, lp.Closed) and closed.error and "version-4" in closed.reason


# -- the push tree --------------------------------------------------------------------------

def test_a_draining_link_is_mended_at_once_and_its_grafts_are_not_pruned_until_it_closes() -> None:
    """x is the only eager way in for O and P (y and z pruned for them): when x starts to drain
    they are grafted on y and z at once. Until x has closed, both x and the grafted link bring
    O and P, and the duplicates must not prune the grafted link again (that would leave only
    the link that closes): no PRUNE for them, nor on x itself. x announces nothing any more,
    and is no link to graft on. Once x has closed, duplicates prune as before."""
    tree: PushTree[str] = PushTree()
    for link in ("y", "z"):
        for origin in (O, P):
            assert tree.pushed(link, origin, new=False)
    assert tree.pushed("x", Q, new=False) and tree.pushed("y", Q, new=False)  # Q: z brings it
    mend = tree.drain_link("x", ["x", "y", "z"])
    assert sorted(mend) == [("y", O), ("y", P), ("z", O), ("z", P)] and tree.draining("x")
    assert tree.drain_link("x", ["x", "y", "z"]) == []  # once
    for link, origin in mend:
        assert tree.pushed(link, origin, new=False) is False  # the copy x still brought first
    assert tree.pushed("x", O, new=False) is False
    tree.announced("x", f"{O}/000000", [bytes(32)], now=0.0)
    assert tree.wanted == 0
    R = "d" * 16
    assert tree.pushed("z", R, new=False)  # R: y brings it (x drains: it prunes nothing)
    assert tree.drop_link("y", ["x", "z"]) == [("z", R)]  # y closes while x drains: z, not x
    assert tree.drop_link("x", ["z"]) == []  # mended already
    assert not tree.draining("x")
    assert tree.pushed("z", O, new=False) is True  # x is gone: a duplicate prunes again


# -- nodes in memory --------------------------------------------------------------------------

def _closing_order(t: _Triangle) -> tuple[list[MemLink], list[MemLink], MemLink]:
    """The links that bring A's sale to C over the closing (eager) link, in order; those that
    bring it over the remaining one; and the remaining link."""
    if t.eager is t.ac:
        return [t.ac], [t.ab, t.bc], t.bc
    return [t.ab, t.bc], [t.ac], t.ac


@pytest.mark.parametrize("drainer", ["C", "peer"])
def test_a_sale_in_flight_on_a_draining_link_arrives_and_the_grafted_link_stays_eager(
        tmp_path: Path, drainer: str) -> None:
    """A triangle whose trees have formed: C takes A's sales from one link, the other is pruned.
    One end of the eager link drains it (C, as the planner's dialling end does; or its peer).
    C grafts A's origin on the other link at once; A's next sale, sold while the drain is under
    way, reaches C by PUSH over both links (the draining one still carries what was in flight),
    and the copy that comes second does not prune the grafted link. The draining link then
    closes on the answer, not on the timeout. A's sale after that comes over the grafted link
    in a PUSH at once: no IHAVE, no pull, no PRUNE anywhere on C."""
    t = _Triangle.formed(tmp_path)
    clock, net, a, c = t.clock, t.net, t.a, t.c
    first, second, remaining = _closing_order(t)
    closing = t.eager
    peer = a if closing is t.ac else t.b
    tap: list[tuple[SyncSession, FrameType]] = []
    for link in (t.ab, t.ac, t.bc):
        _frames(link, tap)
    prunes, grafts = c.replicator.tree.prunes, c.replicator.tree.grafts
    drainer_session = _session(closing, c if drainer == "C" else peer)
    assert drainer_session.drain("surplus link")
    if drainer == "C":
        assert c.replicator.tree.mended == 1  # one other link
        remaining.deliver()  # C's GRAFT reaches the remaining link's other end
    sold = a.core.sell(500)["id"]
    for link in first:  # over the draining link first (its DRAIN goes, or arrives, meanwhile)
        link.deliver()
    assert sold in c.sale_ids()
    for link in second:  # ... then the copy over the grafted link: a duplicate
        link.deliver()
    net.pump()
    assert c.replicator.tree.mended == 1 and c.replicator.tree.prunes == prunes
    assert closing.a.closed and closing.b.closed
    assert {closing.a.close_reason, closing.b.close_reason} == {"link drained"}
    far = a if remaining is t.ac else t.b
    assert far.replicator.tree.eager(_session(remaining, far), a.core.node_id)
    pushed0, _ = _pushed(c)
    nxt = a.core.sell(501)["id"]
    _settle(net, clock, ANNOUNCE_DELAY / 4)
    assert nxt in c.sale_ids() and _pushed(c)[0] == pushed0 + 1  # pushed once
    assert c.replicator.tree.grafts == grafts and c.replicator.tree.prunes == prunes
    assert FrameType.DRAIN in [f for _, f in tap]
    drained = [s for s in (closing.a, closing.b)]
    after = [f for s, f in tap if s in drained][[f for s, f in tap if s in drained].index(FrameType.DRAIN):]
    assert set(after) <= {FrameType.PUSH, FrameType.DRAIN, FrameType.GOODBYE}
    assert a.entries() == t.b.entries() == c.entries()


def test_a_version_4_peer_link_is_drained_by_lingering(tmp_path: Path) -> None:
    """C speaks version 5, B only up to 4: C drains its link to B without a DRAIN frame (B
    would end the link at once on the unknown type), grafts at once, takes what B pushes
    meanwhile, and closes after the drain timeout with a GOODBYE that B knows."""
    clock = wall_clock()
    a, b, c = _nodes(tmp_path, clock, 3, versions=[lp.SUPPORTED_VERSIONS, (1, 2, 3, 4), lp.SUPPORTED_VERSIONS])
    net = MemNetwork()
    ab, ac, bc = (net.connect(x.replicator, y.replicator) for x, y in ((a, b), (a, c), (b, c)))
    _settle(net, clock, 1.0)
    assert bc.a.version == 4
    tap: list[tuple[SyncSession, FrameType]] = []
    _frames(bc, tap)
    sc = _session(bc, c)
    assert sc.drain("surplus link")
    sold = b.core.sell(600)["id"]  # B knows of no drain: it pushes to C as before
    net.pump()
    assert sold in c.sale_ids() and not sc.closed
    _settle(net, clock, T.drain + 0.5)
    assert sc.closed and "version-4 link" in (sc.close_reason or "")
    sb = _session(bc, b)
    assert sb.closed and not any(f == FrameType.DRAIN for _, f in tap)
    assert a.entries() == b.entries() == c.entries()


# -- real TLS on loopback ---------------------------------------------------------------------

@pytest.fixture
def pair_of_nodes(tmp_path: Path) -> Any:
    site = make_site(tmp_path / "site")
    a = SimNode.open(enroll(site, tmp_path / "a", "alpha"), SYSTEM_CLOCK, FAST)
    b = SimNode.open(enroll(site, tmp_path / "b", "bravo"), SYSTEM_CLOCK, FAST)
    yield a, b
    a.close()
    b.close()


async def test_a_drained_tls_link_closes_on_the_answer_with_the_sale_in_flight_delivered(pair_of_nodes: Any) -> None:
    """Two nodes over real TLS 1.3, one link between them. B drains it and A sells at that very
    moment, before A has read the DRAIN: A's PUSH of that sale goes out before its answer, so B
    holds the sale when the link has closed, though no other link could bring it; both ends
    close on the DRAIN handshake (not on the timeout), and B's link task returns that reason."""
    a, b = pair_of_nodes
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, a)
        result: list[str] = []

        async def dial(task_status: trio.TaskStatus[SyncSession | None] = trio.TASK_STATUS_IGNORED) -> None:
            result.append(await connect_link(endpoint(b), "127.0.0.1", port, task_status=task_status))

        sb = await nursery.start(dial)
        assert sb is not None
        await wait_for(lambda: len(a.replicator.sessions) == 1 and sb.version == lp.DRAIN_VERSION
                       and a.replicator.sessions[0].version == lp.DRAIN_VERSION, "link up")
        sa = a.replicator.sessions[0]
        first = a.core.sell(100)["id"]
        await wait_for(lambda: first in b.sale_ids(), "a first sale")
        assert sb.drain("surplus link")
        assert sb.health().state == "draining" and sa.health().state == "open"  # A has not read it yet
        in_flight = a.core.sell(200)["id"]  # A has not read the DRAIN yet: it pushes this sale
        await wait_for(lambda: bool(result), "the link closes")
        assert sa.health().state == sb.health().state == "closed"
        assert sa.closed and sb.closed
        assert result == ["link drained"] and sb.close_reason == "link drained"
        assert sa.close_reason == "link drained"  # B's GOODBYE, after A's answer
        assert in_flight in b.sale_ids()
        assert a.entries() == b.entries()
        nursery.cancel_scope.cancel()


def test_a_draining_link_shows_as_draining_at_both_ends_until_it_closes(tmp_path: Path) -> None:
    """Link health (the node's status, ``meshpos status --json``: peers.links[].state) says
    "draining" from the drain until the link has closed, at the end that drains and, once the
    DRAIN has arrived, at its peer; an open link that does not drain stays "open"."""
    clock = wall_clock()
    a, b, c = _nodes(tmp_path, clock, 3)
    net = MemNetwork()
    ab, ac = net.connect(a.replicator, b.replicator), net.connect(a.replicator, c.replicator)
    _settle(net, clock, 1.0)
    sa, sb = _session(ab, a), _session(ab, b)
    assert {h.state for h in a.replicator.health()} == {"open"}
    assert sa.drain("surplus link")
    assert sa.health().state == "draining" and sb.health().state == "open"
    assert [h.state for h in a.replicator.health() if h.peer_node == c.core.node_id] == ["open"]
    sb.receive_data(sa.data_to_send())  # the DRAIN arrives
    assert sb.health().state == "draining"
    net.pump()
    assert sa.closed and sb.closed and sa.health().state == sb.health().state == "closed"
    assert [h.state for h in a.replicator.health()] == ["open"]  # the closed link is gone
