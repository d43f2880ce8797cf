"""The durable store and the site ledger: acknowledgement, recovery, verification, re-assertion."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import automerge.core as am
import pytest

from meshpos.wire import envelope
from meshpos.domain.errors import CorruptStoreError, LockedError, PolicyError, StoreError
from meshpos.ledger.ledger import entry_bytes
from meshpos.node.core import NodeCore
from meshpos.site.sitedir import Site

from test_disk_full import _rows as _disk_rows, small_disk  # noqa: F401 (a fixture)


def test_sale_is_durable_before_it_is_returned(make_node, clock) -> None:
    path = make_node("t1")
    core = NodeCore.open(path, clock)
    sale = core.sell(1250, description="panino")
    core.store.conn.close()  # no clean shutdown: what was returned must be on disk
    core.dir.unlock()
    reopened = NodeCore.open(path, clock)
    try:
        assert reopened.sale(sale["id"])["amount_minor"] == 1250
        assert reopened.ledger.has(f"sale/{sale['id']}")
    finally:
        reopened.close()


def test_held_store_syncs_the_wal_before_a_sale_returns_and_only_off_loop_otherwise(
        make_node, clock, monkeypatch) -> None:
    """Under hold() (the running node) COMMIT no longer fsyncs by itself: flush() (what a sale
    calls before it is acknowledged) must fdatasync the WAL after its COMMIT; commit() alone
    must not touch the disk (the group commit does that on a worker thread)."""
    import os
    path = make_node("t1")
    core = NodeCore.open(path, clock)
    store = core.store
    log: list[str] = []
    real_fdatasync = os.fdatasync
    store.conn.set_trace_callback(lambda sql: log.append(sql) if sql in ("COMMIT", "BEGIN") else None)

    def fdatasync(fd: int) -> None:
        assert os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(f"{store.path}-wal")
        log.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    store.hold()
    try:
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        log.clear()
        sale = core.sell(1250)
        assert log[-3:] == ["COMMIT", "BEGIN", "fdatasync"], log
        log.clear()
        with store.transaction():
            store.set_meta("probe", "1")
        assert store.commit() and log == ["COMMIT", "BEGIN"]
        assert not store.commit()  # nothing new: no COMMIT at all
        store.sync_wal()
        assert log[-1] == "fdatasync"
    finally:
        store.release()
        core.close()
    reopened = NodeCore.open(path, clock)
    assert reopened.sale(sale["id"]) is not None
    reopened.close()


def test_directory_is_locked_against_a_second_process(make_node, open_node) -> None:
    path = make_node("t1")
    open_node(path)
    with pytest.raises(LockedError):
        NodeCore.open(path)


def test_caps_refuse_with_which_limit_and_by_how_much(make_node, open_node, site: Site) -> None:
    core = open_node(make_node("t1"))
    with pytest.raises(PolicyError, match=r"per-sale offline cap of 500.00 EUR by 0.01 EUR"):
        core.sell(50_001)
    card = core.seal_card("4111111111111111", "1230")
    for _ in range(20):
        core.sell(50_000, card=card)
    with pytest.raises(PolicyError, match=r"terminal's pending offline total .* by 0.01 EUR; .* or take cash"):
        core.sell(1, card=card)
    # as the message says: cash is final when taken, so no stored-total cap holds it back
    for _ in range(3):
        assert core.sell(50_000)["status"] == "paid"
    with pytest.raises(PolicyError, match=r"per-sale offline cap of 500.00 EUR by 0.01 EUR"):
        core.sell(50_001)  # the per-sale cap holds for cash too


def test_corrupt_and_foreign_databases_name_the_file(make_node, clock, tmp_path: Path) -> None:
    path = make_node("t1")
    core = NodeCore.open(path, clock)
    core.sell(100)
    core.close()
    db = path / "meshpos.db"
    shutil.copy(db, tmp_path / "backup.db")
    db.write_bytes(db.read_bytes()[:1000])
    for name in ("meshpos.db-wal", "meshpos.db-shm"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(CorruptStoreError, match="meshpos.db"):
        NodeCore.open(path, clock)
    foreign = sqlite3.connect(db.with_name("x.db"))
    foreign.execute("CREATE TABLE t(x)")
    foreign.commit()
    foreign.close()
    db.unlink()
    db.with_name("x.db").rename(db)
    with pytest.raises(CorruptStoreError, match="foreign"):
        NodeCore.open(path, clock)


def test_database_of_another_node_is_refused(make_node, clock) -> None:
    a, b = make_node("a"), make_node("b")
    NodeCore.open(a, clock).close()
    shutil.copy(a / "meshpos.db", b / "meshpos.db")
    with pytest.raises(StoreError, match="another site or node"):
        NodeCore.open(b, clock)


def test_damaged_chunk_is_dropped_and_shard_rebuilt_from_verified_entries(make_node, clock) -> None:
    path = make_node("t1")
    core = NodeCore.open(path, clock)
    ids = [core.sell(100 + i)["id"] for i in range(5)]
    core.close()
    conn = sqlite3.connect(path / "meshpos.db")
    conn.execute("UPDATE chunks SET data = substr(data, 1, 10) WHERE id = (SELECT max(id) FROM chunks)")
    conn.commit()
    conn.close()
    core = NodeCore.open(path, clock)
    try:
        doc = core.ledger.docs[core.ledger.shards()[0]]
        for sale_id in ids:
            assert entry_bytes(doc.get(am.ROOT, f"sale/{sale_id}")) == core.ledger.raw(f"sale/{sale_id}")
    finally:
        core.close()


def _peer_doc(src: NodeCore, shard: str) -> am.Document:
    return am.Document.load(src.ledger.snapshot(shard))


def test_replicated_entries_are_verified_and_forgeries_kept_out(make_node, open_node, site: Site) -> None:
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    sale = t1.sell(999)
    shard = t1.ledger.shards()[0]
    hostile = _peer_doc(t1, shard)
    forged_body = {**envelope.decode(t1.ledger.raw(f"sale/{sale['id']}")).body, "seq": 2,
                   "sale_id": envelope.sale_id(t1.node_id, 2), "amount_minor": 5}
    forged = envelope.seal("sale", t1.node_id, forged_body, t2.key)  # signed with the wrong key
    with hostile.transaction() as tx:
        tx.put(am.ROOT, f"sale/{forged_body['sale_id']}", am.ScalarType.Bytes, forged)
        tx.put(am.ROOT, "garbage", am.ScalarType.Str, "x")
    report = t2.ledger.receive_snapshot(shard, hostile.save(), "hostile")
    keys = sorted(v.key for v in report.accepted)
    assert f"sale/{sale['id']}" in keys and f"cert/{t1.node_id}" in keys
    assert {k for k, _ in report.rejected} == {f"sale/{forged_body['sale_id']}", "garbage"}
    assert [s["id"] for s in t2.sales()] == [sale["id"]]


def test_deleted_and_overwritten_entries_are_reasserted(make_node, open_node) -> None:
    t1 = open_node(make_node("t1"))
    a, b = t1.sell(100), t1.sell(200)
    shard = t1.ledger.shards()[0]
    hostile = _peer_doc(t1, shard)
    with hostile.transaction() as tx:
        tx.delete(am.ROOT, f"sale/{a['id']}")
        tx.put(am.ROOT, f"sale/{b['id']}", am.ScalarType.Bytes, b"overwritten")
    report = t1.ledger.receive_snapshot(shard, hostile.save(), "hostile")
    assert report.reasserted == 2
    doc = t1.ledger.docs[shard]
    assert entry_bytes(doc.get(am.ROOT, f"sale/{a['id']}")) == t1.ledger.raw(f"sale/{a['id']}")
    assert entry_bytes(doc.get(am.ROOT, f"sale/{b['id']}")) == t1.ledger.raw(f"sale/{b['id']}")
    # the re-assertion wins on the hostile side too once it merges back
    hostile.merge(am.Document.load(t1.ledger.snapshot(shard)))
    assert entry_bytes(hostile.get(am.ROOT, f"sale/{b['id']}")) == t1.ledger.raw(f"sale/{b['id']}")


def test_entry_of_unknown_signer_is_parked_until_its_certificate_arrives(make_node, open_node) -> None:
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    sale = t1.sell(700)
    shard = t1.ledger.shards()[0]
    partial = _peer_doc(t1, shard)
    with partial.transaction() as tx:
        tx.delete(am.ROOT, f"cert/{t1.node_id}")
    report = t2.ledger.receive_snapshot(shard, partial.save(), "t1")
    assert report.parked >= 1 and t2.sales() == []
    # t1 sees the deletion of its certificate entry, re-asserts it, and t2 gets it from there
    assert t1.ledger.receive_snapshot(shard, partial.save(), "t2").reasserted == 1
    t2.ledger.receive_snapshot(shard, t1.ledger.snapshot(shard), "t1")
    assert [s["id"] for s in t2.sales()] == [sale["id"]]
    assert t2.store.parked() == []


def test_honest_relay_strips_forgeries_so_its_neighbours_never_see_them(make_node, open_node) -> None:
    t1, t2, t3 = (open_node(make_node(n)) for n in ("t1", "t2", "t3"))
    sale = t1.sell(100)
    shard = t1.ledger.shards()[0]
    hostile = _peer_doc(t1, shard)
    forged_body = {**envelope.decode(t1.ledger.raw(f"sale/{sale['id']}")).body, "seq": 2,
                   "sale_id": envelope.sale_id(t1.node_id, 2)}
    with hostile.transaction() as tx:
        tx.put(am.ROOT, f"sale/{forged_body['sale_id']}", am.ScalarType.Bytes,
               envelope.seal("sale", t1.node_id, forged_body, t3.key))
        tx.put(am.ROOT, "junk", am.ScalarType.Bytes, b"not an envelope")
    first = t2.ledger.receive_snapshot(shard, hostile.save(), "hostile")
    assert len(first.rejected) == 2 and sorted(first.stripped) == sorted([f"sale/{forged_body['sale_id']}", "junk"])
    relayed = t3.ledger.receive_snapshot(shard, t2.ledger.snapshot(shard), "t2")
    assert relayed.rejected == [] and [s["id"] for s in t3.sales()] == [sale["id"]]


from hypothesis import given, settings, strategies as st  # noqa: E402

from meshpos.ledger.ledger import changed_keys  # noqa: E402
from tests.amdocs import concurrent_writes, delete_keys, doc_with_one_key  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=8, unique=True),
       st.lists(st.integers(min_value=0, max_value=7), max_size=4))
def test_changed_keys_reads_exactly_the_keys_a_merge_touched(keys: list[str], deletes: list[int]) -> None:
    doc, before = doc_with_one_key()
    with doc.transaction() as tx:
        for key in keys:
            tx.put(am.ROOT, key, am.ScalarType.Bytes, key.encode())
    touched = changed_keys(doc, before)
    assert touched is None or touched == set(keys)  # None: the caller falls back to a full scan
    if all(k.isascii() and k.isprintable() for k in keys):
        assert touched == set(keys)
    gone = {keys[i] for i in deletes if i < len(keys)}
    if gone:
        assert changed_keys(doc, delete_keys(doc, gone)) in (None, gone)


def test_bulk_merge_checks_signatures_in_parallel_and_still_refuses_forgeries(make_node, open_node) -> None:
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    sales = [t1.sell(100 + i)["id"] for i in range(40)]  # a big merge: signatures are pre-checked in bulk
    shard = t1.ledger.shards()[0]
    doc = _peer_doc(t1, shard)
    forged_body = {**envelope.decode(t1.ledger.raw(f"sale/{sales[0]}")).body, "seq": 41,
                   "sale_id": envelope.sale_id(t1.node_id, 41)}
    with doc.transaction() as tx:
        tx.put(am.ROOT, f"sale/{forged_body['sale_id']}", am.ScalarType.Bytes,
               envelope.seal("sale", t1.node_id, forged_body, t2.key))
    report = t2.ledger.receive_snapshot(shard, doc.save(), "hostile")
    assert [k for k, _ in report.rejected] == [f"sale/{forged_body['sale_id']}"]
    assert sorted(s["id"] for s in t2.sales()) == sorted(sales)
    assert not t2.roster._presigned


def test_a_held_store_checkpoints_only_when_told_on_a_connection_of_its_own(make_node, clock, monkeypatch) -> None:
    from meshpos.ledger import store as store_mod
    monkeypatch.setattr(store_mod, "CHECKPOINT_ROWS", 50)
    core = NodeCore.open(make_node("t1"), clock)
    try:
        store, db = core.store, core.store.path
        store.hold()
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        size = db.stat().st_size
        while not store.checkpoint_due():
            core.sell(100)  # acknowledged: flushed
        assert not store.checkpoint_due()
        assert db.stat().st_size == size
        store.checkpoint()
        assert db.stat().st_size > size
        store.release()
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == store_mod.WAL_CHECKPOINT_PAGES
    finally:
        core.close()


def _log_after_an_overtaken_checkpoint(core: NodeCore, finish: bool) -> tuple[int, int]:
    """100 sales, a checkpoint as the node's worker thread runs it, a sale that comes meanwhile,
    ``finish_checkpoint()`` or not, then 60 more sales (fewer than before the checkpoint: they fit
    in the log's start): the log file's size before and after those 60."""
    store, wal = core.store, Path(f"{core.store.path}-wal")
    store.hold()
    for _ in range(100):
        core.sell(100)
    store.checkpoint()
    core.sell(100)
    if finish:
        store.finish_checkpoint()
    size = wal.stat().st_size
    for _ in range(60):
        core.sell(100)
    after = wal.stat().st_size
    store.release()
    return size, after


def test_a_held_store_starts_its_log_over_after_a_checkpoint_while_sales_go_on(make_node, clock) -> None:
    core = NodeCore.open(make_node("t1"), clock)
    try:
        size, after = _log_after_an_overtaken_checkpoint(core, finish=True)
        assert after == size  # written over from its start, not grown
    finally:
        core.close()


def test_a_held_store_without_finish_checkpoint_grows_its_log(make_node, clock) -> None:
    """What finish_checkpoint() is for: a thread's pass that new commits overtook leaves SQLite
    nothing to start over from."""
    core = NodeCore.open(make_node("t1"), clock)
    try:
        size, after = _log_after_an_overtaken_checkpoint(core, finish=False)
        assert after > size
    finally:
        core.close()


def _visible(doc: am.Document) -> dict[str, object]:
    return {key: doc.get(am.ROOT, key)[0] for key in doc.keys(am.ROOT)}  # type: ignore[index]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), max_size=5), st.lists(st.sampled_from("abcdef"), max_size=5),
       st.lists(st.sampled_from("abcdef"), max_size=3), st.booleans())
def test_changed_keys_are_the_keys_whose_value_a_merge_changed(
        ours: list[str], theirs: list[str], their_deletes: list[str], winner_first: bool) -> None:
    """Two nodes write the same keys concurrently (what an equivocating peer or a re-assertion
    does), then one merges the other's changes: the keys read from the diff are exactly those
    whose visible value differs from before the merge (or None: the caller scans everything)."""
    mine, other = concurrent_writes(ours, theirs, their_deletes)
    doc, incoming = (mine, other) if winner_first else (other, mine)
    before, seen = doc.get_heads(), _visible(doc)
    doc.merge(incoming)
    now = _visible(doc)
    differs = {k for k in seen.keys() | now.keys() if seen.get(k) != now.get(k)}
    touched = changed_keys(doc, before)
    if doc.get_heads() == before:
        return
    assert touched is None or touched == differs


def test_the_pending_totals_read_an_index_of_pending_card_sales_also_in_an_older_database(make_node, open_node) -> None:
    """Each sale sums the pending card sales of every terminal (the caps): through an index of
    exactly those rows (cash sales are pending too, in no total), not of every pending sale
    looked up row by row. A database made before this index gets it at open."""
    path = make_node("t1")
    core = open_node(path)
    db = core.dir.db_path
    core.close()
    with sqlite3.connect(db) as conn:  # as an older version left it
        conn.execute("DROP INDEX sales_pending_card")
        conn.execute("CREATE INDEX sales_pending ON sales(terminal, created_at, amount_minor)"
                     " WHERE result_status IS NULL AND voided_at IS NULL AND refused IS NULL")
    conn.close()
    core = open_node(path)
    names = {r[0] for r in core.store.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "sales_pending_card" in names and "sales_pending" not in names
    card = core.seal_card("4111111111111111", "1230")
    core.sell(1_000, card=card)
    core.sell(700)  # cash: final when taken, no pending total
    plan = " ".join(str(r[-1]) for r in core.store.conn.execute(
        "EXPLAIN QUERY PLAN SELECT terminal, coalesce(sum(amount_minor), 0) FROM sales WHERE result_status IS NULL"
        " AND voided_at IS NULL AND refused IS NULL AND method='card' AND created_at >= ? AND created_at <= ?"
        " GROUP BY terminal", (0, 2**60)))
    assert "INDEX sales_pending_card" in plan, plan
    assert core.store.pending_by_terminal(0) == {core.node_id: 1_000}


def test_a_shard_rebuilt_while_running_writes_as_a_new_actor_its_peers_take(make_node, open_node) -> None:
    """A shard whose stored copy no longer loads is rebuilt from verified entries. Rebuilt in the
    running process, after this process's actor wrote into it, it must not restart that actor's
    seq at 1: a peer holding the old history would refuse every later change of the shard."""
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    t1.sell(100)
    shard = t1.ledger.shards()[0]
    t2.ledger.receive_snapshot(shard, t1.ledger.snapshot(shard), "t1")  # t2 holds t1's history
    with t1.store.transaction():  # the stored copy is damaged under the running node
        t1.store.conn.execute("UPDATE chunks SET data = substr(data, 1, 10) WHERE shard = ?", (shard,))
    t1.ledger.docs.pop(shard)
    t1.ledger._load_shard(shard)  # as after a rollback: the shard is read again, and rebuilt
    pushed: list[tuple[str, list[bytes]]] = []
    t1.ledger.on_changes.append(lambda s, changes: pushed.append((s, list(changes))) if changes else None)
    later = t1.sell(200)
    assert pushed and pushed[-1][0] == shard
    t2.ledger.receive_push(shard, pushed[-1][1], "t1")  # refused before: "duplicate seq 2"
    # it waits for the rebuilt history it depends on, which the next sync brings (refused before)
    t2.ledger.receive_snapshot(shard, t1.ledger.snapshot(shard), "t1")
    assert later["id"] in {s["id"] for s in t2.sales()}


def test_a_busy_held_store_checkpoints_by_commits_and_its_log_starts_over(make_node, clock) -> None:
    """Each group commit writes every page it dirtied to the log again: by rows alone a busy node's
    log grew to ~60 MB between checkpoints. After CHECKPOINT_COMMITS commits a checkpoint is due
    however few rows they held, and once it has copied the log, the log starts over from its
    beginning: its file stays the size of a few commits."""
    from meshpos.ledger import store as store_mod
    core = NodeCore.open(make_node("t1"), clock)
    try:
        store = core.store
        store.hold()
        wal = Path(f"{store.path}-wal")
        checkpoints, sizes = 0, []
        for i in range(12 * store_mod.CHECKPOINT_COMMITS):
            core.sell(100 + i)  # acknowledged: one commit each, a few rows
            if store.checkpoint_due():
                assert store._commits_since_checkpoint == 0
                checkpoints += 1
                store.checkpoint()
                store.finish_checkpoint()
            sizes.append(wal.stat().st_size)
        assert checkpoints == 12
        per_commit = max(b - a for a, b in zip(sizes, sizes[1:]))
        # the file keeps what it had before; past that, a few commits' worth, not 120 commits'
        assert max(sizes) - sizes[0] <= (store_mod.CHECKPOINT_COMMITS + 2) * per_commit
        store.release()
    finally:
        core.close()


def test_finish_checkpoint_commits_nothing_a_savepoint_or_an_unflushed_write_holds(make_node, clock) -> None:
    """Red team (issue 15): finish_checkpoint ends the held transaction with a COMMIT. With a savepoint
    open, or rows written since the last commit, it must do nothing: those writes are neither
    acknowledged nor whole yet. Another connection (what a restart after SIGKILL reads) must not
    see them, and a rollback of the savepoint must still take them back."""
    core = NodeCore.open(make_node("t1"), clock)
    try:
        store = core.store
        store.hold()
        core.sell(100)  # acknowledged: committed

        def others_see() -> int:
            other = sqlite3.connect(store.path)
            try:
                return int(other.execute("SELECT count(*) FROM meta WHERE key LIKE 'red/%'").fetchone()[0])
            finally:
                other.close()

        with pytest.raises(RuntimeError):
            with store.transaction():  # a savepoint, as a merge opens around its writes
                store.set_meta("red/in-savepoint", "1")
                store.checkpoint()
                assert not store.finish_checkpoint()
                raise RuntimeError("the merge fails")
        assert others_see() == 0 and store.get_meta("red/in-savepoint") is None
        with store.transaction():  # a savepoint that wrote nothing is open
            store.checkpoint()
            assert not store.finish_checkpoint()
        store.set_meta("red/unflushed", "1")  # written at the held level, not committed
        store.checkpoint()
        assert not store.finish_checkpoint()
        assert others_see() == 0
        store.flush()
        assert others_see() == 1
        store.checkpoint()
        assert store.finish_checkpoint()  # now nothing is pending: the read starts afresh
        store.release()
    finally:
        core.close()


def test_a_power_cut_around_checkpoints_and_log_restarts_loses_no_acknowledged_sale(make_node, clock,
                                                                                   tmp_path: Path) -> None:
    """Red team (issue 15): with checkpoints every CHECKPOINT_COMMITS commits and the log starting
    over after each, the files as a power cut may leave them: (1) a checkpoint cut part-way (each
    page of the database file old or new, the log whole); (2) a commit after an acknowledged sale
    torn part-way, where the log was restarted and the new frames overwrite the old (the log's
    bytes new up to the cut, the previous bytes after it). Every acknowledged sale is there, and
    the store is consistent."""
    import random
    from meshpos.ledger import store as store_mod
    from test_power_loss import DB, check_consistent, node_copy, own_sale_ids
    path = make_node("t1")
    core = NodeCore.open(path, clock)
    wal = path / (DB + "-wal")
    acked: list[str] = []
    states: list[tuple[int, bytes, bytes]] = []  # (sales acknowledged, database file, log file)
    mid_checkpoint: list[tuple[int, bytes, bytes, bytes]] = []
    restarts = 0
    try:
        store = core.store
        store.hold()
        page = store.conn.execute("PRAGMA page_size").fetchone()[0]
        for i in range(3 * store_mod.CHECKPOINT_COMMITS + 3):
            acked.append(core.sell(100 + i)["id"])
            states.append((len(acked), (path / DB).read_bytes(), wal.read_bytes()))
            if store.checkpoint_due():
                before = (path / DB).read_bytes()
                store.checkpoint()
                mid_checkpoint.append((len(acked), before, (path / DB).read_bytes(), wal.read_bytes()))
                restarts += store.finish_checkpoint()
        store.release()
    finally:
        core.close()
    assert restarts == 3
    rnd = random.Random(15)
    variants: list[tuple[int, bytes, bytes]] = []
    for n, old_db, new_db, log in mid_checkpoint:
        for _ in range(2):
            mixed = b"".join((new_db if rnd.random() < 0.5 else old_db)[at:at + page]
                             for at in range(0, max(len(old_db), len(new_db)), page))
            variants.append((n, mixed, log))
    for (n, _, old_log), (_, db, new_log) in zip(states, states[1:]):
        differ = next((i for i, (a, b) in enumerate(zip(old_log, new_log)) if a != b), min(len(old_log), len(new_log)))
        for cut in {differ, rnd.randrange(differ, len(new_log) + 1), len(new_log)}:
            variants.append((n, db, new_log[:cut] + old_log[cut:]))
    for v, (n, db, log) in enumerate(variants):
        copy = node_copy(path, tmp_path / f"cut{v}", db, log)
        reopened = NodeCore.open(copy, clock)
        try:
            assert set(acked[:n]) <= set(own_sale_ids(reopened)), f"variant {v}: after sale {n}"
            check_consistent(reopened)
        finally:
            reopened.close()


def test_a_full_disk_at_a_checkpoint_and_log_restart_loses_nothing_committed(small_disk: Path, caplog: Any) -> None:
    """Red team (issue 15): the disk fills while the log holds 30 acknowledged commits not yet
    copied, so the checkpoint cannot grow the database file; finish_checkpoint runs after it as the
    node does, and writing goes on until a write meets the full disk. Once there is room again
    a checkpoint and a restarted log follow: every acknowledged row is there, before and after
    reopening."""
    import os
    from helpers import fill_disk
    from meshpos.domain.errors import DiskFullError
    from meshpos.ledger.store import Store
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = small_disk
    store = Store.open(disk / "meshpos.db", create=True)
    store.hold()
    committed = 0
    try:
        for i in range(30):
            with store.transaction():
                store.set_meta(f"k{i:06d}", "x" * 3000)
            store.flush()
            committed = i + 1
        fill_disk(disk / "ballast")
        store.checkpoint()  # cannot grow the database file: it fails, and says so in the log
        assert "checkpoint failed" in caplog.text
        store.finish_checkpoint()
        with pytest.raises(DiskFullError):
            for i in range(30, 100_000):
                with store.transaction():
                    store.set_meta(f"k{i:06d}", "x" * 3000)
                store.flush()
                committed = i + 1
        assert _disk_rows(store) == committed
        (disk / "ballast").unlink()
        store.checkpoint()
        assert store.finish_checkpoint()
        with store.transaction():
            store.set_meta("after", "1")
        store.flush()
        assert _disk_rows(store) == committed
    finally:
        store.close()
    reopened = Store.open(disk / "meshpos.db")
    try:
        assert _disk_rows(reopened) == committed and reopened.get_meta("after") == "1"
    finally:
        reopened.close()


def test_the_totals_a_sale_checks_are_the_two_sums_they_replace(make_node, open_node) -> None:
    """``pending_for_sale`` (one pass) gives what the two sums gave: the other terminals' pending
    card sales inside the window and no later than the skew allows, ours from the window's start
    whatever their date; refused, voided, settled and cash sales in none."""
    import random

    core = open_node(make_node("t1"))
    store = core.store
    rng = random.Random(15)
    terminals = [core.node_id, "aaaa000000000001", "aaaa000000000002", "aaaa000000000003"]
    for seq in range(1, 400):
        terminal = rng.choice(terminals)
        body = {"sale_id": f"{terminal}-{seq}", "terminal": terminal, "seq": seq,
                "created_at": rng.randrange(0, 10_000), "amount_minor": rng.randrange(1, 5_000),
                "currency": "EUR", "method": rng.choice(["card", "card", "cash"]), "description": None,
                "card": {"brand": "visa", "last4": "1111", "entry_mode": "manual"}}
        store.insert_sale(body, refused=rng.choice([None] * 6 + ["over the cap"]))
        if rng.random() < 0.1:
            store.conn.execute("UPDATE sales SET voided_at=1 WHERE sale_id=?", (body["sale_id"],))
        if rng.random() < 0.1:
            store.conn.execute("UPDATE sales SET result_status='approved' WHERE sale_id=?", (body["sale_id"],))
    for not_before, not_after in [(0, 10_000), (2_000, 6_000), (9_000, 9_500), (5_000, 4_000), (20_000, 30_000)]:
        expected = store.pending_by_terminal(not_before, not_after)
        expected[core.node_id] = store.pending_by_terminal(not_before, None, core.node_id).get(core.node_id, 0)
        got = store.pending_for_sale(not_before, not_after, core.node_id)
        assert got == expected
    everyone = store.pending_for_sale(0, 10_000, core.node_id)
    assert len(everyone) == 4 and all(everyone.values())  # the data is not trivial
    # ours past the upper bound count, the others' do not
    assert store.pending_for_sale(2_000, 6_000, core.node_id)[core.node_id] > \
        store.pending_by_terminal(2_000, 6_000, core.node_id)[core.node_id]
    assert store.pending_for_sale(9_990, 9_991, core.node_id) == {core.node_id: 0}


def test_a_shard_is_compacted_after_its_chunks_and_counts_them_through_rollbacks(make_node, clock) -> None:
    """The ledger compacts a shard into a snapshot once it has COMPACT_AFTER_CHUNKS change chunks;
    the store counts them in memory after the first query, so the count must follow a snapshot
    and a rolled-back write as the table does (a count left too high compacts too early, one
    left too low lets the chunks pile up)."""
    from meshpos.ledger.ledger import COMPACT_AFTER_CHUNKS
    core = NodeCore.open(make_node("t1"), clock)
    try:
        store = core.store
        shard = core.ledger.index[f"sale/{core.sell(100)['id']}"].home
        most = 0
        for i in range(COMPACT_AFTER_CHUNKS + 10):
            core.sell(101 + i)
            most = max(most, store.chunk_count(shard))
        assert 0 < most < COMPACT_AFTER_CHUNKS  # compacted on the way, never past the mark
        before = store.chunk_count(shard)
        assert store.add_chunk(shard, b"one") == before + 1
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.add_chunk(shard, b"two")
                raise RuntimeError("a write that fails after its chunk")
        assert store.chunk_count(shard) == before + 1  # rolled back in the table...
        assert store.add_chunk(shard, b"three") == before + 2  # ...and in the count
        with store.transaction():  # the same inside a transaction (a savepoint, as under hold())
            with pytest.raises(RuntimeError):
                with store.transaction():
                    store.add_chunk(shard, b"five")
                    raise RuntimeError("a write that fails after its chunk")
            assert store.add_chunk(shard, b"six") == before + 3 == store.chunk_count(shard)
        store.put_snapshot(shard, core.ledger.snapshot(shard))
        assert store.add_chunk(shard, b"four") == 1 == store.chunk_count(shard)
    finally:
        core.close()
