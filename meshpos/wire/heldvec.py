"""The ``held`` field of a node status (format 2): a version vector of the sales a node holds.

Nodes of status format 3 send it as ``held_short`` (wire/shortids.py: the same records by short
ids) and write ``held`` empty; this encoding is still read from older nodes.

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
from meshpos.wire.shortids import ID_BYTES, node_bytes, read_records

MAX_SEQ = 2**53
MAX_HELD_BYTES = 2560  # 200 terminals with sequence numbers below 2^21 take 2,200


def encode(vector: Mapping[str, int], max_bytes: int = MAX_HELD_BYTES) -> str:
    """The ``held`` text of ``vector`` (terminal id -> contiguous high-water mark); ids that are
    not 16 lower-case hex digits and marks outside 1..2^53 are left out, as are the records
    beyond ``max_bytes``."""
    out = bytearray()
    for terminal in sorted(vector):
        n = vector[terminal]
        tid = node_bytes(terminal)
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
    return {tid.hex(): n for tid, n in read_records(raw, ID_BYTES, 1, MAX_SEQ, "status held").items()}
