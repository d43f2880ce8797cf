"""The ``held`` field of a node status: a version vector of the sales a node holds.

Normative text: protocols/link.md, "What a node holds". For each terminal, the
highest sequence number ``n`` such that the node holds that terminal's sales
``1..n`` without a gap. Encoded compactly, so 200 terminals fit in a status
envelope beside everything else:

    held = base64url (no padding) of  record*
    record = terminal id (8 bytes: its 16 hex digits) || n (unsigned LEB128, minimal)

Records are sorted by terminal id, strictly ascending; ``n`` is 1..2^53 (a
terminal of which nothing is held has no record). The encoder keeps at most
MAX_HELD_BYTES of records (the lowest ids first): a terminal left out counts
as "nothing held", so a reader underestimates, never overestimates, who holds
a sale. Pure: no I/O.
"""

from __future__ import annotations

from typing import Mapping

from meshpos.wire.leb128 import uleb128
from meshpos.domain.errors import EncodingError
from meshpos.wire.envelope import b64d, b64e

ID_BYTES = 8
MAX_SEQ = 2**53
MAX_HELD_BYTES = 2560  # 200 terminals with sequence numbers below 2^21 take 2,200
MAX_LEB_BYTES = 8  # 2^53 needs 8 groups of 7 bits


def _hex_id(terminal: str) -> bytes | None:
    if len(terminal) != 2 * ID_BYTES or any(c not in "0123456789abcdef" for c in terminal):
        return None
    return bytes.fromhex(terminal)


def encode(vector: Mapping[str, int], max_bytes: int = MAX_HELD_BYTES) -> str:
    """The ``held`` text of ``vector`` (terminal id -> contiguous high-water mark); ids that are
    not 16 lower-case hex digits and marks outside 1..2^53 are left out, as are the records
    beyond ``max_bytes``."""
    out = bytearray()
    for terminal in sorted(vector):
        n = vector[terminal]
        tid = _hex_id(terminal)
        if tid is None or not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SEQ:
            continue
        record = tid + uleb128(n)
        if len(out) + len(record) > max_bytes:
            break
        out += record
    return b64e(bytes(out))


def decode(text: object) -> dict[str, int]:
    """terminal id -> high-water mark; EncodingError for anything but what ``encode`` makes."""
    if not isinstance(text, str):
        raise EncodingError("status held: must be a base64url string")
    if len(text) > (MAX_HELD_BYTES * 4 + 2) // 3:
        raise EncodingError(f"status held: longer than {MAX_HELD_BYTES} bytes")
    raw = b64d(text, "status held")
    out: dict[str, int] = {}
    last = b""
    i = 0
    while i < len(raw):
        tid = raw[i:i + ID_BYTES]
        if len(tid) < ID_BYTES:
            raise EncodingError("status held: a record is cut short")
        if tid <= last:
            raise EncodingError("status held: terminal ids are not strictly ascending")
        last = tid
        i += ID_BYTES
        n, shift, start = 0, 0, i
        while True:
            if i >= len(raw):
                raise EncodingError("status held: a sequence number is cut short")
            byte = raw[i]
            i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if i - start >= MAX_LEB_BYTES:
                raise EncodingError("status held: a sequence number is too long")
        if raw[start:i] != uleb128(n) or not 1 <= n <= MAX_SEQ:
            raise EncodingError("status held: a sequence number is not minimal or out of 1..2^53")
        out[tid.hex()] = n
    return out
