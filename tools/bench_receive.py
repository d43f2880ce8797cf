#!/usr/bin/env python3
"""Benchmark: the CPU one node spends taking in one pushed sale, the link's path without the network.

A seller node sells ``--sales`` sales (2 of 3 by keyed card, through ``NodeCore.sell``, every
rule and signature as in the product); every change its ledger would push to a link is kept.
A receiving node, run as ``meshpos run`` runs its store (``Store.hold``: savepoints, a group
commit every ``--commit-every`` sales, the WAL synced in this thread), then takes each push the
way a link does: ``SyncSession`` frames are left out, ``Ledger.receive_push`` is called with the
shard and changes of one PUSH frame, the replicator's hooks attached (no link to queue on). The
figure is the receiver's process CPU per sale, median over ``--runs`` fresh receivers; beside it,
the same changes applied to one plain Automerge document per shard (``receive_sync_message`` of
the same message), the floor of any CRDT-based design, and the bare fsync of the commits.

    python tools/bench_receive.py [--sales 400] [--runs 5] [--json]
    python tools/bench_receive.py --profile 30     # cProfile of one receiver: the top 30 by own time
    python tools/bench_receive.py --cold 1,2,4     # caches cleared once per 1, 2, 4 pushes
    python tools/bench_receive.py --cold 1 --defer-writes   # ... and beside it, an experiment (below)

``--cold``: inside a running node the same path costs several times what it costs in this tight
loop, because other processes and the node's other tasks clear the CPU's caches between two
received sales. With ``--cold K`` the receiver's caches are cleared (a 32 MB copy and unrelated
Python work, neither counted) before every K-th push, and the figure is the receiver's thread CPU
in ``receive_push`` and its commits only: K = 1 is a push arriving alone, K = 2 or 4 the pushes
taken in together in one pass, beside the warm loop (K = 0) in the same run, and beside each the
same pushes into plain Automerge documents, cleared alike.

``--defer-writes`` (with ``--cold``): an experiment, not what a node does. Beside each setting, the
same receiver with the rows of received sales (``Ledger._write_rows``) and their change chunks
(``Store.add_chunk``) held in memory and written at the group commit (``Store.flush``), in one
statement per kind: what writing them once per commit instead of once per sale would save. (A node
doing so would also need every reader of the store to see rows not yet written.)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import automerge.core as am

from meshpos.infra.clock import FakeClock
from meshpos.ledger import ledger as ledger_mod
from meshpos.ledger.ledger import changes_message
from meshpos.ledger.store import Store
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock

PAN = "4111111111111111"


def sell(seller: SimNode, clock: FakeClock, n: int) -> list[tuple[str, list[bytes]]]:
    pushes: list[tuple[str, list[bytes]]] = []

    def kept(shard: str, changes: list[bytes] | None) -> None:
        if changes:
            pushes.append((shard, list(changes)))

    seller.core.ledger.on_changes.append(kept)
    core = seller.core
    for i in range(n):
        card = core.seal_card(PAN, "1230") if i % 3 else None
        core.sell(100 + i % 900, card=card)
        clock.advance(0.05)
    seller.core.ledger.on_changes.remove(kept)
    return pushes


def receive(receiver: SimNode, pushes: list[tuple[str, list[bytes]]], peer: str, commit_every: int) -> float:
    """CPU seconds per sale of the receiver's ledger and store."""
    store = receiver.core.store
    ledger = receiver.core.ledger
    store.hold()
    t = time.process_time()
    for i, (shard, changes) in enumerate(pushes, 1):
        ledger.receive_push(shard, changes, peer)
        if i % commit_every == 0:
            store.flush()
    store.flush()
    return (time.process_time() - t) / len(pushes)


class _Clearer:
    """Work that leaves the CPU's data, instruction and branch caches to something else."""

    def __init__(self) -> None:
        self.big = bytearray(32 << 20)
        self.junk = {f"k{i}": [i, str(i), {"x": i}] for i in range(20000)}

    def __call__(self) -> None:
        bytes(self.big)
        json.loads(json.dumps(self.junk))


def _cold_loop(pushes: list[tuple[str, list[bytes]]], every: int, clear: _Clearer,
               take: Callable[[int, str, list[bytes]], None]) -> float:
    """Thread CPU seconds per push of ``take(i, shard, changes)``, the caches cleared (not
    counted) before every ``every``-th push (0: never)."""
    spent = 0.0
    for i, (shard, changes) in enumerate(pushes, 1):
        if every and (i - 1) % every == 0:
            clear()
        t = time.thread_time()
        take(i, shard, changes)
        spent += time.thread_time() - t
    return spent / len(pushes)


def receive_cold(receiver: SimNode, pushes: list[tuple[str, list[bytes]]], peer: str, commit_every: int,
                 every: int, clear: _Clearer) -> float:
    """``receive`` in thread CPU (``receive_push`` and the commits), cleared as ``_cold_loop`` says."""
    store = receiver.core.store
    ledger = receiver.core.ledger
    store.hold()

    def take(i: int, shard: str, changes: list[bytes]) -> None:
        ledger.receive_push(shard, changes, peer)
        if i % commit_every == 0 or i == len(pushes):
            store.flush()

    return _cold_loop(pushes, every, clear, take)


class DeferredWrites:
    """``--defer-writes``: while on, sales' rows and change chunks wait in memory for the flush."""

    def __init__(self) -> None:
        self.entries: list[Any] = []
        self.sales: list[Any] = []
        self.chunks: list[tuple[str, bytes]] = []
        self.saved = (ledger_mod.Ledger._write_rows, Store.add_chunk, Store.flush)

    def __enter__(self) -> "DeferredWrites":
        held = self
        flush = self.saved[2]

        def write_rows(ledger: Any, rows: Any) -> None:
            if rows is not None and rows.entries:
                held.entries.extend(rows.entries)
                held.sales.extend(rows.sales)
                rows.entries.clear()
                rows.sales.clear()

        def add_chunk_later(store: Store, shard: str, data: bytes) -> int:
            held.chunks.append((shard, data))
            return 1  # the compaction's count is not this experiment's concern

        def flush_all(store: Store) -> None:
            if held.entries:
                store.insert_entries(held.entries)
                store.insert_sales(held.sales)
            store.conn.executemany("INSERT INTO chunks(shard, data, crc) VALUES(?,?,?)",
                                   [(shard, data, zlib.crc32(data)) for shard, data in held.chunks])
            held.entries.clear()
            held.sales.clear()
            held.chunks.clear()
            flush(store)

        ledger_mod.Ledger._write_rows = write_rows  # type: ignore[method-assign]
        Store.add_chunk = add_chunk_later  # type: ignore[method-assign]
        Store.flush = flush_all  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        ledger_mod.Ledger._write_rows, Store.add_chunk, Store.flush = self.saved  # type: ignore[method-assign]


def _apply_plain(docs: dict[str, am.Document], shard: str, changes: list[bytes]) -> None:
    doc = docs.get(shard)
    if doc is None:
        doc = docs[shard] = am.Document()
    doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message(changes)))


def plain_cold(pushes: list[tuple[str, list[bytes]]], every: int, clear: _Clearer) -> float:
    """``plain`` in thread CPU, cleared as ``_cold_loop`` says."""
    docs: dict[str, am.Document] = {}
    return _cold_loop(pushes, every, clear, lambda i, shard, changes: _apply_plain(docs, shard, changes))


def plain(pushes: list[tuple[str, list[bytes]]]) -> float:
    docs: dict[str, am.Document] = {}
    t = time.process_time()
    for shard, changes in pushes:
        _apply_plain(docs, shard, changes)
    return (time.process_time() - t) / len(pushes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=400)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--commit-every", type=int, default=8, help="sales per group commit (the node: 200 ms)")
    ap.add_argument("--tmpdir", default=None, help="where the node directories go (e.g. /dev/shm)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile one receiver, print the top N")
    ap.add_argument("--cold", default=None, metavar="K,K,...",
                    help="clear the caches before every K-th push (see above); 0 = the warm loop, measured too")
    ap.add_argument("--defer-writes", action="store_true",
                    help="with --cold: beside each setting, sales' rows and chunks written at the commit (see above)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.defer_writes and args.cold is None:
        ap.error("--defer-writes goes with --cold")
    if args.cold is not None:
        try:
            args.cold = sorted({0, *(int(k) for k in args.cold.split(","))})
        except ValueError:
            ap.error("--cold takes whole numbers separated by commas, such as 1,2,4")
        if any(k < 0 for k in args.cold):
            ap.error("--cold takes numbers of 0 or more")
    logging.basicConfig(level=logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="meshpos-bench-receive-", dir=args.tmpdir))
    try:
        run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


Pushes = list[tuple[str, list[bytes]]]


def prepare(root: Path, sales: int) -> tuple[SimNode, Pushes, Pushes, Callable[[int], SimNode]]:
    """A seller with ``sales`` sales; what its ledger held before them (``bootstrap``: its
    certificate), as pushes; the pushes of the sales; and ``fresh(k)``: a new receiving node
    (directory ``root/rK``) that already holds the bootstrap, as a link's sync gives it."""
    clock = wall_clock()
    site = make_site(root / "site")
    seller = SimNode.open(enroll(site, root / "seller", "seller"), clock)
    first = seller.core.ledger.summary()
    bootstrap = [(shard, [c.bytes for c in seller.core.ledger.docs[shard].get_changes([])]) for shard in first]
    pushes = sell(seller, clock, sales)
    peer = seller.core.node_id

    def fresh(k: int) -> SimNode:
        node = SimNode.open(enroll(site, root / f"r{k}", f"r{k}"), clock)
        for shard, changes in bootstrap:
            node.core.ledger.receive_push(shard, changes, peer)
        return node

    return seller, bootstrap, pushes, fresh


def run(args: argparse.Namespace, root: Path) -> None:
    seller, _, pushes, fresh = prepare(root, args.sales)
    peer = seller.core.node_id
    if args.profile:
        node = fresh(0)
        prof = cProfile.Profile()
        prof.enable()
        receive(node, pushes, peer, args.commit_every)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(args.profile)
        return
    if args.cold is not None:
        cold(args, fresh, pushes, peer)
        return
    ours, floor = [], []
    for k in range(args.runs):
        node = fresh(k + 1)
        ours.append(receive(node, pushes, peer, args.commit_every) * 1000)
        if node.core.store.entry_count() < seller.core.store.entry_count():
            raise SystemExit("the receiver did not take every sale")
        node.close()
        floor.append(plain(pushes) * 1000)
    out: dict[str, Any] = {
        "sales": len(pushes), "runs": args.runs, "commit_every": args.commit_every,
        "cpu_ms_per_sale": statistics.median(ours), "runs_ms": ours,
        "plain_automerge_ms_per_sale": statistics.median(floor),
        "ratio_to_plain": statistics.median(ours) / statistics.median(floor),
    }
    print(f"{len(pushes)} pushed sales: {out['cpu_ms_per_sale']:.3f} ms CPU per sale (runs "
          + ", ".join(f"{x:.3f}" for x in ours) + f"); plain Automerge {out['plain_automerge_ms_per_sale']:.3f} ms "
          f"(x{out['ratio_to_plain']:.1f})")
    if args.json:
        print(json.dumps(out))


def cold(args: argparse.Namespace, fresh: Any, pushes: list[tuple[str, list[bytes]]], peer: str) -> None:
    clear = _Clearer()
    runs: dict[int, list[float]] = {k: [] for k in args.cold}
    deferred: dict[int, list[float]] = {k: [] for k in args.cold}
    floor: dict[int, list[float]] = {k: [] for k in args.cold}
    n = 0
    for _ in range(args.runs):
        for every in args.cold:  # interleaved, so that the host's drift touches every K alike
            for defer in (False, True) if args.defer_writes else (False,):
                n += 1
                node = fresh(100 + n)
                with DeferredWrites() if defer else contextlib.nullcontext():
                    spent = receive_cold(node, pushes, peer, args.commit_every, every, clear) * 1000
                if node.core.store.entry_count() < len(pushes):
                    raise SystemExit("the receiver did not take every sale")
                (deferred if defer else runs)[every].append(spent)
                node.close()
            floor[every].append(plain_cold(pushes, every, clear) * 1000)

    def name(k: int) -> str:
        return "warm" if k == 0 else f"cleared every {k}"

    out: dict[str, Any] = {
        "sales": len(pushes), "runs": args.runs,
        "ms_per_sale": {name(k): statistics.median(v) for k, v in runs.items()},
        "plain_automerge_ms_per_sale": {name(k): statistics.median(v) for k, v in floor.items()},
        "runs_ms": {str(k): v for k, v in runs.items()}}
    if args.defer_writes:
        out["deferred_writes_ms_per_sale"] = {name(k): statistics.median(v) for k, v in deferred.items()}
        out["deferred_runs_ms"] = {str(k): v for k, v in deferred.items()}
    warm = statistics.median(runs[0])
    for k, v in runs.items():
        what = "warm loop" if k == 0 else f"caches cleared once per {k} push{'es' if k > 1 else ''}"
        print(f"{what}: {statistics.median(v):.3f} ms thread CPU per sale (x{statistics.median(v) / warm:.2f} "
              f"the warm loop; runs " + ", ".join(f"{x:.3f}" for x in v) + f"); plain Automerge "
              f"{statistics.median(floor[k]):.3f} ms")
        if args.defer_writes:
            d = deferred[k]
            print(f"  rows and chunks written at the commit: {statistics.median(d):.3f} ms (runs "
                  + ", ".join(f"{x:.3f}" for x in d) + ")")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
