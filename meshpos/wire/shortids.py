"""Tables keyed by short node ids: the compact ``links_short`` and ``held_short`` of a status.

Normative text: protocols/link.md, "Short ids (status format 3)". A node id is 16 hex digits (8
bytes); a record names a node by the first ``width`` bytes of its id (4..8), one width for the
whole table, and carries one unsigned integer:

    table  = base64url (no padding, canonical) of  width || record*      ("" : no record)
    width  = one byte, MIN_WIDTH..ID_BYTES
    record = id prefix (width bytes) || value (unsigned LEB128, minimal)

Records are sorted by prefix, strictly ascending (so no node is named twice). Which node a prefix
names is the reader's business: the member of its roster whose id starts with it, if exactly one
does (meshpos.status.shortids). Each table format has its own value range and byte bound; the
encoder keeps the records of the lowest prefixes that fit, the decoder never raises: a table that
is not exactly what the encoder makes reads as no record, with the reason (``ShortTable.problem``)
for the reader to log. Pure: no I/O.

The old ``held`` (wire/heldvec.py) is the same record layout with full ids and no width byte:
``read_records`` reads both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshpos.domain.errors import EncodingError
from meshpos.wire.envelope import b64d, b64e
from meshpos.wire.leb128 import uleb128

ID_BYTES = 8  # a node id: 16 hex digits
MIN_WIDTH = 4  # 2^32 prefixes: two of 256 random ids share one with odds of 1 in 130,000
MAX_LEB_BYTES = 8  # 8 groups of 7 bits: up to 2^56 - 1, past every range below


@dataclass(frozen=True)
class ShortTable:
    """A decoded (or to-be-encoded) table: id prefix -> value, all prefixes ``width`` bytes long.
    ``problem``: why the text read as no record (None when it was well formed); it encodes as
    the empty table ""."""

    width: int
    records: Mapping[bytes, int] = field(default_factory=dict)
    problem: str | None = field(default=None, compare=False)  # a diagnostic, not content

    @classmethod
    def of(cls, width: int, values: Mapping[str, int]) -> "ShortTable":
        """The table of ``values`` (full node id -> value) at ``width``; an id that is not 16
        lower-case hex digits is left out, and of two ids sharing a prefix only the lower is kept
        (the sender picks a width at which its roster has no such pair: ``status.shortids``)."""
        records: dict[bytes, int] = {}
        for node in sorted(values):
            raw = node_bytes(node)
            if raw is not None and raw[:width] not in records:
                records[raw[:width]] = values[node]
        return cls(width, records)


def node_bytes(node: str) -> bytes | None:
    """A node id's 8 bytes, or None if it is not 16 lower-case hex digits."""
    if len(node) != 2 * ID_BYTES or any(c not in "0123456789abcdef" for c in node):
        return None
    return bytes.fromhex(node)


def read_records(raw: bytes, width: int, lo: int, hi: int, what: str) -> dict[bytes, int]:
    """``record*`` (prefix of ``width`` bytes || minimal LEB128 value in lo..hi, prefixes strictly
    ascending) -> prefix -> value; EncodingError naming ``what`` for anything else."""
    out: dict[bytes, int] = {}
    last = b""
    i, end = 0, len(raw)
    while i < end:
        prefix = raw[i:i + width]
        i += width
        if i >= end:  # no room for the value's first byte either
            raise EncodingError(f"{what}: a record is cut short")
        if prefix <= last:
            raise EncodingError(f"{what}: node ids are not strictly ascending (one named twice?)")
        last = prefix
        byte = raw[i]
        i += 1
        n = byte
        if byte & 0x80:  # more groups: 7 bits each, low group first
            n, shift, groups = byte & 0x7F, 7, 1
            while True:
                if i >= end:
                    raise EncodingError(f"{what}: a number is cut short")
                byte = raw[i]
                i += 1
                groups += 1
                n |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
                if groups >= MAX_LEB_BYTES:
                    raise EncodingError(f"{what}: a number is too long")
            if byte == 0:  # a last group of 0 after others: a longer encoding than needed
                n = -1
        if not lo <= n <= hi:
            raise EncodingError(f"{what}: a number is not minimal or out of {lo}..{hi}")
        out[prefix] = n
    return out


@dataclass(frozen=True)
class TableFormat:
    """One table field of the status: its name, value range and bound on the record bytes."""

    name: str
    lo: int
    hi: int
    max_bytes: int  # of records, the width byte apart

    @property
    def max_text(self) -> int:
        """The longest text a well-formed table takes (base64url of width byte + records)."""
        return ((1 + self.max_bytes) * 4 + 2) // 3

    def encode(self, table: ShortTable | None) -> str | None:
        """The field's text (None for None); records whose value is out of range are left out,
        as are those past the byte bound (the lowest prefixes are kept)."""
        if table is None:
            return None
        out = bytearray()
        for prefix in sorted(table.records):
            value = table.records[prefix]
            if len(prefix) != table.width or not self.lo <= value <= self.hi:
                continue
            record = prefix + uleb128(value)
            if len(out) + len(record) > self.max_bytes:
                break
            out += record
        return b64e(bytes([table.width]) + bytes(out)) if out else ""

    def decode(self, text: object) -> ShortTable | None:
        """The table of a field's text (None for null); never raises: a malformed text is an empty
        table whose ``problem`` says why."""
        if text is None:
            return None
        try:
            return self._decode(text)
        except EncodingError as exc:
            return ShortTable(0, {}, str(exc))

    def _decode(self, text: object) -> ShortTable:
        if not isinstance(text, str):
            raise EncodingError(f"{self.name}: not a base64url string")
        if text == "":
            return ShortTable(0)
        if len(text) > self.max_text:
            raise EncodingError(f"{self.name}: longer than {self.max_bytes} bytes of records")
        raw = b64d(text, self.name)
        width = raw[0]
        if not MIN_WIDTH <= width <= ID_BYTES:
            raise EncodingError(f"{self.name}: id width {width} is not {MIN_WIDTH}..{ID_BYTES}")
        if len(raw) == 1:
            raise EncodingError(f"{self.name}: a width and no record (an empty table is \"\")")
        return ShortTable(width, read_records(raw[1:], width, self.lo, self.hi, self.name))


MAX_RTT_MS = 10**15  # the status's bound on a count
# links_short: a link's round-trip time in ms + 1 (0: not measured yet). 256 links at width 4 with
# RTTs below 127 ms take 1,280 bytes; the bound holds 409 such links (341 with RTTs up to 16 s; 292 of
# those at width 5).
LINKS = TableFormat("links_short", 0, MAX_RTT_MS + 1, 2048)
# held_short: the highest sale number held without a gap (protocols/link.md, "What a node holds").
# 256 terminals at width 4 with sequence numbers below 2^21 take 1,792 bytes; the bound holds 365.
HELD = TableFormat("held_short", 1, 2**53, 2560)


def rtt_value(rtt_ms: int | None) -> int:
    return 0 if rtt_ms is None else min(rtt_ms, MAX_RTT_MS) + 1


def rtt_of(value: int) -> int | None:
    return None if value == 0 else value - 1

