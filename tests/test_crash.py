"""A node process killed with SIGKILL in the middle of a sales burst loses no acknowledged sale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import automerge.core as am

from meshpos.ledger.ledger import entry_bytes
from meshpos.node.core import NodeCore

DRIVER = Path(__file__).with_name("crash_driver.py")


def _burst_and_kill(node: Path, count: int, kill_after: int) -> list[str]:
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(node), str(count)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) >= kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    return acked


def test_sigkill_mid_burst_keeps_every_acknowledged_sale(make_node) -> None:
    node = make_node("t1")
    acked: list[str] = []
    for round_, kill_after in enumerate((180, 260, 330)):
        acked += _burst_and_kill(node, 600, kill_after)
        core = NodeCore.open(node)  # restart: opens, nothing half-loaded
        try:
            held = {s["id"] for s in core.sales()}
            assert set(acked) <= held, f"round {round_}: lost {sorted(set(acked) - held)[:5]}"
            seqs = sorted(s["seq"] for s in core.sales())
            assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers have a gap or a duplicate"
            # every sale in the view is in the ledger, byte for byte, and in its Automerge shard
            for sale_id in held:
                raw = core.ledger.raw(f"sale/{sale_id}")
                assert raw is not None
                in_doc = [entry_bytes(core.ledger.docs[s].get(am.ROOT, f"sale/{sale_id}"))
                          for s in core.ledger.shards()]
                assert raw in in_doc
            assert core.store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            core.close()
    assert len(acked) >= 500
