"""Is an Automerge change that a peer sent encoded exactly as Automerge itself would encode it?

Why: Automerge applies a change as it arrives and keeps its bytes and hash, but it saves a document
as columns of operations and, on load, encodes every change anew and checks the hashes against the
saved heads. A change encoded any other way (a number written in two bytes where one does, a
run-length column split into two runs, a delete that names no operation, columns in another
order, trailing bytes) applies, then makes every save of that shard unloadable ("mismatching
heads"), for good: the change stays in the shard's history even when the ledger strips the entry
it brought. A fresh node that bootstraps from such a save cuts the honest node off. So the ledger
refuses, before it merges them, changes that are not in Automerge's own encoding
(protocols/link.md, "Canonical changes").

How: every change is decoded into the operations meshpos writes, encoded again the way automerge
0.5.7 does (``storage/change``, ``columnar/encoding``: RLE, delta and boolean encoders, minimal
LEB128, empty columns left out), and the two byte strings must be equal. meshpos writes only one
kind of change (``Ledger._put``, ``_strip``, ``_purge_beyond_cut``, ``_load_shard``): operations on
the root map, each a put of a ``bytes`` value or a delete, in one transaction, without a message.
Anything else is refused, on purpose, because meshpos never writes it and this module cannot
prove its save round-trips: an operation on another object or a list position, another value
type, another action (counters, marks, objects), a column Automerge writes only for those, a
deflated column, a commit message, extra bytes after the columns, an empty change. Also refused,
though each is a valid encoding, because Automerge would write the change differently: deps not
in ascending order, other actors that are not exactly the ones the predecessors name in
ascending order, predecessors not in ascending (counter, actor) order or repeated, a predecessor
not older than its operation, a delete without predecessor (a save keeps a delete only as the
successor of what it deleted). And a root key named by two operations of one change: meshpos
writes each key once per transaction, and a run of one key is how a change of 60 bytes named a
million operations, seconds of CPU to read at every node it reached (red team, 2026-12-03);
refused before anything loops over the operations, a change's cost to read is that of its bytes.

The chunks this reads (``check_chunks``): a change chunk (type 1) is checked as above; a
compressed change chunk (type 2, its body deflated: what ``Change.bytes`` and every PUSH carry) is
inflated and the change inside checked as above (Automerge keeps the inflated change, so how it
was deflated does not matter); a document chunk (type 0, what Automerge's sync puts in a message
to a peer that holds nothing) is accepted unread: Automerge loads it only if every change it
rebuilds from it hashes to the document's heads, which is this very check done by Automerge.
Several chunks may follow one another in one element (Automerge's ``load_incremental`` reads them
all). Anything else is refused.

What this cannot see, reading the change alone: a change encoded canonically but inconsistent
with the document it joins breaks saves too (a predecessor naming an operation on another key or
none at all, a ``seq`` that does not follow its actor's previous change, another ``startOp`` than
Automerge would assign). meshpos.wire.amhistory refuses those, from the shard's history, once
Automerge has applied the change (``change_ops`` gives it the operations read here).

Pure: no I/O; ``NonCanonical`` (an ``EncodingError``) says what is wrong.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from dataclasses import dataclass
from typing import Callable, Final

from meshpos.domain.errors import EncodingError
from meshpos.wire.amchange import Header, read_header
from meshpos.wire.leb128 import Reader, Truncated, sleb128, uleb128

MAGIC: Final = b"\x85\x6f\x4a\x83"
DOCUMENT_CHUNK: Final = 0
CHANGE_CHUNK: Final = 1
COMPRESSED_CHUNK: Final = 2
INFLATED_MAX: Final = 64 * 1024 * 1024  # a compressed change inflating past this is refused
# Operations (and predecessors) of one change: meshpos writes at most a shard's entries (256 of
# its own, plus what a strip deletes) in one; a column's runs can claim 2**63 in a few bytes.
MAX_OPS: Final = 1 << 20
# Change bodies (``_check_body``) and changes (``change_ops``) whose check is remembered, each
# memo apart: more than one merge reads at once (a push carries one change, a sync message up to a
# few hundred); a sale's change is ~500 bytes.
CHECKED_MEMO: Final = 512
CHECKED_MEMO_BODY: Final = 4096
# ... and of at most this many operations: what a memo entry holds grows with its operations, not
# its bytes (a sale's change is one; a 4 kB body of short distinct keys names ~1,000).
CHECKED_MEMO_OPS: Final = 16

# Column specs (id << 4 | deflate << 3 | type) of the changes meshpos writes, in Automerge's order.
KEY_STR: Final = 21
INSERT: Final = 52
ACTION: Final = 66
VAL_META: Final = 86
VAL_RAW: Final = 87
PRED_NUM: Final = 112
PRED_ACTOR: Final = 113
PRED_CTR: Final = 115
KNOWN_COLUMNS: Final = (KEY_STR, INSERT, ACTION, VAL_META, VAL_RAW, PRED_NUM, PRED_ACTOR, PRED_CTR)

ACTION_PUT: Final = 1
ACTION_DELETE: Final = 3
VALUE_BYTES: Final = 7  # value metadata type of a bytes value: length << 4 | 7
VALUE_NULL: Final = 0

SYNC_V1: Final = 0x42
SYNC_V2: Final = 0x43


class NonCanonical(EncodingError):
    """A change Automerge would apply but not encode this way: merging it would break every save
    of the shard."""




# -- LEB128 and the column encodings (automerge columnar/encoding) ----------------------------


def _rle_decode(data: bytes, kind: str) -> list[int | str | None]:
    """A run-length encoded column's entries (``kind``: "uint", "sint" or "str"; None = null)."""
    r = Reader(data)

    def value() -> int | str:
        if kind == "uint":
            return r.uleb()
        if kind == "sint":
            return r.sleb()
        try:
            return r.take(r.uleb()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NonCanonical("a key is not UTF-8") from exc

    out: list[int | str | None] = []
    while not r.done:
        count = r.sleb()
        size = abs(count) if count else r.uleb()
        if len(out) + size > MAX_OPS:  # before making the list: a run can claim 2**63 entries
            raise NonCanonical(f"a column of more than {MAX_OPS} entries")
        if count > 0:
            out.extend([value()] * count)
        elif count < 0:
            out.extend(value() for _ in range(-count))
        else:
            out.extend([None] * size)
    return out


def _rle_encode(values: list[int | str | None], kind: str) -> bytes:
    """automerge ``RleEncoder``: runs of two or more equal values, literal runs of the rest, null
    runs; a column of nulls only is empty."""
    out = bytearray()

    def put(v: int | str) -> None:
        if kind == "uint":
            assert isinstance(v, int)
            out.extend(uleb128(v))
        elif kind == "sint":
            assert isinstance(v, int)
            out.extend(sleb128(v))
        else:
            assert isinstance(v, str)
            raw = v.encode("utf-8")
            out.extend(uleb128(len(raw)) + raw)

    if all(v is None for v in values):
        return b""
    i, n = 0, len(values)
    literal: list[int | str] = []

    def flush_literal() -> None:
        if literal:
            out.extend(sleb128(-len(literal)))
            for v in literal:
                put(v)
            literal.clear()

    while i < n:
        v = values[i]
        j = i
        while j < n and values[j] == v and (v is not None or values[j] is None):
            j += 1
        run = j - i
        if v is None:
            flush_literal()
            out.extend(sleb128(0) + uleb128(run))
        elif run >= 2:
            flush_literal()
            out.extend(sleb128(run))
            put(v)
        else:
            literal.append(v)
        i = j
    flush_literal()
    return bytes(out)


def _delta_decode(data: bytes) -> list[int | None]:
    out: list[int | None] = []
    absolute = 0
    for d in _rle_decode(data, "sint"):
        if d is None:
            out.append(None)
        else:
            assert isinstance(d, int)
            absolute += d
            out.append(absolute)
    return out


def _delta_encode(values: list[int]) -> bytes:
    deltas: list[int | str | None] = []
    absolute = 0
    for v in values:
        deltas.append(v - absolute)
        absolute = v
    return _rle_encode(deltas, "sint")


def _bool_decode(data: bytes) -> list[bool]:
    r = Reader(data)
    out: list[bool] = []
    value = False
    while not r.done:
        count = r.uleb()
        if len(out) + count > MAX_OPS:
            raise NonCanonical(f"a column of more than {MAX_OPS} entries")
        out.extend([value] * count)
        value = not value
    return out


def _bool_encode(values: list[bool]) -> bytes:
    out = bytearray()
    last, count = False, 0
    for v in values:
        if v == last:
            count += 1
        else:
            out.extend(uleb128(count))
            last, count = v, 1
    if count:
        out.extend(uleb128(count))
    return bytes(out)


# -- one change ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operation of a change meshpos writes: a put of bytes or a delete, on root key ``key``,
    with its predecessors as (counter, actor) operation ids."""
    key: str
    put: bool
    preds: tuple[tuple[int, bytes], ...]


def _remembered(decode: Callable[[bytes], tuple[Op, ...]]) -> Callable[[bytes], tuple[Op, ...]]:
    """``decode``, a pure function of bytes, remembered for the last ``CHECKED_MEMO`` inputs of
    up to ``CHECKED_MEMO_BODY`` bytes and ``CHECKED_MEMO_OPS`` operations that passed (a refusal
    raises, and is not remembered; the bounds keep what a peer can make it hold near 2 MB of
    inputs, plus their keys). ``remembered.memo`` is the ``lru_cache`` (tests clear it)."""

    @functools.lru_cache(maxsize=CHECKED_MEMO)
    def memo(data: bytes) -> tuple[Op, ...]:
        ops = decode(data)
        if len(ops) > CHECKED_MEMO_OPS:
            raise _NotRemembered(ops)
        return ops

    @functools.wraps(decode)
    def remembered(data: bytes) -> tuple[Op, ...]:
        if len(data) > CHECKED_MEMO_BODY:
            return decode(data)
        try:
            return memo(data)
        except _NotRemembered as many:
            return many.ops

    remembered.memo = memo  # type: ignore[attr-defined]
    return remembered


class _NotRemembered(Exception):
    """A body that passed but names more than ``CHECKED_MEMO_OPS`` operations: ``lru_cache``
    keeps no exception, so they are not held."""

    def __init__(self, ops: tuple[Op, ...]) -> None:
        super().__init__()
        self.ops = ops


def _decode_body(body: bytes) -> tuple[Op, ...]:
    r = Reader(body)
    header = read_header(r)
    one = _one_new_put(body, r.pos, header)
    return one if one is not None else _decode_general(body, r, header)


@_remembered
def _check_body(body: bytes) -> tuple[Op, ...]:
    """Decode the change body (after ``type, length``) into meshpos's kind of operations, encode
    them again as Automerge does, and compare; the operations, in order. Remembered: a node reads
    each change it receives three times, the push checked before Automerge applies it
    (``check_chunks``), then the history check and the merge's keys (``change_ops``), which read
    the very change Automerge kept."""
    return _decode_body(body)


def _decode_general(body: bytes, r: Reader, header: Header) -> tuple[Op, ...]:
    """Any change body, ``r`` after its header: decoded, encoded again, compared."""
    deps, actor, seq, start_op, time, message, others, specs = header
    columns: dict[int, bytes] = {}
    for spec, size in specs:
        if spec not in KNOWN_COLUMNS:
            raise NonCanonical(f"column {spec}, which meshpos never writes")
        if spec in columns:
            raise NonCanonical(f"column {spec} twice")
        columns[spec] = r.take(size)
    if not r.done:
        raise NonCanonical("extra bytes after the columns")
    if message:
        raise NonCanonical("a commit message, which meshpos never writes")
    if any(a >= b for a, b in zip(deps, deps[1:])):
        raise NonCanonical("deps not in ascending order")

    def column(spec: int) -> bytes:
        return columns.get(spec, b"")

    keys = _rle_decode(column(KEY_STR), "str")
    root_keys = [k for k in keys if k is not None]
    if len(set(root_keys)) != len(root_keys):  # before any loop over the operations
        raise NonCanonical("a root key named twice in one change, which meshpos never writes")
    actions = _rle_decode(column(ACTION), "uint")
    n = len(actions)
    if n == 0:
        raise NonCanonical("a change without operations, which meshpos never writes")
    if len(keys) != n or any(k is None for k in keys):
        raise NonCanonical("an operation not on a root-map key, which meshpos never writes")
    if any(a not in (ACTION_PUT, ACTION_DELETE) for a in actions):
        raise NonCanonical("an action other than put and delete, which meshpos never writes")
    if _bool_decode(column(INSERT)) != [False] * n:
        raise NonCanonical("the insert column is not one false per operation")
    metas = _rle_decode(column(VAL_META), "uint")
    if len(metas) != n or any(m is None for m in metas):
        raise NonCanonical("the value metadata column does not hold one value per operation")
    raw_len = 0
    for action, meta in zip(actions, metas):
        assert isinstance(meta, int)
        if action == ACTION_PUT and meta & 0x0F == VALUE_BYTES:
            raw_len += meta >> 4
        elif not (action == ACTION_DELETE and meta == VALUE_NULL):
            raise NonCanonical("a value that is not bytes, or a delete with a value, which meshpos never writes")
    if raw_len != len(column(VAL_RAW)):
        raise NonCanonical("the values' bytes do not match their lengths")
    counts = _rle_decode(column(PRED_NUM), "uint")
    if len(counts) != n or any(c is None for c in counts):
        raise NonCanonical("the predecessor counts do not hold one count per operation")
    total = sum(c for c in counts if isinstance(c, int))
    pred_actors = _rle_decode(column(PRED_ACTOR), "uint")
    pred_ctrs = _delta_decode(column(PRED_CTR))
    if len(pred_actors) != total or len(pred_ctrs) != total or None in pred_actors or None in pred_ctrs:
        raise NonCanonical("the predecessor columns do not match the predecessor counts")
    table = [actor, *others]
    named: set[bytes] = set()
    ops: list[Op] = []
    at = 0
    for i, (key, action, count) in enumerate(zip(keys, actions, counts)):
        assert isinstance(count, int) and isinstance(key, str)
        if action == ACTION_DELETE and count == 0:
            raise NonCanonical("a delete without predecessor")
        preds: list[tuple[int, bytes]] = []
        previous: tuple[int, bytes] | None = None
        for index, ctr in zip(pred_actors[at:at + count], pred_ctrs[at:at + count]):
            assert isinstance(index, int) and isinstance(ctr, int)
            if index >= len(table):
                raise NonCanonical("a predecessor names an actor past the change's actor table")
            if not 0 < ctr < start_op + i:
                raise NonCanonical("a predecessor not older than its operation")
            this = (ctr, table[index])
            if previous is not None and this <= previous:
                raise NonCanonical("predecessors not in ascending order, or repeated")
            previous = this
            preds.append(this)
            if index:
                named.add(table[index])
        ops.append(Op(key, action == ACTION_PUT, tuple(preds)))
        at += count
    if others != sorted(named) or actor in named:
        raise NonCanonical("the other actors are not exactly those the predecessors name, in ascending order")
    ints = [int(x) for x in pred_ctrs if x is not None]
    encoded = {
        KEY_STR: _rle_encode(keys, "str"),
        INSERT: _bool_encode([False] * n),
        ACTION: _rle_encode(actions, "uint"),
        VAL_META: _rle_encode(metas, "uint"),
        VAL_RAW: column(VAL_RAW),
        PRED_NUM: _rle_encode(counts, "uint"),
        PRED_ACTOR: _rle_encode(pred_actors, "uint"),
        PRED_CTR: _delta_encode(ints),
    }
    present = [(spec, data) for spec, data in encoded.items() if data]
    again = _encode_header(header._replace(specs=[(spec, len(data)) for spec, data in present]))
    for _, data in present:
        again += data
    if bytes(again) != body:
        raise NonCanonical("not encoded as Automerge encodes it")
    return tuple(ops)


_ONE_PUT_COLUMNS: Final = (KEY_STR, INSERT, ACTION, VAL_META, VAL_RAW, PRED_NUM)


def _encode_header(h: Header) -> bytearray:
    """A change body's header as Automerge writes it (minimal LEB128, no commit message)."""
    out = bytearray(uleb128(len(h.deps)) + b"".join(h.deps) + uleb128(len(h.actor)) + h.actor + uleb128(h.seq)
                    + uleb128(h.start_op) + sleb128(h.time) + uleb128(0) + uleb128(len(h.others)))
    for other in h.others:
        out += uleb128(len(other)) + other
    out += uleb128(len(h.specs))
    for spec, size in h.specs:
        out += uleb128(spec) + uleb128(size)
    return out


def _one_new_put(body: bytes, at: int, h: Header) -> tuple[Op, ...] | None:
    """The change nearly every merge brings, one put of bytes under a new key (a sale, a void, a
    result: no predecessor), checked against the one encoding Automerge gives it, without
    decoding its columns: each column of one operation is a literal run of one value. The
    operation, or None for any other change, or one encoded otherwise (the general check then
    decides, and says why it refuses)."""
    if len(h.specs) != 6 or h.message or h.others or tuple(spec for spec, _ in h.specs) != _ONE_PUT_COLUMNS:
        return None
    if any(a >= b for a, b in zip(h.deps, h.deps[1:])):
        return None
    if h.specs[4][1] == 0:  # an empty value: Automerge leaves its (empty) valRaw column out
        return None
    key_column = body[at:at + h.specs[0][1]]
    r = Reader(key_column)
    try:
        if r.sleb() != -1:
            return None
        key = r.take(r.uleb()).decode("utf-8")
    except (Truncated, UnicodeDecodeError):
        return None
    raw = key.encode("utf-8")
    value_len = h.specs[4][1]
    value_at = at + sum(size for _, size in h.specs[:4])
    columns = (
        b"\x7f" + uleb128(len(raw)) + raw,  # keyStr: a literal run of one string
        b"\x01",  # insert: one false
        b"\x7f" + uleb128(ACTION_PUT),  # action
        b"\x7f" + uleb128(value_len << 4 | VALUE_BYTES),  # valMeta: bytes of this length
        body[value_at:value_at + value_len],  # valRaw: the value itself
        b"\x7f\x00",  # predNum: none; predActor and predCtr are empty, so left out
    )
    again = _encode_header(h._replace(specs=[(spec, len(data)) for spec, data in zip(_ONE_PUT_COLUMNS, columns)]))
    if again + b"".join(columns) != body:
        return None
    return (Op(key, True, ()),)


def _check_change_chunk(chunk_type: int, checksum: bytes, body: bytes) -> tuple[Op, ...]:
    if chunk_type == COMPRESSED_CHUNK:
        inflater = zlib.decompressobj(-15)
        try:
            body = inflater.decompress(body, INFLATED_MAX)
        except zlib.error as exc:
            raise NonCanonical(f"a compressed change does not inflate ({exc})") from exc
        if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise NonCanonical("a compressed change is truncated, too large, or followed by other bytes")
    if hashlib.sha256(bytes([CHANGE_CHUNK]) + uleb128(len(body)) + body).digest()[:4] != checksum:
        raise NonCanonical("a change's checksum does not match")
    return _check_body(body)


@_remembered
def change_ops(raw: bytes) -> tuple[Op, ...]:
    """The operations of one uncompressed change chunk (``Change.raw_bytes``), checked as
    ``check_chunks`` does; ``NonCanonical`` if it is not the kind of change meshpos writes.
    Remembered as ``_check_body`` is: the history check and the merge's keys read each change a
    merge brings, and its checksum need not be computed twice."""
    r = Reader(raw)
    try:
        if r.take(4) != MAGIC:
            raise NonCanonical("not an Automerge chunk")
        checksum = r.take(4)
        if r.take(1)[0] != CHANGE_CHUNK:
            raise NonCanonical("not an uncompressed change chunk")
        body = r.take(r.uleb())
        if not r.done:
            raise NonCanonical("extra bytes after the change")
        return _check_change_chunk(CHANGE_CHUNK, checksum, body)
    except Truncated as exc:
        raise NonCanonical("a change is truncated") from exc


OBJ_ACTOR: Final = 1  # objActor: a column of changes meshpos does not write (automerge storage/change)
DEFLATE: Final = 0x08


def root_keys_set(raw: bytes) -> list[str | None]:
    """Per operation of an uncompressed change chunk of any kind: the root key it gives a value
    (a put, or an object made there), or None (a delete, an operation inside another object or
    on a list position: nothing a root key's operation may name as predecessor). A change this
    cannot read gives no key at all, so no predecessor may name its operations."""
    try:
        r = Reader(raw)
        r.take(9)
        body = r.take(r.uleb())
        r = Reader(body)
        r.take(32 * r.uleb())  # deps
        r.take(r.uleb())  # actor
        r.uleb(), r.uleb(), r.sleb()  # seq, startOp, time
        r.take(r.uleb())  # message
        for _ in range(r.uleb()):  # other actors
            r.take(r.uleb())
        specs = [(r.uleb(), r.uleb()) for _ in range(r.uleb())]
        columns = {spec: r.take(size) for spec, size in specs}
        if any(spec & DEFLATE for spec in columns):
            return []
        actions = _rle_decode(columns.get(ACTION, b""), "uint")
        keys = _rle_decode(columns.get(KEY_STR, b""), "str")
        objects = _rle_decode(columns.get(OBJ_ACTOR, b""), "uint")
    except (Truncated, NonCanonical):
        return []
    out: list[str | None] = []
    for i, action in enumerate(actions):
        key = keys[i] if i < len(keys) else None
        on_root = i >= len(objects) or objects[i] is None
        out.append(key if on_root and isinstance(key, str) and action != ACTION_DELETE else None)
    return out


def check_chunks(data: bytes) -> None:
    """Check one element of a PUSH or of a sync message's changes: Automerge chunks one after the
    other, as ``load_incremental`` reads them. Raises ``NonCanonical`` with the reason."""
    r = Reader(data)
    try:
        if r.done:
            raise NonCanonical("an empty change")
        while not r.done:
            start = r.pos
            if r.take(4) != MAGIC:
                raise NonCanonical("not an Automerge chunk")
            checksum = r.take(4)
            chunk_type = r.take(1)[0]
            length = r.uleb()
            if r.data[start + 9:r.pos] != uleb128(length):
                raise NonCanonical("a chunk length not written in the fewest bytes")
            body = r.take(length)
            if chunk_type == DOCUMENT_CHUNK:
                continue  # Automerge loads it only if its changes, encoded anew, match its heads
            if chunk_type not in (CHANGE_CHUNK, COMPRESSED_CHUNK):
                raise NonCanonical(f"a chunk of type {chunk_type}")
            _check_change_chunk(chunk_type, checksum, body)
    except Truncated as exc:
        raise NonCanonical("a change is truncated") from exc


def sync_message_changes(data: bytes) -> list[bytes]:
    """The elements of an Automerge sync message's change list (format v1 0x42 and v2 0x43: type,
    heads, need, have, then the changes; capabilities may follow)."""
    r = Reader(data)
    try:
        if r.take(1)[0] not in (SYNC_V1, SYNC_V2):
            raise NonCanonical("not an Automerge sync message")
        r.take(32 * r.uleb())  # heads
        r.take(32 * r.uleb())  # need
        for _ in range(r.uleb()):  # have: last sync heads and a Bloom filter
            r.take(32 * r.uleb())
            r.take(r.uleb())
        return [r.take(r.uleb()) for _ in range(r.uleb())]
    except Truncated as exc:
        raise NonCanonical("a sync message is truncated") from exc


def check_sync_message(data: bytes) -> None:
    """Check every change an Automerge sync message carries (``check_chunks``)."""
    for element in sync_message_changes(data):
        check_chunks(element)
