#!/usr/bin/env python3
"""Idle cost of a node: CPU % and wake-ups per second of `meshpos run` processes doing nothing.

    python tools/bench_idle.py                    # 6 nodes, 3 runs of a 60 s window
    python tools/bench_idle.py --window 30 --runs 1 --json

A site of N (default 6) nodes on 127.0.0.1, each given the nodes started before it as static
peers, so every node holds N-1 real TLS links (mDNS off); nothing is sold. Once every link is open
and the start-up sync has settled (--settle seconds), the script samples /proc once a second for
--window seconds and reports, per process:

- CPU %: time on CPU from /proc/PID/task/TID/schedstat (nanoseconds, first field), summed over
  the process's threads; beside it utime + stime from /proc/PID/stat (clock ticks, coarse, but it
  includes threads that ended during the window);
- wake-ups per second: voluntary context switches (/proc/PID/task/TID/status
  `voluntary_ctxt_switches`), summed over the process's threads. Each thread's last seen count is
  kept, so a worker thread that ends inside the window still counts up to its last sample;
- run slices per second: the third field of /proc/PID/task/TID/schedstat, summed the same way.

Beside the nodes, the same figures for an idle `python3 -c "import trio; trio.run(trio.sleep_forever)"`
process measured in the same window: the floor a trio program cannot go below. The figures of a run
are the median over the N nodes; with --runs R the medians of R whole runs (each a new mesh).
--tree DIR runs the nodes from another checkout of meshpos (e.g. `git worktree add /tmp/old <commit>`),
to measure an older version with this same script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshpos.domain.errors import MeshposError  # noqa: E402
from meshpos.node import client  # noqa: E402
from meshpos.node.enroll import enroll_one_step  # noqa: E402
from meshpos.site.nodedir import NodeDir  # noqa: E402
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for  # noqa: E402
from meshpos.site.sitedir import init_site  # noqa: E402

TRIO_IDLE = "import trio; trio.run(trio.sleep_forever)"


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (every thread, ended ones too), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@dataclass
class Sampler:
    """Per-thread counters of one process, keeping each thread's last value."""

    pid: int
    vol: dict[int, int] = field(default_factory=dict)
    slices: dict[int, int] = field(default_factory=dict)
    cpu_ns: dict[int, int] = field(default_factory=dict)

    def sample(self) -> None:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for name in tids:
            tid = int(name)
            try:
                status = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
                sched = Path(f"/proc/{self.pid}/task/{tid}/schedstat").read_text().split()
            except OSError:
                continue  # the thread ended between listdir and read
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    self.vol[tid] = int(line.split()[1])
            self.slices[tid] = int(sched[2])
            self.cpu_ns[tid] = int(sched[0])

    def totals(self) -> tuple[int, int, int]:
        return sum(self.vol.values()), sum(self.slices.values()), sum(self.cpu_ns.values())


def measure(pids: dict[str, int], window: float) -> dict[str, dict[str, float]]:
    samplers = {name: Sampler(pid) for name, pid in pids.items()}
    for s in samplers.values():
        s.sample()
    start = {name: (s.totals(), cpu_ticks(s.pid)) for name, s in samplers.items()}
    t0 = time.monotonic()
    while time.monotonic() - t0 < window:
        time.sleep(min(1.0, max(0.0, window - (time.monotonic() - t0))))
        for s in samplers.values():
            s.sample()
    elapsed = time.monotonic() - t0
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, s in samplers.items():
        (vol0, sl0, ns0), cpu0 = start[name]
        vol1, sl1, ns1 = s.totals()
        out[name] = {"cpu_pct": 100.0 * (ns1 - ns0) / 1e9 / elapsed,
                     "cpu_pct_ticks": 100.0 * (cpu_ticks(s.pid) - cpu0) / hz / elapsed,
                     "wakeups_per_s": (vol1 - vol0) / elapsed, "slices_per_s": (sl1 - sl0) / elapsed}
    return out


def build(root: Path, n: int) -> list[Path]:
    site = init_site(root / "site", "Idle bench")
    ports = free_ports(n)
    nodes = []
    for i in range(n):
        path = root / f"n{i}"
        enroll_one_step(site, path, "terminal", f"N{i}", listen=f"127.0.0.1:{ports[i]}",
                        peers=[f"127.0.0.1:{ports[j]}" for j in range(i)])
        nodes.append(path)
    return nodes


def answers(path: Path) -> bool:
    try:
        client.running(path, timeout=5.0).status()
        return True
    except MeshposError:
        return False


def open_links(path: Path) -> int:
    st = client.running(path, timeout=10).status()
    return len({ln["peer_node"] for ln in st["peers"]["links"] if ln["state"] == "open"})


def one_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    nodes = build(tmp, args.nodes)
    procs = ProcessGroup(tmp / "logs")
    idle = subprocess.Popen([sys.executable, "-c", TRIO_IDLE], start_new_session=True)
    try:
        here = os.getcwd()
        os.chdir(args.tree)  # the children run `python -m meshpos...`: the meshpos of that checkout
        try:
            for i, path in enumerate(nodes):
                procs.start(f"n{i}", "run", str(path), "--no-mdns")
        finally:
            os.chdir(here)
        for i, path in enumerate(nodes):
            wait_for(lambda p=path: answers(p), 120, f"node {i} did not start", alive=procs.children[f"n{i}"])
        wait_for(lambda: all(open_links(p) >= args.nodes - 1 for p in nodes), 120,
                 "not every link opened", interval=1.0)
        time.sleep(args.settle)
        pids = {f"n{i}": procs.children[f"n{i}"].proc.pid for i in range(len(nodes))}  # type: ignore[union-attr]
        pids["trio_idle"] = idle.pid
        figures = measure(pids, args.window)
        links = [open_links(p) for p in nodes]
    finally:
        procs.stop_all()
        idle.terminate()
        idle.wait(timeout=10)
    node_figs = [figures[f"n{i}"] for i in range(len(nodes))]
    return {
        "links_per_node": links,
        "node_cpu_pct": statistics.median(f["cpu_pct"] for f in node_figs),
        "node_cpu_pct_ticks": statistics.median(f["cpu_pct_ticks"] for f in node_figs),
        "node_wakeups_per_s": statistics.median(f["wakeups_per_s"] for f in node_figs),
        "node_slices_per_s": statistics.median(f["slices_per_s"] for f in node_figs),
        "trio_cpu_pct": figures["trio_idle"]["cpu_pct"],
        "trio_wakeups_per_s": figures["trio_idle"]["wakeups_per_s"],
        "trio_slices_per_s": figures["trio_idle"]["slices_per_s"],
        "per_node": figures,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=6, help="node processes (each gets nodes-1 links; default 6)")
    ap.add_argument("--window", type=float, default=60.0, help="seconds measured per run (default 60)")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds to wait after every link is open, before measuring (default 20)")
    ap.add_argument("--runs", type=int, default=3, help="whole runs, each with a new mesh (default 3)")
    ap.add_argument("--tmpdir", type=Path, default=None, help="where the node directories go")
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the meshpos checkout the node processes run (default: this script's)")
    ap.add_argument("--json", action="store_true", help="print one JSON line of results")
    args = ap.parse_args()
    if args.nodes < 2:
        ap.error("--nodes must be at least 2")
    runs = []
    for r in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="bench-idle-", dir=args.tmpdir))
        try:
            runs.append(one_run(args, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not args.json:
            x = runs[-1]
            print(f"run {r + 1}: node CPU {x['node_cpu_pct']:.3f} % (ticks {x['node_cpu_pct_ticks']:.3f} %), "
                  f"{x['node_wakeups_per_s']:.2f} wake-ups/s, "
                  f"{x['node_slices_per_s']:.2f} slices/s; idle trio CPU {x['trio_cpu_pct']:.3f} %, "
                  f"{x['trio_wakeups_per_s']:.2f} wake-ups/s; links {x['links_per_node']}")
    keys = ("node_cpu_pct", "node_cpu_pct_ticks", "node_wakeups_per_s", "node_slices_per_s", "trio_cpu_pct", "trio_wakeups_per_s",
            "trio_slices_per_s")
    result: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    result.update(nodes=args.nodes, window_s=args.window, runs=args.runs,
                  runs_node_wakeups_per_s=[round(r["node_wakeups_per_s"], 2) for r in runs],
                  runs_node_cpu_pct=[round(r["node_cpu_pct"], 3) for r in runs], tree=str(args.tree))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"median of {args.runs} runs: node CPU {result['node_cpu_pct']:.3f} % "
              f"(ticks {result['node_cpu_pct_ticks']:.3f} %), "
              f"{result['node_wakeups_per_s']:.2f} wake-ups/s ({result['node_slices_per_s']:.2f} run slices/s); "
              f"idle trio process CPU {result['trio_cpu_pct']:.3f} %, {result['trio_wakeups_per_s']:.2f} wake-ups/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
