#!/usr/bin/env python3
"""Benchmark: a fresh node joins, over a real TLS link on loopback, a peer holding N sales.

Two `meshpos run` processes on 127.0.0.1: the source (its ledger built beforehand with N signed
sales through the real envelope and ledger code) and a freshly enrolled node whose only static
peer is the source. Measured: wall time from starting the fresh node until its store holds every
entry of the source (polled read-only from its SQLite file every 50 ms), and the bytes the
source sent on that link (its link health). Median of --runs runs (a new fresh node each time).

    python tools/bench_join.py [--sales 100000] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import Seller  # noqa: E402

from meshpos.node.memnode import SimNode, make_site, wall_clock  # noqa: E402
from meshpos.node import client  # noqa: E402
from meshpos.node.enroll import enroll_one_step  # noqa: E402
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for  # noqa: E402


def entry_count(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="meshpos-join-"))
    site = make_site(root / "site")
    port = free_ports(1)[0]
    source_dir = root / "source"
    enroll_one_step(site, source_dir, "terminal", "source", listen=f"127.0.0.1:{port}")
    t = time.perf_counter()
    node = SimNode.open(source_dir, wall_clock())
    seller = Seller(node)
    seller.sell_many(args.sales, node.core.ledger)
    total = node.core.store.entry_count()
    raw_bytes = sum(len(r) for (r,) in node.core.store.conn.execute("SELECT raw FROM entries"))
    node.close()
    print(f"built {args.sales} sales ({total} entries, {raw_bytes:,} raw bytes) in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)
    procs = ProcessGroup(root / "logs")
    walls, sent = [], []
    try:
        procs.start_node("source", source_dir, "--no-mdns")
        for k in range(args.runs):
            fresh = root / f"fresh{k}"
            enroll_one_step(site, fresh, "terminal", f"fresh{k}", peers=[f"127.0.0.1:{port}"])
            before = {link["peer_node"]: link["bytes_out"] for link in
                      client.running(source_dir).status()["peers"]["links"]}
            t0 = time.perf_counter()
            procs.start(f"fresh{k}", "run", str(fresh), "--no-mdns")
            wait_for(lambda: entry_count(fresh / "meshpos.db") >= total, 600, "the fresh node did not catch up",
                     interval=0.05)
            walls.append(time.perf_counter() - t0)
            links = client.running(source_dir).status()["peers"]["links"]
            fresh_id = client.running(fresh).status()["node_id"]
            sent.append(sum(link["bytes_out"] - before.get(link["peer_node"], 0)
                            for link in links if link["peer_node"] == fresh_id))
            procs.stop(f"fresh{k}")
            print(f"run {k + 1}: {walls[-1]:.2f} s, {sent[-1]:,} bytes", file=sys.stderr)
    finally:
        procs.stop_all()
    result = {"sales": args.sales, "entries": total, "raw_bytes": raw_bytes, "runs": args.runs,
              "join_s": statistics.median(walls), "join_bytes": statistics.median(sent)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"fresh node joins a peer holding {args.sales:,} sales over TLS on loopback: "
              f"{result['join_s']:.2f} s (median of {args.runs}), {result['join_bytes']:,.0f} bytes sent = "
              f"{result['join_bytes'] / raw_bytes:.2f} x raw envelope bytes; goals: <= 10 s, <= 1.5 x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
