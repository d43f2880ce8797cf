"""ISO 8583 codec and sans-IO exchange: vectors, two ends in memory, and garbage in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.wire.iso8583 import (NEED_DATA, AnswerReceived, ClientConnection, Family, FrameDecoder, LengthHeader,
                                  MatchKey, RequestKind, RequestReceived, ServerConnection, UnexpectedAnswer, UnusableAnswer,
                                  build_request, decode_message, encode_message, frame, parse_answer)
from meshpos.domain.errors import EncodingError, InputError, ProtocolError

VECTORS = json.loads((Path(__file__).parent.parent / "protocols" / "vectors" / "iso8583.json").read_text())
NOW_MS = VECTORS["transmission_now_ms"]


def make_request(**overrides: Any) -> AcquirerRequest:
    fields: dict[str, Any] = dict(
        sale_id="sale-1", pan="4111111111111111", expiry="1228", amount_minor=1250, currency="EUR",
        created_at_ms=1767268245000, entry_mode="chip", terminal_id="TERM0001",
        merchant_id="MERCHANT0000001", stan=1, rrn="600101000001",
    )
    fields.update(overrides)
    return AcquirerRequest(**fields)


def feed_all(conn: ClientConnection | ServerConnection, data: bytes) -> list[Any]:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


# --- vectors -----------------------------------------------------------------


def test_first_vector_is_the_documented_bytes() -> None:
    # spelled out by hand from protocols/iso8583.md, independent of the encoder
    payload = (
        b"0220" b"723C040008C08000" b"16" b"4111111111111111" b"000000" b"000000001250"
        b"0101115140" b"000001" b"115045" b"0101" b"2812" b"051" b"600101000001"
        b"TERM0001" b"MERCHANT0000001" b"978"
    )
    assert VECTORS["requests"][0]["hex"] == (len(payload).to_bytes(2, "big") + payload).hex()


@pytest.mark.parametrize("vector", VECTORS["requests"], ids=lambda v: v["description"])
def test_request_vectors(vector: dict[str, Any]) -> None:
    req = AcquirerRequest(**vector["request"])
    kind = RequestKind(vector["mti"])
    doc = build_request(req, kind, now_ms=NOW_MS)
    assert doc == vector["fields"]
    client = ClientConnection(header=LengthHeader(vector["header"]))
    key, data = client.send_request(req, kind, now_ms=NOW_MS)
    assert data.hex() == vector["hex"]
    assert key == MatchKey(kind.family, f"{req.stan:06d}", req.rrn, req.terminal_id)
    # and the host end reads back the same request
    server = ServerConnection(header=LengthHeader(vector["header"]))
    [received] = feed_all(server, data)
    assert received.kind is kind and received.pan == req.pan and received.amount_minor == req.amount_minor
    assert dict(received.fields) == vector["fields"]


@pytest.mark.parametrize("vector", VECTORS["answers"], ids=lambda v: v["description"])
def test_answer_vectors(vector: dict[str, Any]) -> None:
    family = Family(vector["family"])
    kind = RequestKind.REVERSAL if family is Family.REVERSAL else RequestKind.ADVICE
    client = ClientConnection(header=LengthHeader(vector["header"]))
    client.send_request(make_request(), kind, now_ms=NOW_MS)
    [event] = feed_all(client, bytes.fromhex(vector["hex"]))
    assert isinstance(event, AnswerReceived)
    assert event.result == AcquirerResult(**vector["result"])
    assert client.outstanding == frozenset()


@pytest.mark.parametrize("vector", VECTORS["invalid_answers"], ids=lambda v: v["description"])
def test_invalid_answer_vectors(vector: dict[str, Any]) -> None:
    """Each invalid answer raises the vector's error where it is read; on a connection, one whose
    length header delimits it is an UnusableAnswer (naming the request it answers, if it names an
    outstanding one) and the connection reads on; a bad header raises (the stream is lost)."""
    client = ClientConnection()
    key, _ = client.send_request(make_request(), RequestKind.ADVICE, now_ms=NOW_MS)
    error = {"ProtocolError": ProtocolError, "EncodingError": EncodingError}[vector["error"]]
    data = bytes.fromhex(vector["hex"])
    length = int.from_bytes(data[:2], "big")
    if length != len(data) - 2:  # the header itself is bad
        with pytest.raises(error):
            feed_all(client, data)
        return
    with pytest.raises(error):
        parse_answer(decode_message(data[2:]))
    [event] = feed_all(client, data)
    assert isinstance(event, UnusableAnswer) and event.reason
    names_it = vector["description"] == "missing field 39"  # an 0230 with this request's 11, 37, 41
    assert event.key == (key if names_it else None)
    assert client.outstanding == (frozenset() if names_it else {key})


# --- fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "code"), [("chip", "051"), ("contactless", "071"), ("magstripe", "901"), ("manual", "012")]
)
def test_entry_mode_field_22(mode: str, code: str) -> None:
    assert build_request(make_request(entry_mode=mode), RequestKind.ADVICE, now_ms=NOW_MS)["22"] == code


def test_repeat_carries_the_same_fields_as_the_original() -> None:
    req = make_request()
    original = build_request(req, RequestKind.ADVICE, now_ms=NOW_MS)
    repeat = build_request(req, RequestKind.ADVICE_REPEAT, now_ms=NOW_MS + 60_000)
    assert repeat.pop("t") == "0221" and original.pop("t") == "0220"
    assert repeat.pop("7") != original.pop("7")  # only the transmission time moves
    assert repeat == original


def test_reversal_names_the_original_advice_in_field_90() -> None:
    doc = build_request(make_request(stan=4321), RequestKind.REVERSAL, now_ms=NOW_MS)
    assert doc["t"] == "0420"
    assert doc["90"] == "0220" + "004321" + "0101115045" + "0" * 22


def test_request_validation_and_no_pan_in_repr() -> None:
    req = make_request()
    assert "4111111111111111" not in repr(req) and "1228" not in repr(req)
    assert "4111111111111111" not in req.describe()
    for bad in (
        {"pan": "4111111111111112"}, {"pan": "4111 1111 1111 1111"}, {"expiry": "1328"},
        {"amount_minor": 0}, {"amount_minor": 10**12}, {"currency": "XXX"}, {"entry_mode": "swipe"},
        {"terminal_id": "T1"}, {"merchant_id": "M" * 16}, {"stan": 0}, {"stan": 1_000_000}, {"rrn": "1"},
    ):
        with pytest.raises(InputError) as info:
            make_request(**bad)
        assert "4111111111111111" not in str(info.value)


# --- two ends in memory ------------------------------------------------------


def test_answers_in_any_order_match_their_requests() -> None:
    client, server = ClientConnection(), ServerConnection()
    reqs = [make_request(stan=i, rrn=f"{i:012d}", pan=pan) for i, pan in
            enumerate(["4111111111111111", "4000000000000002", "5555555555554444"], start=1)]
    wire = b"".join(client.send_request(r, RequestKind.ADVICE, now_ms=NOW_MS)[1] for r in reqs)
    received = [e for e in feed_all(server, wire) if isinstance(e, RequestReceived)]
    assert [r.key.rrn for r in received] == [r.rrn for r in reqs]
    codes = {"000000000001": ("00", "AAA111"), "000000000002": ("05", None), "000000000003": ("00", "CCC333")}
    answers = b"".join(server.send_answer(r, *codes[r.key.rrn]) for r in reversed(received))
    events: list[Any] = []
    for i in range(len(answers)):  # one byte at a time: the decoder must wait, never guess
        events += feed_all(client, answers[i : i + 1])
    got = {e.key.rrn: e.result for e in events}
    assert got == {
        "000000000001": AcquirerResult(True, "00", "AAA111"),
        "000000000002": AcquirerResult(False, "05", None),
        "000000000003": AcquirerResult(True, "00", "CCC333"),
    }
    assert [e.key.rrn for e in events] == ["000000000003", "000000000002", "000000000001"]


def test_matching_uses_stan_rrn_and_terminal() -> None:
    client, server = ClientConnection(), ServerConnection()
    req = make_request()
    _, data = client.send_request(req, RequestKind.ADVICE, now_ms=NOW_MS)
    [received] = feed_all(server, data)
    for other in (make_request(stan=2), make_request(rrn="600101000002"), make_request(terminal_id="TERM0002")):
        other_server = ServerConnection()
        [foreign] = feed_all(other_server, ClientConnection().send_request(other, RequestKind.ADVICE, now_ms=NOW_MS)[1])
        [event] = feed_all(client, server.send_answer(foreign, "00", "XXXXXX"))
        assert isinstance(event, UnexpectedAnswer)
    [event] = feed_all(client, server.send_answer(received, "00", "OK0001"))
    assert isinstance(event, AnswerReceived) and event.result.auth_code == "OK0001"


def test_a_forgotten_request_turns_its_late_answer_into_unexpected() -> None:
    client, server = ClientConnection(), ServerConnection()
    key, data = client.send_request(make_request(), RequestKind.ADVICE, now_ms=NOW_MS)
    [received] = feed_all(server, data)
    client.forget(key)
    [event] = feed_all(client, server.send_answer(received, "00", "LATE01"))
    assert event == UnexpectedAnswer("0230", key, AcquirerResult(True, "00", "LATE01"))  # the verdict travels on


def test_the_same_request_cannot_be_outstanding_twice() -> None:
    client = ClientConnection()
    client.send_request(make_request(), RequestKind.ADVICE, now_ms=NOW_MS)
    with pytest.raises(ProtocolError):
        client.send_request(make_request(), RequestKind.ADVICE_REPEAT, now_ms=NOW_MS)
    client.send_request(make_request(), RequestKind.REVERSAL, now_ms=NOW_MS)  # another family


def test_reversal_answer_does_not_settle_an_advice() -> None:
    client, server = ClientConnection(), ServerConnection()
    _, advice = client.send_request(make_request(), RequestKind.ADVICE, now_ms=NOW_MS)
    other = ClientConnection()
    _, reversal = other.send_request(make_request(), RequestKind.REVERSAL, now_ms=NOW_MS)
    [rev] = feed_all(server, reversal)
    [event] = feed_all(client, server.send_answer(rev, "00", None))
    assert isinstance(event, UnexpectedAnswer) and event.key.family is Family.REVERSAL


# --- framing -----------------------------------------------------------------


@pytest.mark.parametrize("header", list(LengthHeader))
def test_frames_split_anywhere_come_out_whole(header: LengthHeader) -> None:
    payloads = [
        encode_message(build_request(make_request(stan=i, rrn=f"{i:012d}"), RequestKind.ADVICE, now_ms=NOW_MS))
        for i in (1, 2, 3)
    ]
    wire = b"".join(frame(p, header) for p in payloads)
    for cut in range(1, len(wire)):
        decoder = FrameDecoder(header)
        out = []
        for part in (wire[:cut], wire[cut:]):
            decoder.receive_data(part)
            while (f := decoder.next_frame()) is not NEED_DATA:
                out.append(f)
        assert out == payloads


def test_ascii_header_and_limits() -> None:
    assert frame(b"abc", LengthHeader.ASCII4) == b"0003abc"
    assert frame(b"abc", LengthHeader.BINARY2) == b"\x00\x03abc"
    for header, wire in ((LengthHeader.BINARY2, b"\x10\x01"), (LengthHeader.ASCII4, b"5000"),
                         (LengthHeader.ASCII4, b"12x4"), (LengthHeader.BINARY2, b"\x00\x00")):
        decoder = FrameDecoder(header, max_frame=4096)
        decoder.receive_data(wire)
        with pytest.raises(ProtocolError):
            decoder.next_frame()
    decoder = FrameDecoder(LengthHeader.NONE, max_frame=64)
    decoder.receive_data(b"0220" + b"F" * 16 + b"F" * 16 + b"0" * 60)
    with pytest.raises(ProtocolError):
        decoder.next_frame()


# --- garbage in: only our two error types come out ---------------------------

VALID = frame(encode_message(build_request(make_request(), RequestKind.ADVICE, now_ms=NOW_MS)))
VALID_ANSWER = bytes.fromhex(VECTORS["answers"][0]["hex"])


def _drain(conn: ClientConnection | ServerConnection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while conn.next_event() is not NEED_DATA:
                pass
    except (EncodingError, ProtocolError):
        pass


@settings(max_examples=300, deadline=None)
@given(header=st.sampled_from(list(LengthHeader)), chunks=st.lists(st.binary(max_size=300), max_size=4))
def test_random_bytes_raise_only_our_errors(header: LengthHeader, chunks: list[bytes]) -> None:
    client = ClientConnection(header=header)
    client.send_request(make_request(), RequestKind.ADVICE, now_ms=NOW_MS)
    _drain(client, chunks)
    _drain(ServerConnection(header=header), chunks)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), base=st.sampled_from([VALID, VALID_ANSWER]))
def test_mutated_messages_raise_only_our_errors(data: st.DataObject, base: bytes) -> None:
    wire = bytearray(base)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    chunks = [bytes(wire[:cut]), bytes(wire[cut:])]
    client = ClientConnection()
    client.send_request(make_request(), RequestKind.ADVICE, now_ms=NOW_MS)
    _drain(client, chunks)
    _drain(ServerConnection(), chunks)
    try:
        decode_message(bytes(wire[2:]))
    except EncodingError:
        pass
