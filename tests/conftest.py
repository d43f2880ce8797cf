"""Shared fixtures: a site with a switch key, enrolled node directories, a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import nacl.signing
import pytest

from meshpos.clock import FakeClock
from meshpos.identity import keys
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.site import Site, init_site



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


