"""What the switch's store needs of a database, and how a location picks one of the two backends.

:class:`Database` is the one interface: SQLite (:mod:`.db_sqlite`, one file beside the switch, the
default) and PostgreSQL (:mod:`.db_postgres`, psycopg 3, for several instances at once) implement
it. The queries themselves are written once, in :mod:`.store`, in the dialect both accept
(``?`` placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING``); each backend owns its schema
(DDL and migrations, numbered alike) and turns its driver's errors into :mod:`meshpos.domain.errors`.

A database location is either a file path (SQLite) or a ``postgresql://`` URL. The environment
variable ``MESHPOS_SWITCH_DB``, when set, overrides the URL recorded in the switch's config, so a
password never has to sit in a file (libpq's ``PGPASSWORD`` and ``~/.pgpass`` work too).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

from meshpos.domain.errors import ConfigError, StoreError

ENV_VAR = "MESHPOS_SWITCH_DB"
URL_SCHEMES = ("postgresql", "postgres")

Row = tuple[Any, ...]


class RetryableStoreError(StoreError):
    """The database gave up this statement to break a deadlock between concurrent writers
    (PostgreSQL SQLSTATE 40P01 / 40001): running it again is safe and usually succeeds."""


class Database(Protocol):
    #: where it is, for messages: a path, or a URL without its password
    location: str
    #: a query may wait on the network: run it in a worker thread, not on the event loop
    reads_block: bool
    #: the column that orders rows by insertion, for ``site_entries``
    rowid: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement inside the open write transaction; the number of rows it changed."""

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many parameter rows, inside the open write transaction (pipelined
        where the driver can)."""

    def execute_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        """The statement once for each parameter row, in order, inside the open write transaction:
        the number of rows each run changed (PostgreSQL: all in one pipelined round trip)."""

    def fetch_tx(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of a statement (``... RETURNING``, or a read) inside the open write transaction."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of a read of committed data, outside any write transaction (any thread)."""

    def transaction(self) -> AbstractContextManager[None]:
        """One write transaction: committed (durably) on return, rolled back on an exception."""

    def savepoint(self) -> AbstractContextManager[None]:
        """Inside a transaction: undo only what ran inside it if it raises."""

    def ping(self) -> None:
        """Raise StoreError unless the database answers a trivial query now."""

    def schema_version(self) -> int:
        """The schema version recorded in the database (0: empty database)."""

    def migrate(self) -> tuple[int, int]:
        """Bring the schema to the current version: (version before, version after)."""

    def close(self) -> None: ...


def redact(url: str) -> str:
    """``url`` without its password (for messages, logs and config.json)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_url(location: str) -> bool:
    return urlsplit(location).scheme in URL_SCHEMES


def check_url(url: str, what: str) -> str:
    if not is_url(url):
        raise ConfigError(f"{what}: {redact(url)!r} is not a postgresql:// URL")
    return url


def resolve(configured: str | None, sqlite_path: Path) -> str:
    """The database to open: ``$MESHPOS_SWITCH_DB`` if set, else the configured URL, else the
    switch's SQLite file."""
    env = os.environ.get(ENV_VAR)
    if env:
        return check_url(env, f"${ENV_VAR}")
    if configured:
        return check_url(configured, "config.json db")
    return str(sqlite_path)


def open_database(location: str, *, create: bool = False) -> Database:
    """The backend for ``location``; its schema must be current (SQLite files migrate in place
    by themselves; a PostgreSQL database older than this program asks for ``switch migrate``)."""
    if is_url(location):
        from meshpos.switch.db_postgres import PostgresDatabase
        return PostgresDatabase.open(location, create=create)
    from meshpos.switch.db_sqlite import SqliteDatabase
    return SqliteDatabase.open(Path(location), create=create)


def migrate_database(location: str) -> tuple[int, int]:
    """``meshpos switch migrate``: (schema version before, after)."""
    if is_url(location):
        from meshpos.switch.db_postgres import PostgresDatabase
        db: Database = PostgresDatabase(location)
    else:
        from meshpos.switch.db_sqlite import SqliteDatabase
        sqlite = SqliteDatabase.open(Path(location))  # migrates as it opens
        sqlite.close()
        return sqlite.migrated
    try:
        return db.migrate()
    finally:
        db.close()


__all__ = ["migrate_database", "Database", "RetryableStoreError", "open_database", "resolve", "redact", "is_url", "ENV_VAR"]
