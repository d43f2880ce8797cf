"""The root-map keys an Automerge change's operations name, read from the change's own bytes.

A merge changes the value of a root key only through an operation on that key in one of the
changes it applied, so the keys those changes name are a superset of the keys the merge changed
(an operation that loses to a concurrent one is named but changes nothing: checking it again costs
a little, missing one would be wrong). The ledger reads them here instead of from Automerge's diff
of the whole document, whose cost grows with the shard.

Format: Automerge's binary change chunk, uncompressed (``Change.raw_bytes``; automerge-rs
``storage/change.rs`` and the binary format spec): ``magic(4) checksum(4) type(1)=1 len(uLEB)``,
then deps, actor, seq, start op, time, message, other actors, the column metadata (count, then
``spec, length`` pairs, in uLEB) and the columns' data. A column spec is ``id << 4 | deflate << 3
| type``. The columns read here: ``objActor`` (spec 1; every value null = the root object),
``keyStr`` (spec 21, a run-length encoded string column) and ``action`` (spec 66, counts the
operations). Anything this module does not recognise (another chunk type, a deflated column, an
operation on another object or on a list position, a truncated field) returns None, and the
caller falls back to the diff: never a guess.
"""

from __future__ import annotations

MAGIC = b"\x85\x6f\x4a\x83"
CHANGE_CHUNK = 1
OBJ_ACTOR = 1  # id 0, actor type
OBJ_CTR = 2  # id 0, uint RLE
KEY_ACTOR = 17  # id 1, actor type
KEY_CTR = 19  # id 1, delta
KEY_STR = 21  # id 1, string RLE
ACTION = 66  # id 4, uint RLE
DEFLATE = 0x08


class _Malformed(Exception):
    pass


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def uleb(self) -> int:
        if self.pos < self.end and self.data[self.pos] < 0x80:  # one byte: nearly every field here
            self.pos += 1
            return self.data[self.pos - 1]
        return self._varint()[0]

    def sleb(self) -> int:
        result, bits, last = self._varint()
        return result - (1 << bits) if last & 0x40 else result

    def _varint(self) -> tuple[int, int, int]:
        """A LEB128 number's bits, how many bits it has, and its last byte (for the sign)."""
        result, shift = 0, 0
        while True:
            if self.pos >= self.end or shift > 63:
                raise _Malformed
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result, shift, byte

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _Malformed
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def done(self) -> bool:
        return self.pos >= self.end


def _rle_count(reader: _Reader, value: str) -> tuple[int, int]:
    """Entries and null entries of a run-length encoded column (``value``: "uint" or "str")."""
    total = nulls = 0
    while not reader.done:
        count = reader.sleb()
        if count > 0:
            _rle_value(reader, value)
            total += count
        elif count < 0:
            for _ in range(-count):
                _rle_value(reader, value)
            total -= count
        else:
            n = reader.uleb()
            total += n
            nulls += n
    return total, nulls


def _rle_value(reader: _Reader, value: str) -> str | int:
    if value == "uint":
        return reader.uleb()
    if value == "sint":  # a delta column's values
        return reader.sleb()
    try:
        return reader.take(reader.uleb()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed from exc


def _rle_strings(reader: _Reader) -> tuple[set[str], int, int]:
    """The distinct non-null values of a string RLE column, its entries and its nulls."""
    keys: set[str] = set()
    total = nulls = 0
    while not reader.done:
        count = reader.sleb()
        if count > 0:
            keys.add(str(_rle_value(reader, "str")))
            total += count
        elif count < 0:
            for _ in range(-count):
                keys.add(str(_rle_value(reader, "str")))
            total -= count
        else:
            n = reader.uleb()
            total += n
            nulls += n
    return keys, total, nulls


def _columns(raw: bytes) -> dict[int, _Reader]:
    r = _Reader(raw)
    if r.take(4) != MAGIC:
        raise _Malformed
    r.take(4)  # checksum: Automerge checked it when it applied the change
    if r.take(1)[0] != CHANGE_CHUNK:
        raise _Malformed
    length = r.uleb()
    if r.pos + length > len(raw):
        raise _Malformed
    r.end = r.pos + length
    r.take(32 * r.uleb())  # deps
    r.take(r.uleb())  # actor
    r.uleb()  # seq
    r.uleb()  # start op
    r.sleb()  # time
    r.take(r.uleb())  # message
    for _ in range(r.uleb()):  # other actors
        r.take(r.uleb())
    specs = [(r.uleb(), r.uleb()) for _ in range(r.uleb())]
    columns: dict[int, _Reader] = {}
    pos = r.pos
    for spec, size in specs:
        if pos + size > r.end:
            raise _Malformed
        if spec in (OBJ_ACTOR, OBJ_CTR, KEY_ACTOR, KEY_CTR, KEY_STR, ACTION):
            columns[spec] = _Reader(raw, pos, pos + size)
        elif spec & ~DEFLATE in (OBJ_ACTOR, OBJ_CTR, KEY_ACTOR, KEY_CTR, KEY_STR, ACTION):
            raise _Malformed  # a deflated column this module needs: let Automerge's diff read it
        pos += size
    return columns


def root_keys(raw: bytes) -> set[str] | None:
    """The root-map keys every operation of the uncompressed change chunk ``raw`` names, or None
    where an operation is not on a root-map key or the bytes are not a change this reads."""
    try:
        columns = _columns(raw)
        ops, action_nulls = _rle_count(columns[ACTION], "uint") if ACTION in columns else (0, 0)
        if action_nulls:
            return None
        for spec in (OBJ_ACTOR, OBJ_CTR):  # absent, or null on every operation: the root object
            if spec in columns:
                total, nulls = _rle_count(columns[spec], "uint")
                if nulls != total or total not in (0, ops):
                    return None
        for spec, kind in ((KEY_ACTOR, "uint"), (KEY_CTR, "sint")):  # null, or a list position (elemId)
            if spec in columns:
                total, nulls = _rle_count(columns[spec], kind)
                if nulls != total:
                    return None
        if KEY_STR not in columns:
            return set() if ops == 0 else None
        keys, total, nulls = _rle_strings(columns[KEY_STR])
        if nulls or total != ops:
            return None
        return keys
    except _Malformed:
        return None
