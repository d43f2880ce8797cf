#!/usr/bin/env python3
"""Benchmark: the pending totals every sale reads (``Store.pending_by_terminal``, the caps).

A real node database (``Store.open``) gets ``--pending`` unsettled sales of 20 terminals, a third
of them cash (pending too, but in no total), beside ``--settled`` settled ones; the query is timed
with the index this checkout makes (``sales_pending_card``: pending card sales only) and with the
older one (``sales_pending``: every pending sale, the method read from each row), alternating.
Prints the medians over ``--runs`` rounds of ``--reps`` queries each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshpos.ledger.store import Store  # noqa: E402

OLD = ("CREATE INDEX sales_pending ON sales(terminal, created_at, amount_minor)"
       " WHERE result_status IS NULL AND voided_at IS NULL AND refused IS NULL")
NEW = ("CREATE INDEX sales_pending_card ON sales(terminal, created_at, amount_minor)"
       " WHERE result_status IS NULL AND voided_at IS NULL AND refused IS NULL AND method='card'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pending", type=int, default=2000, help="unsettled sales in the window (default 2000)")
    ap.add_argument("--settled", type=int, default=18000, help="settled sales beside them (default 18000)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "meshpos.db", create=True)
        rows = []
        for i in range(args.pending + args.settled):
            rows.append((f"s{i:08d}", f"{rng.randrange(20):016x}", i, 1000 + i, rng.randrange(100, 10000), "EUR",
                         "cash" if rng.random() < 1 / 3 else "card", "approved" if i < args.settled else None))
        with store.transaction():
            store.conn.executemany("INSERT INTO sales(sale_id, terminal, seq, created_at, amount_minor, currency,"
                                   " method, result_status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        figures: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.runs):
            for name, drop, make in (("old", "sales_pending_card", OLD), ("new", "sales_pending", NEW)):
                with store.transaction():
                    store.conn.execute(f"DROP INDEX IF EXISTS {drop}")
                    store.conn.execute(make.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))
                t = time.perf_counter()
                for _ in range(args.reps):
                    totals = store.pending_by_terminal(0, 2**60)
                figures[name].append((time.perf_counter() - t) / args.reps * 1e3)
        store.close()
    assert len(totals) == 20
    for name, label in (("old", "every pending sale (older index)"), ("new", "pending card sales (this index)")):
        print(f"{label}: median {statistics.median(figures[name]):.3f} ms per query "
              f"(runs {', '.join(f'{v:.3f}' for v in figures[name])})")


if __name__ == "__main__":
    main()
