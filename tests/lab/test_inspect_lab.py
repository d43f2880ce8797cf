"""The inspector over real multicast: 5 nodes (`meshpos run`, mDNS only) and an inspector, each in its
own network namespace; a cut host is reported unreachable with the partition, and clears when restored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from meshpos.node import client
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import wait_for
from meshpos.site.sitedir import Site

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PORT = 7420
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "MESHPOS_MDNS_TTL": "4", "MESHPOS_STATUS_INTERVAL": "2"}


def inspect(lab: Any, host: int, inspector: Path) -> dict[str, Any]:
    proc = lab.run(host, [sys.executable, "-m", "meshpos.cli.main", "inspect", str(inspector), "--json",
                          "--wait", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    view: dict[str, Any] = json.loads(out)
    return view


def poll(lab: Any, host: int, inspector: Path, cond: Callable[[dict[str, Any]], bool], timeout: float,
         what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = inspect(lab, host, inspector)
        if cond(view):
            return view
        if time.monotonic() > deadline:
            nodes = [{k: n[k] for k in ("name", "reachable", "pending", "status_age_s", "links")} for n in view["nodes"]]
            pytest.fail(f"timed out waiting for {what}: nodes {nodes}, warnings {view['warnings']}")


def test_inspector_over_mdns_sees_five_nodes_a_cut_and_its_repair(make_lab: Any, tmp_path: Path, site: Site) -> None:
    lab = make_lab(6)
    names = [f"T{i}" for i in range(5)]
    dirs = []
    for i, name in enumerate(names):
        path = tmp_path / name
        enroll_one_step(site, path, "gateway" if i == 0 else "terminal", name, listen=f"{lab.addr(i)}:{PORT}")
        core = NodeCore.open(path)
        try:
            for k in range(i + 1):  # T0 holds 1 pending (card) sale, T4 holds 5
                core.sell(100 + k, card=core.seal_card("4111111111111111", "1230"))
            core.sell(900)  # and one cash sale each: final when taken, in no pending count
        finally:
            core.close()
        dirs.append(path)
    insp = tmp_path / "inspector"
    enroll_one_step(site, insp, "inspector", "Inspector")
    for i, path in enumerate(dirs):
        lab.run(i, [sys.executable, "-m", "meshpos.cli.main", "-v", "run", str(path),
                    "--log-file", str(tmp_path / f"{names[i]}.log")],
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{names[i]}.err", "wb"), env=ENV)
    for i, path in enumerate(dirs):  # a start takes seconds, many times that on a host shared by many tests
        wait_for(lambda: client.running(path, timeout=5).status() is not None, 120,
                 lambda: f"{names[i]} did not start: {(tmp_path / f'{names[i]}.err').read_text()[-2000:]}")

    expected = {name: i + 1 for i, name in enumerate(names)}

    def whole(v: dict[str, Any]) -> bool:
        nodes = {n["name"]: n for n in v["nodes"]}
        return (set(nodes) == set(names) and all(n["reachable"] for n in nodes.values())
                and {k: n["pending"] for k, n in nodes.items()} == expected and not v["partition"])

    view = poll(lab, 5, insp, whole, 90, "all 5 nodes reachable with their pending counts")
    assert view["totals"]["pending"] == 15 and view["totals"]["reachable"] == 5
    assert view["inspector"]["mdns"] and view["inspector"]["links"] >= 1
    assert {n["address"] for n in view["nodes"]} == {f"{lab.addr(i)}:{PORT}" for i in range(5)}

    lab.cut(2)
    view = poll(lab, 5, insp, lambda v: v["partition"] and not {n["name"]: n for n in v["nodes"]}["T2"]["reachable"],
                60, "T2 unreachable and a partition")
    nodes = {n["name"]: n for n in view["nodes"]}
    assert all(nodes[n]["reachable"] for n in names if n != "T2")
    assert any("T2 is unreachable" in w for w in view["warnings"])
    assert any(w.startswith("partition:") and "{T2}" in w for w in view["warnings"]), view["warnings"]

    lab.restore(2)
    view = poll(lab, 5, insp, lambda v: whole(v) and not v["warnings"], 120, "the warnings to clear")
