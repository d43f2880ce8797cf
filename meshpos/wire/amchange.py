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

from typing import NamedTuple

from meshpos.wire.leb128 import Reader, Truncated

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



def _rle_count(reader: Reader, value: str) -> tuple[int, int]:
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


def _rle_value(reader: Reader, value: str) -> str | int:
    if value == "uint":
        return reader.uleb()
    if value == "sint":  # a delta column's values
        return reader.sleb()
    try:
        return reader.take(reader.uleb()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed from exc


def _rle_strings(reader: Reader) -> tuple[set[str], int, int]:
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


class Header(NamedTuple):
    """The fields of a change body before its columns' data (the module's docstring)."""
    deps: list[bytes]
    actor: bytes
    seq: int
    start_op: int
    time: int
    message: bytes
    others: list[bytes]
    specs: list[tuple[int, int]]  # (column spec, data length), in order


def read_header(r: Reader) -> Header:
    """The header of the change body ``r`` is at (after ``type, length``); ``r`` is left at the
    columns' data. Truncated if the body ends first."""
    deps = [r.take(32) for _ in range(r.uleb())]
    actor = r.take(r.uleb())
    seq, start_op, time = r.uleb(), r.uleb(), r.sleb()
    message = r.take(r.uleb())
    others = [r.take(r.uleb()) for _ in range(r.uleb())]
    specs = [(r.uleb(), r.uleb()) for _ in range(r.uleb())]
    return Header(deps, actor, seq, start_op, time, message, others, specs)


def _columns(raw: bytes) -> dict[int, Reader]:
    r = Reader(raw)
    if r.take(4) != MAGIC:
        raise _Malformed
    r.take(4)  # checksum: Automerge checked it when it applied the change
    if r.take(1)[0] != CHANGE_CHUNK:
        raise _Malformed
    length = r.uleb()
    if r.pos + length > len(raw):
        raise _Malformed
    r.end = r.pos + length
    specs = read_header(r).specs
    columns: dict[int, Reader] = {}
    pos = r.pos
    for spec, size in specs:
        if pos + size > r.end:
            raise _Malformed
        if spec in (OBJ_ACTOR, OBJ_CTR, KEY_ACTOR, KEY_CTR, KEY_STR, ACTION):
            columns[spec] = Reader(raw, pos, pos + size)
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
    except (_Malformed, Truncated):
        return None
