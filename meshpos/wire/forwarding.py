"""The forwarding API's bodies: one codec for both ends (protocols/forwarding.md).

Request (``POST /v1/forward``)::

    {"format": "meshpos-forward/1", "entries": ["<envelope>", ...]}

Reply (200)::

    {"format": "meshpos-forward-reply/1",
     "results":  ["<signed result envelope>", ...],       one per settled sale
     "pending":  [{"sale_id": "...", "reason": "..."}],   taken, not settled yet: forward again later
     "refused":  [{"index": 3, "type": "sale" | null, "sale_id": "..." | null,
                   "status": "rejected", "reason": "..."}],  not taken, no signed result
     "reversed": ["<sale id>", ...]}                      voids after approval whose reversal (0420) is done

An envelope travels as the JSON string of its canonical bytes (they are UTF-8
JSON text), so the bytes come back unchanged with ``.encode("utf-8")``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from meshpos.domain.errors import EncodingError
from meshpos.wire import envelope

#: HTTP paths of the forwarding API (protocols/forwarding.md)
FORWARD_PATH: Final = "/v1/forward"
HEALTH_PATH: Final = "/v1/health"

#: the field of the health reply that carries the switch's clock (ms since the epoch), from which a
#: node estimates its own clock's offset (protocols/forwarding.md, protocols/clocks.md)
HEALTH_TIME_FIELD: Final = "time_ms"

REQUEST_FORMAT: Final = "meshpos-forward/1"
REPLY_FORMAT: Final = "meshpos-forward-reply/1"

#: a request body larger than this is answered 413 before it is parsed
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
#: a reply body the uplink client accepts
MAX_REPLY_BYTES: Final = 8 * 1024 * 1024
#: entries (of any type) in one request
MAX_ENTRIES: Final = 4000
#: sale entries in one request
MAX_SALES: Final = 1000


@dataclass(frozen=True)
class Refusal:
    index: int
    type: str | None
    sale_id: str | None
    reason: str
    status: str = "rejected"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "type": self.type, "sale_id": self.sale_id, "status": self.status,
                "reason": self.reason}


@dataclass(frozen=True)
class Pending:
    sale_id: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"sale_id": self.sale_id, "reason": self.reason}


@dataclass(frozen=True)
class ForwardReply:
    results: tuple[bytes, ...] = ()
    pending: tuple[Pending, ...] = ()
    refused: tuple[Refusal, ...] = ()
    reversed: tuple[str, ...] = field(default=())


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _loads(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EncodingError(f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise EncodingError(f"{what} must be a JSON object")
    return value


def _envelope_text(raw: bytes) -> str:
    if len(raw) > envelope.MAX_ENVELOPE:
        raise EncodingError(f"envelope of {len(raw)} bytes exceeds {envelope.MAX_ENVELOPE}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EncodingError("an envelope must be UTF-8 JSON text") from exc


def _envelope_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise EncodingError(f"{what} must be a string")
    raw = value.encode("utf-8")
    if len(raw) > envelope.MAX_ENVELOPE:
        raise EncodingError(f"{what} of {len(raw)} bytes exceeds {envelope.MAX_ENVELOPE}")
    return raw


def health_time_ms(body: object) -> int | None:
    """The switch's clock in a health reply body, or None (an older switch, or nonsense)."""
    value = body.get(HEALTH_TIME_FIELD) if isinstance(body, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**53:
        return None
    return value


# -- request -------------------------------------------------------------------------


def encode_request(entries: list[bytes]) -> bytes:
    if len(entries) > MAX_ENTRIES:
        raise EncodingError(f"{len(entries)} entries exceed the limit of {MAX_ENTRIES} per request")
    body = _dumps({"format": REQUEST_FORMAT, "entries": [_envelope_text(raw) for raw in entries]})
    if len(body) > MAX_BODY_BYTES:
        raise EncodingError(f"request of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    return body


def request_size(entries: list[bytes]) -> int:
    """An upper bound of the encoded request size (JSON escaping of quotes included)."""
    return 64 + sum(len(raw) + raw.count(b'"') + raw.count(b"\\") + 3 for raw in entries)


def decode_request(body: bytes) -> list[bytes]:
    """The entries of a request body; EncodingError with a reason a person can act on."""
    if len(body) > MAX_BODY_BYTES:
        raise EncodingError(f"request of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    value = _loads(body, "request body")
    if value.get("format") != REQUEST_FORMAT:
        raise EncodingError(f"request format must be {REQUEST_FORMAT!r}")
    if set(value) != {"format", "entries"}:
        raise EncodingError("request must have exactly the fields format, entries")
    entries = value["entries"]
    if not isinstance(entries, list):
        raise EncodingError("entries must be a list")
    if len(entries) > MAX_ENTRIES:
        raise EncodingError(f"{len(entries)} entries exceed the limit of {MAX_ENTRIES} per request")
    return [_envelope_bytes(item, f"entry {i}") for i, item in enumerate(entries)]


# -- reply ---------------------------------------------------------------------------


def encode_reply(reply: ForwardReply) -> bytes:
    return _dumps({
        "format": REPLY_FORMAT,
        "results": [_envelope_text(raw) for raw in reply.results],
        "pending": [p.to_json() for p in reply.pending],
        "refused": [r.to_json() for r in reply.refused],
        "reversed": list(reply.reversed),
    })


def _str_or_none(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise EncodingError(f"{what} must be a string or null")
    return value


def decode_reply(body: bytes) -> ForwardReply:
    if len(body) > MAX_REPLY_BYTES:
        raise EncodingError(f"reply of {len(body)} bytes exceeds {MAX_REPLY_BYTES}")
    value = _loads(body, "reply body")
    if value.get("format") != REPLY_FORMAT:
        raise EncodingError(f"reply format must be {REPLY_FORMAT!r}")
    try:
        results = tuple(_envelope_bytes(r, "result") for r in value["results"])
        pending = tuple(Pending(sale_id=str(p["sale_id"]), reason=str(p["reason"])) for p in value["pending"])
        refused = tuple(
            Refusal(index=int(r["index"]), type=_str_or_none(r["type"], "type"),
                    sale_id=_str_or_none(r["sale_id"], "sale_id"), reason=str(r["reason"]),
                    status=str(r.get("status", "rejected")))
            for r in value["refused"])
        reversed_ = tuple(str(s) for s in value["reversed"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EncodingError(f"reply body is malformed: {exc}") from exc
    return ForwardReply(results=results, pending=pending, refused=refused, reversed=reversed_)
