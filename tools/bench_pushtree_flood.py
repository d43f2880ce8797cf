#!/usr/bin/env python3
"""CPU a node spends on push-tree timers while one peer announces made-up change hashes.

    python tools/bench_pushtree_flood.py [--rate 32768] [--seconds 3] [--runs 5] [--json]
    python tools/bench_pushtree_flood.py --pushtree OTHER/pushtree.py   # another version, for a baseline

A hostile (enrolled, authenticated) peer sends IHAVE frames naming hashes nobody has, ``--rate``
per second, evenly spread; the node keeps at most WANTED_LIMIT of them awaited. The node's driver
runs the tree's timers at every deadline, as a link's driver does (``next_deadline`` then
``due``). Printed: CPU seconds spent per second of flood (median of the runs); above 1.0 the
node's event loop cannot keep up, and everything else on it (links, the terminal API) starves.
Pure computation: no network, one process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType


def load(path: str | None) -> ModuleType:
    if path is None:
        from meshpos.replication import pushtree
        return pushtree
    spec = importlib.util.spec_from_file_location("pushtree_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def one_run(module: ModuleType, rate: int, seconds: float) -> float:
    tree = module.PushTree()
    shard = "a" * 16 + "/000000"
    step = 1.0 / rate
    total = int(rate * seconds)
    cpu = 0.0
    sent = 0
    now = 0.0
    while sent < total or tree.next_deadline() != float("inf"):
        deadline = tree.next_deadline()
        arrival = sent * step if sent < total else float("inf")
        now = min(deadline, arrival)
        if now == float("inf"):
            break
        if arrival <= deadline:  # the next announcement comes first
            tree.announced("evil", shard, [sent.to_bytes(32, "big")], arrival)
            sent += 1
            continue
        start = time.process_time()
        tree.next_deadline()
        tree.due(now)
        cpu += time.process_time() - start
    return cpu / max(now, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=32768, help="made-up hashes announced per second (default 32768)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of flood simulated per run (default 3)")
    ap.add_argument("--runs", type=int, default=5, help="runs; the median is reported (default 5)")
    ap.add_argument("--pushtree", metavar="FILE", help="measure this pushtree.py instead of the installed one")
    ap.add_argument("--json", action="store_true", help="one JSON line")
    args = ap.parse_args()
    module = load(args.pushtree)
    figures = [one_run(module, args.rate, args.seconds) for _ in range(args.runs)]
    result = {"bench": "pushtree_flood", "rate": args.rate, "seconds": args.seconds,
              "module": str(Path(args.pushtree)) if args.pushtree else "meshpos.replication.pushtree",
              "cpu_s_per_s": round(statistics.median(figures), 4), "runs": [round(f, 4) for f in figures]}
    print(json.dumps(result) if args.json else
          f"{result['module']}: {result['cpu_s_per_s']:.4f} CPU s per s of flood at {args.rate} hashes/s "
          f"(median of {args.runs}: {result['runs']})")


if __name__ == "__main__":
    main()
