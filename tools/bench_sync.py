#!/usr/bin/env python3
"""Benchmark the link/sync layer against plain single-document Automerge sync.

(a) a fresh node joins a peer holding N sales over the real link protocol (sessions joined in
    memory, every byte framed as on the wire): bytes on the wire vs raw envelope bytes, wall time;
    beside one unsharded Automerge document with the same envelopes synced from nothing.
(b) CPU per sale propagated over one link with 1k, 10k, 100k sales already in the ledger, beside the
    same single-document baseline. Medians of 3 runs.

    python tools/bench_sync.py [--sales 100000] [--levels 1000,10000,100000] [--per-level 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import automerge.core as am

from meshpos.identity import sigcheck
from meshpos.wire import envelope
from meshpos.replication.memnet import MemNetwork
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock
from meshpos.ledger.ledger import Ledger


class Seller:
    """Appends signed cash sales through the real envelope and ledger code (no policy caps)."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.seq = node.core.store.last_seq(node.core.node_id)
        self.raw: list[bytes] = []

    def sale(self, bulk: bool = False) -> bytes:
        core = self.node.core
        self.seq += 1
        body = {"sale_id": envelope.sale_id(core.node_id, self.seq), "site": core.policy.site_id,
                "terminal": core.node_id, "seq": self.seq, "created_at": core.clock.now_ms(),
                "amount_minor": 100 + self.seq % 900, "currency": core.policy.currency, "method": "cash",
                "description": None, "items": [], "card": None}
        raw = envelope.seal("sale", core.node_id, body, core.key)
        if bulk:
            self.raw.append(raw)
        return raw

    def sell_many(self, n: int, ledger: Ledger) -> None:
        with self.node.core.store.transaction():
            for _ in range(n):
                ledger.write_local(self.sale(bulk=True))


class Baseline:
    """One unsharded Automerge document, one change per sale, plain sync messages."""

    def __init__(self) -> None:
        self.doc = am.Document(b"\x01" * 16)
        self.peer = am.Document(b"\x02" * 16)
        self.s1, self.s2 = am.SyncState(), am.SyncState()

    def add(self, key: str, raw: bytes) -> None:
        with self.doc.transaction() as tx:
            tx.put(am.ROOT, key, am.ScalarType.Bytes, raw)

    @staticmethod
    def sync(a: am.Document, b: am.Document, sa: am.SyncState, sb: am.SyncState) -> int:
        sent = 0
        while True:
            moved = False
            for src, dst, s_src, s_dst in ((a, b, sa, sb), (b, a, sb, sa)):
                msg = src.generate_sync_message(s_src)
                if msg is not None:
                    data = msg.encode()
                    sent += len(data)
                    dst.receive_sync_message(s_dst, am.Message.decode(data))
                    moved = True
            if not moved:
                return sent

    def join(self) -> tuple[int, float, float]:
        """(bytes, wall seconds, CPU seconds) of a fresh document's sync from nothing."""
        fresh = am.Document(b"\x03" * 16)
        cpu = time.process_time()
        t = time.perf_counter()
        sent = self.sync(self.doc, fresh, am.SyncState(), am.SyncState())
        return sent, time.perf_counter() - t, time.process_time() - cpu

    def propagate_cpu(self, raws: list[tuple[str, bytes]]) -> float:
        self.sync(self.doc, self.peer, self.s1, self.s2)
        cpu = 0.0
        for key, raw in raws:
            self.add(key, raw)
            t = time.process_time()
            self.sync(self.doc, self.peer, self.s1, self.s2)
            cpu += time.process_time() - t
        return cpu / len(raws)


def helpers_cpu() -> float:
    """CPU seconds used so far by this process's signature helper processes (from /proc)."""
    total = 0.0
    for helper in sigcheck.POOL.helpers:
        proc = helper._proc
        if proc is not None:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def join_over_link(root: Path, site: Any, source: SimNode, clock: Any, k: int) -> tuple[int, float, float]:
    """(bytes on the link, wall seconds, CPU seconds of this process and the signature helpers)."""
    fresh = SimNode.open(enroll(site, root / f"fresh{k}", f"fresh{k}"), clock)
    net = MemNetwork()
    link = net.connect(source.replicator, fresh.replicator)
    cpu = time.process_time() + helpers_cpu()
    t = time.perf_counter()
    net.pump()
    wall = time.perf_counter() - t
    cpu = time.process_time() + helpers_cpu() - cpu
    assert fresh.core.store.entry_count() >= source.core.store.entry_count() - 1
    fresh.close()
    return link.bytes_ab + link.bytes_ba, wall, cpu


def propagate_cpu(source: SimNode, seller: Seller, peer: SimNode, per_level: int) -> float:
    net = MemNetwork()
    net.connect(source.replicator, peer.replicator)
    net.pump()  # catch up
    cpu = 0.0
    for _ in range(per_level):
        source.core.ledger.write_local(seller.sale())
        t = time.process_time()
        net.pump()
        cpu += time.process_time() - t
    for link in net.links:
        link.cut()
    return cpu / per_level


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=100_000)
    ap.add_argument("--levels", default="1000,10000,100000")
    ap.add_argument("--per-level", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object after the tables")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    levels = sorted({int(x) for x in args.levels.split(",") if x} | {args.sales})
    root = Path(tempfile.mkdtemp(prefix="meshpos-bench-"))
    clock = wall_clock()
    site = make_site(root / "site")
    source = SimNode.open(enroll(site, root / "source", "source"), clock)
    peer = SimNode.open(enroll(site, root / "peer", "peer"), clock)
    seller = Seller(source)
    base = Baseline()
    rows: list[tuple[int, float, float]] = []
    built = 0
    for level in levels:
        t = time.perf_counter()
        seller.sell_many(level - built, source.core.ledger)
        for raw in seller.raw[built:level]:
            env = envelope.decode(raw)
            base.add(f"sale/{env.body['sale_id']}", raw)
        built = level
        print(f"built {level} sales in {time.perf_counter() - t:.1f}s", flush=True)
        ours = statistics.median(propagate_cpu(source, seller, peer, args.per_level) for _ in range(args.runs))
        extra = [seller.sale() for _ in range(args.per_level * args.runs)]
        keyed = [(f"sale/{envelope.decode(r).body['sale_id']}", r) for r in extra]
        theirs = statistics.median(base.propagate_cpu(keyed[i::args.runs]) for i in range(args.runs))
        rows.append((level, ours, theirs))
        if level == args.sales:
            break
    raw_bytes = sum(len(r) for r, _ in source.core.store.conn.execute("SELECT raw, 1 FROM entries"))
    joins = [join_over_link(root, site, source, clock, k) for k in range(args.runs)]
    link_bytes = statistics.median(j[0] for j in joins)
    link_wall = statistics.median(j[1] for j in joins)
    base_joins = [base.join() for _ in range(args.runs)]
    base_bytes = statistics.median(j[0] for j in base_joins)
    base_wall = statistics.median(j[1] for j in base_joins)
    total = source.core.store.entry_count()
    print()
    print(f"(a) fresh node joins a peer holding {args.sales} bulk sales ({total} ledger entries in all, raw "
          f"envelope bytes {raw_bytes:,}; the one-doc baseline holds the bulk sales plus its own extra ones)")
    print(f"    {'':28} {'wire bytes':>14} {'x raw':>7} {'wall s':>8}")
    print(f"    {'meshpos link (sharded)':28} {link_bytes:>14,.0f} {link_bytes / raw_bytes:>7.2f} {link_wall:>8.2f}")
    print(f"    {'plain Automerge, one doc':28} {base_bytes:>14,.0f} {base_bytes / raw_bytes:>7.2f} {base_wall:>8.2f}")
    print()
    print(f"(b) CPU per propagated sale, one link, both ends (median of {args.runs} x {args.per_level} sales)")
    print(f"    {'sales in ledger':>16} {'meshpos ms':>12} {'one-doc ms':>12}")
    for level, ours, theirs in rows:
        print(f"    {level:>16,} {ours * 1000:>12.2f} {theirs * 1000:>12.2f}")
    if args.json:
        print(json.dumps({"sales": args.sales, "entries": total, "raw_bytes": raw_bytes, "runs": args.runs,
                          "join_bytes": link_bytes, "join_s": link_wall, "baseline_join_bytes": base_bytes,
                          "baseline_join_s": base_wall, "per_level": args.per_level,
                          "cpu_ms_per_sale": {str(lv): o * 1000 for lv, o, _ in rows},
                          "baseline_cpu_ms_per_sale": {str(lv): t * 1000 for lv, _, t in rows}}))
    source.close()
    peer.close()


if __name__ == "__main__":
    main()
