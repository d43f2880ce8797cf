"""A throw-away PostgreSQL cluster for the test session, and the switch's backend fixture.

``pg_cluster`` (session): initdb into a fresh temp dir, the server listening on a UNIX socket in
that dir only (no TCP), fsync off (nothing here survives the session). As root the server runs as
an unprivileged user (PostgreSQL refuses root): ``nobody``, through ``runuser``. Binaries come from
PATH or /usr/lib/postgresql/*/bin (Debian's ``postgresql`` package; ``.ci/run`` installs it).

``switch_db``: parametrizes a test over both switch backends: None (SQLite, the default) or
the URL of a new, empty database in the session's cluster.

Missing PostgreSQL is a failure as root (CI) and a skip otherwise.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

UNPRIVILEGED = "nobody"


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    return None


class PgCluster:
    """One PostgreSQL server on a UNIX socket in ``dir``; ``url(db)`` names a database in it."""

    def __init__(self, root: Path, options: tuple[str, ...] = ("-c", "fsync=off")) -> None:
        initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            raise FileNotFoundError("PostgreSQL's initdb / pg_ctl are not installed (apt-get install postgresql)")
        self.root = root
        self.data = root / "data"
        self.port = 5432
        self.options = options
        self.as_user: list[str] = []
        self.user = pwd.getpwuid(os.getuid()).pw_name
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", UNPRIVILEGED, "--"]
            self.user = UNPRIVILEGED
            entry = pwd.getpwnam(UNPRIVILEGED)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o755)
        self._run(initdb, "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        self._names = itertools.count(1)

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self.as_user, *argv], capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")

    def start(self) -> None:
        opts = " ".join(["-c listen_addresses=''", f"-c unix_socket_directories='{self.root}'",
                         f"-p {self.port}", "-c max_connections=300", *self.options])
        assert self.pg_ctl is not None
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts, "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        assert self.pg_ctl is not None
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.root}&port={self.port}"

    def new_database(self, prefix: str = "switch") -> str:
        import psycopg
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_cluster(options: tuple[str, ...] = ("-c", "fsync=off")) -> PgCluster:
    root = Path(tempfile.mkdtemp(prefix="mpg-"))  # short: a UNIX socket path has ~100 bytes
    cluster = PgCluster(root, options)
    cluster.start()
    return cluster


def remove_cluster(cluster: PgCluster) -> None:
    try:
        cluster.stop("immediate")
    except RuntimeError:
        pass
    shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        cluster = start_cluster()
    except FileNotFoundError as exc:
        if os.geteuid() == 0:
            pytest.fail(f"{exc}: as root every PostgreSQL test must run", pytrace=False)
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        remove_cluster(cluster)


@pytest.fixture(params=["sqlite", "postgresql"])
def switch_db(request: pytest.FixtureRequest) -> str | None:
    """None: the switch's SQLite file; else the URL of a new PostgreSQL database."""
    if request.param == "sqlite":
        return None
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()





@pytest.fixture
def switch_backend_env(switch_db: str | None, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """For tests that make their switches themselves (``init_switch``, the CLI, child processes):
    on the PostgreSQL turn, ``$MESHPOS_SWITCH_DB`` names a new database, so every switch they make
    keeps its state there (``meshpos.switch.database.resolve``)."""
    if switch_db is not None:
        monkeypatch.setenv("MESHPOS_SWITCH_DB", switch_db)
    return switch_db
__all__ = ["PgCluster", "pg_cluster", "switch_db", "switch_backend_env", "start_cluster", "remove_cluster"]
