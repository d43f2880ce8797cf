"""meshpos.wire.amcanon: every change and sync message honest Automerge (automerge==1.0.0rc1)
writes through meshpos's own ways of writing passes; encodings Automerge would not write are
refused (and they do break saves: that is why)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import automerge.core as am
import pytest
from hypothesis import given, settings, strategies as st

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.ledger.ledger import changes_message
from meshpos.node.memnode import SimNode, enroll, make_site
from meshpos.wire import amcanon, amhistory

from test_red_team_automerge_panic import with_column
from test_tls import FAST

PRED_NUM, PRED_ACTOR, PRED_CTR, ACTION, KEY_STR, VAL_META, INSERT = 112, 113, 115, 66, 21, 86, 52


def check_every_change(doc: am.Document) -> int:
    """Check each change of ``doc`` as a peer receives it, uncompressed and compressed."""
    changes = doc.get_changes([])
    for change in changes:
        amcanon.check_chunks(change.raw_bytes)
        amcanon.check_chunks(change.bytes)
    return len(changes)


def sync_all(a: am.Document, b: am.Document) -> int:
    """Sync ``a`` and ``b`` as two honest peers do, checking every message each one receives."""
    sa, sb = am.SyncState(), am.SyncState()
    checked = 0
    for _ in range(50):
        moved = False
        for src, dst, s_src, s_dst in ((a, b, sa, sb), (b, a, sb, sa)):
            msg = src.generate_sync_message(s_src)
            if msg is not None:
                data = msg.encode()
                amcanon.check_sync_message(data)
                dst.receive_sync_message(s_dst, am.Message.decode(data))
                checked += 1
                moved = True
        if not moved:
            break
    assert a.get_heads() == b.get_heads()
    return checked


def actor() -> bytes:
    return os.urandom(16)  # as the ledger's: node id (8 bytes) and 8 random bytes


step = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 4), st.lists(st.integers(0, 40), min_size=1, max_size=6),
              st.sampled_from([0, 1, 7, 100, 255, 256, 257, 700, 3000])),
    st.tuples(st.just("delete"), st.integers(0, 4), st.lists(st.integers(0, 40), min_size=1, max_size=6), st.just(0)),
    st.tuples(st.just("merge"), st.integers(0, 4), st.lists(st.integers(0, 4), min_size=1, max_size=2), st.just(0)),
)


@settings(max_examples=1500, deadline=None)
@given(st.integers(1, 5), st.lists(step, min_size=1, max_size=25), st.binary(min_size=1, max_size=4))
def test_every_honest_change_passes(nodes: int, steps: list[tuple[str, int, list[int], int]], seed: bytes) -> None:
    """Several actors write in root-map puts of bytes (one or several per change, small and over
    the deflate threshold, random and repetitive) and deletes, overwrite each other's keys, merge
    each other (changes with deps on several heads, puts and deletes with several predecessors),
    and sync: every change, and every sync message, passes; every merge's changes fit the
    merging document's history (more of that in test_amhistory)."""
    docs = [am.Document(actor()) for _ in range(nodes)]
    histories = [amhistory.Histories() for _ in range(nodes)]  # meshpos.wire.amhistory
    for kind, who, args, size in steps:
        doc = docs[who % nodes]
        if kind == "put":
            with doc.transaction() as tx:
                for k in dict.fromkeys(args):  # each key once per transaction, as meshpos writes
                    value = (seed * (size // len(seed) + 1))[:size] if k % 2 else os.urandom(size)
                    tx.put(am.ROOT, f"sale/{k:02d}", am.ScalarType.Bytes, value)
        elif kind == "delete":
            present = [f"sale/{k:02d}" for k in args if doc.get(am.ROOT, f"sale/{k:02d}") is not None]
            if present:
                with doc.transaction() as tx:
                    for key in dict.fromkeys(present):
                        tx.delete(am.ROOT, key)
        else:
            for other in args:
                if docs[other % nodes] is not doc:
                    before = doc.get_heads()
                    doc.merge(docs[other % nodes])
                    histories[who % nodes].check_merge("s", doc, before, doc.get_changes(before))  # fits too
    for doc in docs:
        check_every_change(doc)
    if nodes > 1:
        sync_all(docs[0], docs[1])
        sync_all(docs[1], am.Document(actor()))  # a peer holding nothing


def test_the_real_ledger_writes_only_changes_that_pass(tmp_path: Path) -> None:
    """The ledger's own writing paths: a certificate, 300 sales (two shards, the second after the
    log's 256th entry), voids, an entry a peer sent that the ledger rejects and strips (its delete),
    a shard rebuilt from verified entries (every entry put in one change), and the sync of all of
    it between two real ledgers, a fresh one included."""
    site = make_site(tmp_path / "site")
    a = SimNode.open(enroll(site, tmp_path / "a", "a"), SYSTEM_CLOCK, FAST)
    b = SimNode.open(enroll(site, tmp_path / "b", "b"), SYSTEM_CLOCK, FAST)
    try:
        sold = [a.core.sell(100 + i)["id"] for i in range(300)]
        for sale_id in sold[:20]:
            a.core.void(sale_id)
        b.core.sell(5)
        for led_from, led_to in ((a.core.ledger, b.core.ledger), (b.core.ledger, a.core.ledger)):
            for shard in led_from.shards():
                sync_ledgers(led_from, led_to, shard)
        shard = next(s for s in a.core.ledger.shards() if s.startswith(b.core.node_id))
        junk = a.core.ledger._doc(shard).fork()
        before = junk.get_heads()
        with junk.transaction() as tx:
            tx.put(am.ROOT, "sale/forged", am.ScalarType.Bytes, b"not an envelope")
        [forged] = junk.get_changes(before)
        report = b.core.ledger.receive_push(shard, [forged.bytes], "peer")
        assert report.rejected and "sale/forged" not in b.core.ledger._doc(shard).keys(am.ROOT)  # stripped
        b.core.store.put_snapshot(shard, b"damaged")
        b = b.reopen(SYSTEM_CLOCK)  # the shard is rebuilt from verified entries
        checked = 0
        for node in (a, b):
            for name in node.core.ledger.shards():
                checked += check_every_change(node.core.ledger._doc(name))
        assert checked > 300
        for led_from, led_to in ((b.core.ledger, a.core.ledger), (a.core.ledger, b.core.ledger)):
            for name in led_from.shards():
                sync_ledgers(led_from, led_to, name)
        assert a.entries() == b.entries()
    finally:
        a.close()
        b.close()


def sync_ledgers(src, dst, shard: str) -> None:  # type: ignore[no-untyped-def]
    """Sync one shard from ``src`` to ``dst`` through the ledgers (each message checked by the
    receiving ledger, as on a link)."""
    s_src, s_dst = am.SyncState(), am.SyncState()
    for _ in range(20):
        out = src.generate_sync(shard, s_src)
        back = None
        if out is not None:
            amcanon.check_sync_message(out)
            dst.receive_sync(shard, s_dst, out, "peer")
            back = dst.generate_sync(shard, s_dst)
            if back is not None:
                amcanon.check_sync_message(back)
                src.receive_sync(shard, s_src, back, "peer")
        if out is None and back is None:
            return


# -- what is refused ---------------------------------------------------------------------------


def _one_put(key: str = "sale/a", value: bytes = b"xyz") -> tuple[am.Document, bytes]:
    """An empty document, and a change putting ``key``."""
    doc = am.Document(actor())
    with doc.transaction() as tx:
        tx.put(am.ROOT, key, am.ScalarType.Bytes, value)
    [change] = doc.get_changes([])
    return am.Document(), change.raw_bytes


def _overwrite(times: int = 1) -> tuple[am.Document, bytes]:
    """A document with "sale/a" put by two actors concurrently, and a change overwriting both
    values (two predecessors)."""
    base, _ = _one_put()
    other = base.fork()
    other.set_actor(actor())
    with other.transaction() as tx:
        tx.put(am.ROOT, "sale/a", am.ScalarType.Bytes, b"other")
    with base.transaction() as tx:
        tx.put(am.ROOT, "sale/a", am.ScalarType.Bytes, b"mine")
    base.merge(other)
    target = base.fork()
    before = base.get_heads()
    with base.transaction() as tx:
        tx.put(am.ROOT, "sale/a", am.ScalarType.Bytes, b"both")
    [change] = base.get_changes(before)
    return target, change.raw_bytes


def _applies_and_breaks_save(target: am.Document, raw: bytes) -> bool:
    doc = target.fork()
    try:
        doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([raw])))
    except Exception:
        return False
    try:
        am.Document.load(doc.save())
    except Exception as exc:
        return "mismatching heads" in str(exc)
    return False


NON_CANONICAL = {
    "predNum 0 in two bytes": (lambda: _one_put(), PRED_NUM, b"\x7f\x80\x00"),
    "action as a run of one": (lambda: _one_put(), ACTION, b"\x01\x01"),
    "key as a run of one": (lambda: _one_put(), KEY_STR, b"\x01\x06sale/a"),
    "value metadata in two bytes": (lambda: _one_put(), VAL_META, b"\x7f\xb7\x00"),
    "insert count in two bytes": (lambda: _one_put(), INSERT, b"\x81\x00"),
    "a predecessor count as a run of one": (lambda: _overwrite(), PRED_NUM, b"\x01\x02"),
}


@pytest.mark.parametrize("case", sorted(NON_CANONICAL))
def test_a_non_canonical_encoding_is_refused_and_would_have_broken_saves(case: str) -> None:
    make, spec, data = NON_CANONICAL[case]
    target, honest = make()
    amcanon.check_chunks(honest)
    bad = with_column(honest, spec, data)
    with pytest.raises(amcanon.NonCanonical):
        amcanon.check_chunks(bad)
    assert _applies_and_breaks_save(target, bad)  # what the refusal spares the shard


def test_what_meshpos_never_writes_is_refused() -> None:
    """An operation off the root map, another value type, a commit message, trailing bytes, a
    chunk that is not one: refused with the reason."""
    doc = am.Document(actor())
    with doc.transaction() as tx:
        tx.put_object(am.ROOT, "list", am.ObjType.List)
    with pytest.raises(amcanon.NonCanonical, match="never writes"):
        amcanon.check_chunks(doc.get_changes([])[0].raw_bytes)
    doc = am.Document(actor())
    with doc.transaction() as tx:
        tx.put(am.ROOT, "sale/a", am.ScalarType.Str, "text")
    with pytest.raises(amcanon.NonCanonical, match="never writes"):
        amcanon.check_chunks(doc.get_changes([])[0].raw_bytes)
    _, honest = _one_put()
    with pytest.raises(amcanon.NonCanonical):
        amcanon.check_chunks(honest + b"\x00")
    with pytest.raises(amcanon.NonCanonical):
        amcanon.check_chunks(honest[:-1])
    with pytest.raises(amcanon.NonCanonical):
        amcanon.check_chunks(b"")
    with pytest.raises(amcanon.NonCanonical):
        amcanon.check_sync_message(b"\x41")
    with pytest.raises(amcanon.NonCanonical, match="more than"):
        amcanon.check_chunks(with_column(honest, ACTION, b"\xff\xff\xff\xff\x0f\x01"))  # 2**35 puts in 6 bytes


def test_a_document_chunk_in_a_sync_message_passes_and_automerge_checks_it() -> None:
    """Automerge's sync sends a peer holding nothing the whole document: accepted unread, since
    Automerge loads it only if its changes encoded anew hash to its heads."""
    doc = am.Document(actor())
    with doc.transaction() as tx:
        tx.put(am.ROOT, "sale/a", am.ScalarType.Bytes, b"xyz")
    amcanon.check_chunks(doc.save())


def test_a_document_chunk_of_a_poisoned_document_is_refused_by_automerge() -> None:
    """Why a document chunk may pass unread: Automerge itself refuses one whose changes, encoded
    anew, do not hash to its heads (here a document holding the red team's change)."""
    target, honest = _one_put()
    poisoned = target.fork()
    bad = with_column(honest, PRED_NUM, b"\x7f\x80\x00")
    poisoned.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([bad])))
    saved = poisoned.save()
    amcanon.check_chunks(saved)  # passes here...
    with pytest.raises(Exception, match="mismatching heads"):  # ...and Automerge refuses it
        am.Document().receive_sync_message(am.SyncState(), am.Message.decode(changes_message([saved])))


def _body_of(raw: bytes) -> bytes:
    """The body of an uncompressed change chunk (``Change.raw_bytes``)."""
    r = amcanon.Reader(raw)
    r.take(9)
    return r.take(r.uleb())


def _general(body: bytes) -> tuple[amcanon.Op, ...]:
    r = amcanon.Reader(body)
    return amcanon._decode_general(body, r, amcanon.read_header(r))


def _same_verdict(body: bytes, check: Callable[[bytes], tuple[amcanon.Op, ...]] = amcanon._decode_body) -> None:
    """``check`` (the shortcut for one new put, ``_one_new_put``, by default) decides as the
    general check does: the same operations, or the same refusal."""
    try:
        expected: object = _general(body)
    except (amcanon.NonCanonical, amcanon.Truncated) as exc:
        expected = type(exc)
    try:
        got: object = check(body)
    except (amcanon.NonCanonical, amcanon.Truncated) as exc:
        got = type(exc)
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40), st.sampled_from([0, 1, 15, 16, 127, 128, 300, 3000]),
       st.integers(0, 3), st.data())
def test_the_shortcut_for_one_new_put_decides_as_the_general_check(key: str, size: int, earlier: int,
                                                                    data: st.DataObject) -> None:
    """Nearly every change a node receives is one put of a new key (a sale, a void, a result); it
    is checked against its one encoding without decoding the columns. For any key (any Unicode),
    any value size, with deps or without, and for every byte of it changed, cut or added, the
    shortcut accepts exactly what the general check accepts, with the same operation."""
    doc = am.Document(actor())
    for i in range(earlier):  # deps, a higher seq and startOp
        with doc.transaction() as tx:
            tx.put(am.ROOT, f"earlier/{i}", am.ScalarType.Bytes, os.urandom(20))
    with doc.transaction() as tx:
        tx.put(am.ROOT, key, am.ScalarType.Bytes, os.urandom(size))
    body = _body_of(doc.get_changes([])[-1].raw_bytes)
    r = amcanon.Reader(body)
    header = amcanon.read_header(r)
    shortcut = amcanon._one_new_put(body, r.pos, header)
    if size:
        assert shortcut == (amcanon.Op(key, True, ()),) == _general(body)
    else:  # an empty value leaves its column out: not the shortcut's shape, the general check's
        assert shortcut is None and _general(body) == (amcanon.Op(key, True, ()),)
    at = data.draw(st.integers(0, len(body) - 1))
    flipped = bytearray(body)
    flipped[at] ^= data.draw(st.integers(1, 255))
    for mutant in (bytes(flipped), body[:at], body + data.draw(st.binary(min_size=1, max_size=3)),
                   body[:at] + body[at + 1:]):
        _same_verdict(mutant)


def test_a_key_named_twice_in_one_change_is_refused_before_the_operations_are_read() -> None:
    """meshpos writes each root key once per transaction. A change that names one key twice is
    refused (Automerge would write it so; meshpos never does), and it is refused on its key
    column alone: a run of one key is how 60 bytes named a million operations, which the checks
    after it would loop over (seconds of CPU at every node a push reached)."""
    doc = am.Document(actor())
    with doc.transaction() as tx:
        tx.put(am.ROOT, "sale/a", am.ScalarType.Bytes, b"1")
        tx.put(am.ROOT, "sale/a", am.ScalarType.Bytes, b"2")
    change = doc.get_changes([])[-1]
    for chunk in (change.raw_bytes, change.bytes):
        with pytest.raises(amcanon.NonCanonical, match="named twice"):
            amcanon.check_chunks(chunk)
    # the key column of a million puts of one key, as a peer could write it in a few bytes: the
    # decode stops at the keys (the actions column is never reached: it is not even valid here)
    body = _body_of(change.raw_bytes)
    r = amcanon.Reader(body)
    header = amcanon.read_header(r)
    key_column = amcanon.sleb128(1 << 20) + amcanon.uleb128(6) + b"sale/a"
    columns = [(amcanon.KEY_STR, key_column), (amcanon.ACTION, b"\xff")]
    forged = amcanon._encode_header(header._replace(specs=[(spec, len(data)) for spec, data in columns]))
    forged += b"".join(data for _, data in columns)
    with pytest.raises(amcanon.NonCanonical, match="named twice"):
        amcanon._decode_body(bytes(forged))
