#!/usr/bin/env python3
"""Forwarding throughput, end to end: queued sales on a node -> HTTPS -> switch -> ISO 8583 ->
the acquirer simulator (answering after --delay-ms) -> signed results -> back into the node's ledger.

    python tools/bench_forwarding.py                 # 10,000 sales, 50 ms acquirer, median of 3 runs
    python tools/bench_forwarding.py --sales 2000 --runs 1

Each run starts from a copy of the same node directory (the sales are made once) and a fresh
switch database. Everything runs on 127.0.0.1; by default the simulator and the switch run in
one process and the node's forwarder in this one (--one-process puts all three in this one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshpos.acquirer.iso8583_link import open_iso8583_link  # noqa: E402
from meshpos.acquirer.simulator import SimRules, serve_simulator  # noqa: E402
from meshpos.infra.clock import SYSTEM_CLOCK  # noqa: E402
from meshpos.identity import keys  # noqa: E402
from meshpos.node.core import NodeCore  # noqa: E402
from meshpos.node.enroll import enroll_one_step  # noqa: E402
from meshpos.site.sitedir import init_site  # noqa: E402
from meshpos.switch.processor import Switch  # noqa: E402
from meshpos.switch.service import SwitchService, serve_switch  # noqa: E402
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch  # noqa: E402
from meshpos.switch.tls import server_context  # noqa: E402
from meshpos.uplink.forwarder import Forwarder, HttpsTransport  # noqa: E402

PANS = ("4111111111111111", "5555555555554444")


def prepare(root: Path, n_sales: int, terminals: int) -> tuple[Path, list[Path]]:
    key = keys.generate()
    switch_dir = root / "switch-template"
    init_switch(switch_dir, "127.0.0.1:0", "127.0.0.1:1", key=key)
    site = init_site(root / "site", "Bench", switch_key=keys.x25519_public_of(key).hex(),
                     switch_url="https://127.0.0.1:9")
    site.update_policy(max_terminal_pending_minor=10**11, max_site_pending_minor=10**12)
    add_site(switch_dir, site.path)
    nodes = []
    for t in range(terminals):
        path = root / f"node{t}"
        enroll_one_step(site, path, "terminal", f"t{t}")
        nodes.append(path)
    cores = [NodeCore.open(p) for p in nodes]
    for core in cores:
        core.ingest(site.policy_envelope(), "bench")
    t0 = time.perf_counter()
    for i in range(n_sales):
        core = cores[i % terminals]
        core.sell(100 + i % 900, card=core.seal_card(PANS[i % 2], "1228", "contactless"))
    # the forwarding node holds the whole site's ledger, as replication would leave it
    first = cores[0]
    for other in cores[1:]:
        for type_ in ("cert", "sale"):
            for raw in other.store.entries_of_type(type_):
                first.ingest(raw, "peer")
    print(f"prepared {n_sales} sales on {terminals} terminals in {time.perf_counter() - t0:.1f} s", flush=True)
    for core in cores:
        core.close()
    return switch_dir, nodes


async def serve(switch_dir: Path, delay_ms: int, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                ) -> None:
    sd = SwitchDir(switch_dir)
    store = sd.open_store()
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(lambda task_status: serve_simulator(
            SimRules(seed=1, delay_ms=delay_ms), "127.0.0.1", 0, task_status=task_status))
        async with open_iso8583_link("127.0.0.1", sim.port) as link:
            switch = Switch(store, sd.key(), link, SYSTEM_CLOCK)
            ctx = server_context(sd.tls_path, sd.key_path, [s.ca_pem for s in store.sites()])
            port = await nursery.start(serve_switch, SwitchService(switch, ctx), "127.0.0.1", 0)
            task_status.started(port)
            await trio.sleep_forever()


def switch_process(switch_dir: Path, delay_ms: int, conn: "multiprocessing.connection.Connection") -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, switch_dir, delay_ms)
            conn.send(port)
    trio.run(main)


async def forward_all(node: Path, url: str, n_sales: int) -> float:
    core = NodeCore.open(node)
    try:
        fwd = Forwarder(core, SYSTEM_CLOCK, HttpsTransport(core, switch_url=url))
        t0 = time.perf_counter()
        await fwd.drain()
        elapsed = time.perf_counter() - t0
        settled = sum(1 for s in core.sales() if s["status"] in ("approved", "declined"))
        if settled != n_sales:
            raise SystemExit(f"only {settled} of {n_sales} sales settled")
        return elapsed
    finally:
        core.close()


def one_run(root: Path, template: Path, node_template: Path, n_sales: int, delay_ms: int, run: int,
            one_process: bool) -> float:
    switch_dir = root / f"switch{run}"
    node = root / f"forwarder{run}"
    shutil.copytree(template, switch_dir)
    shutil.copytree(node_template, node)
    (node / "node.lock").unlink(missing_ok=True)
    if one_process:
        async def main() -> float:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, switch_dir, delay_ms)
                elapsed = await forward_all(node, f"https://127.0.0.1:{port}", n_sales)
                nursery.cancel_scope.cancel()
                return elapsed
        return trio.run(main)
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=switch_process, args=(switch_dir, delay_ms, child), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        return trio.run(forward_all, node, f"https://127.0.0.1:{port}", n_sales)
    finally:
        proc.terminate()
        proc.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sales", type=int, default=10_000)
    p.add_argument("--delay-ms", type=int, default=50, help="acquirer answer delay (default 50)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--terminals", type=int, default=4)
    p.add_argument("--one-process", action="store_true", help="switch, simulator and forwarder in one process")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshpos-bench-") as tmp:
        root = Path(tmp)
        template, nodes = prepare(root, args.sales, args.terminals)
        rates = []
        for run in range(args.runs):
            elapsed = one_run(root, template, nodes[0], args.sales, args.delay_ms, run, args.one_process)
            rates.append(args.sales / elapsed)
            print(f"run {run + 1}: {args.sales} sales in {elapsed:.2f} s = {rates[-1]:.0f} sales/s", flush=True)
        print(f"median: {statistics.median(rates):.0f} sales/s end to end "
              f"({args.sales} sales, acquirer delay {args.delay_ms} ms, {args.runs} runs)")
        if args.json:
            print(json.dumps({"sales_per_s": statistics.median(rates), "runs": rates, "sales": args.sales,
                              "delay_ms": args.delay_ms, "terminals": args.terminals}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
