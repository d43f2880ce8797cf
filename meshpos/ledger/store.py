"""The node's durable state: one SQLite file (WAL, synchronous=FULL).

It holds every verified ledger entry, a materialized view of the sales, and
the Automerge shards as snapshot + incremental change chunks. A sale, its
ledger entry and its Automerge change commit in ONE transaction, so a sale is
acknowledged only once all three are on disk, and a crash leaves all or none.
SQLite's WAL frames carry checksums: a torn last write is dropped by SQLite on
recovery, never loaded half. Each chunk also carries a CRC32 of its own, so a
damaged chunk is detected (the shard is then rebuilt from the verified
entries) instead of being fed to Automerge.

Schema: protocols/storage.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from meshpos.infra.sqlite import NEARLY_FULL_BYTES, disk_full, open_checked, free_bytes, is_disk_full, sqlite_transaction, store_error
from meshpos.domain.errors import CorruptStoreError, StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: sales.refused (content rules) and sales.reversed_at; 3: idempotency keys
WAL_CHECKPOINT_PAGES = 1000  # SQLite's own default
CHECKPOINT_ROWS = 4000  # rows a sale's entry and view take ~1 KiB together: ~1,000 pages
# ... or after this many commits: each commit writes every page it dirtied to the log again (a busy
# node's group commit, ~8 sales, ~100 pages: the indexes' leaves), so by rows alone the log grew
# to ~60 MB between checkpoints at 40 sales/s (tools/bench_mesh.py)
CHECKPOINT_COMMITS = 10
APPLICATION_ID = 0x4D504F53  # "MPOS": a foreign SQLite file is told apart at once

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(
    key TEXT PRIMARY KEY, type TEXT NOT NULL, signer TEXT NOT NULL, raw BLOB NOT NULL,
    shard TEXT NOT NULL, received_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_shard ON entries(shard);
CREATE INDEX IF NOT EXISTS entries_type ON entries(type);
CREATE TABLE IF NOT EXISTS sales(
    sale_id TEXT PRIMARY KEY, terminal TEXT NOT NULL, seq INTEGER NOT NULL, created_at INTEGER NOT NULL,
    amount_minor INTEGER NOT NULL, currency TEXT NOT NULL, method TEXT NOT NULL,
    brand TEXT, last4 TEXT, entry_mode TEXT, description TEXT,
    voided_at INTEGER, result_status TEXT, auth_code TEXT, response_code TEXT, reason TEXT,
    settled_at INTEGER, refused TEXT, reversed_at INTEGER);
CREATE INDEX IF NOT EXISTS sales_terminal ON sales(terminal, seq);
CREATE INDEX IF NOT EXISTS sales_pending_card ON sales(terminal, created_at, amount_minor)
    WHERE result_status IS NULL AND voided_at IS NULL AND refused IS NULL AND method='card';
DROP INDEX IF EXISTS sales_pending;
CREATE TABLE IF NOT EXISTS shards(shard TEXT PRIMARY KEY, snapshot BLOB);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY AUTOINCREMENT, shard TEXT NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_shard ON chunks(shard, id);
CREATE TABLE IF NOT EXISTS idempotency(
    key TEXT PRIMARY KEY, body_hash TEXT NOT NULL, sale_id TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS parked(
    key TEXT PRIMARY KEY, raw BLOB NOT NULL, shard TEXT NOT NULL, reason TEXT NOT NULL,
    received_at INTEGER NOT NULL);
"""


def damaged(path: Path, what: str) -> CorruptStoreError:
    """The error for a damaged node database: what is wrong, and how the node gets its content back."""
    return CorruptStoreError(f"{path}: {what}; move it aside and restart the node to recover from the mesh")


@functools.cache
def _schema_columns() -> dict[str, tuple[str, ...]]:
    """The columns of each table of ``SCHEMA``, read from an empty database made with it."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(SCHEMA)
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: tuple(row[1] for row in conn.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        conn.close()


# A sale row with the idempotency key it was created under (the node's own API sales only).
_SALE_ROWS = ("SELECT s.*, k.key AS idempotency_key FROM sales s"
              " LEFT JOIN idempotency k ON k.sale_id = s.sale_id")




_INSERT_ENTRY = "INSERT INTO entries(key, type, signer, raw, shard, received_at) VALUES(?,?,?,?,?,?)"
# the pending card sales (the caps' exposure), through the partial index sales_pending_card
_PENDING_CARD = ("SELECT terminal, coalesce(sum(amount_minor), 0) FROM sales WHERE result_status IS NULL"
                 " AND voided_at IS NULL AND refused IS NULL AND method='card'")
_INSERT_SALE = ("INSERT OR IGNORE INTO sales(sale_id, terminal, seq, created_at, amount_minor, currency, method,"
                " brand, last4, entry_mode, description, refused) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)")
EntryRow = tuple[str, str, str, bytes, str, int]  # key, type, signer, raw, shard, received_at


def sale_row(body: dict[str, Any], refused: str | None) -> tuple[Any, ...]:
    """The sales-view row of a (verified) sale body."""
    card = body.get("card") or {}
    return (body["sale_id"], body["terminal"], body["seq"], body["created_at"], body["amount_minor"],
            body["currency"], body["method"], card.get("brand"), card.get("last4"), card.get("entry_mode"),
            body.get("description"), refused)


@dataclass(frozen=True)
class ShardData:
    shard: str
    snapshot: bytes | None
    chunks: list[bytes]
    damaged: int  # chunks dropped because their CRC did not match


class Store:
    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self._depth = 0
        self._held = False
        self._flushed_changes = 0
        self._wal_fd: int | None = None
        self._checkpoint_mark = 0
        self._commits_since_checkpoint = 0
        self.on_dirty: Callable[[], None] | None = None
        self.rollbacks = 0  # times SQLite rolled the held transaction back (Ledger reloads after one)
        self._chunk_counts: dict[str, int] = {}  # shard -> its chunks (add_chunk); forgotten on a rollback

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = False, identity: dict[str, str] | None = None) -> "Store":
        """Open (or create) the node database; ``identity`` must match what it holds."""
        if not create and not path.exists():
            raise StoreError(f"{path}: node database is missing")
        conn: sqlite3.Connection | None = None
        try:
            conn, _ = open_checked(path, APPLICATION_ID, "node")
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise damaged(path, f"database is damaged ({ok})")
            conn.executescript(SCHEMA)
        except UnicodeDecodeError as exc:  # a damaged schema text (sqlite_master), read by sqlite3 as str
            if conn is not None:
                conn.close()
            raise damaged(path, f"database is damaged (its schema is not text: {exc.reason})") from exc
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc, path.parent):
                if conn is not None:
                    conn.close()
                raise disk_full(path, "opening the node database") from exc
            raise damaged(path, f"database is damaged or not a database ({exc})") from exc
        store = cls(path, conn)
        try:
            store._settle_schema()
            if identity:
                store.check_identity(identity)
        except BaseException as exc:
            store.close()
            if isinstance(exc, sqlite3.DatabaseError) and not is_disk_full(exc, path.parent):
                # a schema whose text SQLite accepts but whose tables are not what it says (a flip)
                raise damaged(path, f"database is damaged ({exc})") from exc
            raise
        return store

    def _settle_schema(self) -> None:
        """Bring an older schema up to date; then every column the schema names must be there."""
        version = self.get_meta("schema")
        if version == "1":
            self._migrate_1_to_2()
            version = "2"
        if version == "2":
            self._migrate_2_to_3()
            version = "3"
        if version is None:
            with self.transaction():
                self.set_meta("schema", str(SCHEMA_VERSION))
        elif version != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path}: database schema {version} is not {SCHEMA_VERSION}")
        self._check_columns()

    def _migrate_1_to_2(self) -> None:
        with self.transaction():
            cols = {row[1] for row in self.conn.execute("PRAGMA table_info(sales)")}
            for col, kind in (("refused", "TEXT"), ("reversed_at", "INTEGER")):
                if col not in cols:
                    self.conn.execute(f"ALTER TABLE sales ADD COLUMN {col} {kind}")
            self.conn.execute("DROP INDEX IF EXISTS sales_pending")  # schema 1's; SCHEMA made sales_pending_card
            self.set_meta("schema", "2")

    def _migrate_2_to_3(self) -> None:
        """3: the terminal API's idempotency keys (a table of its own; no sale changes)."""
        with self.transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS idempotency(key TEXT PRIMARY KEY, body_hash TEXT NOT NULL,"
                              " sale_id TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL)")
            self.set_meta("schema", "3")

    def _check_columns(self) -> None:
        """Every column the schema names is there. A damaged schema text (a bit flip in a column's
        name) passes SQLite's own checks; without this, the first read of that column failed
        deep in the node with an IndexError or an OperationalError."""
        for table, columns in _schema_columns().items():
            try:
                held = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
            except sqlite3.DatabaseError as exc:  # a column's declaration that is not text
                raise damaged(self.path, f"database is damaged (table {table} cannot be read: {exc})") from exc
            missing = sorted(set(columns) - held)
            if missing:
                raise damaged(self.path, f"database is damaged (table {table} lacks column(s) {', '.join(missing)})")

    def check_identity(self, identity: dict[str, str]) -> None:
        for key, value in identity.items():
            held = self.get_meta(key)
            if held is None:
                with self.transaction():
                    self.set_meta(key, value)
            elif held != value:
                raise StoreError(f"{self.path}: database belongs to {key} {held}, not {value} "
                                 "(a node directory of another site or node?)")

    def close(self) -> None:
        if self._held:
            self.release()
        self.conn.close()

    # -- transactions -----------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT; a nested use is a SAVEPOINT inside the outer transaction.

        Deferred, not IMMEDIATE: one process owns the node directory (node.lock), so there is
        no other writer to race, and a transaction that ends up writing nothing (a sync
        acknowledgement) costs no fsync. Under ``hold()`` (the running node) every
        transaction is a savepoint of the held one, made durable by ``flush()``."""
        if self._depth:
            self._repair_held()
            name = f"sp{self._depth}"
            self.conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self.conn
            except BaseException as exc:
                self._depth -= 1
                self._chunk_counts.clear()
                if self.conn.in_transaction:
                    self.conn.execute(f"ROLLBACK TO {name}")
                    self.conn.execute(f"RELEASE {name}")
                else:  # SQLite rolled back the whole (held) transaction: a full disk
                    self._repair_held()
                if isinstance(exc, sqlite3.DatabaseError) and is_disk_full(exc, self.path.parent):
                    raise disk_full(self.path, "writing") from exc
                raise
            self._depth -= 1
            self.conn.execute(f"RELEASE {name}")
            if self._held and self._depth == 1 and self.on_dirty is not None:
                self.on_dirty()
            return
        self._depth = 1
        try:
            with sqlite_transaction(self.conn, self.path):
                yield self.conn
        except BaseException:
            self._chunk_counts.clear()
            raise
        finally:
            self._depth = 0

    # -- group commit (the running node) ---------------------------------------------

    def hold(self) -> None:
        """Keep one transaction open; writes join it and become durable at ``flush()``.

        The running node takes what its links bring in this way: one fsync per few
        milliseconds instead of one per sync message. Paths that acknowledge something
        (a sale, a void) call ``flush()`` before they return, so the acknowledgement
        still means "on disk"."""
        if self._held or self._depth:
            raise StoreError("hold() inside a transaction")
        # Held commits do not fsync by themselves (synchronous=NORMAL; checkpoint() syncs on its
        # own connection); durability comes from sync_wal(), which the running node calls off its
        # event loop and flush() calls inline.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoint() does it, beside the writer
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT count(*) FROM meta").fetchone()  # the WAL file exists from here on
        try:
            self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.conn.execute("ROLLBACK")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            raise StoreError(f"{self.path}-wal: cannot open the write-ahead log: {exc}") from exc
        self._held, self._depth = True, 1
        self._flushed_changes = self.conn.total_changes

    @property
    def held(self) -> bool:
        return self._held

    def _repair_held(self) -> None:
        """Under hold(), SQLite rolls the held transaction back by itself when a write meets a
        full disk: what was written since the last commit (never acknowledged: acknowledgements
        wait for flush()) is gone from disk. Open a new one, so that writes go on joining it."""
        if self._held and self._depth == 1 and not self.conn.in_transaction:
            log.error("%s: uncommitted writes were rolled back by SQLite (disk full?); they come back from "
                      "the mesh", self.path)
            self.conn.execute("BEGIN")
            self._flushed_changes = self.conn.total_changes
            self._chunk_counts.clear()
            self.rollbacks += 1  # what others hold in memory of those writes must be read again

    def commit(self) -> bool:
        """COMMIT what was written under hold(), without waiting for the disk (then sync_wal()).
        False if nothing was written since the last commit."""
        if not self._held:
            return False
        if self._depth != 1:
            raise StoreError("commit inside a nested transaction")
        if not self.conn.in_transaction:  # a write outside our savepoints met a full disk or an I/O error
            self._repair_held()
            lost = "the writes since the last commit were rolled back"
            if free_bytes(self.path.parent) < NEARLY_FULL_BYTES:
                raise disk_full(self.path, lost)
            raise StoreError(f"{self.path}: {lost} by SQLite (an I/O error?)")
        if self.conn.total_changes == self._flushed_changes:
            return False
        try:
            self.conn.execute("COMMIT")
            self._commits_since_checkpoint += 1
        except sqlite3.DatabaseError as exc:
            failed = store_error(self.path, "commit", exc)
            self._repair_held()
            raise failed from exc
        self.conn.execute("BEGIN")
        self._flushed_changes = self.conn.total_changes
        return True

    def sync_wal(self) -> None:
        """Wait until every committed transaction is on disk: fdatasync of the WAL file, what
        synchronous=FULL does at each COMMIT. Touches no SQLite state, so a worker thread may run
        it while the connection goes on."""
        if self._wal_fd is None:
            raise StoreError("sync_wal() without hold()")
        try:
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            raise store_error(Path(f"{self.path}-wal"), "sync to disk", exc) from exc

    def flush(self) -> None:
        """Make everything written so far durable before returning."""
        if self.commit():
            self.sync_wal()

    def release(self) -> None:
        if not self._held:
            return
        self.flush()
        self.conn.execute("COMMIT")
        self.conn.execute("PRAGMA synchronous=FULL")
        self._held, self._depth = False, 0
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        self.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")

    def checkpoint_due(self) -> bool:
        """Under ``hold()``, where SQLite no longer checkpoints by itself: True once per
        CHECKPOINT_ROWS rows written (about 1,000 pages, SQLite's own interval) or
        CHECKPOINT_COMMITS commits that wrote something; the caller then runs ``checkpoint()``.
        With ``finish_checkpoint()`` after it, the log starts over from its beginning, so it stays
        a few MB instead of growing (and the file system zeroing each new block of it)."""
        rows = self.conn.total_changes - self._checkpoint_mark
        if not rows or (rows < CHECKPOINT_ROWS and self._commits_since_checkpoint < CHECKPOINT_COMMITS):
            return False
        self._checkpoint_mark = self.conn.total_changes
        self._commits_since_checkpoint = 0
        return True

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, on a connection of its own, so a
        worker thread can do it while this one goes on writing (PASSIVE: it never waits for or
        blocks the writer). Under ``hold()`` nothing else checkpoints."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.DatabaseError as exc:
            log.warning("%s: checkpoint failed: %s", self.path, exc)
        finally:
            conn.close()

    def finish_checkpoint(self) -> bool:
        """After ``checkpoint()`` in a worker thread, on this connection's own thread: copy what
        was committed meanwhile too, when nothing waits for a commit. SQLite starts the log over
        at the next write only once the whole log is in the database, and a pass in a thread
        never is that while sales go on beside it: a node that kept selling grew its log without
        end (260 MB after 7,000 sales in tools/bench_api_ab.py), which made every fdatasync and
        read slower (BENCHMARKS.md, "Terminal API", the WAL that never started over). Few pages
        are left by then; on a connection of its own, so it syncs as ``checkpoint()`` does. True when
        it did (False: a write waits for its commit, or a savepoint is open; the next one tries)."""
        if (not self._held or self._depth != 1 or not self.conn.in_transaction
                or self.conn.total_changes != self._flushed_changes):
            return False  # a write waits for its commit (or a savepoint is open): the next checkpoint
        # the held transaction has only read since its last commit: end it, so that its next read
        # starts after the checkpoint (SQLite starts the log over only for a writer that did)
        self.conn.execute("COMMIT")
        try:
            self.checkpoint()
        finally:
            self.conn.execute("BEGIN")
        return True

    # -- meta -------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                          (key, value))

    # -- entries ----------------------------------------------------------------

    def entry(self, key: str) -> tuple[bytes, str] | None:
        row = self.conn.execute("SELECT raw, shard FROM entries WHERE key=?", (key,)).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]))

    def insert_entry(self, key: str, type_: str, signer: str, raw: bytes, shard: str, now_ms: int) -> None:
        self.conn.execute(_INSERT_ENTRY, (key, type_, signer, raw, shard, now_ms))

    def insert_entries(self, rows: list[EntryRow]) -> None:
        """``insert_entry`` for many entries in one statement (a whole shard a joiner takes in)."""
        self.conn.executemany(_INSERT_ENTRY, rows)

    def entries_of_shard(self, shard: str) -> list[tuple[str, bytes]]:
        return [(str(k), bytes(r)) for k, r in
                self.conn.execute("SELECT key, raw FROM entries WHERE shard=? ORDER BY rowid", (shard,))]

    def entries_of_type(self, *types: str) -> list[bytes]:
        marks = ",".join("?" * len(types))
        return [bytes(r[0]) for r in
                self.conn.execute(f"SELECT raw FROM entries WHERE type IN ({marks}) ORDER BY rowid", types)]

    def all_entries(self) -> list[tuple[str, bytes, str]]:
        """(key, raw, shard) of every entry held."""
        return [(str(k), bytes(r), str(s)) for k, r, s in self.conn.execute("SELECT key, raw, shard FROM entries")]

    def entries_with_reception(self, type_: str) -> list[tuple[str, bytes, int]]:
        """(key, raw, received_at) of every entry of one type, with when this node first stored it."""
        return [(str(k), bytes(r), int(t)) for k, r, t in self.conn.execute(
            "SELECT key, raw, received_at FROM entries WHERE type=?", (type_,))]

    def parked_entry(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT raw FROM parked WHERE key=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def entry_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM entries").fetchone()[0])

    # -- parked entries (signer not known yet) ----------------------------------

    def park(self, key: str, raw: bytes, shard: str, reason: str, now_ms: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO parked(key, raw, shard, reason, received_at) VALUES(?,?,?,?,?)",
                          (key, raw, shard, reason, now_ms))

    def parked(self) -> list[tuple[str, bytes, str]]:
        return [(str(k), bytes(r), str(s)) for k, r, s in self.conn.execute("SELECT key, raw, shard FROM parked")]

    def unpark(self, key: str) -> None:
        self.conn.execute("DELETE FROM parked WHERE key=?", (key,))

    # -- sales view -------------------------------------------------------------

    def insert_sale(self, body: dict[str, Any], refused: str | None = None) -> None:
        self.conn.execute(_INSERT_SALE, sale_row(body, refused))

    def insert_sales(self, rows: list[tuple[Any, ...]]) -> None:
        """``insert_sale`` for many sales in one statement; each row made by ``sale_row``."""
        self.conn.executemany(_INSERT_SALE, rows)

    def set_refused(self, sale_id: str, refused: str | None) -> int:
        """Record a (new) verdict; the number of rows whose verdict changed."""
        return self.conn.execute("UPDATE sales SET refused=? WHERE sale_id=? AND refused IS NOT ?",
                                 (refused, sale_id, refused)).rowcount

    def sale_entries_since(self, created_at_ms: int) -> list[bytes]:
        return [bytes(r[0]) for r in self.conn.execute(
            "SELECT e.raw FROM sales s JOIN entries e ON e.key = 'sale/' || s.sale_id WHERE s.created_at >= ?",
            (created_at_ms,))]

    def delete_sale(self, sale_id: str) -> None:
        self.conn.execute("DELETE FROM sales WHERE sale_id=?", (sale_id,))

    def unmark_void(self, sale_id: str) -> None:
        self.conn.execute("UPDATE sales SET voided_at=NULL WHERE sale_id=?", (sale_id,))

    def mark_reversed(self, sale_id: str, at_ms: int) -> None:
        self.conn.execute("UPDATE sales SET reversed_at=? WHERE sale_id=? AND reversed_at IS NULL", (at_ms, sale_id))

    def entries_of_signer(self, signer: str) -> list[tuple[str, bytes, str]]:
        return [(str(k), bytes(r), str(s)) for k, r, s in self.conn.execute(
            "SELECT key, raw, shard FROM entries WHERE signer=?", (signer,))]

    def delete_entry(self, key: str) -> None:
        self.conn.execute("DELETE FROM entries WHERE key=?", (key,))

    def mark_void(self, sale_id: str, at_ms: int) -> None:
        self.conn.execute("UPDATE sales SET voided_at=? WHERE sale_id=? AND voided_at IS NULL", (at_ms, sale_id))

    def set_result(self, body: dict[str, Any]) -> None:
        self.conn.execute(
            "UPDATE sales SET result_status=?, auth_code=?, response_code=?, reason=?, settled_at=? WHERE sale_id=?",
            (body["status"], body["auth_code"], body["response_code"], body["reason"], body["settled_at"],
             body["sale_id"]))

    def sales(self, terminal: str | None = None) -> list[sqlite3.Row]:
        self.conn.row_factory = sqlite3.Row
        try:
            if terminal is None:
                return list(self.conn.execute(f"{_SALE_ROWS} ORDER BY s.created_at, s.sale_id"))
            return list(self.conn.execute(f"{_SALE_ROWS} WHERE s.terminal=? ORDER BY s.seq", (terminal,)))
        finally:
            self.conn.row_factory = None

    def sales_page(self, after: tuple[int, str] | None, limit: int, *, method: str | None = None,
                   since_ms: int | None = None) -> list[sqlite3.Row]:
        """Up to ``limit`` sales in (created_at, sale_id) order, after the ``after`` cursor."""
        sql, args = f"{_SALE_ROWS} WHERE 1", list[Any]()
        if after is not None:
            sql += " AND (s.created_at, s.sale_id) > (?, ?)"
            args += list(after)
        if method is not None:
            sql += " AND s.method=?"
            args.append(method)
        if since_ms is not None:
            sql += " AND s.created_at >= ?"
            args.append(since_ms)
        self.conn.row_factory = sqlite3.Row
        try:
            return list(self.conn.execute(sql + " ORDER BY s.created_at, s.sale_id LIMIT ?", (*args, limit)))
        finally:
            self.conn.row_factory = None

    def sale(self, sale_id: str) -> sqlite3.Row | None:
        self.conn.row_factory = sqlite3.Row
        try:
            row: sqlite3.Row | None = self.conn.execute(f"{_SALE_ROWS} WHERE s.sale_id=?", (sale_id,)).fetchone()
            return row
        finally:
            self.conn.row_factory = None

    def held_marks(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Per terminal, the greatest ``n`` such that its sales ``1..n`` are all held (a seq equal to
        its rank among the terminal's seqs lies in that run), and the (terminal, seq) held beyond it."""
        ranked = ("SELECT terminal, seq, row_number() OVER (PARTITION BY terminal ORDER BY seq) AS rank"
                  " FROM sales")
        marks = [(str(t), int(n)) for t, n in self.conn.execute(
            f"SELECT terminal, max(seq) FROM ({ranked}) WHERE seq = rank GROUP BY terminal")]
        ahead = [(str(t), int(s)) for t, s in self.conn.execute(
            f"SELECT terminal, seq FROM ({ranked}) WHERE seq > rank")]
        return marks, ahead
    # -- idempotency keys (the terminal API) -------------------------------------

    def insert_idempotency(self, key: str, body_hash: str, sale_id: str, now_ms: int) -> None:
        """Inside the sale's own transaction: the key is durable exactly when the sale is."""
        self.conn.execute("INSERT INTO idempotency(key, body_hash, sale_id, created_at) VALUES(?,?,?,?)",
                          (key, body_hash, sale_id, now_ms))

    def idempotency(self, key: str) -> tuple[str, str] | None:
        """(body_hash, sale_id) stored under an idempotency key, or None."""
        row = self.conn.execute("SELECT body_hash, sale_id FROM idempotency WHERE key=?", (key,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def last_seq(self, terminal: str) -> int:
        row = self.conn.execute("SELECT max(seq) FROM sales WHERE terminal=?", (terminal,)).fetchone()
        return int(row[0] or 0)

    def pending_total(self, terminal: str | None, not_before_ms: int, not_after_ms: int | None = None) -> int:
        """Sum of valid card sales with no result and no void, created in [not_before_ms, not_after_ms]."""
        return sum(self.pending_by_terminal(not_before_ms, not_after_ms, terminal).values())

    def pending_by_terminal(self, not_before_ms: int, not_after_ms: int | None = None,
                            terminal: str | None = None) -> dict[str, int]:
        """terminal -> sum of its valid card sales with no result and no void, created in the range
        (refused sales are never counted, nor cash ones: they are not the site's exposure)."""
        sql = _PENDING_CARD + " AND created_at >= ?"
        args: tuple[Any, ...] = (not_before_ms,)
        if not_after_ms is not None:
            sql += " AND created_at <= ?"
            args += (not_after_ms,)
        if terminal is not None:
            sql += " AND terminal=?"
            args += (terminal,)
        return {str(t): int(v) for t, v in self.conn.execute(sql + " GROUP BY terminal", args)}

    def pending_for_sale(self, not_before_ms: int, not_after_ms: int, own: str) -> dict[str, int]:
        """The totals a new sale of terminal ``own`` checks the caps against, in one pass over the
        pending card sales (two calls of ``pending_by_terminal`` before: the pass grows with the
        pending sales, and every sale made it twice): every other terminal's created in
        [not_before_ms, not_after_ms], ``own``'s from not_before_ms whatever their date ahead (a
        clock set back must not free a terminal's own caps); ``own`` is always in it, 0 if none."""
        totals = {str(t): int(v) for t, v in self.conn.execute(
            _PENDING_CARD + " AND created_at >= ? AND (created_at <= ? OR terminal = ?) GROUP BY terminal",
            (not_before_ms, not_after_ms, own))}
        totals.setdefault(own, 0)
        return totals

    # -- Automerge shards ---------------------------------------------------------

    def to_forward(self, not_after_ms: int) -> list[tuple[str, str | None]]:
        """(sale_id, result_status) of the sales a forwarder sends: no result yet, or voided after
        approval and not reversed yet; never a refused sale nor one dated after ``not_after_ms``."""
        return [(str(s), r) for s, r in self.conn.execute(
            "SELECT sale_id, result_status FROM sales WHERE refused IS NULL AND created_at <= ?"
            " AND (result_status IS NULL"
            "      OR (voided_at IS NOT NULL AND result_status='approved' AND reversed_at IS NULL))"
            " ORDER BY created_at, sale_id", (not_after_ms,))]

    def pending_summary(self, window_start_ms: int, not_after_ms: int,
                        terminal: str | None = None) -> tuple[int, int, int | None]:
        """(count, amount, oldest created_at) of the card sales awaiting their authorization: inside
        the offline window, not voided, refused or future-dated (a cash sale is final when taken)."""
        sql = ("SELECT count(*), coalesce(sum(amount_minor), 0), min(created_at)"
               " FROM sales WHERE result_status IS NULL AND voided_at IS NULL AND refused IS NULL"
               " AND method='card' AND created_at >= ? AND created_at <= ?")
        args: tuple[Any, ...] = (window_start_ms, not_after_ms)
        if terminal is not None:
            sql += " AND terminal=?"
            args += (terminal,)
        count, amount, oldest = self.conn.execute(sql, args).fetchone()
        return int(count), int(amount), None if oldest is None else int(oldest)

    def refused_by_terminal(self, limit: int) -> list[tuple[str, int]]:
        """The terminals with the most sales refused by the content rules, with their counts."""
        return [(str(t), int(n)) for t, n in self.conn.execute(
            "SELECT terminal, count(*) FROM sales WHERE refused IS NOT NULL GROUP BY terminal"
            " ORDER BY count(*) DESC, terminal LIMIT ?", (limit,))]

    def add_chunk(self, shard: str, data: bytes) -> int:
        """Append a change chunk to the shard; how many chunks it has now (counted in memory after
        the first time: a count query per received sale cost more than the insert)."""
        self.conn.execute("INSERT INTO chunks(shard, data, crc) VALUES(?,?,?)", (shard, data, zlib.crc32(data)))
        n = self._chunk_counts.get(shard)
        n = self.chunk_count(shard) if n is None else n + 1
        self._chunk_counts[shard] = n
        return n

    def chunk_count(self, shard: str) -> int:
        return int(self.conn.execute("SELECT count(*) FROM chunks WHERE shard=?", (shard,)).fetchone()[0])

    def put_snapshot(self, shard: str, snapshot: bytes) -> None:
        """Replace a shard's snapshot and drop the chunks it now contains (same transaction)."""
        self.conn.execute("INSERT INTO shards(shard, snapshot) VALUES(?, ?) "
                          "ON CONFLICT(shard) DO UPDATE SET snapshot=excluded.snapshot", (shard, snapshot))
        self.conn.execute("DELETE FROM chunks WHERE shard=?", (shard,))
        self._chunk_counts[shard] = 0

    def shard_names(self) -> list[str]:
        rows = self.conn.execute("SELECT shard FROM shards UNION SELECT DISTINCT shard FROM chunks")
        return sorted(str(r[0]) for r in rows)

    def load_shard(self, shard: str) -> ShardData:
        row = self.conn.execute("SELECT snapshot FROM shards WHERE shard=?", (shard,)).fetchone()
        snapshot = bytes(row[0]) if row and row[0] is not None else None
        chunks, damaged = [], 0
        for data, crc in self.conn.execute("SELECT data, crc FROM chunks WHERE shard=? ORDER BY id", (shard,)):
            if zlib.crc32(data) != crc:
                damaged += 1
                continue
            chunks.append(bytes(data))
        return ShardData(shard=shard, snapshot=snapshot, chunks=chunks, damaged=damaged)
