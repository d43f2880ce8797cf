"""The frame codec against protocols/vectors/link-frames.json, and fuzzed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpos.domain.errors import ProtocolError
from meshpos.wire import link as lp
from meshpos.wire.link_frames import MAX_PAYLOAD, Frame, FrameDecoder, FrameType, encode_frame

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "protocols" / "vectors" / "link-frames.json").read_text())


def test_max_payload_matches_spec() -> None:
    assert VECTORS["max_payload"] == MAX_PAYLOAD


@pytest.mark.parametrize("vec", VECTORS["frames"], ids=lambda v: v["name"])
def test_frame_vectors(vec: dict[str, Any]) -> None:
    payload = bytes.fromhex(vec["payload_hex"])
    assert encode_frame(FrameType(vec["type"]), payload).hex() == vec["frame_hex"]
    dec = FrameDecoder()
    data = bytes.fromhex(vec["frame_hex"])
    for i in range(len(data)):  # one byte at a time: "need more data" until the last byte
        assert dec.next_frame() is None
        dec.receive_data(data[i:i + 1])
    assert dec.next_frame() == Frame(FrameType(vec["type"]), payload)
    assert dec.next_frame() is None and not dec.partial


def _event(desc: dict[str, Any]) -> lp.Sendable:
    kind = desc["kind"]
    digests = lambda m: {k: bytes.fromhex(v) for k, v in m.items()}  # noqa: E731
    if kind == "hello":
        return lp.Hello(tuple(desc["versions"]), desc["site"], desc["node"], desc["role"], digests(desc["summary"]))
    if kind == "summary":
        return lp.Summary(digests(desc["summary"]))
    if kind == "sync":
        return lp.Sync(desc["shard"], bytes.fromhex(desc["data_hex"]))
    if kind == "snapshot":
        return lp.Snapshot(desc["shard"], bytes.fromhex(desc["data_hex"]))
    if kind == "have":
        return lp.Have(digests(desc["shards"]))
    if kind == "push":
        return lp.Push(desc["shard"], bytes.fromhex(desc["digest_hex"]), tuple(bytes.fromhex(c) for c in desc["changes_hex"]))
    if kind == "ihave":
        return lp.Ihave(tuple((shard, tuple(bytes.fromhex(h) for h in hashes)) for shard, hashes in desc["entries"]))
    if kind == "prune":
        return lp.Prune(tuple(desc["origins"]))
    if kind == "graft":
        return lp.Graft(tuple(desc["origins"]))
    if kind == "ping":
        return lp.Ping(desc["nonce"])
    if kind == "pong":
        return lp.Pong(desc["nonce"])
    if kind == "drain":
        return lp.Drain(desc["reason"])
    return lp.Goodbye(desc["reason"])


@pytest.mark.parametrize("vec", VECTORS["events"], ids=lambda v: v["name"])
def test_event_vectors(vec: dict[str, Any]) -> None:
    event = _event(vec["event"])
    data = bytes.fromhex(vec["frame_hex"])
    assert lp.encode_event(event) == data
    dec = FrameDecoder()
    dec.receive_data(data)
    frame = dec.next_frame()
    assert frame is not None
    assert lp.decode_frame(frame) == event


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors(vec: dict[str, Any]) -> None:
    dec = FrameDecoder()
    dec.receive_data(bytes.fromhex(vec["bytes_hex"]))
    with pytest.raises(ProtocolError, match=vec["error"]):
        while dec.next_frame() is not None:
            pass
    with pytest.raises(ProtocolError):  # it stays broken
        dec.next_frame()


@pytest.mark.parametrize("vec", VECTORS["incomplete"], ids=lambda v: v["name"])
def test_incomplete_vectors(vec: dict[str, Any]) -> None:
    dec = FrameDecoder()
    dec.receive_data(bytes.fromhex(vec["bytes_hex"]))
    assert dec.next_frame() is None and dec.partial


def test_encode_refuses_oversize() -> None:
    with pytest.raises(ProtocolError):
        encode_frame(FrameType.SNAPSHOT, bytes(MAX_PAYLOAD + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=40), st.booleans())
def test_decoder_on_random_bytes_only_raises_protocol_error(data: bytes, cuts: list[int], prefix_valid: bool) -> None:
    if prefix_valid:
        data = encode_frame(FrameType.PING, bytes(8)) + data
    dec = FrameDecoder(max_payload=256)
    pos = 0
    chunks = []
    for cut in cuts:
        chunks.append(data[pos:pos + cut])
        pos += cut
    chunks.append(data[pos:])
    got = []
    try:
        for chunk in chunks:
            dec.receive_data(chunk)
            while (frame := dec.next_frame()) is not None:
                got.append(frame)
                try:
                    lp.decode_frame(frame)
                except Exception as exc:  # payload errors are EncodingError, nothing else
                    from meshpos.domain.errors import EncodingError
                    assert isinstance(exc, EncodingError)
    except ProtocolError:
        return
    assert sum(5 + len(f.payload) for f in got) + dec.buffered == len(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=300)), max_size=10),
       st.integers(1, 50))
def test_any_chunking_of_valid_frames_roundtrips(frames: list[tuple[FrameType, bytes]], step: int) -> None:
    data = b"".join(encode_frame(t, p) for t, p in frames)
    dec = FrameDecoder()
    got = []
    for i in range(0, len(data), step):
        dec.receive_data(data[i:i + step])
        while (frame := dec.next_frame()) is not None:
            got.append((frame.type, frame.payload))
    assert got == frames and not dec.partial
