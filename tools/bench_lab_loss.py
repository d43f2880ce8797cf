#!/usr/bin/env python3
"""Mesh propagation on a lossy field network: 6 lab hosts (network namespaces, tools/netns_lab.py),
one `meshpos run` per host, every host's interface dropping a share of the packets it receives at
random (nftables numgen); for every sale, the time from its commit to its presence on EVERY node,
at each loss level asked. Needs root, iproute2 and nftables.

    sudo python tools/bench_lab_loss.py                        # 0, 5, 20 % loss, 3 runs each
    sudo python tools/bench_lab_loss.py --loss 0 20 --runs 1 --seconds 10 --json

The site: host 0 is the gateway, hosts 1..5 terminals configured with the gateway's address only
(mDNS on, peer exchange on: the links the product forms by itself). Sales are taken at --rate per
second, round robin over the 6 nodes, through their API sockets (Unix sockets: no loss there);
2 of 3 are card sales. Presence = each node's own `entries.received_at` stamp, read from the SQLite
files after the run (tools/bench_mesh.py explains the method; all namespaces share one clock).
Each run builds a new site in a new lab; the figures are medians over the runs, every run's p99 kept.

Also per run: how long the mesh took to form (every node with at least two open links), from the
first node's start and from the last one's; the links held before the load (after --settle); and
the CPU % of each node process (utime + stime from /proc) over an idle window (--idle-seconds,
nothing sold) and over the load, beside an idle `python3 -c "import trio; trio.run(trio.sleep_forever)"`
process measured in the same windows (the floor; the host may be shared: compare the two).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


netns_lab = _load("netns_lab")
bench_mesh = _load("bench_mesh")

from meshpos.apps.procs import ProcessGroup  # noqa: E402
from meshpos.identity import keys  # noqa: E402
from meshpos.node import client  # noqa: E402
from meshpos.node.enroll import enroll_one_step  # noqa: E402
from meshpos.site.nodedir import NodeDir  # noqa: E402
from meshpos.site.sitedir import init_site  # noqa: E402

HOSTS = 6  # default; --hosts for the largest mesh this host holds
PORT = 7420
TRIO_IDLE = "import trio; trio.run(trio.sleep_forever)"
FORM_TIMEOUT = 120.0  # seconds after the last node started


def cpu_window(pids: list[int], seconds: float) -> list[float]:
    """Each process's CPU % (of one core) over the next ``seconds``."""
    before = [bench_mesh.cpu_seconds(pid) for pid in pids]
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return [100.0 * (bench_mesh.cpu_seconds(pid) - b) / elapsed for pid, b in zip(pids, before)]


def open_links(nodes: list[Path]) -> list[int]:
    return [sum(1 for link in client.running(p).status()["peers"]["links"] if link["state"] == "open")
            for p in nodes]


def one_run(loss: int, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="meshpos-bench-lab-"))
    switch_pub = keys.x25519_public_of(keys.generate())
    site = init_site(tmp / "site", "Bench sul Campo", "EUR", switch_key=switch_pub.hex(),
                     switch_url="https://127.0.0.1:9")
    procs = ProcessGroup(tmp / "logs")
    if args.status_interval:
        procs.env["MESHPOS_STATUS_INTERVAL"] = str(args.status_interval)
    lab = netns_lab.Lab(args.hosts)
    baseline = subprocess.Popen([sys.executable, "-c", TRIO_IDLE])
    try:
        lab.up()
        for i in range(args.hosts):
            lab.loss(i, loss)
        gateway = f"{lab.addr(0)}:{PORT}"
        nodes = []
        for i in range(args.hosts):
            path = tmp / f"n{i}"
            enroll_one_step(site, path, "gateway" if i == 0 else "terminal", f"N{i}",
                            listen=f"{lab.addr(i)}:{PORT}", peers=[] if i == 0 else [gateway])
            nodes.append(path)
        first = time.monotonic()
        children = [procs.start_node(f"n{i}", path, timeout=120, wrap=["ip", "netns", "exec", lab.host_ns(i)])
                    for i, path in enumerate(nodes)]
        pids = [c.proc.pid for c in children if c.proc is not None]
        t0 = time.monotonic()
        while min(open_links(nodes)) < 2:  # every node holds a link to at least two others
            if time.monotonic() - t0 > FORM_TIMEOUT:
                raise SystemExit(f"the mesh did not form at {loss} % loss")
            time.sleep(0.5)
        formed = time.monotonic()
        print(f"mesh formed {formed - first:.1f} s after the first node started, {formed - t0:.1f} s after "
              f"the last", file=sys.stderr, flush=True)
        time.sleep(args.settle)
        held = open_links(nodes)
        idle = cpu_window(pids + [baseline.pid], args.idle_seconds) if args.idle_seconds > 0 else None
        dbs = [NodeDir(p).db_path for p in nodes]
        cpu_before = [bench_mesh.cpu_seconds(pid) for pid in pids + [baseline.pid]]
        load_t0 = time.monotonic()
        sold = bench_mesh.run_load(nodes, args.rate, args.seconds, switch_pub)
        load_s = time.monotonic() - load_t0
        load = [100.0 * (bench_mesh.cpu_seconds(pid) - b) / load_s
                for pid, b in zip(pids + [baseline.pid], cpu_before)]
        ok = [s for s in sold if s.sale_id is not None]
        converged = bench_mesh.wait_everywhere(dbs, "sale", {f"sale/{s.sale_id}" for s in ok}, timeout=180)
        res = bench_mesh.latencies(dbs, "sale", {s.sale_id: s.returned for s in ok if s.sale_id},
                                   lambda sid: f"sale/{sid}")
        links = sum(len([link for link in client.running(p).status()["peers"]["links"]
                         if link["state"] == "open"]) for p in nodes) // 2
        res.update(loss_pct=loss, hosts=args.hosts, links=links, rate=args.rate, seconds=args.seconds,
                   sales=len(sold), sell_errors=len(sold) - len(ok), converged=converged,
                   formed_s=round(formed - first, 1), formed_after_last_s=round(formed - t0, 1),
                   links_settled=sum(held) // 2, links_per_node_max=max(held),
                   cpu_load_pct=round(statistics.median(load[:-1]), 2), cpu_load_pct_max=round(max(load[:-1]), 2),
                   baseline_load_pct=round(load[-1], 2))
        if idle is not None:
            res.update(cpu_idle_pct=round(statistics.median(idle[:-1]), 2), cpu_idle_pct_max=round(max(idle[:-1]), 2),
                       baseline_idle_pct=round(idle[-1], 2))
        return res
    finally:
        baseline.kill()
        baseline.wait()
        procs.stop_all()
        lab.down()
        if args.keep:
            print(f"kept {tmp} (logs in {tmp / 'logs'})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    res = dict(runs[0])
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "min_ms", "links", "formed_s", "formed_after_last_s",
                "links_settled", "cpu_load_pct", "baseline_load_pct", "cpu_idle_pct", "baseline_idle_pct"):
        values = [r[key] for r in runs if key in r]
        if values:
            res[key] = statistics.median(values)
    res["runs"] = len(runs)
    res["p99_runs_ms"] = [r.get("p99_ms") for r in runs]
    res["missing"] = sum(r.get("missing", 0) for r in runs)
    res["converged"] = all(r.get("converged") for r in runs)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", type=int, nargs="+", default=[0, 5, 20], metavar="PCT",
                    help="loss levels to measure, %% of received packets dropped on every host (default 0 5 20)")
    ap.add_argument("--rate", type=float, default=10.0, help="sales per second, site-wide (default 10)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration per run (default 20)")
    ap.add_argument("--runs", type=int, default=3, help="runs per loss level, each on a new lab (default 3)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between the mesh forming and the load")
    ap.add_argument("--hosts", type=int, default=HOSTS,
                    help=f"lab hosts, one node each (default {HOSTS}; at most 250, one /24)")
    ap.add_argument("--status-interval", type=float, default=2.0,
                    help="seconds between a node's statuses (MESHPOS_STATUS_INTERVAL; default 2, fast for a "
                         "small lab; 0 keeps the product's paced periods, which large meshes need: statuses "
                         "flood, so every node handles N per period)")
    ap.add_argument("--idle-seconds", type=float, default=10.0,
                    help="CPU window with nothing sold, after --settle (default 10; 0: none)")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (node logs, databases)")
    ap.add_argument("--json", action="store_true", help="one JSON object per loss level")
    args = ap.parse_args()
    if not 2 <= args.hosts <= 250:
        ap.error("--hosts must be between 2 and 250")
    reason = netns_lab.usable()
    if reason:
        print(f"bench_lab_loss: {reason}", file=sys.stderr)
        return 2
    if shutil.which("nft") is None:
        print("bench_lab_loss: nft is not installed (apt-get install nftables)", file=sys.stderr)
        return 2
    for loss in args.loss:
        runs = []
        for i in range(args.runs):
            print(f"{loss} % loss: run {i + 1} of {args.runs}", file=sys.stderr, flush=True)
            runs.append(one_run(loss, args))
        res = median_of(runs)
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            print(f"{loss:>3} % loss, {args.hosts} hosts ({res['links']:g} links), {res['sales']} sales at {args.rate:g}/s "
                  f"for {args.seconds:g} s, median of {args.runs} run(s): sale -> every node p50 "
                  f"{res.get('p50_ms', float('nan')):.0f} ms, p99 {res.get('p99_ms', float('nan')):.0f} ms "
                  f"(runs: {', '.join(f'{v:.0f}' for v in res['p99_runs_ms'] if v is not None)}), max "
                  f"{res.get('max_ms', float('nan')):.0f} ms; {res['missing']} missing, "
                  f"{res['sell_errors']} sell errors", flush=True)
            idle_txt = (f"idle {res['cpu_idle_pct']:.1f} % (trio idle {res['baseline_idle_pct']:.1f} %), "
                        if "cpu_idle_pct" in res else "")
            print(f"      formed {res['formed_s']:g} s after the first start ({res['formed_after_last_s']:g} s after "
                  f"the last); {res['links_settled']:g} links after --settle; CPU per node (median) {idle_txt}"
                  f"under load {res['cpu_load_pct']:.1f} % (trio idle {res['baseline_load_pct']:.1f} %)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
