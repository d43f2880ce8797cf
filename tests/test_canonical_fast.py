"""canonical.decode (msgspec's fast path) reaches the verdict of canonical.decode_reference (the rule
as written) on every input: the same value, or the same EncodingError."""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpos.domain.errors import EncodingError
from meshpos.wire import canonical

REFERENCE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def verdict(decoder: Any, data: bytes) -> tuple[str, Any]:
    try:
        value = decoder(data)
    except EncodingError as exc:
        return "refused", str(exc)
    # the canonical bytes of the value tell apart what == does not (True and 1, 1 and 1.0)
    return "accepted", canonical.dumps_trusted(value)


def assert_same_verdict(data: bytes) -> tuple[str, Any]:
    fast = verdict(canonical.decode, data)
    assert fast == verdict(canonical.decode_reference, data), data[:200]
    return fast


def test_every_code_point_is_encoded_as_the_reference_encodes_it() -> None:
    """The lemma the fast path rests on: msgspec writes every character (escapes included) as the
    reference does, so bytes that are msgspec's encoding of a value are the reference's too."""
    every = "".join(chr(cp) for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF)
    fast = msgspec.json.Encoder(order="sorted")
    assert fast.encode(every) == REFERENCE.encode(every).encode("utf-8")
    keys = {ch: i for i, ch in enumerate(every[::97])}  # keys from every plane, in code point order
    assert fast.encode(keys) == REFERENCE.encode(keys).encode("utf-8")


json_values = st.recursive(
    st.none() | st.booleans() | st.text() | st.floats(allow_nan=False)
    | st.integers(-2**70, 2**70) | st.integers(-10**6, 10**6)
    | st.sampled_from([2**53, -2**53, 2**53 + 1, -2**53 - 1, 10**15, 10**16 - 1]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def encodings(value: Any) -> list[bytes]:
    """The canonical encoding and near misses of it."""
    out = [REFERENCE.encode(value).encode("utf-8", "surrogatepass"),
           json.dumps(value).encode("utf-8", "surrogatepass"),
           json.dumps(value, ensure_ascii=True, separators=(",", ":"), sort_keys=True).encode("ascii"),
           json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")]
    try:
        out.append(msgspec.json.encode(value))
    except (msgspec.EncodeError, OverflowError, TypeError):
        pass
    return out


@settings(max_examples=250, deadline=None)
@given(json_values)
def test_fast_and_reference_agree_on_encodings_of_any_value(value: Any) -> None:
    for data in encodings(value):
        assert_same_verdict(data)


@settings(max_examples=250, deadline=None)
@given(json_values, st.data())
def test_fast_and_reference_agree_on_damaged_encodings(value: Any, data: st.DataObject) -> None:
    raw = bytearray(REFERENCE.encode(value).encode("utf-8", "surrogatepass"))
    for _ in range(data.draw(st.integers(1, 3))):
        if raw and data.draw(st.booleans()):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
        else:
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    assert_same_verdict(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fast_and_reference_agree_on_any_bytes(data: bytes) -> None:
    assert_same_verdict(data)


@pytest.mark.parametrize("data", [
    b'{"a":1.0}', b'{"a":1e5}', b'{"a":1E5}', b'{"a":-0.0}', b'[1e400]', b"[NaN]", b"[Infinity]",
    b"[9007199254740993]", b"[-9007199254740993]", b"[18446744073709551616]", b"[-0]", b"[01]",
    b'{"b":1,"a":2}', b'{"a":1,"a":1}', b'{"a": 1}', b" [1]", b"[1] ", b'"\\/"', b'"\\u00e9"',
    b'"\\u001B"', b'"\\u001b\\u0008"', b'"\x01"', b'"\\ud800"', b'"\xed\xa0\x80"', b"\xef\xbb\xbf[1]",
    b'"\xff"', b'"\xc3"', b"[" * 3000 + b"]" * 3000, b"", b"nul", b'"abc', b"[1,]", b"{,}", b"[true,False]",
])
def test_bad_inputs_are_refused_by_both_with_the_same_error(data: bytes) -> None:
    assert assert_same_verdict(data)[0] == "refused"


@pytest.mark.parametrize("data", [
    b"[9007199254740992]", b"[-9007199254740992]", b"[999999999999999]", b'"\\b\\f\\n\\r\\t\\"\\\\\\u001f"',
    '"\x7f\u2028\U0001F600 caffè"'.encode(), b'{"":[],"a":{},"b":[null,true,false,0,-1]}',
    b'{"description":"9007199254740993 in a string"}',
])
def test_good_inputs_are_accepted_by_both_alike(data: bytes) -> None:
    assert assert_same_verdict(data)[0] == "accepted"


def test_canonical_input_is_accepted_without_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a node's ledger holds takes the fast path; the reference only sees what it refuses
    (or a 16-digit run)."""
    seen: list[bytes] = []

    def reference(data: bytes) -> Any:
        seen.append(data)
        raise EncodingError("the reference was asked")

    monkeypatch.setattr(canonical, "decode_reference", reference)
    body = {"amount_minor": 1250, "card": None, "created_at": 1767225600000, "description": "Caffè",
            "items": [{"name": "brioche", "qty": 2}], "method": "cash", "seq": 1}
    assert canonical.decode(canonical.encode(body)) == body
    assert seen == []
    for data in (b'{"a":1.5}', b'{"b":1,"a":2}', b"[1234567890123456]"):
        with pytest.raises(EncodingError, match="the reference was asked"):
            canonical.decode(data)
    assert len(seen) == 3
