"""Shared fixtures: a site with a switch key, enrolled node directories, a fake clock."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import nacl.signing
import pytest

from meshpos.devices import escpos_import
from meshpos.infra.clock import FakeClock
from meshpos.identity import keys
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.site.sitedir import Site, init_site

from argv_watch import ArgvWatch
from helpers import TEST_PANS
from pg import pg_cluster, switch_backend_env, switch_db  # noqa: F401 -- fixtures: PostgreSQL, the switch backends

# test modules import python-escpos directly (its Dummy): imported here first, the way the
# product imports it, so that the test run leaves no pickle directory in /tmp either
escpos_import.load()


@pytest.fixture(scope="session", autouse=True)
def argv_watch() -> Iterator[ArgvWatch]:
    """No full card number in the argv of any process of this test run, the whole session long
    (issue 12): sampled from /proc every 50 ms; the session fails, naming the process, if one
    was seen. A test that does it on purpose calls ``argv_watch.forgive(pid)``."""
    watch = ArgvWatch(known=TEST_PANS).start()
    yield watch
    watch.stop()
    offenders = watch.offenders()
    if offenders:
        pytest.fail("a full card number was in the command line of " + "; ".join(map(str, offenders))
                    + " (card numbers are read from stdin: `meshpos sell --card -`)", pytrace=False)


class _Faults(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "connection_fault", False):  # serve_bounded's report of a failed handler
            self.seen.append(record.getMessage().splitlines()[0])


@pytest.fixture(autouse=True)
def no_connection_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    """A connection handler that fails is closed and logged, and the listener goes on
    (meshpos.infra.netguard.serve_bounded): in a running node that keeps the site selling, but in
    a test it would hide the bug. A test in whose process a handler failed fails, unless it is
    marked ``connection_faults`` (it makes one fail on purpose)."""
    handler = _Faults()
    logger = logging.getLogger("meshpos.infra.netguard")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.seen and request.node.get_closest_marker("connection_faults") is None:
        pytest.fail("a connection handler failed in this test: " + "; ".join(handler.seen), pytrace=False)


@pytest.fixture
def switch_key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes(range(100, 132)))


@pytest.fixture
def site(tmp_path: Path, switch_key: nacl.signing.SigningKey) -> Site:
    return init_site(tmp_path / "site", "Fiera di Test", "EUR",
                     switch_key=keys.x25519_public_of(switch_key).hex(), switch_url="https://127.0.0.1:9")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_node(tmp_path: Path, site: Site) -> Callable[..., Path]:
    def make(name: str, role: str = "terminal", **kw: object) -> Path:
        path = tmp_path / name
        enroll_one_step(site, path, role, name, **kw)  # type: ignore[arg-type]
        return path
    return make


@pytest.fixture
def open_node(clock: FakeClock) -> Iterator[Callable[[Path], NodeCore]]:
    opened: list[NodeCore] = []

    def open_(path: Path) -> NodeCore:
        core = NodeCore.open(path, clock)
        opened.append(core)
        return core
    yield open_
    for core in opened:
        try:
            core.close()
        except Exception:
            pass


