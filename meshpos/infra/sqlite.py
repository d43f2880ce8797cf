"""One SQLite transaction with its errors translated: disk full, damaged file, failed commit.

Neutral: the node's store and the switch's store both open SQLite files (WAL, synchronous=FULL)
and want the same translation of ``sqlite3`` errors into :mod:`meshpos.domain.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path
from typing import Iterator

from meshpos.domain.errors import CorruptStoreError, DiskFullError, StoreError

SQLITE_FULL = 13
SQLITE_IOERR = 10
SQLITE_IOERR_SHMSIZE = 4874  # the WAL's -shm file could not grow: "may indicate ... out of space"
NEARLY_FULL_BYTES = 256 * 1024  # less than this free: an I/O error or a rolled-back write is a full disk


def free_bytes(path: Path) -> int:
    """Bytes free for this user on the file system holding ``path`` (0 if it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """SQLITE_FULL ("database or disk is full"), SQLITE_IOERR_SHMSIZE, ENOSPC / EDQUOT; with
    ``where`` (the database's directory), also an I/O error while that disk is (nearly) full:
    SQLite reports a -shm file it cannot create on a full disk as "disk I/O error"."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None) or 0
        if code & 0xFF == SQLITE_FULL or code == SQLITE_IOERR_SHMSIZE or "database or disk is full" in str(exc):
            return True
        io_error = code & 0xFF == SQLITE_IOERR or "disk I/O error" in str(exc)
        return io_error and where is not None and free_bytes(where) < NEARLY_FULL_BYTES
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: Path, detail: str) -> DiskFullError:
    return DiskFullError(f"{path}: the disk is full ({detail}): nothing acknowledged was lost, but nothing new "
                         "can be recorded until space is freed on that disk (the database is not damaged: do "
                         "not move it aside)")


def store_error(path: Path, doing: str, exc: BaseException) -> StoreError:
    """The error to raise for ``exc``, met while ``doing`` something to the database at ``path``."""
    if is_disk_full(exc, path.parent):
        return disk_full(path, doing)
    return StoreError(f"{path}: {doing} failed: {exc}")


@contextlib.contextmanager
def sqlite_transaction(conn: sqlite3.Connection, path: Path, begin: str = "BEGIN") -> Iterator[None]:
    """One top-level SQLite transaction: ``begin`` ... COMMIT, ROLLBACK on any exception;
    failures to start or commit become StoreError naming the file (DiskFullError when the disk
    is full: SQLite then rolls the transaction back itself)."""
    try:
        conn.execute(begin)
    except sqlite3.DatabaseError as exc:
        raise store_error(path, "starting a transaction", exc) from exc
    try:
        yield
    except BaseException as exc:
        if conn.in_transaction:  # SQLite rolls back by itself on a full disk
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.DatabaseError) and is_disk_full(exc, path.parent):
            raise disk_full(path, "writing") from exc
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise store_error(path, "commit", exc) from exc


def open_checked(path: Path, application_id: int, kind: str) -> tuple[sqlite3.Connection, bool]:
    """Connect to a meshpos SQLite file the one way both stores use (autocommit, WAL,
    synchronous=FULL, a 5 s busy timeout) and check it is ours: a file with tables and another
    ``application_id`` is refused as a foreign file; a new, empty file is stamped with ours.
    Returns the connection and whether the file was new. sqlite3 errors are the caller's to
    translate (a damaged file, a full disk); the connection is closed when one is raised."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and app_id != application_id:
            raise CorruptStoreError(f"{path}: not a meshpos {kind} database (foreign SQLite file)")
        if not tables:
            conn.execute(f"PRAGMA application_id={application_id}")
    except BaseException:
        conn.close()
        raise
    return conn, not tables


__all__ = ["sqlite_transaction", "store_error", "is_disk_full", "disk_full", "free_bytes", "open_checked"]
