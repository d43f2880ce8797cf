#!/usr/bin/env python3
"""Switch forwarding throughput by backend and number of instances: 1 SQLite instance, then 1, 2
and 3 instances on one PostgreSQL, each a `meshpos switch run` process, the ISO 8583 acquirer
simulator (`meshpos acquirer-sim`, a process too) answering after --delay-ms.

    python tools/bench_switch_backends.py                   # 4,000 sales, 50 ms, median of 3 runs
    python tools/bench_switch_backends.py --sales 2000 --runs 1 --configs sqlite pg1

What is timed: queued card sales of one site (signed envelopes, card data sealed to the switch),
already cut into forwarding batches of --batch sales, sent over HTTPS (mutual TLS, pinned key)
by --clients concurrent forwarders spread round robin over the instances, until every sale has
its signed result back (a sale answered pending is sent again). The forwarders only count
results (no node ledger ingests them), so the figure is the switches' and not the nodes'.
Each run has a fresh database (a new SQLite switch.db, or a new PostgreSQL database in one
throw-away cluster with fsync on, UNIX socket) and fresh instance processes.

Beside the rate, each run prints the CPU milliseconds per settled sale of each kind of process
(the instances, the simulator, the forwarders in this process, PostgreSQL's server processes),
read from /proc just before and after the timed part, and what their sum allows on 2 cores.
Before/after in one window: ``--tree`` runs instances and simulator from another checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the throw-away PostgreSQL cluster and the instances harness

from meshpos.infra.clock import SYSTEM_CLOCK  # noqa: E402
from meshpos.domain.errors import UplinkError  # noqa: E402
from meshpos.node.core import NodeCore  # noqa: E402
from meshpos.node.enroll import enroll_one_step  # noqa: E402
from meshpos.apps.procs import ProcessGroup  # noqa: E402
from meshpos.uplink.client import forward, make_client_context  # noqa: E402
from meshpos.uplink.forwarder import Forwarder  # noqa: E402
from meshpos.wire import envelope  # noqa: E402

from pg import PgCluster, remove_cluster, start_cluster  # noqa: E402
from switch_instances import Instances  # noqa: E402

CONFIGS = {"sqlite": ("sqlite", 1), "pg1": ("postgresql", 1), "pg2": ("postgresql", 2), "pg3": ("postgresql", 3)}
PANS = ("4111111111111111", "5555555555554444")
POLICY = {"max_terminal_pending_minor": 10**11, "max_site_pending_minor": 10**12}


def prepare(inst: Instances, n_sales: int, terminals: int, batch: int) -> tuple[list[list[bytes]], NodeCore]:
    """Sales on ``terminals`` terminals of the run's site; the batches one forwarder would send."""
    cores = []
    for t in range(terminals):
        enroll_one_step(inst.site, inst.root / f"t{t}", "terminal", f"T{t}")
        cores.append(NodeCore.open(inst.root / f"t{t}", SYSTEM_CLOCK))
    ids = []
    for i in range(n_sales):
        core = cores[i % terminals]
        ids.append(str(core.sell(100 + i % 900, card=core.seal_card(PANS[i % 2], "1228", "contactless"))["id"]))
    first = cores[0]
    for other in cores[1:]:
        for type_ in ("cert", "sale"):
            for raw in other.store.entries_of_type(type_):
                first.ingest(raw, "peer")
        other.close()
    fwd = Forwarder(first, SYSTEM_CLOCK)
    return [fwd.entries_for(ids[k:k + batch]) for k in range(0, len(ids), batch)], first


async def drive(urls: list[str], core: NodeCore, batches: list[list[bytes]], clients: int,
                copies: int = 1) -> tuple[float, list[dict[str, bytes]]]:
    """``copies`` uplink nodes each forward every batch (``clients`` requests at once each), the
    n-th starting at instance n: the same sales reach different instances at the same time."""
    ctx = make_client_context(core)
    results: list[dict[str, bytes]] = [{} for _ in range(copies)]

    async def uplink(copy: int) -> None:
        todo = list(batches)
        turn = copy

        async def client() -> None:
            nonlocal turn
            while todo:
                entries = todo.pop(0)
                url = urls[turn % len(urls)]
                turn += 1
                try:
                    reply = await forward(url, ctx, entries)
                except UplinkError as exc:
                    raise SystemExit(f"forwarding failed: {exc}") from exc
                done = {}
                for raw in reply.results:
                    done[envelope.decode(raw).body["sale_id"]] = raw
                results[copy].update(done)
                if reply.pending:  # send the unsettled ones again (an instance waited on another)
                    todo.append([raw for raw in entries if envelope.decode(raw).type != "sale"
                                 or envelope.decode(raw).body["sale_id"] not in done])

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for copy in range(copies):
            nursery.start_soon(uplink, copy)
    return time.perf_counter() - t0, results


def check_once(inst: Instances, results: list[dict[str, bytes]], config: str) -> None:
    """Two uplink nodes sent every sale: one 0220 each at the simulator, no 0221, one result."""
    if results[0] != results[1]:
        raise SystemExit(f"{config}: the two uplink nodes got different results")
    stats = inst.wait_stats(lambda st: st["totals"].get("0220", 0) >= len(results[0]), "stats file")
    rrns = inst.rrns(list(results[0]))
    bad = {s: stats["by_sale"].get(rrn) for s, rrn in rrns.items() if stats["by_sale"].get(rrn) != {"0220": 1}}
    if bad or len(rrns) != len(results[0]):
        raise SystemExit(f"{config}: not exactly one 0220 per sale: {list(bad.items())[:5]}")
    print(f"  {config}: {len(rrns)} sales sent by two uplink nodes through different instances at once: "
          f"one 0220 each, no 0221, identical signed results on both", flush=True)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def postgres_pids(cluster: PgCluster) -> list[int]:
    """The cluster's postmaster and its children (one backend per connection, the writers)."""
    try:
        master = int((cluster.data / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return []
    pids = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
    return pids


def cpu_by_kind(procs: ProcessGroup, n: int, cluster: PgCluster | None, backend: str) -> dict[str, float]:
    """CPU seconds used so far by each kind of process of a run (the forwarders: this process)."""
    out = {"instances": sum(cpu_s(procs.children[f"sw{i}"].proc.pid) for i in range(n)),  # type: ignore[union-attr]
           "acquirer simulator": cpu_s(procs.children["acquirer"].proc.pid),  # type: ignore[union-attr]
           "forwarders": time.process_time()}
    if backend == "postgresql" and cluster is not None:
        out["postgresql"] = sum(cpu_s(pid) for pid in postgres_pids(cluster))
    return out


def one_run(root: Path, cluster: PgCluster | None, config: str, args: argparse.Namespace,
            cpu: dict[str, list[float]]) -> float:
    backend, n = CONFIGS[config]
    procs = ProcessGroup(root / "logs")
    try:
        db = cluster.new_database("bench") if backend == "postgresql" and cluster else None
        twice = args.twice and n > 1
        wrap = (sys.executable, str(Path(__file__).resolve()), "--profile-child",
                str(Path(args.profile) / f"{config}-{root.name}")) if args.profile else ()
        inst = Instances.create(root, procs, db, n, delay_ms=args.delay_ms, policy=POLICY,
                                acquirer_connections=args.acquirer_connections, stats=twice, wrap=wrap,
                                in_flight=args.in_flight)
        batches, core = prepare(inst, args.sales, args.terminals, args.batch)
        try:
            before = cpu_by_kind(procs, n, cluster, backend)
            elapsed, results = trio.run(drive, [inst.url(i) for i in range(n)], core, batches,
                                        args.clients, 2 if twice else 1)
            after = cpu_by_kind(procs, n, cluster, backend)
            if args.profile:  # each instance's own timings (database, acquirer round trips) beside its profile
                for i in range(n):
                    (Path(args.profile) / f"{config}-{root.name}-sw{i}.metrics").write_bytes(inst.ops(i, "/metrics")[1])
            for kind, used in after.items():  # CPU seconds per sale settled
                cpu.setdefault(kind, []).append((used - before[kind]) / args.sales)
            cpu.setdefault("wall", []).append(elapsed / args.sales)
        finally:
            core.close()
        if any(len(r) != args.sales for r in results):
            raise SystemExit(f"{config}: {[len(r) for r in results]} of {args.sales} sales settled")
        if twice:
            check_once(inst, results, config)
        return args.sales / elapsed
    finally:
        procs.stop_all()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sales", type=int, default=4000)
    p.add_argument("--delay-ms", type=int, default=50, help="acquirer answer delay (default 50)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--terminals", type=int, default=4)
    p.add_argument("--batch", type=int, default=200, help="sales per forwarding request (default 200)")
    p.add_argument("--clients", type=int, default=6, help="concurrent forwarding requests (default 6)")
    p.add_argument("--acquirer-connections", type=int, default=1, help="per instance (default 1)")
    p.add_argument("--in-flight", type=int, metavar="N",
                   help="advices outstanding at the acquirer per instance (default: the switch's own default)")
    p.add_argument("--twice", action="store_true",
                   help="with 2+ instances, two uplink nodes each send every sale (starting at different "
                        "instances) and the run checks one 0220 per sale at the simulator and identical results")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--tree", type=Path, default=ROOT,
                   help="run the instances and the simulator from another checkout of meshpos (a baseline, e.g. "
                        "`git archive COMMIT | tar -x -C DIR`); the forwarders always run this one's")
    p.add_argument("--profile", metavar="DIR",
                   help="run each instance under cProfile (its event loop thread; slower) and write one "
                        "profile per instance process into DIR (read with `python -m pstats FILE`)")
    args = p.parse_args()
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    os.chdir(args.tree)  # the children run `python -m meshpos...`: the meshpos of that checkout
    cluster = start_cluster(options=()) if any(CONFIGS[c][0] == "postgresql" for c in args.configs) else None
    results: dict[str, dict[str, object]] = {}
    cpus: dict[str, dict[str, list[float]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="meshpos-bench-") as tmp:
            for run in range(args.runs):  # configs interleaved: a noisy minute does not hit one config only
                for config in args.configs:
                    cpu = cpus.setdefault(config, {})
                    rate = one_run(Path(tmp) / f"{config}-{run}", cluster, config, args, cpu)
                    results.setdefault(config, {"runs": []})["runs"].append(rate)  # type: ignore[union-attr]
                    print(f"run {run + 1} {config}: {rate:.0f} sales/s; CPU ms per sale: "
                          + ", ".join(f"{k} {v[-1] * 1000:.2f}" for k, v in cpu.items() if k != "wall"), flush=True)
    finally:
        if cluster is not None:
            remove_cluster(cluster)
    for config, r in results.items():
        runs: list[float] = r["runs"]  # type: ignore[assignment]
        n = CONFIGS[config][1]
        r["sales_per_s"] = statistics.median(runs)
        r["per_instance"] = statistics.median(runs) / n
        print(f"{config}: median {r['sales_per_s']:.0f} sales/s, {r['per_instance']:.0f} per instance "
              f"(runs {', '.join(f'{x:.0f}' for x in runs)})")
        medians = {kind: statistics.median(v) * 1000 for kind, v in cpus[config].items() if kind != "wall"}
        r["cpu_ms_per_sale"] = medians
        total = sum(medians.values())
        print(f"  CPU ms per sale (medians): {', '.join(f'{k} {v:.2f}' for k, v in medians.items())}; "
              f"all {total:.2f}: at most {2000 / total:.0f} sales/s on 2 cores" if total else "")
    if args.json:
        print(json.dumps({"tree": str(args.tree), "sales": args.sales, "delay_ms": args.delay_ms, "batch": args.batch,
                          "clients": args.clients, "results": results}))
    return 0


def profile_child(out: str, argv: list[str]) -> int:
    """``--profile-child OUT PYTHON -m meshpos.cli.main ARGS``: run that command in this process
    under cProfile and write the profile to OUT.<pid> when it ends (SIGTERM ends a switch cleanly)."""
    import cProfile
    import runpy

    sys.argv = ["meshpos", *argv[3:]]
    sys.path.insert(0, os.getcwd())  # the meshpos of --tree, as for a child run without --profile
    prof = cProfile.Profile()
    code = 0
    prof.enable()
    try:
        runpy.run_module(argv[2], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        prof.disable()
        prof.dump_stats(f"{out}.{os.getpid()}")
    return code


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--profile-child":
        raise SystemExit(profile_child(sys.argv[2], sys.argv[3:]))
    raise SystemExit(main())
