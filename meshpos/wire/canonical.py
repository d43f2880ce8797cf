"""Canonical JSON: the one byte encoding of every signed object.

Rules (protocols/envelope.md): UTF-8; object keys sorted by code point; no
insignificant white space; only objects, arrays, strings, integers, true,
false and null (no floats); integers within +-2**53. Decoding re-encodes and
rejects anything that is not byte-identical, so one value has one encoding.

Two decoders, one verdict. ``decode_reference`` is the rule as written (Python's json, whose
output protocols/envelope.md spells out byte for byte). ``decode`` is what every node runs on
every entry it takes in: msgspec parses (refusing floats as it meets them) and re-encodes in C,
about a quarter of the reference's cost, and it only ever *accepts*: anything it does not accept
outright, and any integer of 16 digits or more, goes to the reference, which decides and names
the error. It accepts only bytes that are msgspec's own sorted encoding of what it parsed; that
encoding is the reference's byte for byte (every code point escaped alike, keys in code point
order, tests/test_canonical_fast.py), so what it accepts the reference accepts, with the same value.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from meshpos.domain.errors import EncodingError

MAX_SAFE_INT = 2**53


def _check(value: Any, depth: int = 0) -> None:
    if depth > 16:
        raise EncodingError("canonical JSON nested too deep")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            raise EncodingError(f"integer out of range: {value}")
        return
    if isinstance(value, list):
        for item in value:
            _check(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError("object keys must be strings")
            _check(item, depth + 1)
        return
    raise EncodingError(f"type not allowed in canonical JSON: {type(value).__name__}")


def encode(value: Any) -> bytes:
    _check(value)
    return dumps_trusted(value)


# built once: a JSONEncoder or JSONDecoder costs more to make than a ledger entry costs to parse
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def dumps_trusted(value: Any) -> bytes:
    """Encode a value already known to hold only canonical types (it came from ``decode``)."""
    return _ENCODER.encode(value).encode("utf-8")


def _reject_float(text: str) -> Any:
    raise EncodingError("floats are not allowed in canonical JSON")


def _checked_int(text: str) -> int:
    value = int(text)
    if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        raise EncodingError(f"integer out of range: {text[:30]}")
    return value


_DECODER = json.JSONDecoder(parse_float=_reject_float, parse_constant=_reject_float, parse_int=_checked_int)


def decode_reference(data: bytes) -> Any:
    """Parse canonical JSON with the rule as written. The parser itself refuses floats and
    out-of-range integers and only builds JSON types, so the re-encoding that proves canonical
    form needs no type walk."""
    try:
        value = _DECODER.decode(data.decode("utf-8"))
        again = dumps_trusted(value)
    except EncodingError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise EncodingError(f"not valid JSON: {exc}") from exc
    if again != data:
        raise EncodingError("JSON is not in canonical form")
    return value


def _no_float(text: str) -> Any:
    raise ValueError("a float")  # msgspec reports it as a ValidationError: the reference then decides


_FAST_DECODER = msgspec.json.Decoder(float_hook=_no_float)
_FAST_ENCODER = msgspec.json.Encoder(order="sorted")
# Integers of up to 15 digits are within +-2**53 (2**53 has 16): a run of 16 digits anywhere
# (in a number, or only in a string) sends the input to the reference, which checks the range.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_SIXTEEN_DIGITS = b"0" * 16


def decode(data: bytes) -> Any:
    """Parse canonical JSON: what ``decode_reference`` accepts, with the same value, or the
    EncodingError it raises; faster (see the module's docstring)."""
    if type(data) is bytes:
        try:
            value = _FAST_DECODER.decode(data)
            canonical = _FAST_ENCODER.encode(value) == data
        except (msgspec.MsgspecError, ValueError, TypeError, RecursionError):
            canonical = False  # not for the fast path to say why: the reference does
        if canonical and data.translate(_DIGITS_TO_ZERO).find(_SIXTEEN_DIGITS) < 0:
            return value
    return decode_reference(data)
