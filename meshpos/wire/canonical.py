"""Canonical JSON: the one byte encoding of every signed object.

Rules (protocols/envelope.md): UTF-8; object keys sorted by code point; no
insignificant white space; only objects, arrays, strings, integers, true,
false and null (no floats); integers within +-2**53. Decoding re-encodes and
rejects anything that is not byte-identical, so one value has one encoding.
"""

from __future__ import annotations

import json
from typing import Any

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


def decode(data: bytes) -> Any:
    """Parse canonical JSON. The parser itself refuses floats and out-of-range integers and
    only builds JSON types, so the re-encoding that proves canonical form needs no type walk."""
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
