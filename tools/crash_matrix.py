#!/usr/bin/env python3
"""Crash matrix: SIGKILL node processes and the switch at random points of a running fair.

    python tools/crash_matrix.py --kills 300 --seed 7 [--out DIR] [--terminals 3]

A whole site on loopback, as ``meshpos demo`` builds it (acquirer simulator, switch, a gateway
and N terminals as ``meshpos run`` processes with real TLS links). Each kill is one of:

  sale         a terminal in the middle of a sales burst
  sync         a node while sales just taken elsewhere replicate to it
  compaction   a terminal in a burst long enough to compact a shard (snapshot every 64 chunks)
  forwarding   the uplink node while it forwards the site's queue to the switch
  switch       the switch while it processes a batch (its group commit of "received",
               "advice sent", "settled"), with card sales in flight

and every killed process is restarted at once. After each kill: every sale the killed terminal
had acknowledged is on it again. At the end, once the mesh is whole and one node has an uplink:
every acknowledged sale is on every node and settled, the ledgers (the set of (key, bytes) of
verified entries) are identical on every node, and the acquirer saw each card sale advised
once (one 0220; repeats only as 0221). Prints the figures; exit 1 on any loss or double advice.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshpos.apps.demo import CARDS, FINAL, Demo
from meshpos.domain.errors import MeshposError
from meshpos.node import client
from meshpos.apps.procs import wait_for

KINDS = ("sale", "sync", "compaction", "forwarding", "switch")


def read_entries(node_dir: Path) -> frozenset[tuple[str, bytes]]:
    """The node's verified entries, (key, bytes), read beside a running node (WAL readers)."""
    conn = sqlite3.connect(f"file:{node_dir / 'meshpos.db'}?mode=ro", uri=True)
    try:
        return frozenset((str(k), bytes(r)) for k, r in conn.execute("SELECT key, raw FROM entries"))
    finally:
        conn.close()


def advice_counts(stats_path: Path) -> tuple[list[str], int, int]:
    """From the acquirer simulator's stats file: (sales with more than one 0220, sales advised at
    all, 0221 repeats)."""
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"by_sale": {}}
    by_sale: dict[str, dict[str, int]] = stats["by_sale"]
    double = [rrn for rrn, c in by_sale.items() if c.get("0220", 0) > 1]
    advised = sum(1 for c in by_sale.values() if c.get("0220", 0) + c.get("0221", 0) > 0)
    return double, advised, sum(c.get("0221", 0) for c in by_sale.values())


@dataclass
class Report:
    kills: Counter[str] = field(default_factory=Counter)
    sales: int = 0  # acknowledged
    sales_in_ledger: int = 0  # acknowledged, and committed before a kill cut the acknowledgement
    card_sales: int = 0
    lost_after_kill: list[str] = field(default_factory=list)
    lost_at_end: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    ledgers_identical: bool = False
    ledger_entries: int = 0
    double_0220: list[str] = field(default_factory=list)
    advised: int = 0
    repeats_0221: int = 0
    seconds: float = 0.0

    @property
    def losses(self) -> int:
        return len(self.lost_after_kill) + len(self.lost_at_end)

    @property
    def ok(self) -> bool:
        return (not self.losses and not self.unsettled and self.ledgers_identical and not self.double_0220
                and self.advised == self.card_sales)

    def to_json(self) -> dict[str, Any]:
        return {"kills": dict(self.kills), "kills_total": sum(self.kills.values()), "sales": self.sales,
                "sales_in_ledger": self.sales_in_ledger, "card_sales": self.card_sales, "losses": self.losses, "lost_after_kill": self.lost_after_kill[:10],
                "lost_at_end": self.lost_at_end[:10], "unsettled": self.unsettled[:10],
                "ledgers_identical": self.ledgers_identical, "ledger_entries": self.ledger_entries,
                "double_0220": self.double_0220[:10], "advised": self.advised, "repeats_0221": self.repeats_0221,
                "seconds": round(self.seconds, 1), "ok": self.ok}


class Matrix:
    def __init__(self, out: Path, terminals: int, seed: int, verbose: bool = True) -> None:
        self.demo = Demo(out, terminals, 0, write=lambda line: None, quiet=True)
        self.rnd = random.Random(seed)
        self.report = Report()
        self.verbose = verbose
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"[{time.monotonic() - self.demo.t0:6.1f}s] {text}", flush=True)

    @property
    def terminals(self) -> list[str]:
        return [n for n in self.demo.nodes if n != "gateway"]

    def sell_one(self, name: str) -> str | None:
        pan = self.rnd.choice((None, CARDS[0], CARDS[1]))
        try:
            sale = self.demo.sell(name, self.rnd.randint(100, 5000), pan)
        except (MeshposError, OSError):
            return None
        return str(sale["id"])

    def burst(self, name: str, count: int, acked: list[str], stop: threading.Event) -> None:
        for _ in range(count):
            if stop.is_set():
                return
            sale_id = self.sell_one(name)
            if sale_id is None:
                return
            acked.append(sale_id)

    def restart(self, name: str) -> None:
        if name == "switch":
            self.demo.procs.start("switch", "switch", "run", str(self.demo.out / "switch"))
            return
        self.demo.procs.start_node(name, self.demo.nodes[name], "--no-mdns")

    def kill(self, name: str) -> None:
        self.demo.procs.kill(name, signal.SIGKILL)

    def check_own(self, name: str, acked: list[str]) -> None:
        held = {s["id"] for s in client.running(self.demo.nodes[name]).sales()}
        lost = [s for s in acked if s not in held]
        if lost:
            self.say(f"LOST after kill of {name}: {lost[:5]}")
            self.report.lost_after_kill += lost

    def kill_during_burst(self, name: str, count: int) -> None:
        acked: list[str] = []
        stop = threading.Event()
        seller = threading.Thread(target=self.burst, args=(name, count, acked, stop))
        seller.start()
        time.sleep(self.rnd.uniform(0.05, 0.6))
        self.kill(name)
        stop.set()
        seller.join(timeout=60)
        self.restart(name)
        self.check_own(name, acked)

    def uplink(self, name: str, on: bool) -> None:
        client.running(self.demo.nodes[name]).uplink(on)

    def one(self, kind: str) -> None:
        rnd = self.rnd
        if kind == "sale":
            self.kill_during_burst(rnd.choice(self.terminals), 40)
        elif kind == "compaction":
            self.kill_during_burst(rnd.choice(self.terminals), 90)
        elif kind == "sync":
            seller = rnd.choice(self.terminals)
            victim = rnd.choice([n for n in self.demo.nodes if n != seller])
            for _ in range(rnd.randint(3, 12)):
                self.sell_one(seller)
            time.sleep(rnd.uniform(0.0, 0.3))
            self.kill(victim)
            self.restart(victim)
        elif kind == "forwarding":
            node = rnd.choice(self.terminals)
            for _ in range(rnd.randint(2, 6)):
                self.sell_one(rnd.choice(self.terminals))
            self.uplink(node, True)
            time.sleep(rnd.uniform(0.05, 1.5))
            self.kill(node)
            self.restart(node)
            self.uplink(node, False)
        elif kind == "switch":
            node = rnd.choice(self.terminals)
            self.uplink(node, True)
            for _ in range(rnd.randint(3, 10)):
                self.sell_one(rnd.choice(self.terminals))
            time.sleep(rnd.uniform(0.05, 1.0))
            self.kill("switch")
            self.restart("switch")
            self.uplink(node, False)
        self.report.kills[kind] += 1

    # -- the end ------------------------------------------------------------------------

    def finish(self, settle_timeout: float) -> None:
        demo = self.demo
        expected = set(demo.expected)
        self.report.sales = len(expected)
        uplink_node = self.terminals[-1]
        self.uplink(uplink_node, True)

        def settled() -> bool:
            views = demo._views()
            every = set(expected).union(*views.values())
            return all(v.get(sid, {}).get("status") in FINAL for v in views.values() for sid in every)

        try:
            wait_for(settled, settle_timeout, "not every sale settled on every node", interval=1.0)
        except MeshposError as exc:
            self.say(str(exc))
        views = demo._views()
        # sales committed while their acknowledgement was cut by a kill are real sales too: the
        # acquirer must see every card sale the ledger holds, once
        everything = {sid: sale for view in views.values() for sid, sale in view.items()}
        self.report.sales_in_ledger = len(everything)
        self.report.card_sales = sum(1 for s in everything.values() if s["method"] == "card")
        for name, view in views.items():
            self.report.lost_at_end += [f"{name}:{sid}" for sid in expected if sid not in view]
            self.report.unsettled += [f"{name}:{sid}" for sid in everything
                                      if sid in view and view[sid]["status"] not in FINAL]

        def identical() -> bool:
            sets = [read_entries(p) for p in demo.nodes.values()]
            self.report.ledger_entries = len(sets[0])
            return all(s == sets[0] for s in sets)

        try:
            wait_for(identical, 60, "ledgers differ", interval=1.0)
            self.report.ledgers_identical = True
        except MeshposError as exc:
            self.say(str(exc))
        self.report.double_0220, self.report.advised, self.report.repeats_0221 = advice_counts(demo.stats)

    def top_up(self, min_sales: int, min_cards: int) -> None:
        """Sell until the fair holds at least this many sales and card sales: how many a burst
        takes before its kill depends on the host's speed, the checks' scope must not."""
        for _ in range(4 * (min_sales + min_cards)):
            sales = list(self.demo.expected.values())
            if len(sales) >= min_sales and sum(1 for s in sales if s["method"] == "card") >= min_cards:
                return
            self.sell_one(self.rnd.choice(self.terminals))

    def run(self, kills: int, settle_timeout: float = 240.0, min_sales: int = 0, min_cards: int = 0) -> Report:
        demo = self.demo
        start = time.monotonic()
        try:
            demo.setup()
            demo.start_all()
            for name in self.terminals:  # a few sales everywhere before the first kill
                for _ in range(3):
                    self.sell_one(name)
            for k in range(kills):
                kind = KINDS[k] if k < len(KINDS) else self.rnd.choice(KINDS)
                self.one(kind)
                self.say(f"kill {k + 1}/{kills} ({kind}): {len(demo.expected)} sales acknowledged so far, "
                         f"{self.report.losses} lost")
            self.top_up(min_sales, min_cards)
            self.finish(settle_timeout)
        finally:
            self.report.seconds = time.monotonic() - start
            demo.procs.stop_all()
        return self.report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--terminals", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("crash-matrix-out"))
    ap.add_argument("--json", action="store_true", help="print the report as JSON only")
    args = ap.parse_args()
    if args.out.exists():
        import shutil
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    matrix = Matrix(args.out, args.terminals, args.seed, verbose=not args.json)
    report = matrix.run(args.kills)
    print(json.dumps(report.to_json(), indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
