"""The fast ASCII codec of meshpos.wire.iso8583 gives exactly pyiso8583's bytes and dicts, and
leaves to pyiso8583 (its errors included) every message it does not take exactly so."""

from __future__ import annotations

import random
from typing import Any

import iso8583
import pytest

from meshpos.domain.errors import EncodingError
from meshpos.wire import iso8583 as wire
from meshpos.wire.acquirer import AcquirerRequest

SPEC = wire.DEFAULT_SPEC


def requests(rng: random.Random, n: int) -> list[AcquirerRequest]:
    out = []
    for i in range(n):
        length = rng.randint(12, 19)
        body = "4" + "".join(rng.choice("0123456789") for _ in range(length - 2))
        check = next(d for d in "0123456789" if wire_luhn(body + d))
        out.append(AcquirerRequest(
            sale_id=f"sale{i}", pan=body + check, expiry=rng.choice([None, "1228", "0130"]),
            amount_minor=rng.randint(1, 999_999_999_999), currency=rng.choice(["EUR", "USD", "JPY"]),
            created_at_ms=rng.randint(0, 4_000_000_000_000), entry_mode=rng.choice(["chip", "contactless", "manual"]),
            terminal_id="".join(rng.choice("0123456789abcdef") for _ in range(8)),
            merchant_id=f"MERCHANT{i % 10}-01 ./", stan=rng.randint(1, 999_999),
            rrn=f"{rng.randint(0, 10**12 - 1):012d}"))
    return out


def wire_luhn(pan: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def messages() -> list[dict[str, str]]:
    rng = random.Random(8583)
    docs = []
    for req in requests(rng, 150):
        for kind in wire.RequestKind:
            doc = wire.build_request(req, kind, now_ms=rng.randint(0, 4_000_000_000_000))
            docs.append(doc)
            received = wire.parse_request(iso8583.decode(bytes(iso8583.encode(dict(doc), SPEC)[0]), SPEC)[0])
            code = rng.choice(["00", "05", "51", "91"])
            docs.append(wire.build_answer(received, code, "A1B2C3" if code == "00" else None))
    return docs


def reference_encode(doc: dict[str, str]) -> bytes:
    return bytes(iso8583.encode(dict(doc), SPEC)[0])


def test_the_default_spec_takes_the_fast_codec() -> None:
    assert wire._codec(SPEC) is not None


def test_same_bytes_and_dicts_as_pyiso8583() -> None:
    codec = wire._codec(SPEC)
    assert codec is not None
    for doc in messages():
        raw = reference_encode(doc)
        assert codec.encode(doc) == raw, doc["t"]
        assert codec.decode(raw) == iso8583.decode(raw, SPEC)[0]
        assert wire.encode_message(doc) == raw and wire.decode_message(raw) == iso8583.decode(raw, SPEC)[0]


def reference_decode(raw: bytes) -> Any:
    try:
        return iso8583.decode(raw, SPEC)[0]
    except Exception as exc:  # noqa: BLE001 -- whatever pyiso8583 makes of it
        return type(exc)


def test_damaged_messages_decode_as_pyiso8583_decodes_them() -> None:
    """Flipped, cut, lengthened, lower-cased: what the fast decoder takes, pyiso8583 decodes to the
    same dict; what it leaves, decode_message hands to pyiso8583 (an EncodingError if it fails)."""
    codec = wire._codec(SPEC)
    assert codec is not None
    rng = random.Random(4)
    alphabet = b"0123456789ABCDEFabcdef \x00\xff"
    taken = 0
    for doc in messages()[:200]:
        raw = reference_encode(doc)
        for _ in range(15):
            damaged = bytearray(raw)
            how = rng.randrange(4)
            if how == 0:
                damaged[rng.randrange(len(damaged))] = rng.choice(alphabet)
            elif how == 1:
                del damaged[rng.randrange(len(damaged)):]
            elif how == 2:
                damaged += bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
            else:
                damaged = bytearray(bytes(damaged).lower())
            fast = codec.decode(bytes(damaged))
            expected = reference_decode(bytes(damaged))
            if fast is not None:
                taken += 1
                assert fast == expected
            elif isinstance(expected, type):
                with pytest.raises(EncodingError):
                    wire.decode_message(bytes(damaged))
            else:
                assert wire.decode_message(bytes(damaged)) == expected
    assert taken > 100  # the damage kept many messages well-formed (a changed digit): those are compared too


@pytest.mark.parametrize("doc", [
    {"t": "0220", "4": "12"},  # a fixed field of the wrong width
    {"t": "0220", "2": "4" * 20},  # a variable field over its maximum
    {"t": "022", "3": "000000"},  # a short type
    {"t": "0220", "3": "00000é"},  # not ASCII
    {"t": "0220", "65": "1"},  # the tertiary bitmap's bit
    {"t": "0220", "200": "1"},  # beyond 192
])
def test_what_the_fast_encoder_leaves_goes_to_pyiso8583(doc: dict[str, str]) -> None:
    codec = wire._codec(SPEC)
    assert codec is not None and codec.encode(doc) is None
    try:
        expected = reference_encode(doc)
    except iso8583.EncodeError:
        with pytest.raises(EncodingError):
            wire.encode_message(doc)
    else:
        assert wire.encode_message(doc) == expected  # pyiso8583 drops field 65 (its bitmap's bit)


def test_a_spec_with_other_encodings_goes_to_pyiso8583() -> None:
    from iso8583.specs import default as binary_spec

    assert wire._codec(binary_spec) is None
    doc = {"t": "0230", "39": "00", "11": "000001"}
    raw = wire.encode_message(doc, binary_spec)
    assert raw == bytes(iso8583.encode(dict(doc), binary_spec)[0])
    assert wire.decode_message(raw, binary_spec)["39"] == "00"


def test_date_fields_are_the_utc_calendar_of_the_milliseconds() -> None:
    from datetime import datetime, timezone

    rng = random.Random(7)
    for ms in [0, 999, 951_782_400_000, 1_796_215_279_915, *(rng.randint(0, 4_102_444_800_000) for _ in range(2000))]:
        expected = datetime.fromtimestamp(ms // 1000, tz=timezone.utc).strftime("%m%d%H%M%S")
        assert wire._mmddhhmmss(ms) == expected
