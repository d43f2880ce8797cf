"""The forwarding API on a weak uplink: request compression and the results lookup
(protocols/forwarding.md, "Compression" and "Resuming a batch"). One codec for both ends.

Compression: a switch that accepts gzip request bodies says so with an ``Accept-Encoding: gzip``
header on its answers (``/v1/health`` and ``/v1/forward`` alike); a node sends
``Content-Encoding: gzip`` only after it saw that header from this switch. The switch accepts
plain and gzip bodies, refuses any other coding with 415, and never inflates a body past
``MAX_BODY_BYTES`` (the limit of a plain request): a small body that would inflate beyond is
refused (400) before it costs more than that much memory.

Answers: a node that sends ``Accept-Encoding: gzip`` may get an answer of ``COMPRESS_REPLY_FROM``
bytes or more with ``Content-Encoding: gzip``; it inflates it no further than ``MAX_REPLY_BYTES``.

Results lookup (``POST /v1/results``): the node names sales whose batch it sent without getting
the answer (the connection broke, the reply was lost); the switch answers with the forward reply
format: the signed result of every named sale it settled, ``pending`` for those it holds but has
not settled; a sale it never received is not mentioned. The node then forwards only the rest.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Final

from meshpos.domain.errors import EncodingError
from meshpos.wire.forwarding import MAX_BODY_BYTES, MAX_SALES

GZIP: Final = "gzip"
#: the answer header by which a switch announces the request codings it accepts
ANNOUNCE_HEADER: Final = "accept-encoding"
#: the request header naming the request body's coding
CODING_HEADER: Final = "content-encoding"
IDENTITY: Final = "identity"
GZIP_LEVEL: Final = 6
#: a switch compresses an answer of at least this many bytes for a node that accepts gzip
COMPRESS_REPLY_FROM: Final = 1024

RESULTS_PATH: Final = "/v1/results"
RESULTS_FORMAT: Final = "meshpos-results/1"
MAX_SALE_ID: Final = 128


def announces_gzip(header: str | None) -> bool:
    """Whether an ``Accept-Encoding`` value lists gzip (with a non-zero q, if any)."""
    if not header:
        return False
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() != GZIP:
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def compress(body: bytes) -> bytes:
    """A gzip member of ``body`` (no file name, time 0: the same body gives the same bytes)."""
    return gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)


def decode_body(data: bytes, coding: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The plain body of ``data`` sent with Content-Encoding ``coding`` (a request; an answer
    with ``limit=MAX_REPLY_BYTES``).

    Raises ``UnsupportedCoding`` for a coding other than identity and gzip, ``EncodingError``
    for a corrupt or truncated gzip stream, trailing bytes, or more than ``limit`` bytes once
    inflated (inflation stops at ``limit + 1`` bytes whatever the input claims)."""
    name = (coding or IDENTITY).strip().lower()
    if name in ("", IDENTITY):
        return data
    if name != GZIP:
        raise UnsupportedCoding(f"body coding {name[:40]!r} is not accepted (only gzip)")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise EncodingError(f"body is not valid gzip: {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise EncodingError(f"body inflates past {limit} bytes")
    if not inflater.eof:
        raise EncodingError("body is a truncated gzip stream")
    if inflater.unused_data:
        raise EncodingError("body has bytes after its gzip stream")
    return out


class UnsupportedCoding(EncodingError):
    """A request body in a coding the switch does not take (HTTP 415)."""


def encode_results_request(sale_ids: list[str]) -> bytes:
    if len(sale_ids) > MAX_SALES:
        raise EncodingError(f"{len(sale_ids)} sale ids exceed the limit of {MAX_SALES} per lookup")
    return json.dumps({"format": RESULTS_FORMAT, "sale_ids": sale_ids}, separators=(",", ":")).encode()


def decode_results_request(body: bytes) -> list[str]:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EncodingError("results lookup body is not JSON") from exc
    if not isinstance(value, dict) or value.get("format") != RESULTS_FORMAT or set(value) != {"format", "sale_ids"}:
        raise EncodingError(f"results lookup must be {{\"format\": {RESULTS_FORMAT!r}, \"sale_ids\": [...]}}")
    ids = value["sale_ids"]
    if not isinstance(ids, list) or len(ids) > MAX_SALES:
        raise EncodingError(f"sale_ids must be a list of at most {MAX_SALES} strings")
    for i, sale_id in enumerate(ids):
        if not isinstance(sale_id, str) or not 0 < len(sale_id) <= MAX_SALE_ID:
            raise EncodingError(f"sale_ids[{i}] must be a string of 1 to {MAX_SALE_ID} characters")
    return ids
