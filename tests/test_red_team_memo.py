"""Red team against the remembered canonical check and its shortcut for one new put (issue 15).

meshpos.wire.amcanon remembers the operations of change bodies that passed, and checks a change
of one put with no predecessor (``_one_new_put``) against the one encoding Automerge gives it.
Attacks: a body the shortcut takes but the general check refuses (and that breaks every save of
the shard); the memo answering for other bytes; a peer making the memo hold more than its bound.
"""

from __future__ import annotations

import gc
import hashlib
import os
import tracemalloc

import automerge.core as am
import pytest

from meshpos.ledger.ledger import changes_message
from meshpos.wire import amcanon
from meshpos.wire.leb128 import Reader, sleb128, uleb128

from test_amcanon import _body_of, _general, _same_verdict


def _chunk(body: bytes) -> bytes:
    """An uncompressed change chunk around ``body``, its checksum right: bytes Automerge applies."""
    chunk = bytes([amcanon.CHANGE_CHUNK]) + uleb128(len(body)) + body
    return amcanon.MAGIC + hashlib.sha256(chunk).digest()[:4] + chunk


def _with_columns(body: bytes, columns: list[tuple[int, bytes]]) -> bytes:
    r = Reader(body)
    header = amcanon.read_header(r)
    specs = [(spec, len(data)) for spec, data in columns]
    return bytes(amcanon._encode_header(header._replace(specs=specs))) + b"".join(d for _, d in columns)


def _columns_of(body: bytes) -> list[tuple[int, bytes]]:
    r = Reader(body)
    return [(spec, r.take(size)) for spec, size in amcanon.read_header(r).specs]


def test_an_empty_value_with_its_column_written_out_is_refused() -> None:
    """Automerge leaves out an empty column, so a put of an empty value has no valRaw column.
    Written with a valRaw column of 0 bytes, the change has the shortcut's six columns and each
    is what the shortcut builds: it took it, though the general check refuses it. Automerge
    applies it, and the shard's save no longer loads."""
    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "cert/x", am.ScalarType.Bytes, b"x")
    target = doc.fork()
    before = doc.get_heads()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "sale/junk", am.ScalarType.Bytes, b"")
    [change] = doc.get_changes(before)
    honest = _body_of(change.raw_bytes)
    columns = dict(_columns_of(honest))
    assert amcanon.VAL_RAW not in columns  # Automerge's own encoding leaves it out
    columns[amcanon.VAL_RAW] = b""
    body = _with_columns(honest, [(spec, columns[spec]) for spec in amcanon._ONE_PUT_COLUMNS])
    bad = _chunk(body)
    # test of the test: Automerge applies it, and every save of the shard is broken
    target.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([bad])))
    assert "sale/junk" in target.keys(am.ROOT)
    with pytest.raises(Exception, match="mismatching heads"):
        am.Document.load(target.save())
    with pytest.raises(amcanon.NonCanonical):
        _general(body)
    with pytest.raises(amcanon.NonCanonical):
        amcanon.check_chunks(bad)
    with pytest.raises(amcanon.NonCanonical):
        amcanon.change_ops(bad)
    amcanon.check_chunks(change.raw_bytes)  # the honest one passes


def _many_puts(n: int) -> bytes:
    """A change body of ``n`` puts of an empty value under one key, each column one run: canonical,
    about 60 bytes, whatever ``n`` is (Automerge applies it)."""
    header = amcanon.Header([], os.urandom(16), 1, 1, 0, b"", [], [])
    return _with_columns(bytes(amcanon._encode_header(header)), [
        (amcanon.KEY_STR, sleb128(n) + uleb128(1) + b"k"),
        (amcanon.INSERT, uleb128(n)),
        (amcanon.ACTION, sleb128(n) + uleb128(amcanon.ACTION_PUT)),
        (amcanon.VAL_META, sleb128(n) + uleb128(amcanon.VALUE_BYTES)),
        (amcanon.PRED_NUM, sleb128(n) + uleb128(0)),
    ])


def _distinct_puts(n: int) -> bytes:
    """A change body of ``n`` puts of an empty value under ``n`` different keys: canonical, a few
    bytes per operation (the keys are a literal run; every other column one run)."""
    header = amcanon.Header([], os.urandom(16), 1, 1, 0, b"", [], [])
    keys = [f"k{i}".encode() for i in range(n)]
    return _with_columns(bytes(amcanon._encode_header(header)), [
        (amcanon.KEY_STR, sleb128(-n) + b"".join(uleb128(len(k)) + k for k in keys)),
        (amcanon.INSERT, uleb128(n)),
        (amcanon.ACTION, sleb128(n) + uleb128(amcanon.ACTION_PUT)),
        (amcanon.VAL_META, sleb128(n) + uleb128(amcanon.VALUE_BYTES)),
        (amcanon.PRED_NUM, sleb128(n) + uleb128(0)),
    ])


def test_a_peer_cannot_make_the_memo_hold_much_more_than_its_bodies() -> None:
    """The memo is bounded by its bodies' bytes (512 of at most 4 kB), but it holds their
    operations too: a body of 60 bytes named a million (MAX_OPS), ~100 MB held per body that
    passed, by one key repeated. Such a body is refused now (a key named twice in one change);
    one of distinct keys costs bytes for each, and only changes of a few operations are kept."""
    doc = am.Document()
    doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([_chunk(_many_puts(1000))])))
    assert doc.keys(am.ROOT) == ["k"]  # test of the test: Automerge applies such a change
    with pytest.raises(amcanon.NonCanonical, match="named twice"):
        amcanon.change_ops(_chunk(_many_puts(20_000)))
    amcanon._check_body.memo.cache_clear()
    amcanon.change_ops.memo.cache_clear()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(4):
            body = _distinct_puts(600)
            assert len(body) <= amcanon.CHECKED_MEMO_BODY  # small enough to be remembered by bytes
            assert len(amcanon.change_ops(_chunk(body))) == 600  # still checked, and answered
        gc.collect()  # only what is referenced stays
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, amcanon.__file__)])
    finally:
        tracemalloc.stop()
        amcanon._check_body.memo.cache_clear()
        amcanon.change_ops.memo.cache_clear()
    held = sum(stat.size for stat in snapshot.statistics("filename"))  # made by amcanon, still held
    assert held < 50_000


def test_the_memo_answers_only_for_the_very_bytes() -> None:
    """The memo is keyed by the body's bytes (equality, not only the hash): a body that differs
    in one byte (another key, another value, another actor of the same length) gets its own
    answer, and a refused body is refused though an accepted one equal to it but for one byte
    is remembered."""
    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "sale/aaaa", am.ScalarType.Bytes, b"value")
    raw = doc.get_changes([])[0].raw_bytes
    body = _body_of(raw)
    assert amcanon.change_ops(raw) == (amcanon.Op("sale/aaaa", True, ()),)
    at = body.index(b"sale/aaaa") + len("sale/")
    other = body[:at] + b"b" + body[at + 1:]
    assert amcanon.change_ops(_chunk(other)) == (amcanon.Op("sale/baaa", True, ()),)
    for i in range(len(body)):  # every byte changed: the answer is the general check's
        _same_verdict(body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:], amcanon._check_body)


def test_merged_keys_names_every_key_a_merge_changed_whatever_the_memo_holds() -> None:
    """merged_keys decides which entries a merge verifies; it now reads the memo's operations.
    A change of meshpos's kind after the memo holds another one equal but for its key; a change
    of another kind (an object made at a root key, as a snapshot may carry); a delete: each
    merge's keys include every key Automerge's own diff says changed (or are None: all keys)."""
    from meshpos.ledger.ledger import changed_keys, merged_keys
    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "cert/x", am.ScalarType.Bytes, b"x")
        tx.put(am.ROOT, "sale/old", am.ScalarType.Bytes, b"old")
    seen = am.Document()
    with seen.transaction() as tx:
        tx.put(am.ROOT, "sale/aaaa", am.ScalarType.Bytes, b"v")
    amcanon.change_ops(seen.get_changes([])[0].raw_bytes)  # the memo holds this one

    def merge(edit: object) -> None:
        other = doc.fork()
        with other.transaction() as tx:
            edit(tx)  # type: ignore[operator]
        before = doc.get_heads()
        doc.merge(other)
        keys = merged_keys(doc, before)
        diff = changed_keys(doc, before)
        assert diff  # test of the test: the merge changed something
        assert keys is None or diff <= keys, (keys, diff)

    merge(lambda tx: tx.put(am.ROOT, "sale/aaab", am.ScalarType.Bytes, b"v"))
    merge(lambda tx: tx.put_object(am.ROOT, "sale/map", am.ObjType.Map))
    merge(lambda tx: tx.delete(am.ROOT, "sale/old"))
    merge(lambda tx: tx.put(am.ROOT, "sale/empty", am.ScalarType.Bytes, b""))
