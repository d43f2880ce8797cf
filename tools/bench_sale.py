#!/usr/bin/env python3
"""Benchmark: durable sale commit (sign + seal + SQLite FULL commit + ledger append).

Takes N card sales on a fresh node (default 5,000) through NodeCore.sell and
reports median and p99 of the acknowledgement latency, plus the bare fsync
cost of the same disk for comparison. Median of the per-run figures over
--runs runs.
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

import nacl.signing

from meshpos.identity import keys
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.site.sitedir import init_site


def fsync_cost(directory: Path, n: int = 200) -> float:
    path = directory / "fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 512)
            t = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return statistics.median(times) * 1000


def one_run(sales: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        switch = nacl.signing.SigningKey.generate()
        site = init_site(root / "site", "Bench", switch_key=keys.x25519_public_of(switch).hex())
        enroll_one_step(site, root / "t1", "terminal", "T1")
        core = NodeCore.open(root / "t1")
        site.update_policy(max_terminal_pending_minor=10**12, max_site_pending_minor=10**12)
        core.ingest(site.policy_envelope(), "organizer")  # a signed policy version, as a node takes one
        lat = []
        try:
            for i in range(sales):
                t = time.perf_counter()
                capture = core.seal_card("4111111111111111", "1230", "chip")
                core.sell(100 + i % 900, card=capture)
                lat.append(time.perf_counter() - t)
        finally:
            core.close()
        lat.sort()
        return {"median_ms": statistics.median(lat) * 1000, "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
                "fsync_ms": fsync_cost(root)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = []
    for r in range(args.runs):
        runs.append(one_run(args.sales))
        print(f"run {r + 1}: median {runs[-1]['median_ms']:.2f} ms, p99 {runs[-1]['p99_ms']:.2f} ms, "
              f"fsync {runs[-1]['fsync_ms']:.2f} ms", file=sys.stderr)
    result = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result["sales"] = args.sales
    result["runs"] = args.runs
    if args.json:
        print(json.dumps(result))
    else:
        print(f"durable sale commit over {args.sales} sales (median of {args.runs} runs): "
              f"median {result['median_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms "
              f"(bare fsync {result['fsync_ms']:.2f} ms); goal p99 < 5 ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
