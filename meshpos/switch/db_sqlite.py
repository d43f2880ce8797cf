"""The switch's SQLite backend: one file (WAL, synchronous=FULL), one process at a time.

Two connections: the writer (BEGIN IMMEDIATE ... COMMIT, from the group-commit worker thread)
and a query-only reader serving the event loop, which sees committed data only. A file of an
older schema is migrated in place when opened (one machine, one process: nothing else can be
reading it meanwhile).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any, Iterator, Sequence

from meshpos.domain.errors import CorruptStoreError, StoreError
from meshpos.infra.sqlite import open_checked, sqlite_transaction, store_error
from meshpos.switch.database import Row

APPLICATION_ID = 0x4D505357  # "MPSW"

# Schema versions, shared with db_postgres (which starts at 3). Version 1 and 2 files recorded
# their version in meta('schema'); from 3 on it is the schema_version table.
_V1 = """
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
    state TEXT NOT NULL CHECK (state IN ('received', 'advice_sent', 'settled')),
    result BLOB, result_status TEXT, reversal TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    received_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS sales_state ON sales(state);
CREATE TABLE IF NOT EXISTS voids(
    sale_id TEXT PRIMARY KEY, site_id TEXT NOT NULL, raw BLOB NOT NULL, at INTEGER NOT NULL);
"""
_V2 = "ALTER TABLE sales ADD COLUMN reversal_entry BLOB;"
_V3 = """
ALTER TABLE sales ADD COLUMN claimed_by TEXT;
ALTER TABLE sales ADD COLUMN claimed_until INTEGER;
CREATE INDEX sales_claimed ON sales(claimed_by) WHERE claimed_by IS NOT NULL;
CREATE TABLE site_generation(one INTEGER PRIMARY KEY CHECK (one = 1), gen INTEGER NOT NULL);
INSERT INTO site_generation(one, gen) VALUES(1, 0);
CREATE TABLE schema_version(version INTEGER NOT NULL);
INSERT INTO schema_version(version) VALUES(0);
"""
MIGRATIONS: dict[int, str] = {1: _V1, 2: _V2, 3: _V3}
SCHEMA_VERSION = max(MIGRATIONS)


class SqliteDatabase:
    reads_block = False
    rowid = "rowid"

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.location = str(path)
        self.conn = conn
        self.reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.reader.execute("PRAGMA query_only=1")
        self.reader.execute("PRAGMA busy_timeout=5000")
        self.migrated = (0, 0)  # schema version when opened, and now

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> "SqliteDatabase":
        if not create and not path.exists():
            raise StoreError(f"{path}: switch database is missing (run `meshpos switch init` first)")
        try:
            conn, _ = open_checked(path, APPLICATION_ID, "switch")
        except sqlite3.DatabaseError as exc:
            raise CorruptStoreError(f"{path}: switch database is damaged or not a database ({exc})") from exc
        db = cls(path, conn)
        try:
            db.migrated = db.migrate()
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.reader.close()
        self.conn.close()

    def _translate(self, doing: str, exc: sqlite3.Error) -> StoreError:
        return store_error(self.path, doing, exc)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, tuple(params)).rowcount

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, [tuple(r) for r in rows])

    def execute_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        return [self.conn.execute(sql, tuple(r)).rowcount for r in rows]

    def fetch_tx(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in self.conn.execute(sql, tuple(params)).fetchall()]

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return [tuple(r) for r in self.reader.execute(sql, tuple(params)).fetchall()]
        except sqlite3.Error as exc:
            raise self._translate("reading", exc) from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with sqlite_transaction(self.conn, self.path, "BEGIN IMMEDIATE"):
            yield

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        self.conn.execute("SAVEPOINT op")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO SAVEPOINT op")
            raise
        finally:
            self.conn.execute("RELEASE SAVEPOINT op")

    def ping(self) -> None:
        self.query("SELECT 1")

    def schema_version(self) -> int:
        names = {str(r[0]) for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "schema_version" in names:
            return int(self.conn.execute("SELECT version FROM schema_version").fetchone()[0])
        if "meta" in names:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            return int(row[0]) if row is not None and str(row[0]).isdigit() else 1
        return 0

    def migrate(self) -> tuple[int, int]:
        try:
            with self.transaction():
                before = self.schema_version()
                if before > SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: switch database schema {before} is newer than this "
                                     f"program's {SCHEMA_VERSION}: upgrade meshpos")
                for version in range(before + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[version].split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                if before < SCHEMA_VERSION:
                    self.conn.execute("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))
                    self.conn.execute("DELETE FROM meta WHERE key='schema'")
        except sqlite3.DatabaseError as exc:
            raise CorruptStoreError(f"{self.path}: switch database cannot be migrated ({exc})") from exc
        return before, SCHEMA_VERSION


__all__ = ["SqliteDatabase", "SCHEMA_VERSION", "APPLICATION_ID"]
