"""tools/bench_mesh.py --breakdown: the probe of tools/cpu_probe counts one node's CPU by trio task
and by part of the receive path, between the start and the end of the load, in that node only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_breakdown_counts_the_probed_nodes_receive_path(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_mesh.py"), "--nodes", "3", "--rate", "6",
                          "--seconds", "4", "--breakdown", "1", "--json", "--tmpdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    b = res["breakdown"]
    assert res["missing"] == 0 and res["sales"] >= 20
    parts, tasks = b["parts"], b["tasks"]
    # node 1 takes in the sales of the two others, each once (3 nodes: all linked to each other)
    assert 0.5 <= parts["Ledger.receive_push"]["calls"] <= 1.2
    assert parts["Ledger.receive_push"]["ms"] > parts["Ledger._after_merge"]["ms"] > parts["Ledger._scan"]["ms"] > 0
    assert parts["Roster.verify"]["calls"] >= parts["Ledger.receive_push"]["calls"]  # each new entry is verified
    assert "reader" in tasks and tasks["reader"]["ms"] >= parts["SyncSession.receive_data"]["ms"]
    assert sum(t["ms"] for t in tasks.values()) <= b["main_thread_ms_per_sale"] * 1.01
    assert b["node_ms_per_sale"] >= b["main_thread_ms_per_sale"] * 0.99
    # without --breakdown, no node runs the probe: no breakdown at all
    plain = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_mesh.py"), "--nodes", "2", "--rate", "4",
                            "--seconds", "2", "--json", "--tmpdir", str(tmp_path)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert json.loads(plain.stdout.strip().splitlines()[-1])["breakdown"] is None
