#!/usr/bin/env python3
"""A 200-terminal fair in a deterministic simulation (meshpos.apps.sitesim): the real ledger,
sync sessions, link protocol, planner, forwarder and switch processor; a simulated network
(latency, TCP-style loss, connection resets, partitions) and clock; node restarts. Seeded.

    TMPDIR=/dev/shm python tools/bench_site_sim.py                  # 200 terminals, 180 s of selling
    python tools/bench_site_sim.py --terminals 50 --seconds 60 --runs 1 --json

Every node's SQLite store commits with synchronous=FULL as in the product; on a disk each of the
N x sales commits waits for an fsync, so put the work directory on a tmpfs (TMPDIR) unless the
fsync cost is what you want to see. It reports, per run and as medians over --runs seeds:
convergence after the heal, sale -> every node p50/p99 (sales untouched by faults), frames and
bytes per sale per node, replication CPU per sale per node (and the whole run's CPU), RSS and
database size per node. A run whose guarantees fail (an acknowledged sale missing on a node after
the heal, ledgers that differ, a card sale without exactly one 0220) exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys

from meshpos.apps.sitesim import GuaranteeBroken, SiteSim, SiteSimConfig, SiteSimReport

FIELDS = (
    ("sales", "sales acknowledged", "{:.0f}"),
    ("links", "links planned", "{:.0f}"),
    ("convergence_s", "heal -> every sale on every node, s", "{:.2f}"),
    ("settled_s", "heal -> every sale settled everywhere, s", "{:.2f}"),
    ("propagation_p50_s", "sale -> every node p50, s (no fault)", "{:.3f}"),
    ("propagation_p99_s", "sale -> every node p99, s (no fault)", "{:.3f}"),
    ("propagation_all_p99_s", "sale -> every node p99, s (all)", "{:.2f}"),
    ("frames_per_sale_per_node", "frames per sale per node", "{:.1f}"),
    ("push_copies_per_sale_per_node", "changes received in PUSH frames per sale per node", "{:.2f}"),
    ("bytes_per_sale_per_node", "bytes per sale per node", "{:.0f}"),
    ("cpu_ms_per_sale_per_node", "replication CPU ms per sale per node", "{:.2f}"),
    ("cpu_total_ms_per_sale_per_node", "whole-run CPU ms per sale per node", "{:.2f}"),
    ("rss_mb_per_node", "RSS MB per node (first run)", "{:.2f}"),
    ("db_mb_per_node", "SQLite MB per node", "{:.2f}"),
    ("resets", "connection resets", "{:.0f}"),
    ("restarts", "node restarts", "{:.0f}"),
    ("advices_0220", "0220 advices", "{:.0f}"),
    ("repeats_0221", "0221 repeats", "{:.0f}"),
    ("wall_s", "wall s", "{:.0f}"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--terminals", type=int, default=200, help="terminals on the site (default 200)")
    ap.add_argument("--seconds", type=float, default=180.0, help="seconds of selling (simulated; default 180)")
    ap.add_argument("--sale-interval", type=float, default=60.0,
                    help="mean seconds between two sales of one terminal (default 60)")
    ap.add_argument("--loss", type=float, default=0.05, help="share of writes lost once (default 0.05)")
    ap.add_argument("--resets", type=float, default=2.0, help="connection resets per link per hour (default 2)")
    ap.add_argument("--partitions", type=int, default=2, help="partitions during the run (default 2)")
    ap.add_argument("--restarts", type=int, default=4, help="node restarts during the run (default 4)")
    ap.add_argument("--uplinks", type=int, default=2, help="terminals that forward to the switch (default 2)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the first run; run k uses seed+k (default 1)")
    ap.add_argument("--runs", type=int, default=3, help="runs with successive seeds; medians reported (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object after the table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    reports: list[SiteSimReport] = []
    for k in range(args.runs):
        cfg = SiteSimConfig(terminals=args.terminals, seed=args.seed + k, duration_s=args.seconds,
                            sale_interval_s=args.sale_interval, loss=args.loss, resets_per_link_hour=args.resets,
                            partitions=args.partitions, restarts=args.restarts, uplinks=args.uplinks)
        sim = SiteSim(cfg)
        try:
            reports.append(sim.run())
        except GuaranteeBroken as exc:
            print(f"run {k} (seed {cfg.seed}): GUARANTEE BROKEN: {exc}", file=sys.stderr)
            return 1
        finally:
            sim.close()
        print(f"run {k} (seed {cfg.seed}) done in {reports[-1].wall_s:.0f} s", flush=True)
        if args.json:  # each run as it ends: a long benchmark cut short still leaves its figures
            print(json.dumps({"run": k, **reports[-1].as_dict()}), flush=True)
    print(f"\n{args.terminals} terminals, {args.seconds:g} s of selling, one sale per terminal every "
          f"{args.sale_interval:g} s on average, loss {args.loss:g}, {args.resets:g} resets/link/h, "
          f"{args.partitions} partitions, {args.restarts} restarts, {args.uplinks} uplinks; {args.runs} runs")
    print(f"    {'':42} {'median':>10} " + " ".join(f"{'run ' + str(k):>10}" for k in range(len(reports))))
    medians: dict[str, float] = {}
    for key, label, fmt in FIELDS:
        values = [float(getattr(r, key) if getattr(r, key) is not None else float("nan")) for r in reports]
        if key == "rss_mb_per_node":  # later runs reuse the memory the first one freed: only its delta counts
            values = values[:1] + [float("nan")] * (len(values) - 1)
        medians[key] = statistics.median([v for v in values if v == v] or [float("nan")])
        print(f"    {label:42} {fmt.format(medians[key]):>10} " + " ".join(f"{fmt.format(v):>10}" for v in values))
    print("    guarantees held in every run: every acknowledged sale on every node, identical ledgers, "
          "one 0220 per card sale")
    if args.json:
        print(json.dumps({"medians": medians, "runs": [r.as_dict() for r in reports]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
