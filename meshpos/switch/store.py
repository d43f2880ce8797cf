"""The switch's durable state: one SQLite file (WAL, synchronous=FULL).

Tables:
  sites        registered sites: CA certificate (PEM), current signed policy, merchant id
  site_entries CA-signed revocations and policies, and node certificates, learned from batches
  sales        the de-duplication table, keyed on sale id: the sale envelope (its card data stays
               sealed), its digest, the state (received / advice_sent / settled), the signed
               result bytes, the reversal state and, once a void after approval was reversed,
               the signed ``reversal`` entry; the attempts. ``ref`` numbers the sale for the
               acquirer (RRN and STAN derive from it), so a repeat carries the same numbers.
  voids        void envelopes received, also those that came before their sale

Every state change of a sale commits before the switch acts on it: ``received`` before the
batch is answered, ``advice_sent`` before the first byte of the 0220 leaves, ``settled`` before
the result is returned. A crash between "advice sent" and "answer" therefore leaves
``advice_sent``, and the next attempt goes as 0221, never as a second 0220.

No column ever holds a full card number.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import trio

from meshpos.domain.errors import CorruptStoreError, StoreError
from meshpos.ledger.store import sqlite_transaction

APPLICATION_ID = 0x4D505357  # "MPSW"
SCHEMA_VERSION = "2"  # 2: sales.reversal_entry (schema 1 is migrated in place on open)

RECEIVED = "received"
ADVICE_SENT = "advice_sent"
SETTLED = "settled"
STATES = (RECEIVED, ADVICE_SENT, SETTLED)

REVERSAL_SENT = "sent"
REVERSAL_DONE = "done"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites(
    site_id TEXT PRIMARY KEY, name TEXT NOT NULL, ca_pem TEXT NOT NULL, policy_env BLOB NOT NULL,
    merchant_id TEXT NOT NULL, added_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS site_entries(
    key TEXT NOT NULL, site_id TEXT NOT NULL, type TEXT NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY(site_id, key));
CREATE TABLE IF NOT EXISTS sales(
    ref INTEGER PRIMARY KEY AUTOINCREMENT,
    sale_id TEXT NOT NULL UNIQUE, site_id TEXT NOT NULL, terminal TEXT NOT NULL,
    digest BLOB NOT NULL, sale_raw BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    result BLOB, result_status TEXT, reversal TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    received_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, reversal_entry BLOB);
CREATE INDEX IF NOT EXISTS sales_state ON sales(state);
CREATE TABLE IF NOT EXISTS voids(
    sale_id TEXT PRIMARY KEY, site_id TEXT NOT NULL, raw BLOB NOT NULL, at INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SiteRow:
    site_id: str
    name: str
    ca_pem: bytes
    policy_env: bytes
    merchant_id: str


@dataclass(frozen=True)
class SaleRow:
    ref: int
    sale_id: str
    site_id: str
    terminal: str
    digest: bytes
    sale_raw: bytes
    state: str
    result: bytes | None
    result_status: str | None
    reversal: str | None
    attempts: int
    reversal_entry: bytes | None = None  # the signed ``reversal`` envelope, once the 0420 was answered


def _sale(row: Any) -> SaleRow:
    return SaleRow(ref=int(row[0]), sale_id=str(row[1]), site_id=str(row[2]), terminal=str(row[3]),
                   digest=bytes(row[4]), sale_raw=bytes(row[5]), state=str(row[6]),
                   result=None if row[7] is None else bytes(row[7]),
                   result_status=None if row[8] is None else str(row[8]),
                   reversal=None if row[9] is None else str(row[9]), attempts=int(row[10]),
                   reversal_entry=None if row[11] is None else bytes(row[11]))


_SALE_COLUMNS = ("ref, sale_id, site_id, terminal, digest, sale_raw, state, result, result_status, reversal,"
                 " attempts, reversal_entry")

Op = Callable[["SwitchStore"], None]


class SwitchStore:
    """``conn`` writes (in :class:`GroupCommit`'s worker thread while a service runs);
    ``reader`` serves the event loop's queries and sees committed data only."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.reader.execute("PRAGMA query_only=1")
        self.reader.execute("PRAGMA busy_timeout=5000")
        self._depth = 0

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> "SwitchStore":
        if not create and not path.exists():
            raise StoreError(f"{path}: switch database is missing (run `meshpos switch init` first)")
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables and app_id != APPLICATION_ID:
                raise CorruptStoreError(f"{path}: not a meshpos switch database")
            if not tables:
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise CorruptStoreError(f"{path}: switch database is damaged or not a database ({exc})") from exc
        store = cls(path, conn)
        version = store.get_meta("schema")
        if version is None:
            with store.transaction():
                store.set_meta("schema", SCHEMA_VERSION)
        elif version == "1":
            with store.transaction():
                columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(sales)")}
                if "reversal_entry" not in columns:
                    conn.execute("ALTER TABLE sales ADD COLUMN reversal_entry BLOB")
                store.set_meta("schema", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{path}: switch database schema {version} is not {SCHEMA_VERSION}")
        return store

    def close(self) -> None:
        self.reader.close()
        self.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (durable on return); nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with sqlite_transaction(self.conn, self.path, "BEGIN IMMEDIATE"):
                yield self.conn
        finally:
            self._depth = 0

    # -- meta ----------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.reader.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # -- sites ---------------------------------------------------------------------

    def put_site(self, site: SiteRow, now_ms: int) -> None:
        self.conn.execute(
            "INSERT INTO sites(site_id, name, ca_pem, policy_env, merchant_id, added_at) VALUES(?,?,?,?,?,?) "
            "ON CONFLICT(site_id) DO UPDATE SET name=excluded.name, policy_env=excluded.policy_env, "
            "merchant_id=excluded.merchant_id",
            (site.site_id, site.name, site.ca_pem.decode("ascii"), site.policy_env, site.merchant_id, now_ms))

    def sites(self) -> list[SiteRow]:
        rows = self.reader.execute("SELECT site_id, name, ca_pem, policy_env, merchant_id FROM sites ORDER BY site_id")
        return [SiteRow(str(r[0]), str(r[1]), str(r[2]).encode("ascii"), bytes(r[3]), str(r[4])) for r in rows]

    def put_site_entry(self, site_id: str, key: str, type_: str, raw: bytes) -> bool:
        """Keep a verified roster entry; False if it was known already."""
        cur = self.conn.execute("INSERT OR IGNORE INTO site_entries(key, site_id, type, raw) VALUES(?,?,?,?)",
                                (key, site_id, type_, raw))
        return cur.rowcount > 0

    def site_entries(self, site_id: str) -> list[bytes]:
        rows = self.reader.execute(
            "SELECT raw FROM site_entries WHERE site_id=? ORDER BY "
            "CASE type WHEN 'policy' THEN 0 WHEN 'cert' THEN 1 ELSE 2 END, rowid", (site_id,))
        return [bytes(r[0]) for r in rows]

    # -- sales ---------------------------------------------------------------------

    def sale(self, sale_id: str) -> SaleRow | None:
        row = self.reader.execute(f"SELECT {_SALE_COLUMNS} FROM sales WHERE sale_id=?", (sale_id,)).fetchone()
        return None if row is None else _sale(row)

    def sale_by_ref(self, ref: int) -> SaleRow | None:
        row = self.reader.execute(f"SELECT {_SALE_COLUMNS} FROM sales WHERE ref=?", (ref,)).fetchone()
        return None if row is None else _sale(row)

    def insert_received(self, sale_id: str, site_id: str, terminal: str, digest: bytes, raw: bytes,
                        now_ms: int) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO sales(sale_id, site_id, terminal, digest, sale_raw, state, received_at, updated_at)"
            " VALUES(?,?,?,?,?,?,?,?)", (sale_id, site_id, terminal, digest, raw, RECEIVED, now_ms, now_ms))

    def mark_advice_sent(self, sale_id: str, now_ms: int) -> None:
        cur = self.conn.execute(
            "UPDATE sales SET state=?, attempts=attempts+1, updated_at=? WHERE sale_id=? AND state=?",
            (ADVICE_SENT, now_ms, sale_id, RECEIVED))
        if cur.rowcount != 1:
            raise StoreError(f"sale {sale_id} is not in state {RECEIVED}: refusing to mark a second 0220")

    def add_attempts(self, sale_id: str, n: int, now_ms: int) -> None:
        self.conn.execute("UPDATE sales SET attempts=attempts+?, updated_at=? WHERE sale_id=?", (n, now_ms, sale_id))

    def settle(self, sale_id: str, result: bytes, status: str, reversal: str | None, now_ms: int) -> None:
        cur = self.conn.execute(
            "UPDATE sales SET state=?, result=?, result_status=?, reversal=coalesce(?, reversal), updated_at=?"
            " WHERE sale_id=? AND state!=?", (SETTLED, result, status, reversal, now_ms, sale_id, SETTLED))
        if cur.rowcount != 1:
            raise StoreError(f"sale {sale_id} is settled already or unknown")

    def set_reversal(self, sale_id: str, reversal: str, now_ms: int, entry: bytes | None = None) -> None:
        self.conn.execute("UPDATE sales SET reversal=?, reversal_entry=coalesce(?, reversal_entry), updated_at=?"
                          " WHERE sale_id=?", (reversal, entry, now_ms, sale_id))

    def count_states(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        for state, n in self.reader.execute("SELECT state, count(*) FROM sales GROUP BY state"):
            counts[str(state)] = int(n)
        return counts

    # -- voids ---------------------------------------------------------------------

    def put_void(self, sale_id: str, site_id: str, raw: bytes, at_ms: int) -> None:
        self.conn.execute("INSERT OR IGNORE INTO voids(sale_id, site_id, raw, at) VALUES(?,?,?,?)",
                          (sale_id, site_id, raw, at_ms))

    def void_of(self, sale_id: str) -> bytes | None:
        row = self.reader.execute("SELECT raw FROM voids WHERE sale_id=?", (sale_id,)).fetchone()
        return None if row is None else bytes(row[0])


class _Group:
    __slots__ = ("ops", "done", "errors", "leader")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.done = trio.Event()
        self.errors: dict[int, BaseException] = {}
        self.leader = False


class GroupCommit:
    """Durable writes from many tasks, many per fsync (group commit).

    ``await commit(op)`` returns once ``op`` is committed. Ops join the open group;
    its first caller leads it: it waits until the previous group's commit is done (so
    the group grows meanwhile), then runs all its ops in ONE transaction in a worker
    thread, so the event loop goes on while SQLite writes and fsyncs. Each op runs in
    its own savepoint: one that raises is undone alone and its caller gets the error.
    The leader is shielded: a cancelled caller never strands the others. Every write of
    a running switch goes through here; no transaction is held across an await.
    """

    def __init__(self, store: SwitchStore) -> None:
        self.store = store
        self._group = _Group()
        self._lock = trio.Lock()
        self.commits = 0

    def _run(self, group: _Group) -> None:
        conn = self.store.conn
        with self.store.transaction():
            for i, each in enumerate(group.ops):
                conn.execute("SAVEPOINT op")
                try:
                    each(self.store)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    group.errors[i] = exc
                conn.execute("RELEASE op")

    async def commit(self, op: Op) -> None:
        group = self._group
        index = len(group.ops)
        group.ops.append(op)
        if group.leader:
            await group.done.wait()
        else:
            group.leader = True
            with trio.CancelScope(shield=True):
                async with self._lock:
                    self._group = _Group()  # later ops form the next group
                    try:
                        await trio.to_thread.run_sync(self._run, group)
                        self.commits += 1
                    except Exception as exc:  # the commit itself failed: nothing of the group is durable
                        group.errors = {i: exc for i in range(len(group.ops))}
                    group.done.set()
        error = group.errors.get(index)
        if error is not None:
            raise StoreError(f"switch database write failed: {error}") from error
