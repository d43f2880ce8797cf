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
"""

from __future__ import annotations

import argparse
import json
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


def one_run(root: Path, cluster: PgCluster | None, config: str, args: argparse.Namespace) -> float:
    backend, n = CONFIGS[config]
    procs = ProcessGroup(root / "logs")
    try:
        db = cluster.new_database("bench") if backend == "postgresql" and cluster else None
        twice = args.twice and n > 1
        inst = Instances.create(root, procs, db, n, delay_ms=args.delay_ms, policy=POLICY,
                                acquirer_connections=args.acquirer_connections, stats=twice)
        batches, core = prepare(inst, args.sales, args.terminals, args.batch)
        try:
            elapsed, results = trio.run(drive, [inst.url(i) for i in range(n)], core, batches,
                                        args.clients, 2 if twice else 1)
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
    p.add_argument("--twice", action="store_true",
                   help="with 2+ instances, two uplink nodes each send every sale (starting at different "
                        "instances) and the run checks one 0220 per sale at the simulator and identical results")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args()
    cluster = start_cluster(options=()) if any(CONFIGS[c][0] == "postgresql" for c in args.configs) else None
    results: dict[str, dict[str, object]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="meshpos-bench-") as tmp:
            for run in range(args.runs):  # configs interleaved: a noisy minute does not hit one config only
                for config in args.configs:
                    rate = one_run(Path(tmp) / f"{config}-{run}", cluster, config, args)
                    results.setdefault(config, {"runs": []})["runs"].append(rate)  # type: ignore[union-attr]
                    print(f"run {run + 1} {config}: {rate:.0f} sales/s", flush=True)
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
    if args.json:
        print(json.dumps({"sales": args.sales, "delay_ms": args.delay_ms, "batch": args.batch,
                          "clients": args.clients, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
