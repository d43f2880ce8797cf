"""Power loss: writes that never reached the disk, and damaged files.

The model: a sale is acknowledged once its COMMIT returned (WAL, synchronous=FULL: the WAL
frames are on disk). After the burst we hold the files as they are on disk and, for each
acknowledged sale, the WAL's size when it was acknowledged. A power cut during a later write
leaves a WAL cut anywhere after that size, or a torn frame: every such variant must open with
*exactly* the sales whose commit lies wholly before the cut (nothing half applied, nothing
acknowledged lost). Damage that SQLite cannot repair (a cut or scrambled main file) must make
the node refuse to start with CorruptStoreError naming the file; moving the file aside and
restarting brings every entry back from a peer, and the node's sequence continues after the
highest sale id the mesh returned: it never sells under an id the mesh or the switch holds.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import pytest

import meshpos.node.core as core_mod
from meshpos.domain.errors import CorruptStoreError, PolicyError, StoreError
from meshpos.replication.memnet import MemNetwork
from meshpos.node.memnode import SimNode, wall_clock
from meshpos.node.core import NodeCore
from meshpos.ledger.store import Store

DB = "meshpos.db"


def node_copy(src: Path, dst: Path, db: bytes, wal: bytes | None) -> Path:
    """A copy of the node directory with the given database and WAL bytes (no shm: after a power
    cut its contents are not to be trusted, and SQLite rebuilds it from the WAL)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(DB, DB + "-wal", DB + "-shm", "*.sock", "node.lock"))
    (dst / DB).write_bytes(db)
    if wal is not None:
        (dst / (DB + "-wal")).write_bytes(wal)
    return dst


def own_sale_ids(core: NodeCore) -> list[str]:
    return [s["id"] for s in core.sales(core.node_id)]


def check_consistent(core: NodeCore) -> None:
    assert core.store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    seqs = [s["seq"] for s in core.sales(core.node_id)]
    assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers have a gap"
    for sale_id in own_sale_ids(core):  # the view and the ledger agree: all four parts of a sale or none
        assert core.ledger.raw(f"sale/{sale_id}") is not None


@pytest.fixture
def burst(make_node, tmp_path: Path):
    """One terminal, 40 sales after a checkpoint; the on-disk bytes and the WAL size at each ack."""
    path = make_node("t1")
    core = NodeCore.open(path, wall_clock())
    core.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal_path = path / (DB + "-wal")
    acked: list[tuple[str, int]] = []
    for i in range(40):
        sale_id = core.sell(100 + i)["id"]
        acked.append((sale_id, wal_path.stat().st_size))  # the WAL as it is when the sale is acknowledged
    db, wal = (path / DB).read_bytes(), wal_path.read_bytes()
    page = core.store.conn.execute("PRAGMA page_size").fetchone()[0]
    core.close()
    return path, db, wal, acked, page


def expected_at(acked: list[tuple[str, int]], cut: int) -> list[str]:
    return [sale_id for sale_id, size in acked if size <= cut]


def test_wal_cut_anywhere_keeps_exactly_the_commits_before_the_cut(burst, tmp_path: Path) -> None:
    path, db, wal, acked, page = burst
    frame = 24 + page
    rnd = random.Random(5)
    cuts = sorted({rnd.randrange(32, len(wal) + 1) for _ in range(14)}
                  | {32 + frame * rnd.randrange(1, (len(wal) - 32) // frame) for _ in range(6)}  # whole frames
                  | {len(wal), len(wal) - 1, 0})
    for n, cut in enumerate(cuts):
        copy = node_copy(path, tmp_path / f"cut{n}", db, wal[:cut])
        core = NodeCore.open(copy, wall_clock())
        try:
            held = own_sale_ids(core)
            assert held == expected_at(acked, cut), f"WAL cut at {cut}"
            check_consistent(core)
        finally:
            core.close()


def test_flipped_bytes_in_the_wal_tail_drop_that_frame_and_what_follows(burst, tmp_path: Path) -> None:
    path, db, wal, acked, page = burst
    frame = 24 + page
    rnd = random.Random(9)
    tail_start = len(wal) * 3 // 4
    for n in range(10):
        at = rnd.randrange(max(32, tail_start), len(wal))
        damaged = bytearray(wal)
        damaged[at] ^= 1 << rnd.randrange(8)
        frame_start = 32 + (at - 32) // frame * frame
        copy = node_copy(path, tmp_path / f"flip{n}", db, bytes(damaged))
        core = NodeCore.open(copy, wall_clock())
        try:
            held = own_sale_ids(core)
            # the torn frame and every later one are dropped (checksums chain): exactly the commits
            # that end before it survive; the acknowledged sales of a healthy disk never lie there
            assert held == expected_at(acked, frame_start), f"flip at {at} (frame at {frame_start})"
            check_consistent(core)
        finally:
            core.close()


def test_a_power_cut_mid_commit_loses_no_acknowledged_sale(burst, tmp_path: Path) -> None:
    """The durability contract itself: the last acknowledged sale's WAL is whole, the next commit
    was torn anywhere in its frames: all acknowledged sales are there."""
    path, db, wal, acked, page = burst
    last_ack = acked[-2][1]  # sale 39 acknowledged; sale 40 being written when the power went
    rnd = random.Random(3)
    for n, cut in enumerate(sorted({last_ack} | {rnd.randrange(last_ack, len(wal)) for _ in range(5)})):
        copy = node_copy(path, tmp_path / f"mid{n}", db, wal[:cut])
        core = NodeCore.open(copy, wall_clock())
        try:
            held = set(own_sale_ids(core))
            assert {s for s, _ in acked[:-1]} <= held
        finally:
            core.close()


def damaged_variants(db: bytes, rnd: random.Random) -> list[tuple[str, bytes]]:
    out = [("header scrambled", b"\x00" * 100 + db[100:]), ("not a database", b"garbage" * 1000)]
    for _ in range(3):
        out.append((f"cut at {(cut := rnd.randrange(4096, len(db)))}", db[:cut]))
    for _ in range(2):
        at = rnd.randrange(4096, len(db) - 4096)
        out.append((f"page scrambled at {at}", db[:at] + bytes(rnd.randrange(256) for _ in range(4096)) + db[at + 4096:]))
    return out


def test_damaged_main_file_is_refused_naming_it_or_opens_whole(burst, tmp_path: Path) -> None:
    path, db, wal, acked, page = burst
    # checkpoint everything into the main file first, so damage to it hits real data
    whole = node_copy(path, tmp_path / "whole", db, wal)
    core = NodeCore.open(whole, wall_clock())
    core.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    core.close()
    full_db = (whole / DB).read_bytes()
    refused = 0
    for n, (what, data) in enumerate(damaged_variants(full_db, random.Random(11))):
        copy = node_copy(path, tmp_path / f"dmg{n}", data, None)
        try:
            core = NodeCore.open(copy, wall_clock())
        except CorruptStoreError as exc:
            assert str(copy / DB) in str(exc), (what, str(exc))
            refused += 1
            continue
        except StoreError as exc:  # e.g. the meta rows were lost: still a clear store error naming the file
            assert str(copy / DB) in str(exc), (what, str(exc))
            refused += 1
            continue
        try:  # it opened: then it must be whole
            check_consistent(core)
            assert set(own_sale_ids(core)) == {s for s, _ in acked}, what
        finally:
            core.close()
    assert refused >= 3


def recover_from_peer(tmp_path: Path, make_node, sales: int, guard: bool = True):
    """A sells ``sales`` (two shards, compactions included), B replicates; A's database is damaged,
    refused, moved aside; A restarts and links to B. Returns (a, b, net, acked ids)."""
    clock = wall_clock()
    a = SimNode.open(make_node("a"), clock)
    b = SimNode.open(make_node("b"), clock)
    acked = [a.core.sell(100 + i % 50)["id"] for i in range(sales)]
    net = MemNetwork()
    net.connect(a.replicator, b.replicator)
    net.pump()
    assert set(acked) <= b.sale_ids()
    a.close()
    db = a.path / DB
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])  # the disk lost the second half of the file
    with pytest.raises(CorruptStoreError) as info:
        NodeCore.open(a.path, clock)
    assert str(db) in str(info.value) and "move it aside" in str(info.value)
    for suffix in ("", "-wal", "-shm"):
        if (a.path / (DB + suffix)).exists():
            (a.path / (DB + suffix)).rename(a.path / (DB + suffix + ".damaged"))
    a = SimNode.open(a.path, clock)
    return a, b, net, acked


def sell_without_reuse(a: SimNode, b: SimNode) -> str:
    """Sell on A; the new sale id must not be one the mesh already holds (with other bytes)."""
    new = a.core.sell(777)["id"]
    held_by_b = b.core.ledger.raw(f"sale/{new}")
    assert held_by_b is None or held_by_b == a.core.ledger.raw(f"sale/{new}"), f"sale id {new} used twice"
    return new


def test_corrupt_store_refused_then_recovered_from_the_mesh_without_reusing_a_sale_id(make_node, tmp_path) -> None:
    a, b, net, acked = recover_from_peer(tmp_path, make_node, 300)
    try:
        assert a.sale_ids() == set()
        with pytest.raises(PolicyError, match="re-created"):
            a.core.sell(500)  # before the mesh gave its sales back: a sale now would reuse id ...-00000001
        net.connect(a.replicator, b.replicator)
        net.pump()
        assert set(acked) <= a.sale_ids(), "the mesh did not give the node's own sales back"
        assert not a.core.recovery_flag.exists()
        new = sell_without_reuse(a, b)
        assert new.endswith(f"{len(acked) + 1:08d}")
        net.pump()
        assert a.entries() == b.entries()
        own_shards = [s for s in a.core.ledger.shards() if s.startswith(a.core.node_id)]
        assert a.core.ledger.index[f"sale/{new}"].home == max(own_shards), "new entries go past the old log"
    finally:
        a.close()
        b.close()


def test_recovery_check_catches_a_node_that_sells_before_the_mesh_answered(make_node, tmp_path, monkeypatch) -> None:
    """Test of the test: without the recovery flag, the re-created node sells seq 1 again and the
    reuse check fails."""
    real = core_mod._write_durably
    monkeypatch.setattr(core_mod, "_write_durably",
                        lambda p, text: None if p.name == core_mod.RECOVERING_FILE else real(p, text))
    a, b, net, acked = recover_from_peer(tmp_path, make_node, 5)
    try:
        with pytest.raises(AssertionError, match="used twice"):
            sell_without_reuse(a, b)
    finally:
        a.close()
        b.close()


def test_store_runs_wal_and_synchronous_full(make_node) -> None:
    core = NodeCore.open(make_node("t1"), wall_clock())
    try:
        assert core.store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert core.store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        core.close()


def test_durability_check_catches_a_store_without_synchronous_full(make_node, monkeypatch) -> None:
    """Test of the test: a Store that opens with synchronous=NORMAL (the WAL is not synced at each
    commit, so an acknowledged sale can vanish in a power cut) fails the check above."""
    real_open = Store.open.__func__  # type: ignore[attr-defined]

    def lax_open(cls, path, **kw):  # type: ignore[no-untyped-def]
        store = real_open(cls, path, **kw)
        store.conn.execute("PRAGMA synchronous=NORMAL")
        return store

    monkeypatch.setattr(Store, "open", classmethod(lax_open))
    with pytest.raises(AssertionError):
        test_store_runs_wal_and_synchronous_full(make_node)
