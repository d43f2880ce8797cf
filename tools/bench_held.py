#!/usr/bin/env python3
"""Benchmark: what the held vector (issue 14, part 3) costs a node.

* rebuild: ``Store.held_marks()`` (run whenever the ledger loads) on a store holding
  --sales sales of --terminals terminals, beside one full read of the sales view
  (what ``meshpos status`` does on every call) on the same store;
* bookkeeping: ``Holdings.add`` per accepted sale (arrival order shuffled per terminal
  window, so gaps open and close), beside a durable sale commit (``NodeCore.sell``,
  cash) on a fresh node in the same run;
* status: the encoded ``held`` of --terminals terminals, in bytes.

Medians over --runs runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from meshpos.ledger.holdings import Holdings
from meshpos.ledger.store import Store
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.site.sitedir import init_site
from meshpos.wire import heldvec


def fill(store: Store, terminals: list[str], sales: int) -> None:
    with store.transaction():
        for i in range(sales):
            terminal = terminals[i % len(terminals)]
            seq = i // len(terminals) + 1
            store.insert_sale({"sale_id": f"{terminal}-{seq:08d}", "terminal": terminal, "seq": seq,
                               "created_at": 1_800_000_000_000 + i, "amount_minor": 100, "currency": "EUR",
                               "method": "cash", "card": None, "description": None})


def one_run(sales: int, n_terminals: int, commits: int) -> dict[str, float]:
    rng = random.Random(1)
    terminals = [f"{rng.getrandbits(64):016x}" for _ in range(n_terminals)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = Store.open(root / "bench.db", create=True)
        try:
            fill(store, terminals, sales)
            t = time.perf_counter()
            marks, ahead = store.held_marks()
            rebuild_ms = (time.perf_counter() - t) * 1000
            assert len(marks) == n_terminals and not ahead
            t = time.perf_counter()
            store.sales()
            read_ms = (time.perf_counter() - t) * 1000
        finally:
            store.close()
        arrivals = [(terminals[i % n_terminals], i // n_terminals + 1) for i in range(sales)]
        for k in range(0, len(arrivals), 64):  # out of order within windows of 64: gaps open and close
            window = arrivals[k:k + 64]
            rng.shuffle(window)
            arrivals[k:k + 64] = window
        holdings = Holdings()
        t = time.perf_counter()
        for terminal, seq in arrivals:
            holdings.add(terminal, seq)
        add_us = (time.perf_counter() - t) / sales * 1e6
        assert sum(holdings.vector().values()) == sales
        held_bytes = len(heldvec.encode(holdings.vector()))

        site = init_site(root / "site", "Bench")
        enroll_one_step(site, root / "t1", "terminal", "T1")
        core = NodeCore.open(root / "t1")
        lat = []
        try:
            for i in range(commits):
                t = time.perf_counter()
                core.sell(100 + i)
                lat.append(time.perf_counter() - t)
        finally:
            core.close()
    return {"rebuild_ms": rebuild_ms, "sales_read_ms": read_ms, "add_us": add_us,
            "sale_commit_us": statistics.median(lat) * 1e6, "held_bytes": held_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=100_000)
    ap.add_argument("--terminals", type=int, default=200)
    ap.add_argument("--commits", type=int, default=300, help="durable sale commits for the baseline")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    runs = [one_run(args.sales, args.terminals, args.commits) for _ in range(args.runs)]
    out = {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
    out.update(sales=args.sales, terminals=args.terminals, runs=args.runs)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
