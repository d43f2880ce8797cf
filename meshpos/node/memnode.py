"""Helpers to stand up test sites and nodes for link, sync and bench code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshpos.infra.clock import SYSTEM_CLOCK, Clock, FakeClock
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.site.sitedir import Site, init_site
from meshpos.replication.sync import Replicator, SyncConfig

SWITCH_KEY = "11" * 32


def make_site(path: Path, name: str = "Fair") -> Site:
    return init_site(path, name, switch_key=SWITCH_KEY)


def enroll(site: Site, node_dir: Path, name: str, role: str = "terminal") -> Path:
    enroll_one_step(site, node_dir, role, name)
    return node_dir


def wall_clock() -> FakeClock:
    """A hand-moved clock starting at the real time (certificates are issued at real time)."""
    return FakeClock(now_ms=SYSTEM_CLOCK.now_ms(), monotonic=1000.0)


@dataclass
class SimNode:
    path: Path
    core: NodeCore
    replicator: Replicator

    @classmethod
    def open(cls, path: Path, clock: Clock, config: SyncConfig = SyncConfig()) -> "SimNode":
        core = NodeCore.open(path, clock)
        return cls(path, core, Replicator.for_core(core, config))

    def close(self) -> None:
        self.replicator.detach()
        self.core.close()

    def reopen(self, clock: Clock) -> "SimNode":
        self.close()
        return SimNode.open(self.path, clock, self.replicator.config)

    def entries(self) -> frozenset[tuple[str, bytes]]:
        rows = self.core.store.conn.execute("SELECT key, raw FROM entries")
        return frozenset((str(k), bytes(r)) for k, r in rows)

    def sale_ids(self) -> set[str]:
        return {row["sale_id"] for row in self.core.store.sales()}
