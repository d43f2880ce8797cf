"""Hoarded leases against real processes (issue 12, reproduction 2): terminals (``meshpos run``),
the switch and the acquirer simulator on 127.0.0.1 (tests/uplink_harness.py).

A hostile enrolled terminal signs a lease on every bucket dated 60 days ahead, and a
revoked terminal's live leases sit in the ledger: the terminal that gets an uplink still
forwards the whole site's queue. Every wait is bounded and polls; the bound is one lease
period (uplink_harness.WAIT_S, 60 s = leases.LEASE_MS), on old code nothing moved for 60 days.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from meshpos.wire import envelope
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.node import client
from meshpos.node.core import NodeCore
from meshpos.apps.procs import ProcessGroup
from meshpos.uplink import leases as L

from uplink_harness import Fair

DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    for child in group.children.values():
        if child.proc is not None and child.alive:
            os.killpg(child.proc.pid, signal.SIGTERM)
    group.stop_all()


def sign_leases(core: NodeCore, granted_at: int, life_ms: int) -> list[bytes]:
    out = []
    for n in range(L.BUCKETS):
        body = {"site": core.policy.site_id, "holder": core.node_id, "scope": f"bucket/{n}",
                "granted_at": granted_at, "until": granted_at + life_ms}
        out.append(core.ledger.write_local(envelope.seal("lease", core.node_id, body, core.key)).env.raw)
    core.store.flush()
    return out


def lease_holders(node_dir: Path) -> dict[str, int]:
    """Holder -> lease entries in a node's store (read beside the running node: WAL readers never block it)."""
    conn = sqlite3.connect(f"file:{node_dir / 'meshpos.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT key FROM entries WHERE type='lease'").fetchall()
    finally:
        conn.close()
    out: dict[str, int] = {}
    for (key,) in rows:
        holder = key.split("/")[1]
        out[holder] = out.get(holder, 0) + 1
    return out


def test_hoarded_and_revoked_leases_do_not_stop_the_terminal_with_uplink(tmp_path: Path,
                                                                         procs: ProcessGroup) -> None:
    fair = Fair.create(tmp_path, procs, terminals=4, start_nodes=False)  # a line: t1 - t2 - t3 - t4
    now = SYSTEM_CLOCK.now_ms()
    hostile = NodeCore.open(fair.nodes["t1"], SYSTEM_CLOCK)
    try:
        hostile_id = hostile.node_id
        sign_leases(hostile, now + 60 * DAY_MS, L.MAX_LEASE_MS)  # they verify: its certificate is valid then
    finally:
        hostile.close()
    # t4 claimed every bucket for the longest life a lease may have, its leases reached t3, then it was
    # revoked (and is gone)
    lost = NodeCore.open(fair.nodes["t4"], SYSTEM_CLOCK)
    gateway = NodeCore.open(fair.nodes["t3"], SYSTEM_CLOCK)
    try:
        lost_id = lost.node_id
        gateway.ingest(lost.ledger.raw(f"cert/{lost_id}") or b"", "peer")
        for raw in sign_leases(lost, SYSTEM_CLOCK.now_ms(), L.MAX_LEASE_MS):
            gateway.ingest(raw, "peer")
        gateway.ingest(fair.site.revoke(lost_id, "lost at the fair"), "organizer")
    finally:
        lost.close()
        gateway.close()
    for name in ("t1", "t2", "t3"):
        fair.start_node(name)

    fair.sell_mix(8, names=["t2"])
    fair.wait_converged(["t1", "t2", "t3"])
    # (t1 runs meshpos itself, which never gives up leases that do not count; an older meshpos released
    # "its" future leases at start-up, so there only t4's leases kept t3 from forwarding)
    fair.wait(lambda: lease_holders(fair.nodes["t3"]).get(hostile_id) == L.BUCKETS,
              "the hostile terminal's leases did not reach t3",
              state=lambda: str({n: lease_holders(fair.nodes[n]) for n in ("t1", "t2", "t3")}))
    assert lease_holders(fair.nodes["t3"])[lost_id] == L.BUCKETS

    fair.uplink("t3")
    fair.wait_settled(["t2", "t3"])
    fair.check_exactly_once(repeats_allowed=False, names=["t1", "t2", "t3"])
    assert "from T3" in fair.switch_log()
    assert client.running(fair.nodes["t3"]).status()["uplink"]["set_aside"] == 0


def test_the_leases_of_a_terminal_that_is_gone_are_taken_over_at_once(tmp_path: Path, procs: ProcessGroup) -> None:
    """t4 claimed every bucket for the longest life a lease may have and then went dark (not revoked):
    t3 has no link to it and no fresh status of it, so it forwards at once, not 10 minutes later."""
    fair = Fair.create(tmp_path, procs, terminals=4, start_nodes=False)
    gone = NodeCore.open(fair.nodes["t4"], SYSTEM_CLOCK)
    gateway = NodeCore.open(fair.nodes["t3"], SYSTEM_CLOCK)
    try:
        gone_id = gone.node_id
        gateway.ingest(gone.ledger.raw(f"cert/{gone_id}") or b"", "peer")
        for raw in sign_leases(gone, SYSTEM_CLOCK.now_ms(), L.MAX_LEASE_MS):
            gateway.ingest(raw, "peer")
    finally:
        gone.close()
        gateway.close()
    for name in ("t1", "t2", "t3"):
        fair.start_node(name)
    fair.sell_mix(6, names=["t1", "t2"])
    fair.wait_converged(["t1", "t2", "t3"])
    fair.uplink("t3")
    fair.wait_settled(["t1", "t2", "t3"])
    fair.check_exactly_once(repeats_allowed=False, names=["t1", "t2", "t3"])
    assert lease_holders(fair.nodes["t3"])[gone_id] == L.BUCKETS
