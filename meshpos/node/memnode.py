"""Helpers to stand up test sites and nodes for link, sync and bench code."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meshpos.node.parts import replicator_for
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
    # the random half of the ledger's Automerge actor ids, kept for ``reopen`` (each reopen draws
    # a new actor from it, as a restarted node must)
    entropy: Callable[[int], bytes] = field(default=os.urandom, compare=False)

    @classmethod
    def open(cls, path: Path, clock: Clock, config: SyncConfig = SyncConfig(),
             entropy: Callable[[int], bytes] = os.urandom) -> "SimNode":
        core = NodeCore.open(path, clock, entropy=entropy)
        return cls(path, core, replicator_for(core, config), entropy)

    def close(self) -> None:
        self.replicator.detach()
        self.core.close()

    def reopen(self, clock: Clock) -> "SimNode":
        self.close()
        return SimNode.open(self.path, clock, self.replicator.config, self.entropy)

    def entries(self) -> frozenset[tuple[str, bytes]]:
        return frozenset((k, r) for k, r, _ in self.core.store.all_entries())

    def sale_ids(self) -> set[str]:
        return {row["sale_id"] for row in self.core.store.sales()}
