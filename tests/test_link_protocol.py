"""The sans-IO link protocol: two ends joined in memory, time injected."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpos.domain.errors import ProtocolError
from meshpos.wire.link_frames import FrameType, encode_frame
from meshpos.wire.link import (Closed, Goodbye, Have, Hello, LinkConnection, LinkState, LinkUp, Ping, Pong,
                                   Push, Sync, Timeouts)

SITE = "a" * 16
SHARD = "0123456789abcdef/000000"
T = Timeouts(hello=10, idle=45, keepalive=15, frame=60)


def hello(node: str, versions: tuple[int, ...] = (1,), site: str = SITE, role: str = "terminal") -> Hello:
    return Hello(versions, site, node, role, {SHARD: bytes(8)})


def pair(a_hello: Hello | None = None, b_hello: Hello | None = None) -> tuple[LinkConnection, LinkConnection]:
    a = LinkConnection(a_hello or hello("1" * 16), 0.0, timeouts=T)
    b = LinkConnection(b_hello or hello("2" * 16), 0.0, timeouts=T)
    ha, hb = a.start(), b.start()
    b.receive_data(ha, 0.0)
    a.receive_data(hb, 0.0)
    return a, b


def closed(conn: LinkConnection) -> Closed:
    events = conn.events()
    assert isinstance(events[-1], Closed), events
    assert conn.state is LinkState.CLOSED
    return events[-1]


def test_hello_opens_both_ends_and_messages_flow() -> None:
    a, b = pair()
    ea, eb = a.events(), b.events()
    assert isinstance(ea[0], LinkUp) and ea[0].peer.node_id == "2" * 16 and ea[0].version == 1
    assert isinstance(eb[0], LinkUp) and eb[0].peer.summary == {SHARD: bytes(8)}
    b.receive_data(a.send(Sync(SHARD, b"\x42\x01")) + a.send(Have({SHARD: bytes(8)})), 1.0)
    assert b.events() == [Sync(SHARD, b"\x42\x01"), Have({SHARD: bytes(8)})]


def test_version_negotiation_picks_highest_common() -> None:
    a, b = pair(hello("1" * 16, (1, 2, 3)), hello("2" * 16, (2, 3, 4)))
    assert a.version == b.version == 3


def test_version_mismatch_closes_with_reason() -> None:
    a, b = pair(hello("1" * 16, (1,)), hello("2" * 16, (2,)))
    reason = closed(a).reason
    assert "no common protocol version" in reason
    bye = a.send(Goodbye(reason))
    assert bye and a.send(Goodbye(reason)) == b""  # only once


@pytest.mark.parametrize("b_hello, reason", [
    (hello("2" * 16, site="b" * 16), "site"),
    (hello("1" * 16), "ourselves"),
])
def test_wrong_peer_is_refused(b_hello: Hello, reason: str) -> None:
    a, _ = pair(hello("1" * 16), b_hello)
    assert reason in closed(a).reason


def test_certificate_node_must_match_hello() -> None:
    a = LinkConnection(hello("1" * 16), 0.0, timeouts=T, expect_node="3" * 16)
    a.start()
    a.receive_data(LinkConnection(hello("2" * 16), 0.0).start(), 0.0)
    assert "certificate" in closed(a).reason


def test_frame_before_hello_is_out_of_order() -> None:
    a = LinkConnection(hello("1" * 16), 0.0, timeouts=T)
    a.start()
    a.receive_data(encode_frame(FrameType.PING, bytes(8)), 0.0)
    c = closed(a)
    assert "before HELLO" in c.reason and c.error


def test_second_hello_and_unsolicited_pong_close() -> None:
    a, b = pair()
    a.events()
    a.receive_data(LinkConnection(hello("2" * 16), 0.0).start(), 1.0)
    assert "second HELLO" in closed(a).reason
    a, b = pair()
    a.events()
    a.receive_data(encode_frame(FrameType.PONG, bytes(8)), 1.0)
    assert "answers no PING" in closed(a).reason


def test_sending_before_open_is_a_local_error() -> None:
    a = LinkConnection(hello("1" * 16), 0.0, timeouts=T)
    a.start()
    with pytest.raises(ProtocolError):
        a.send(Sync(SHARD, b"x"))


@pytest.mark.parametrize("data, reason", [
    (b"\x00\x00\x00\x01\x63x", "unknown frame type"),
    ((5 * 1024 * 1024).to_bytes(4, "big") + b"\x03", "exceeds"),
    (encode_frame(FrameType.SYNC, b"\x03abc\x01"), "bad shard name"),
    (encode_frame(FrameType.HAVE, b'{"shards": {}}'), "canonical"),
    (encode_frame(FrameType.PING, b"\x01"), "PING payload"),
    (encode_frame(FrameType.SYNC, bytes([len(SHARD)]) + SHARD.encode()), "no data"),
])
def test_garbage_closes_with_reason(data: bytes, reason: str) -> None:
    a, _ = pair()
    a.events()
    a.receive_data(data, 1.0)
    c = closed(a)
    assert reason in c.reason and c.error
    a.receive_data(encode_frame(FrameType.PING, bytes(8)), 2.0)  # ignored after close
    assert a.events() == []


def test_hello_timeout() -> None:
    a = LinkConnection(hello("1" * 16), 100.0, timeouts=T)
    a.start()
    assert a.tick(105.0) == b"" and a.events() == []
    assert a.next_deadline() == pytest.approx(110.0, abs=0.01)
    a.tick(110.5)
    assert "no HELLO within 10s" in closed(a).reason


def test_keepalive_ping_pong_rtt_and_idle_timeout() -> None:
    a, b = pair()
    a.events(), b.events()
    assert a.tick(14.0) == b""
    ping = a.tick(15.0)
    assert ping and a.tick(16.0) == b""  # one PING outstanding at a time
    b.receive_data(ping, 15.2)
    (ev,) = b.events()
    assert isinstance(ev, Ping)
    a.receive_data(b.send(Pong(ev.nonce)), 15.5)
    (pong,) = a.events()
    assert isinstance(pong, Pong) and pong.rtt == pytest.approx(0.5) and a.rtt == pytest.approx(0.5)
    a.tick(30.0)
    assert a.state is LinkState.OPEN
    a.tick(15.5 + 45.1)
    assert "nothing received for 45s" in closed(a).reason


def test_stall_mid_frame_times_out_even_if_bytes_trickle() -> None:
    a, _ = pair()
    a.events()
    frame = encode_frame(FrameType.SYNC, bytes([len(SHARD)]) + SHARD.encode() + bytes(100))
    for i in range(40):  # one byte every 2 s keeps the idle timer happy but not the frame timer
        a.receive_data(frame[i:i + 1], 1.0 + 2 * i)
        a.tick(1.0 + 2 * i)
        if a.state is LinkState.CLOSED:
            break
    assert "mid-frame" in closed(a).reason


def test_truncated_frame_then_eof() -> None:
    a, _ = pair()
    a.events()
    a.receive_data(encode_frame(FrameType.GOODBYE, b"bye")[:6], 1.0)
    assert a.events() == []
    a.receive_data(b"", 2.0)
    c = closed(a)
    assert "mid-frame" in c.reason and c.by_peer


def test_goodbye_from_peer() -> None:
    a, b = pair()
    a.events()
    a.receive_data(b.send(Goodbye("maintenance")), 1.0)
    c = closed(a)
    assert c.reason == "maintenance" and c.by_peer and not c.error
    assert a.send(Goodbye("x")) == b""


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 30))
def test_random_bytes_after_hello_never_escape(data: bytes, step: int) -> None:
    a, _ = pair()
    a.events()
    for i in range(0, len(data), step):
        a.receive_data(data[i:i + step], 1.0)
        for _ in a.events():
            pass
    a.tick(1000.0)
    assert a.state in (LinkState.OPEN, LinkState.CLOSED)
    if a.state is LinkState.OPEN:
        a.tick(1e6)
    assert a.state is LinkState.CLOSED


def test_push_needs_a_version_3_link() -> None:
    a, b = pair(hello("1" * 16, (1, 2, 3)), hello("2" * 16, (1, 2, 3)))
    a.events(), b.events()
    push = Push(SHARD, bytes(8), (b"\x85\x6f\x4a\x83",))
    b.receive_data(a.send(push), 1.0)
    assert b.events() == [push]
    old_a, old_b = pair(hello("1" * 16, (1, 2)), hello("2" * 16, (1, 2, 3)))
    with pytest.raises(ProtocolError, match="version-2"):
        old_a.send(push)
    old_b.events()
    old_b.receive_data(encode_frame(FrameType.PUSH, bytes([len(SHARD)]) + SHARD.encode() + bytes(8)
                                    + b"\x00\x00\x00\x01\x01"), 1.0)
    assert "PUSH on a version-2 link" in closed(old_b).reason


@pytest.mark.parametrize("body, reason", [
    (b"", "no data"),
    (bytes(8), "no change"),
    (bytes(8) + b"\x00\x00", "no change"),
    (bytes(8) + b"\x00\x00\x00\x00\x01", "zero or runs past"),
    (bytes(8) + b"\x00\x00\x00\x05\x01", "zero or runs past"),
    (bytes(8) + b"\x00\x00\x00\x01\x01\x00\x00", "truncated"),
])
def test_malformed_push_closes_with_reason(body: bytes, reason: str) -> None:
    a, b = pair(hello("1" * 16, (3,)), hello("2" * 16, (3,)))
    b.events()
    b.receive_data(encode_frame(FrameType.PUSH, bytes([len(SHARD)]) + SHARD.encode() + body), 1.0)
    assert reason in closed(b).reason
