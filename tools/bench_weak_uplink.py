#!/usr/bin/env python3
"""Forwarding goodput over a weak uplink: queued sales on a node -> tools/weak_link.py (a TCP relay
at --rate-kbit each way, cut for --down-s seconds every --up-s + --down-s) -> HTTPS -> switch ->
ISO 8583 -> the acquirer simulator -> signed results back into the node's ledger.

    python tools/bench_weak_uplink.py                  # 5,000 sales, 256 kbit/s, 10 s drops every 30 s
    python tools/bench_weak_uplink.py --sales 500 --runs 1 --modes gzip

Modes (each run starts from a copy of the same node directory and a fresh switch database):
  gzip    the product: gzip bodies both ways (negotiated), adaptive batches, resumed batches
  plain   the same without compression (no Content-Encoding, no Accept-Encoding)
  fixed   plain, with batches of a fixed 200 sales (the forwarder before adaptive batches)
The node runs the product's forwarding loop (run_forwarder: two workers, its back-off); the switch
and the simulator run in a child process (tools/bench_forwarding.py). Goodput = sales settled per
second from the first attempt to the last sale settled on the node; also the request bytes per
sale that went onto the link (every attempt, cut or not), and the sales each run's acquirer was
advised of more than once (must be 0).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forwarding import prepare, switch_process  # noqa: E402
from meshpos.infra.clock import SYSTEM_CLOCK  # noqa: E402
from meshpos.node.core import NodeCore  # noqa: E402
from meshpos.uplink.batching import BatchSizer  # noqa: E402
from meshpos.uplink.forwarder import BATCH_SALES, Forwarder, HttpsTransport, run_forwarder  # noqa: E402

MODES = ("gzip", "plain", "fixed")


def start_relay(target_port: int, args: argparse.Namespace) -> tuple["subprocess.Popen[str]", str]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "weak_link.py"),
                             "--target", f"127.0.0.1:{target_port}", "--rate-kbit", str(args.rate_kbit),
                             "--up-s", str(args.up_s), "--down-s", str(args.down_s)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"weak_link.py did not start: {line!r}")
    return proc, line.split()[-1]


async def forward_all(node: Path, url: str, n_sales: int, mode: str, limit_s: float) -> dict[str, Any]:
    core = NodeCore.open(node)
    transport = HttpsTransport(core, switch_url=url, compress=(mode == "gzip"))
    try:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            fwd: Forwarder = await nursery.start(lambda task_status: run_forwarder(
                core, SYSTEM_CLOCK, lambda: True, transport=transport, task_status=task_status))
            if mode == "fixed":
                fwd.sizer = BatchSizer(maximum=BATCH_SALES, start=BATCH_SALES, minimum=BATCH_SALES)
            with trio.move_on_after(limit_s):
                while core.store.to_forward(SYSTEM_CLOCK.now_ms()):
                    await trio.sleep(0.25)
            nursery.cancel_scope.cancel()
        elapsed = time.perf_counter() - t0
        settled = sum(1 for s in core.sales() if s["status"] in ("approved", "declined"))
        return {"mode": mode, "seconds": elapsed, "settled": settled, "goodput": settled / elapsed,
                "request_bytes_per_sale": transport.body_bytes / n_sales, "requests": transport.requests}
    finally:
        core.close()


def one_run(root: Path, template: Path, node_template: Path, args: argparse.Namespace, mode: str,
            run: int) -> dict[str, Any]:
    switch_dir = root / f"switch-{mode}-{run}"
    node = root / f"forwarder-{mode}-{run}"
    shutil.copytree(template, switch_dir)
    shutil.copytree(node_template, node)
    (node / "node.lock").unlink(missing_ok=True)
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=switch_process, args=(switch_dir, args.delay_ms, child), daemon=True)
    proc.start()
    relay = None
    try:
        port = parent.recv()
        relay, hostport = start_relay(port, args)
        result = trio.run(forward_all, node, f"https://{hostport}", args.sales, mode, args.limit_s)
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=10)
        proc.terminate()
        proc.join()
    result["advised_twice"] = advised_twice(switch_dir)
    return result


def advised_twice(switch_dir: Path) -> int:
    """Sales the switch advised to the acquirer more than once (its store counts advice attempts:
    the first is the 0220, any further one a 0221 repeat); 0 means one advice per sale."""
    import sqlite3
    db = next(switch_dir.glob("*.db"))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM sales WHERE attempts > 1").fetchone()[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sales", type=int, default=5000, help="queued sales (default 5000)")
    p.add_argument("--rate-kbit", type=float, default=256.0, help="link throughput each way (default 256)")
    p.add_argument("--up-s", type=float, default=20.0, help="seconds up in each cycle (default 20)")
    p.add_argument("--down-s", type=float, default=10.0, help="seconds down in each cycle (default 10)")
    p.add_argument("--delay-ms", type=int, default=50, help="acquirer answer delay (default 50)")
    p.add_argument("--runs", type=int, default=3, help="runs per mode; medians reported (default 3)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default all)")
    p.add_argument("--limit-s", type=float, default=1800.0, help="give a run up after this long (default 1800)")
    p.add_argument("--terminals", type=int, default=4, help="terminals the sales come from (default 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes takes {', '.join(MODES)}")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="meshpos-bench-weak-") as tmp:
        root = Path(tmp)
        template, nodes = prepare(root, args.sales, args.terminals)
        for run in range(args.runs):  # modes interleaved, so a slow spell of the host hits all alike
            for mode in modes:
                r = one_run(root, template, nodes[0], args, mode, run)
                results[mode].append(r)
                print(f"run {run + 1} {mode:>5}: {r['settled']}/{args.sales} settled in {r['seconds']:.1f} s = "
                      f"{r['goodput']:.1f} sales/s, {r['request_bytes_per_sale']:.0f} request bytes/sale, "
                      f"{r['requests']} requests, {r['advised_twice']} advised twice", flush=True)
    print(f"\n{args.sales} sales, {args.rate_kbit:g} kbit/s each way, down {args.down_s:g} s every "
          f"{args.up_s + args.down_s:g} s, acquirer {args.delay_ms} ms; medians of {args.runs} runs")
    print(f"    {'mode':>6} {'sales/s':>9} {'s':>8} {'req B/sale':>11} {'requests':>9} {'advised twice':>14}")
    summary = {}
    for mode in modes:
        rs = results[mode]
        med = {k: statistics.median(r[k] for r in rs) for k in ("goodput", "seconds", "request_bytes_per_sale",
                                                                  "requests")}
        med["advised_twice"] = max(r["advised_twice"] for r in rs)
        med["all_settled"] = all(r["settled"] == args.sales for r in rs)
        summary[mode] = med
        print(f"    {mode:>6} {med['goodput']:>9.1f} {med['seconds']:>8.1f} {med['request_bytes_per_sale']:>11.0f} "
              f"{med['requests']:>9.0f} {med['advised_twice']:>14}")
    if args.json:
        print(json.dumps({"args": vars(args), "summary": summary, "runs": results}))
    ok = all(s["all_settled"] and s["advised_twice"] == 0 for s in summary.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
