"""meshpos.wire.amhistory: every change honest Automerge (automerge==1.0.0rc1) writes fits the
shard's history it joins, however writers merge, overwrite, delete and reload; a change encoded
canonically but not fitting (a wrong seq, startOp or predecessor) is refused, and it does break
saves: that is why."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import automerge.core as am
import pytest
from hypothesis import given, settings, strategies as st

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.ledger.ledger import changes_message
from meshpos.node.memnode import SimNode, enroll, make_site
from meshpos.wire import amcanon, amhistory
from meshpos.wire.leb128 import Reader as _Reader, sleb128 as _sleb, uleb128 as _uleb

from test_red_team_automerge_panic import with_column
from test_tls import FAST

PRED_CTR = 115


def with_header(raw: bytes, seq: int | None = None, start_op: int | None = None) -> bytes:
    """The change chunk ``raw`` with another ``seq`` or ``startOp``, canonically encoded, the
    checksum made anew."""
    r = _Reader(raw)
    r.take(9)
    body = r.take(r.uleb())
    r = _Reader(body)
    r.take(32 * r.uleb())
    r.take(r.uleb())
    head = body[:r.pos]
    old_seq, old_start = r.uleb(), r.uleb()
    new = head + _uleb(old_seq if seq is None else seq) + _uleb(old_start if start_op is None else start_op)
    new += body[r.pos:]
    chunk = bytes([amcanon.CHANGE_CHUNK]) + _uleb(len(new)) + new
    return amcanon.MAGIC + hashlib.sha256(chunk).digest()[:4] + chunk


def with_pred(raw: bytes, counter: int) -> bytes:
    """``raw`` (one operation with one predecessor) with the predecessor's counter ``counter``."""
    return with_column(raw, PRED_CTR, b"\x7f" + _sleb(counter))


def apply(doc: am.Document, raw: bytes) -> list[bytes]:
    """Apply ``raw`` as a push does; the heads before."""
    before = doc.get_heads()
    doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([raw])))
    return before


def check_merge(histories: amhistory.Histories, name: str, doc: am.Document, before: list[bytes]) -> int:
    new = doc.get_changes(before)
    histories.check_merge(name, doc, before, new)
    return len(new)


def target_and_change() -> tuple[am.Document, bytes, bytes]:
    """A shard written by two actors (keys a, b, c; c put then deleted then put again), and an
    honest change of a third overwriting ``a``: the shard, the change, its actor."""
    writer = am.Document(os.urandom(16))
    with writer.transaction() as tx:
        tx.put(am.ROOT, "a", am.ScalarType.Bytes, b"1")  # op 1
        tx.put(am.ROOT, "b", am.ScalarType.Bytes, b"2")  # op 2
    with writer.transaction() as tx:
        tx.put(am.ROOT, "c", am.ScalarType.Bytes, b"3")  # op 3
    with writer.transaction() as tx:
        tx.delete(am.ROOT, "c")  # op 4
    target = writer.fork()
    third = writer.fork()
    third.set_actor(os.urandom(16))
    before = third.get_heads()
    with third.transaction() as tx:
        tx.put(am.ROOT, "a", am.ScalarType.Bytes, b"new")  # op 5, pred (1, writer)
    [change] = third.get_changes(before)
    return target, change.raw_bytes, change.actor_id


BAD = {
    "seq skips one": lambda raw: with_header(raw, seq=2),
    "predecessor on another key": lambda raw: with_pred(raw, 2),
    "predecessor naming a delete": lambda raw: with_pred(raw, 4),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_canonical_change_that_does_not_fit_breaks_saves_and_is_refused(name: str) -> None:
    target, raw, _ = target_and_change()
    histories = amhistory.Histories()
    doc = target.fork()
    check_merge(histories, "s", doc, apply(doc, raw))  # the honest one fits
    am.Document.load(doc.save())
    bad = BAD[name](raw)
    amcanon.check_chunks(bad)  # canonically encoded: the encoding check alone lets it in
    doc = target.fork()
    before = apply(doc, bad)
    assert doc.get_heads() != before  # Automerge applies it ...
    with pytest.raises(BaseException):
        am.Document.load(doc.save())  # ... and no save of the document loads any more
    with pytest.raises(amhistory.Unfit):
        check_merge(amhistory.Histories(), "s", doc, before)


@pytest.mark.parametrize("start_op", [4, 6])
def test_a_start_op_other_than_automerges_is_refused(start_op: int) -> None:
    """A startOp off by one either way (op 5 is the one Automerge assigns): Automerge applies it,
    and this lone change still saves, but a later one of its actor can then reuse its operation
    ids (below): refused, as Automerge never writes it."""
    target, raw, _ = target_and_change()
    doc = target.fork()
    before = apply(doc, with_header(raw, start_op=start_op))
    assert doc.get_heads() != before
    with pytest.raises(amhistory.Unfit, match="startOp"):
        check_merge(amhistory.Histories(), "s", doc, before)


def test_a_start_op_reusing_the_actors_operation_ids_breaks_saves_and_is_refused() -> None:
    """The writer's second change claiming the operation ids of its first: Automerge applies it,
    no save loads; refused."""
    target, raw, actor_id = target_and_change()
    third = target.fork()
    third.set_actor(actor_id)
    apply(third, raw)
    before = third.get_heads()
    with third.transaction() as tx:
        tx.put(am.ROOT, "b", am.ScalarType.Bytes, b"second")  # op 6
    [second] = third.get_changes(before)
    bad = with_header(second.raw_bytes, start_op=5)
    amcanon.check_chunks(bad)
    doc = target.fork()
    apply(doc, raw)
    before = apply(doc, bad)
    assert doc.get_heads() != before
    with pytest.raises(BaseException):
        am.Document.load(doc.save())
    with pytest.raises(amhistory.Unfit, match="startOp"):
        check_merge(amhistory.Histories(), "s", doc, before)


def actor() -> bytes:
    return os.urandom(16)


step = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 4), st.lists(st.integers(0, 30), min_size=1, max_size=5)),
    st.tuples(st.just("put_delete"), st.integers(0, 4), st.lists(st.integers(0, 30), min_size=1, max_size=3)),
    st.tuples(st.just("delete"), st.integers(0, 4), st.lists(st.integers(0, 30), min_size=1, max_size=5)),
    st.tuples(st.just("merge"), st.integers(0, 4), st.lists(st.integers(0, 4), min_size=1, max_size=2)),
    st.tuples(st.just("sync"), st.integers(0, 4), st.lists(st.integers(0, 4), min_size=1, max_size=1)),
    st.tuples(st.just("reload"), st.integers(0, 4), st.just([0])),
)


@settings(max_examples=600, deadline=None)
@given(st.integers(1, 5), st.lists(step, min_size=1, max_size=40))
def test_every_honest_change_fits(nodes: int, steps: list[tuple[str, int, list[int]]]) -> None:
    """Several actors write root-map puts and deletes, overwrite each other's keys (concurrent
    puts, puts over deletes), merge each other (changes with several deps, predecessors of
    several actors), sync as peers do, and reload their document from a save (its index is then
    built anew from the document): every change each document receives, in the order Automerge
    applies it, fits; the changes a node writes itself are read into its index on the next check.
    A peer holding nothing then receives everything in one sync: it all fits."""
    actors = [actor() for _ in range(nodes)]
    docs = [am.Document(a) for a in actors]
    histories = [amhistory.Histories() for _ in range(nodes)]
    for kind, who, args in steps:
        i = who % nodes
        doc = docs[i]
        if kind == "put":
            with doc.transaction() as tx:
                for k in args:  # a key twice: the second put names the first, in the same change
                    tx.put(am.ROOT, f"sale/{k:02d}", am.ScalarType.Bytes, os.urandom(k % 3 * 40))
        elif kind == "put_delete":  # put then delete in one change: the delete names the put
            with doc.transaction() as tx:
                for k in dict.fromkeys(args):
                    tx.put(am.ROOT, f"sale/{k:02d}", am.ScalarType.Bytes, os.urandom(5))
                    tx.delete(am.ROOT, f"sale/{k:02d}")
        elif kind == "delete":
            present = [f"sale/{k:02d}" for k in dict.fromkeys(args) if doc.get(am.ROOT, f"sale/{k:02d}") is not None]
            if present:
                with doc.transaction() as tx:
                    for key in present:
                        tx.delete(am.ROOT, key)
        elif kind == "merge":
            for other in args:
                if docs[other % nodes] is not doc:
                    before = doc.get_heads()
                    doc.merge(docs[other % nodes])
                    check_merge(histories[i], "s", doc, before)
        elif kind == "sync":
            j = args[0] % nodes
            if j != i:
                sync_checked(docs[i], docs[j], histories[i], histories[j])
        else:
            docs[i] = am.Document.load(doc.save())
            docs[i].set_actor(actors[i])
    if nodes > 1:
        sync_checked(docs[0], docs[1], histories[0], histories[1])
    fresh = am.Document(actor())
    before = fresh.get_heads()
    fresh.merge(docs[-1])
    check_merge(amhistory.Histories(), "s", fresh, before)


def sync_checked(a: am.Document, b: am.Document, ha: amhistory.Histories, hb: amhistory.Histories) -> None:
    """Sync ``a`` and ``b`` as two peers do, checking the history after each message received."""
    sa, sb = am.SyncState(), am.SyncState()
    for _ in range(50):
        moved = False
        for src, dst, s_src, s_dst, h in ((a, b, sa, sb, hb), (b, a, sb, sa, ha)):
            msg = src.generate_sync_message(s_src)
            if msg is not None:
                before = dst.get_heads()
                dst.receive_sync_message(s_dst, am.Message.decode(msg.encode()))
                check_merge(h, "s", dst, before)
                moved = True
        if not moved:
            break
    assert a.get_heads() == b.get_heads()


def test_a_long_history_of_many_writers_fits() -> None:
    """Ten writers, 60 rounds each of a put (half of them over another writer's key), a delete
    every fifth, a merge of a neighbour: each merge checked, then a peer holding nothing gets it
    all."""
    docs = [am.Document(actor()) for _ in range(10)]
    histories = [amhistory.Histories() for _ in docs]
    for rnd in range(60):
        for i, doc in enumerate(docs):
            with doc.transaction() as tx:
                tx.put(am.ROOT, f"sale/{i}/{rnd}", am.ScalarType.Bytes, b"x")
                if rnd:
                    tx.put(am.ROOT, f"sale/{(i + 1) % 10}/{rnd - 1}", am.ScalarType.Bytes, b"over")
            if rnd % 5 == 4 and doc.get(am.ROOT, f"sale/{i}/{rnd - 2}") is not None:
                with doc.transaction() as tx:
                    tx.delete(am.ROOT, f"sale/{i}/{rnd - 2}")
            other = docs[(i + 3) % 10]
            before = doc.get_heads()
            doc.merge(other)
            check_merge(histories[i], "s", doc, before)
    fresh = am.Document(actor())
    fresh.merge(docs[0])
    assert check_merge(amhistory.Histories(), "s", fresh, []) > 600


def test_the_ledger_refuses_a_pushed_or_synced_change_that_does_not_fit(tmp_path: Path) -> None:
    """Through the ledger, as a peer's PUSH and SYNC arrive: a change with a wrong seq is refused
    (an EncodingError: the link closes), the shard is as before, its save loads, and the node
    reopens from its store without rebuilding the shard; the honest change is then accepted."""
    site = make_site(tmp_path / "site")
    node = SimNode.open(enroll(site, tmp_path / "n", "n"), SYSTEM_CLOCK, FAST)
    peer = SimNode.open(enroll(site, tmp_path / "p", "p"), SYSTEM_CLOCK, FAST)
    try:
        node.core.sell(100)
        shard = next(iter(node.core.ledger.docs))
        doc = node.core.ledger._doc(shard).fork()
        doc.set_actor(peer.core.ledger.actor)
        before = doc.get_heads()
        with doc.transaction() as tx:
            tx.put(am.ROOT, "sale/junk", am.ScalarType.Bytes, b"junk")
        [change] = doc.get_changes(before)
        heads = node.core.ledger.heads(shard)
        for name, bad in (("seq", with_header(change.raw_bytes, seq=3)),
                          ("startOp", with_header(change.raw_bytes, start_op=change.start_op + 1))):
            amcanon.check_chunks(bad)
            with pytest.raises(amhistory.Unfit, match=name):
                node.core.ledger.receive_push(shard, [bad], "peer")
            assert node.core.ledger.heads(shard) == heads
            with pytest.raises(amhistory.Unfit, match=name):
                node.core.ledger.receive_sync(shard, am.SyncState(), changes_message([bad]), "peer")
            assert node.core.ledger.heads(shard) == heads
            am.Document.load(node.core.ledger.snapshot(shard))
        node = node.reopen(SYSTEM_CLOCK)
        assert node.core.ledger.heads(shard) == heads
        report = node.core.ledger.receive_push(shard, [change.bytes], "peer")
        assert report.rejected  # junk: stripped by the ledger, but the change itself fits
        am.Document.load(node.core.ledger.snapshot(shard))
    finally:
        node.close()
        peer.close()


def test_a_change_waiting_for_its_deps_is_checked_when_it_applies(tmp_path: Path) -> None:
    """A peer pushes a writer's second change before its first: Automerge keeps it waiting (the
    heads do not move, nothing is checked yet); the first then applies both, each checked in
    the order applied: honest, both fit; the second with a wrong seq, the merge is refused and
    the shard is as it was before it."""
    site = make_site(tmp_path / "site")
    node = SimNode.open(enroll(site, tmp_path / "n", "n"), SYSTEM_CLOCK, FAST)
    peer = SimNode.open(enroll(site, tmp_path / "p", "p"), SYSTEM_CLOCK, FAST)
    try:
        node.core.sell(100)
        shard = next(iter(node.core.ledger.docs))
        doc = node.core.ledger._doc(shard).fork()
        doc.set_actor(peer.core.ledger.actor)
        changes = []
        for key in ("sale/one", "sale/two"):
            before = doc.get_heads()
            with doc.transaction() as tx:
                tx.put(am.ROOT, key, am.ScalarType.Bytes, b"junk")
            changes += doc.get_changes(before)
        first, second = changes
        heads = node.core.ledger.heads(shard)
        node.core.ledger.receive_push(shard, [with_header(second.raw_bytes, seq=3)], "peer")
        assert node.core.ledger.heads(shard) == heads  # waiting for its deps
        with pytest.raises(amhistory.Unfit, match="seq"):
            node.core.ledger.receive_push(shard, [first.bytes], "peer")
        assert node.core.ledger.heads(shard) == heads
        am.Document.load(node.core.ledger.snapshot(shard))
        node.core.ledger.receive_push(shard, [second.bytes], "peer")
        assert node.core.ledger.heads(shard) == heads  # waiting again: the refusal dropped the queue too
        report = node.core.ledger.receive_push(shard, [first.bytes], "peer")
        assert {k for k, _ in report.rejected} == {"sale/one", "sale/two"}  # both applied, both fit
        am.Document.load(node.core.ledger.snapshot(shard))
    finally:
        node.close()
        peer.close()


def test_an_honest_delete_of_what_a_snapshot_brought_fits() -> None:
    """A snapshot brought values meshpos never writes (a string, a map holding a key, a list):
    their changes are not meshpos's kind, yet a peer's honest strip of those keys (deletes whose
    predecessors name them) fits, and an overwrite naming the map's inner put is refused."""
    doc = am.Document(actor())
    with doc.transaction() as tx:
        tx.put(am.ROOT, "garbage", am.ScalarType.Str, "x" * 300)  # op 1
        inner = tx.put_object(am.ROOT, "m", am.ObjType.Map)  # op 2
        tx.put(inner, "k", am.ScalarType.Str, "y")  # op 3, inside the map
        tx.put_object(am.ROOT, "l", am.ObjType.List)  # op 4
    assert amcanon.root_keys_set(doc.get_changes([])[0].raw_bytes) == ["garbage", "m", None, "l"]
    histories = amhistory.Histories()
    target = am.Document(actor())
    before = target.get_heads()
    target.merge(doc)
    check_merge(histories, "s", target, before)
    peer = doc.fork()
    peer.set_actor(actor())
    before = peer.get_heads()
    with peer.transaction() as tx:
        for key in ("garbage", "m", "l"):
            tx.delete(am.ROOT, key)
    [strip] = peer.get_changes(before)
    before = apply(target, strip.raw_bytes)
    check_merge(histories, "s", target, before)
    am.Document.load(target.save())
    writer = doc.fork()
    writer.set_actor(actor())
    before = writer.get_heads()
    with writer.transaction() as tx:
        tx.put(am.ROOT, "garbage", am.ScalarType.Bytes, b"over")  # pred (1, doc's actor)
    [over] = writer.get_changes(before)
    bad = with_pred(over.raw_bytes, 3)  # the put inside the map
    amcanon.check_chunks(bad)
    fresh = doc.fork()
    before = apply(fresh, bad)
    assert fresh.get_heads() != before
    with pytest.raises(amhistory.Unfit, match="predecessor"):
        check_merge(amhistory.Histories(), "s", fresh, before)
