"""CPU of the canonical-encoding check (meshpos.wire.amcanon) per received change, beside the
merge that change costs anyway, in the same run.

A node sells ``--sales`` sales; each sale's change, as a PUSH carries it (``Change.bytes``,
deflated past 256 bytes), is then (a) checked, (b) checked in its uncompressed form, (c) applied
by Automerge alone to a document (receive_sync_message, as the ledger does), (d) merged by a
second node's ledger (``receive_push``: the check, Automerge, verification, SQLite), (e) merged by
a third node's ledger with the check patched out (the baseline). Medians of
``--runs`` runs, microseconds per change, CPU time of this process.

    python tools/bench_amcanon.py --sales 500 --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import automerge.core as am

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.ledger.ledger import changes_message
from meshpos.node.memnode import SimNode, enroll, make_site
from meshpos.wire import amcanon


def per_change_us(fn, items) -> float:  # type: ignore[no-untyped-def]
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / len(items) * 1e6


def seller_and_takers(site: Any, tmp: Path, run: int, sales: int) -> tuple[
        SimNode, SimNode, SimNode, list[tuple[str, bytes]], dict[str, am.Document]]:
    """A node that sold ``sales`` sales; two nodes ("taker" and "bare") holding what it held
    before them; the changes as its PUSHes carried them, (shard, chunk) in order; and a copy of
    each of its shards from before the sales (tools/bench_amhistory.py uses the same set-up)."""
    seller = SimNode.open(enroll(site, tmp / f"s{run}", f"s{run}"), SYSTEM_CLOCK)
    taker = SimNode.open(enroll(site, tmp / f"t{run}", f"t{run}"), SYSTEM_CLOCK)
    bare = SimNode.open(enroll(site, tmp / f"b{run}", f"b{run}"), SYSTEM_CLOCK)
    for shard in seller.core.ledger.shards():  # the takers start where the seller does
        taker.core.ledger.receive_snapshot(shard, seller.core.ledger.snapshot(shard), "bench")
        bare.core.ledger.receive_snapshot(shard, seller.core.ledger.snapshot(shard), "bench")
    before = {shard: am.Document.load(seller.core.ledger.snapshot(shard)) for shard in seller.core.ledger.shards()}
    pushed: list[tuple[str, bytes]] = []
    seller.core.ledger.on_changes.append(lambda shard, changes: pushed.extend((shard, c) for c in changes or []))
    for i in range(sales):
        seller.core.sell(100 + i)
    return seller, taker, bare, pushed, before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sales", type=int, default=500, help="sales (changes) per run")
    parser.add_argument("--runs", type=int, default=5, help="runs; the medians are printed")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"check_push_bytes": [], "check_raw_bytes": [],
                                       "automerge_apply": [], "ledger_receive_push": [],
                                       "ledger_receive_push_unchecked": []}
    with tempfile.TemporaryDirectory() as tmp:
        site = make_site(Path(tmp) / "site")
        for run in range(args.runs):
            seller, taker, bare, pushed, _ = seller_and_takers(site, Path(tmp), run, args.sales)
            raw = [c.raw_bytes for s in seller.core.ledger.shards() for c in seller.core.ledger._doc(s).get_changes([])]
            changes = [c for _, c in pushed]
            results["check_push_bytes"].append(per_change_us(amcanon.check_chunks, changes))
            results["check_raw_bytes"].append(per_change_us(amcanon.check_chunks, raw))
            docs = {shard: am.Document.load(taker.core.ledger.snapshot(shard))  # Automerge alone: the
                    for shard in taker.core.ledger.shards()}  # same changes, in order, one document a shard
            results["automerge_apply"].append(per_change_us(
                lambda sc: docs.setdefault(sc[0], am.Document()).receive_sync_message(
                    am.SyncState(), am.Message.decode(changes_message([sc[1]]))), pushed))
            results["ledger_receive_push"].append(per_change_us(
                lambda sc: taker.core.ledger.receive_push(sc[0], [sc[1]], "bench"), pushed))
            check = amcanon.check_chunks
            amcanon.check_chunks = lambda data: None  # the baseline: the same merge without the check
            try:
                results["ledger_receive_push_unchecked"].append(per_change_us(
                    lambda sc: bare.core.ledger.receive_push(sc[0], [sc[1]], "bench"), pushed))
            finally:
                amcanon.check_chunks = check
            assert seller.entries() <= taker.entries() and seller.entries() <= bare.entries(), "all merged"
            bare.close()
            seller.close()
            taker.close()
    out = {name: {"median_us": round(statistics.median(v), 1), "runs_us": [round(x, 1) for x in v]}
           for name, v in results.items()}
    out["sales"] = args.sales  # type: ignore[assignment]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
