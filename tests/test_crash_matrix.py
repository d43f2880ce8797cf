"""Crash matrix, short form: one SIGKILL of each kind (a terminal mid-burst, a node mid-sync, a
terminal mid-compaction, the uplink node mid-forwarding, the switch mid-batch) on a whole fair
of real processes on loopback; then no acknowledged sale lost anywhere, identical ledgers,
every sale settled, each card sale advised with exactly one 0220. The long run (hundreds of
seeded kills) is ``tools/crash_matrix.py --kills N --seed S``; figures in BENCHMARKS.md.

Tests of the test: the checks that judge the run catch a second 0220 in the acquirer's stats
and a ledger that lost an entry on one node.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from crash_matrix import KINDS, Matrix, advice_counts, read_entries  # noqa: E402


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Matrix, dict]:
    out = tmp_path_factory.mktemp("crash-matrix") / "fair"
    out.mkdir()
    matrix = Matrix(out, terminals=3, seed=4, verbose=False)
    report = matrix.run(kills=len(KINDS), settle_timeout=150, min_sales=40, min_cards=10)
    return matrix, report.to_json()


def test_every_kind_of_kill_loses_nothing_and_advises_once(matrix_run) -> None:
    matrix, report = matrix_run
    assert report["kills"] == {kind: 1 for kind in KINDS}
    assert report["sales"] >= 40 and report["card_sales"] >= 10
    assert report["losses"] == 0, report
    assert report["unsettled"] == [], report
    assert report["ledgers_identical"], report
    assert report["double_0220"] == [], report
    assert report["advised"] == report["card_sales"], report
    assert report["ok"]


def test_the_checks_catch_a_second_0220_and_a_lost_entry(matrix_run, tmp_path: Path) -> None:
    matrix, _ = matrix_run
    stats = json.loads(matrix.demo.stats.read_text())
    rrn = next(iter(stats["by_sale"]))
    stats["by_sale"][rrn]["0220"] = 2  # what a switch that sends 0220 on retry leaves behind
    doctored = tmp_path / "stats.json"
    doctored.write_text(json.dumps(stats))
    double, _, _ = advice_counts(doctored)
    assert double == [rrn]
    # one node's copy of the ledger misses an entry: the ledgers no longer compare equal
    nodes = list(matrix.demo.nodes.values())
    copy = tmp_path / "node"
    shutil.copytree(nodes[0], copy, ignore=shutil.ignore_patterns("*.sock"))
    with sqlite3.connect(copy / "meshpos.db") as conn:
        conn.execute("DELETE FROM entries WHERE rowid = (SELECT max(rowid) FROM entries WHERE type='sale')")
    assert read_entries(copy) != read_entries(nodes[1])
    assert read_entries(nodes[0]) == read_entries(nodes[1])
