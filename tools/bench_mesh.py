#!/usr/bin/env python3
"""Mesh propagation: N `meshpos run` node processes on 127.0.0.1 with real TLS links, sales taken
at a steady site-wide rate through the nodes' API sockets (api.sock); for every sale, the time from its commit
(the `sell` call returning to this script) to its presence on EVERY node. Goal: p99 <= 500 ms.

    python tools/bench_mesh.py                       # 20 nodes, 40 sales/s for 60 s
    python tools/bench_mesh.py --nodes 8 --rate 10 --seconds 10 --json

Topology (--topology): `planner` (default) gives every node the static peers the product's ring
planner (meshpos.replication.planner.ring_targets: 2 ring successors + 1 chord) would dial, i.e. the links a real
site forms over mDNS; `prev2` peers each node with the 2 nodes started before it (a long thin mesh,
diameter ~N/2). mDNS is off either way.

How presence is observed, at no cost to the nodes: each node stamps every entry it accepts with its
own wall clock (`entries.received_at`, milliseconds, taken when it ingests the sync message, in the
same transaction that makes the entry durable). After the run the script reads those stamps from
every node's SQLite file. All processes share one host clock, so "on every node" = the latest stamp
of that sale over the N nodes, minus the `sell` return time. As an independent check, an observer
thread in this script polls each node's database (read-only, incremental rowid queries) and notes
when it first sees each sale; that is an upper bound whose resolution is the observer's cycle time
(printed). Neither method loads the nodes' API sockets.

Where a node's CPU goes (``--breakdown I``): node I runs with the probe of tools/cpu_probe (loaded
through PYTHONPATH by every node, active in node I only), which counts, between the start and the
end of the load, the thread CPU of each trio task, of trio's wait for I/O and of a few functions of
the receive path (inclusive, nested as tools/cpu_probe/sitecustomize.py lists them), per site sale.
The probe costs that node a little (two clock reads per task step and per call of a listed
function); the other nodes run as without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshpos.wire.cards import seal_card  # noqa: E402
from meshpos.domain.errors import MeshposError  # noqa: E402
from meshpos.identity import keys  # noqa: E402
from meshpos.replication.planner import ring_targets  # noqa: E402
from meshpos.node import client  # noqa: E402
from meshpos.node.ops import SealedCard, SellRequest  # noqa: E402
from meshpos.node.enroll import enroll_one_step  # noqa: E402
from meshpos.site.nodedir import NodeDir  # noqa: E402
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for  # noqa: E402
from meshpos.site.sitedir import Site, init_site  # noqa: E402

CARDS = ("4111111111111111", "5555555555554444")


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def diameter(adj: dict[int, set[int]]) -> int:
    best = 0
    for src in adj:
        dist = {src: 0}
        todo = deque([src])
        while todo:
            u = todo.popleft()
            for v in adj[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    todo.append(v)
        if len(dist) < len(adj):
            return -1
        best = max(best, max(dist.values()))
    return best


def read_ro(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
    conn.execute("PRAGMA query_only=1")
    return conn


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children, from /proc (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "cpu": cpu_model() or "unknown"}


@dataclass
class Mesh:
    """A site, N enrolled nodes with static peers on loopback, their processes."""

    root: Path
    n: int
    topology: str = "planner"
    switch_key: str | None = None
    switch_url: str | None = None
    uplink_node: int | None = None
    site: Site = field(init=False)
    nodes: list[Path] = field(default_factory=list)
    edges: set[tuple[int, int]] = field(default_factory=set)
    procs: ProcessGroup = field(init=False)

    def build(self) -> None:
        if self.switch_key is None:
            self.switch_key = keys.x25519_public_of(keys.generate()).hex()
        self.site = init_site(self.root / "site", "Bench mesh", switch_key=self.switch_key,
                              switch_url=self.switch_url)
        self.site.update_policy(max_terminal_pending_minor=10**12, max_site_pending_minor=10**13)
        ports = free_ports(self.n)
        ids = []
        for i in range(self.n):
            path = self.root / f"n{i:02d}"
            cfg = enroll_one_step(self.site, path, "terminal", f"N{i:02d}", listen=f"127.0.0.1:{ports[i]}",
                                  uplink=(i == self.uplink_node))
            self.nodes.append(path)
            ids.append(cfg.node_id)
        index = {nid: i for i, nid in enumerate(ids)}
        for i, nid in enumerate(ids):
            if self.topology == "planner":
                targets = sorted(index[t] for t in ring_targets(nid, set(ids)))
            elif self.topology == "prev2":
                targets = [j for j in (i - 1, i - 2) if j >= 0]
            else:
                raise SystemExit(f"unknown topology {self.topology}")
            nd = NodeDir(self.nodes[i])
            cfg = nd.config()
            cfg.peers = [f"127.0.0.1:{ports[j]}" for j in targets]
            nd.save_config(cfg)
            for j in targets:
                self.edges.add((min(i, j), max(i, j)))
        self.procs = ProcessGroup(self.root / "logs")

    def adjacency(self) -> dict[int, set[int]]:
        adj: dict[int, set[int]] = {i: set() for i in range(self.n)}
        for a, b in self.edges:
            adj[a].add(b)
            adj[b].add(a)
        return adj

    def start(self, timeout: float = 180.0, wrap: dict[int, list[str]] | None = None) -> float:
        """Start every node and wait until all are linked; ``wrap[i]`` goes before node i's command
        (tools/count_instructions.py: valgrind)."""
        t0 = time.monotonic()
        for i, path in enumerate(self.nodes):
            self.procs.start(f"n{i:02d}", "run", str(path), "--no-mdns", wrap=(wrap or {}).get(i, []))
        for i, path in enumerate(self.nodes):
            child = self.procs.children[f"n{i:02d}"]
            wait_for(lambda p=path: _answers(p), timeout, f"node {i} did not start:\n{child.log_tail()}",
                     interval=0.2, alive=child)
        # converged roster (every node knows every certificate) and every planned link open
        dbs = [NodeDir(p).db_path for p in self.nodes]
        wait_for(lambda: all(count(db, "cert") >= self.n for db in dbs), timeout,
                 "certificates did not reach every node", interval=0.5)
        want = {i: len(adj) for i, adj in self.adjacency().items()}

        def links_open() -> bool:
            for i, path in enumerate(self.nodes):
                st = client.running(path, timeout=10).status()
                opened = {ln["peer_node"] for ln in st["peers"]["links"] if ln["state"] == "open"}
                if len(opened) < want[i]:
                    return False
            return True
        wait_for(links_open, timeout, "not every planned link opened", interval=1.0)
        return time.monotonic() - t0

    def link_totals(self) -> tuple[int, int | None]:
        """Bytes received over every node's links, and changes received in PUSH frames (None where
        a node does not count them: code before link protocol version 4)."""
        received, pushed = 0, 0
        counted = True
        for path in self.nodes:
            for ln in client.running(path, timeout=30).status()["peers"]["links"]:
                received += ln["bytes_in"]
                counted = counted and "changes_pushed_in" in ln
                pushed += ln.get("changes_pushed_in", 0)
        return received, pushed if counted else None

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.procs.children.values() if c.proc is not None]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def stop(self) -> None:
        self.procs.stop_all()


def _answers(path: Path) -> bool:
    try:
        client.running(path, timeout=5.0).status()
        return True
    except MeshposError:
        return False


def count(db: Path, type_: str) -> int:
    try:
        conn = read_ro(db)
    except sqlite3.Error:
        return 0
    try:
        return int(conn.execute("SELECT count(*) FROM entries WHERE type=?", (type_,)).fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def stamps(db: Path, type_: str) -> dict[str, int]:
    """key -> received_at (ms) of every entry of one type on one node."""
    conn = read_ro(db)
    try:
        return {str(k): int(t) for k, t in
                conn.execute("SELECT key, received_at FROM entries WHERE type=?", (type_,))}
    finally:
        conn.close()


class Observer(threading.Thread):
    """Polls every node's database for new entries of one type; first time (time.time()) it sees each key."""

    def __init__(self, dbs: list[Path], type_: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.dbs = dbs
        self.type = type_
        self.interval = interval
        self.first: list[dict[str, float]] = [{} for _ in dbs]
        self.cycles: list[float] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        conns = [read_ro(db) for db in self.dbs]
        last = [0] * len(conns)
        while not self.stop_flag.is_set():
            t0 = time.time()
            for i, conn in enumerate(conns):
                try:
                    rows = conn.execute("SELECT rowid, key FROM entries WHERE rowid > ? AND type=?",
                                        (last[i], self.type)).fetchall()
                except sqlite3.Error:
                    continue
                now = time.time()
                for rowid, key in rows:
                    last[i] = max(last[i], rowid)
                    self.first[i].setdefault(str(key), now)
            elapsed = time.time() - t0
            self.cycles.append(elapsed)
            self.stop_flag.wait(max(0.0, self.interval - elapsed))
        for conn in conns:
            conn.close()


@dataclass
class Sold:
    k: int
    node: int
    scheduled: float
    started: float
    returned: float
    sale_id: str | None
    error: str | None = None


def sell_params(k: int, switch_key: bytes, card_share: int = 2) -> SellRequest:
    """Sale k: `card_share` of every 3 are card sales (sealed here, as `meshpos sell --card` does)."""
    card = None
    if k % 3 < card_share:
        card = SealedCard.of(seal_card(CARDS[k % 2], "1230", "contactless", switch_key))
    return SellRequest(100 + k % 900, card, f"bench {k}")


class Sellers:
    """Keep-alive connections to the nodes' API sockets, as a till or the cashier page keeps one:
    idle ones per node, taken by one call at a time (a connection carries one request at a time;
    a node gets a second one while a call to it is slow). With ``keep_alive`` False every call
    makes its own connection, as the CLI does."""

    def __init__(self, nodes: list[Path], keep_alive: bool) -> None:
        self.nodes = nodes
        self.keep_alive = keep_alive
        self.idle: list[list[client.RunningNode]] = [[] for _ in nodes]
        self.lock = threading.Lock()

    def sell(self, node: int, params: SellRequest) -> dict[str, Any]:
        if not self.keep_alive:
            return client.running(self.nodes[node], timeout=30).sell(params.amount_minor, params.card,
                                                                       params.description)
        with self.lock:
            conn = self.idle[node].pop() if self.idle[node] else None
        if conn is None:
            conn = client.running(self.nodes[node], timeout=30).__enter__()
        try:
            return conn.sell(params.amount_minor, params.card, params.description)
        finally:
            with self.lock:
                self.idle[node].append(conn)  # a failed connection is closed; the next call reconnects

    def close(self) -> None:
        with self.lock:
            for conns in self.idle:
                for conn in conns:
                    conn.__exit__(None, None, None)
                conns.clear()


def run_load(nodes: list[Path], rate: float, seconds: float, switch_key: bytes, workers: int = 16,
             card_share: int = 2, first_k: int = 0, keep_alive: bool = False) -> list[Sold]:
    """Open-loop load: sale k is due at t0 + k/rate, on node k mod N; each call runs in a pool thread
    so a slow answer never delays the next sale. ``keep_alive``: calls reuse connections (Sellers)."""
    total = int(rate * seconds)
    out: list[Sold] = []
    lock = threading.Lock()
    sellers = Sellers(nodes, keep_alive)

    def one(k: int, due: float) -> None:
        node = k % len(nodes)
        params = sell_params(first_k + k, switch_key, card_share)
        started = time.time()
        try:
            sale = sellers.sell(node, params)
            sold = Sold(k, node, due, started, time.time(), sale["id"])
        except MeshposError as exc:
            sold = Sold(k, node, due, started, time.time(), None, str(exc))
        with lock:
            out.append(sold)

    futures: list[Future[None]] = []
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            t0 = time.time() + 0.2
            for k in range(total):
                due = t0 + k / rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(one, k, due))
            for f in futures:
                f.result()
    finally:
        sellers.close()
    out.sort(key=lambda s: s.k)
    return out


def wait_everywhere(dbs: list[Path], type_: str, want: set[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(want <= set(stamps(db, type_)) for db in dbs):
            return True
        time.sleep(1.0)
    return False


def latencies(dbs: list[Path], type_: str, origin: dict[str, float], key_of: Any,
              observer: Observer | None = None) -> dict[str, Any]:
    """Per key of `origin` (key -> reference time, s): latest received_at over all nodes minus the
    reference; same from the observer's first sightings. Missing anywhere -> counted, not timed."""
    per_node = [stamps(db, type_) for db in dbs]
    lat, obs, missing = [], [], 0
    for ident, t_ref in origin.items():
        key = key_of(ident)
        got = [node.get(key) for node in per_node]
        if any(g is None for g in got):
            missing += 1
            continue
        lat.append(max(g for g in got if g is not None) / 1000 - t_ref)
        if observer is not None:
            seen = [f.get(key) for f in observer.first]
            if all(s is not None for s in seen):
                obs.append(max(s for s in seen if s is not None) - t_ref)
    res: dict[str, Any] = {"samples": len(lat), "missing": missing}
    if lat:
        res.update(p50_ms=pct(lat, 50) * 1000, p90_ms=pct(lat, 90) * 1000, p99_ms=pct(lat, 99) * 1000,
                   max_ms=max(lat) * 1000, min_ms=min(lat) * 1000)
    if obs:
        res.update(observer_p50_ms=pct(obs, 50) * 1000, observer_p99_ms=pct(obs, 99) * 1000,
                   observer_samples=len(obs))
    if observer is not None and observer.cycles:
        res["observer_cycle_ms"] = statistics.median(observer.cycles) * 1000
        res["observer_cycle_p99_ms"] = pct(observer.cycles, 99) * 1000
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--rate", type=float, default=40.0, help="sales per second, site-wide")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--topology", choices=("planner", "prev2"), default="planner")
    ap.add_argument("--poll-ms", type=float, default=25.0, help="observer poll interval")
    ap.add_argument("--cash", action="store_true", help="cash sales only (default: 2 of 3 are card sales)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    ap.add_argument("--tmpdir", type=Path, default=None,
                    help="where the node directories go (e.g. /dev/shm to take the disk's fsync out)")
    ap.add_argument("--runs", type=int, default=1, help="whole runs (a new mesh each); figures are their medians")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait after the mesh formed before selling (default 0). The planner "
                         "closes the links it no longer needs 30 s after its targets settle; --settle 45 "
                         "measures a site whose links have settled, the default includes those closes")
    ap.add_argument("--new-connection-per-sale", action="store_true",
                    help="make a new API connection for every sale, as the CLI does (default: keep-alive "
                         "connections per node, as a till or the cashier page keeps one; before this "
                         "option the tool always made a new one)")
    ap.add_argument("--breakdown", type=int, default=None, metavar="I",
                    help="probe node I (0-based): its CPU per site sale by trio task and part of the receive path")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.breakdown is not None and not 0 <= args.breakdown < args.nodes:
        ap.error(f"--breakdown takes a node index from 0 to {args.nodes - 1}")
    runs = []
    for i in range(args.runs):
        if args.runs > 1:
            print(f"run {i + 1} of {args.runs}", file=sys.stderr, flush=True)
        runs.append(one_run(args))
    res = median_of(runs)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"mesh propagation, {res['nodes']} nodes ({res['topology']}, {res['links']} links, diameter "
              f"{res['diameter']}), {res['sales']} sales at {res['rate']:g}/s for {res['seconds']:g} s "
              f"(achieved {res['achieved_rate']:.1f}/s, {res['sell_errors']} errors), median of {args.runs} run(s):")
        if res.get("samples"):
            print(f"  commit -> on every node: p50 {res['p50_ms']:.0f} ms, p90 {res['p90_ms']:.0f} ms, "
                  f"p99 {res['p99_ms']:.0f} ms (runs: {', '.join(f'{v:.0f}' for v in res['p99_runs_ms'])}), "
                  f"max {res['max_ms']:.0f} ms over {res['samples']} sales ({res['missing']} missing); "
                  "goal p99 <= 500 ms")
        if res.get("observer_samples"):
            print(f"  observer (DB poll, cycle {res['observer_cycle_ms']:.0f} ms median, "
                  f"{res['observer_cycle_p99_ms']:.0f} ms p99): committed on every node p50 "
                  f"{res['observer_p50_ms']:.0f} ms, p99 {res['observer_p99_ms']:.0f} ms (upper bound)")
        print(f"  sell call under load: p50 {res['sell_p50_ms']:.1f} ms, p99 {res['sell_p99_ms']:.1f} ms; "
              f"node CPU {res['node_cpu_s_per_s']:.2f} cores = {res['node_cpu_ms_per_sale_per_node']:.2f} ms "
              f"per sale per node; host {res['machine_nproc']} x {res['machine_cpu']}")
        copies = res.get("pushed_changes_per_sale_per_node")
        print(f"  received over links: {res['link_bytes_in_per_sale_per_node']:.0f} bytes per sale per node; "
              + (f"changes in PUSH frames {copies:.2f} per sale per node" if copies is not None
                 else "changes in PUSH frames not counted by this code"))
        for run in runs:
            if run.get("breakdown"):
                print_breakdown(run["breakdown"])
    return 0


PROBE_DIR = Path(__file__).resolve().parent / "cpu_probe"


def breakdown_of(probe: dict[str, Any], sales: int) -> dict[str, Any]:
    """The probe's counts as milliseconds of thread CPU (and calls) per site sale."""
    def per_sale(table: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        return {name: {"ms": secs * 1000 / sales, "calls": n / sales} for name, (n, secs) in table.items()}
    return {"node_ms_per_sale": probe["process_cpu_s"] * 1000 / sales,
            "main_thread_ms_per_sale": probe["main_thread_cpu_s"] * 1000 / sales,
            "io_wait": {"ms": probe["io_wait"][1] * 1000 / sales, "calls": probe["io_wait"][0] / sales},
            "tasks": per_sale(probe["tasks"]), "parts": per_sale(probe["parts"])}


def print_breakdown(b: dict[str, Any]) -> None:
    print(f"  probed node: {b['node_ms_per_sale']:.3f} ms CPU per site sale, main thread "
          f"{b['main_thread_ms_per_sale']:.3f} (waiting for I/O {b['io_wait']['ms']:.3f}, "
          f"{b['io_wait']['calls']:.2f} waits per sale)")
    print("  by trio task (thread CPU, steps per sale):")
    for name, v in b["tasks"].items():
        if v["ms"] >= 0.001:
            print(f"    {name:40s} {v['ms']:7.3f} ms  {v['calls']:5.2f}")
    print("  by part of the path (inclusive: the parts nest; calls per sale):")
    for name, v in b["parts"].items():
        print(f"    {name:40s} {v['ms']:7.3f} ms  {v['calls']:5.2f}")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result: each numeric figure the median over the runs; missing sales summed; the p99s
    of every run kept."""
    res = dict(runs[0])
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(set(values)) > 1 and all(
                isinstance(v, (int, float)) for v in values):
            res[key] = statistics.median(values)
    res["missing"] = sum(r.get("missing", 0) for r in runs)
    res["converged"] = all(r.get("converged") for r in runs)
    res["runs"] = len(runs)
    res["p99_runs_ms"] = [r.get("p99_ms") for r in runs]
    res["cpu_runs_ms"] = [r.get("node_cpu_ms_per_sale_per_node") for r in runs]
    res["observer_p99_runs_ms"] = [r.get("observer_p99_ms") for r in runs]
    return res


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="meshpos-bench-mesh-", dir=args.tmpdir))
    switch = keys.generate()
    switch_pub = keys.x25519_public_of(switch)
    mesh = Mesh(tmp, args.nodes, args.topology, switch_key=switch_pub.hex())
    probe_out = tmp / "cpu_probe.json"
    try:
        mesh.build()
        if args.breakdown is not None:
            mesh.procs.env.update({
                "PYTHONPATH": os.pathsep.join(p for p in (str(PROBE_DIR), os.environ.get("PYTHONPATH")) if p),
                "MESHPOS_CPU_PROBE": str(probe_out), "MESHPOS_CPU_PROBE_NODE": mesh.nodes[args.breakdown].name})
        print(f"{args.nodes} nodes, topology {args.topology}: {len(mesh.edges)} links, "
              f"diameter {diameter(mesh.adjacency())} hops", file=sys.stderr, flush=True)
        startup = mesh.start()
        print(f"all nodes up and linked in {startup:.1f} s", file=sys.stderr, flush=True)
        if args.settle:
            print(f"settling {args.settle:g} s before the load", file=sys.stderr, flush=True)
            time.sleep(args.settle)
        dbs = [NodeDir(p).db_path for p in mesh.nodes]
        observer = Observer(dbs, "sale", args.poll_ms / 1000)
        links0 = mesh.link_totals()
        observer.start()
        probed = mesh.procs.children[f"n{args.breakdown:02d}"].proc if args.breakdown is not None else None
        if probed is not None:
            os.kill(probed.pid, signal.SIGUSR1)
        cpu0, wall0 = mesh.cpu(), time.time()
        sold = run_load(mesh.nodes, args.rate, args.seconds, switch_pub, card_share=0 if args.cash else 2,
                        keep_alive=not args.new_connection_per_sale)
        wall_load = time.time() - wall0
        ok = [s for s in sold if s.sale_id is not None]
        want = {f"sale/{s.sale_id}" for s in ok}
        converged = wait_everywhere(dbs, "sale", want, timeout=120)
        cpu1, wall1 = mesh.cpu(), time.time()
        if probed is not None:
            os.kill(probed.pid, signal.SIGUSR2)
            wait_for(probe_out.exists, 30, "the probed node wrote no CPU breakdown", interval=0.1)
        observer.stop_flag.set()
        observer.join()
        links1 = mesh.link_totals()  # after the CPU figure: these status calls cost the nodes a little
        per = max(1, len(ok)) * args.nodes
        copies = None if links0[1] is None or links1[1] is None else (links1[1] - links0[1]) / per
        res = latencies(dbs, "sale", {s.sale_id: s.returned for s in ok if s.sale_id}, lambda sid: f"sale/{sid}",
                        observer)
        sell_ms = [(s.returned - s.started) * 1000 for s in ok]
        late_ms = [(s.started - s.scheduled) * 1000 for s in sold]
        res.update({
            "nodes": args.nodes, "topology": args.topology, "keep_alive": not args.new_connection_per_sale, "settle_s": args.settle, "links": len(mesh.edges),
            "diameter": diameter(mesh.adjacency()), "rate": args.rate, "seconds": args.seconds,
            "sales": len(sold), "sell_errors": len(sold) - len(ok), "converged": converged,
            "achieved_rate": len(ok) / wall_load if wall_load else 0.0,
            "sell_p50_ms": pct(sell_ms, 50) if sell_ms else None, "sell_p99_ms": pct(sell_ms, 99) if sell_ms else None,
            "schedule_late_p99_ms": pct(late_ms, 99) if late_ms else None,
            "node_cpu_s_per_s": (cpu1 - cpu0) / (wall1 - wall0), "node_cpu_ms_per_sale_per_node":
                (cpu1 - cpu0) * 1000 / max(1, len(ok)) / args.nodes,
            "link_bytes_in_per_sale_per_node": (links1[0] - links0[0]) / per,
            "pushed_changes_per_sale_per_node": copies,
            "resolution": "node received_at stamps: 1 ms; commit time: sell call return in this script",
            "breakdown": (breakdown_of(json.loads(probe_out.read_text()), max(1, len(ok)))
                          if probed is not None else None),
            **{"machine_" + k: v for k, v in machine().items()},
        })
        errors = [s.error for s in sold if s.error]
        if errors:
            print(f"{len(errors)} sell calls failed, first: {errors[0]}", file=sys.stderr)
    finally:
        mesh.stop()
    if args.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


if __name__ == "__main__":
    raise SystemExit(main())
