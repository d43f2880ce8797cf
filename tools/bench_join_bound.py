#!/usr/bin/env python3
"""Would sealing full shards bring a fresh node's join within 2 x of plain Automerge? An upper bound.

Sealing (the owning terminal signs a full shard's content hash once, so a joiner checks one
signature per 256 entries instead of one per entry) can save at most the time the joiner spends on
signatures. This measures that bound directly: the same in-memory join over the real link protocol
(tools/bench_sync.py, part a) run three ways, interleaved, each run on a fresh joiner:

* ``base``  - plain Automerge, one document, the same envelopes synced from nothing;
* ``ours``  - meshpos as it is (every signature checked, in the helper process, as on a node);
* ``nosig`` - meshpos with the Ed25519 checks replaced by no-ops (NOT a mode of the product; it
  stands for a perfect sealing design that makes signatures free). Every other rule still runs.

If ``nosig / base`` stays above 2, no design that only amortizes signatures reaches the goal.

Besides wall time, each join's CPU time: this process's (both ends of the link run in it) plus
the signature helper processes' (from /proc), the figure to compare on a shared host, where wall
times swing with the other load.

    python tools/bench_join_bound.py                  # 20,000 sales, 3 rounds
    python tools/bench_join_bound.py --sales 100000 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))

spec = importlib.util.spec_from_file_location("bench_sync", TOOLS / "bench_sync.py")
assert spec is not None and spec.loader is not None
bench_sync: Any = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_sync)

from meshpos.identity import keys, sigcheck  # noqa: E402
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock  # noqa: E402
from meshpos.site import roster  # noqa: E402
from meshpos.wire import envelope  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=20_000, help="sales the joiner fetches (default 20000)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three joins (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.sales < 1 or args.rounds < 1:
        ap.error("--sales and --rounds must be at least 1")
    logging.basicConfig(level=logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="meshpos-bench-join-bound-"))
    real = (roster.Roster._check_sig, roster.Roster.presign)
    try:
        clock = wall_clock()
        site = make_site(root / "site")
        source = SimNode.open(enroll(site, root / "source", "source"), clock)
        seller = bench_sync.Seller(source)
        seller.sell_many(args.sales, source.core.ledger)
        base = bench_sync.Baseline()
        for raw in seller.raw:
            base.add(f"sale/{envelope.decode(raw).body['sale_id']}", raw)
        warm = keys.generate()  # start the helpers now: their start-up is no join's CPU
        assert sigcheck.POOL.submit([(bytes(warm.verify_key), b"x", keys.sign(warm, b"x"))]).valid(0)
        times: dict[str, list[float]] = {"base": [], "ours": [], "nosig": []}
        cpus: dict[str, list[float]] = {"base": [], "ours": [], "nosig": []}
        k = 0
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for mode in ("base", "ours", "nosig"):
                if mode == "base":
                    join: Any = base.join
                else:
                    if mode == "ours":
                        roster.Roster._check_sig, roster.Roster.presign = real  # type: ignore[method-assign]
                    else:
                        roster.Roster._check_sig = lambda self, env, public_key: None  # type: ignore[method-assign]
                        roster.Roster.presign = lambda self, envs: None  # type: ignore[method-assign]
                    k += 1
                    join = lambda k=k: bench_sync.join_over_link(root, site, source, clock, k)  # noqa: E731
                _, wall, cpu = join()
                times[mode].append(wall)
                cpus[mode].append(cpu)
        source.close()
    finally:
        roster.Roster._check_sig, roster.Roster.presign = real  # type: ignore[method-assign]
        shutil.rmtree(root, ignore_errors=True)
    med = {key: statistics.median(v) for key, v in times.items()}
    cpu_med = {key: statistics.median(v) for key, v in cpus.items()}
    out = {"sales": args.sales, "rounds": args.rounds, "median_s": med,
           "runs_s": {key: [round(x, 3) for x in v] for key, v in times.items()},
           "cpu_median_s": cpu_med, "cpu_runs_s": {key: [round(x, 3) for x in v] for key, v in cpus.items()},
           "cpu_ours_over_base": cpu_med["ours"] / cpu_med["base"],
           "cpu_nosig_over_base": cpu_med["nosig"] / cpu_med["base"],
           "ours_over_base": med["ours"] / med["base"], "nosig_over_base": med["nosig"] / med["base"],
           "signature_share": 1 - med["nosig"] / med["ours"]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"join of {args.sales:,} sales, median of {args.rounds} interleaved rounds:")
        for key in ("base", "ours", "nosig"):
            print(f"  {key:6} {med[key]:7.2f} s   runs {out['runs_s'][key]}   "
                  f"CPU {cpu_med[key]:7.2f} s   runs {out['cpu_runs_s'][key]}")
        print(f"  ours / base {out['ours_over_base']:.1f} x; with signatures free {out['nosig_over_base']:.1f} x "
              f"(signatures are {out['signature_share']:.0%} of the join)")
        print(f"  CPU: ours / base {out['cpu_ours_over_base']:.1f} x; with signatures free "
              f"{out['cpu_nosig_over_base']:.1f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
