"""CPU of the history check (meshpos.wire.amhistory) per received change, beside the merge that
change costs anyway, in the same run.

A node sells ``--sales`` sales; each sale's change, as a PUSH carries it, is then (a) checked
alone against an index of the shard (``Histories.check_merge`` after Automerge applied it: reading
what the node wrote since, the rules, the index update), (b) merged by a second node's ledger
(``receive_push``: both checks, Automerge, verification, SQLite), (c) merged by a third node's
ledger with the history check patched out (the baseline), and (d) the index of a whole shard of
``--sales`` changes built at once (what the first merge into a shard costs, once). Medians of
``--runs`` runs, microseconds of CPU time of this process (per change for a-c, per shard for d).

    python tools/bench_amhistory.py --sales 500 --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import automerge.core as am

from meshpos.ledger.ledger import changes_message
from meshpos.node.memnode import make_site
from meshpos.wire import amhistory

from bench_amcanon import per_change_us, seller_and_takers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sales", type=int, default=500, help="sales (changes) per run")
    parser.add_argument("--runs", type=int, default=5, help="runs; the medians are printed")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"history_check": [], "ledger_receive_push": [],
                                       "ledger_receive_push_without_history_check": [],
                                       "index_build_per_shard": []}
    built = 0
    with tempfile.TemporaryDirectory() as tmp:
        site = make_site(Path(tmp) / "site")
        for run in range(args.runs):
            seller, taker, bare, pushed, docs = seller_and_takers(site, Path(tmp), run, args.sales)
            histories = amhistory.Histories()
            for shard, doc in docs.items():  # the index built before the timed part, as in a ledger
                histories.check_merge(shard, doc, doc.get_heads(), [])
            timed = 0.0
            for shard, change in pushed:  # Automerge applies (not timed), then the check (timed)
                doc = docs.setdefault(shard, am.Document())
                before = doc.get_heads()
                doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([change])))
                start = time.process_time()
                histories.check_merge(shard, doc, before, doc.get_changes(before))
                timed += time.process_time() - start
            results["history_check"].append(timed / len(pushed) * 1e6)
            results["ledger_receive_push"].append(per_change_us(
                lambda sc: taker.core.ledger.receive_push(sc[0], [sc[1]], "bench"), pushed))
            check = amhistory.Histories.check_merge
            amhistory.Histories.check_merge = lambda self, shard, doc, before, new: None  # type: ignore[method-assign]
            try:
                results["ledger_receive_push_without_history_check"].append(per_change_us(
                    lambda sc: bare.core.ledger.receive_push(sc[0], [sc[1]], "bench"), pushed))
            finally:
                amhistory.Histories.check_merge = check  # type: ignore[method-assign]
            assert seller.entries() <= taker.entries() and seller.entries() <= bare.entries(), "all merged"
            biggest = max(seller.core.ledger.shards(), key=lambda s: len(seller.core.ledger._doc(s).get_changes([])))
            whole = am.Document.load(seller.core.ledger.snapshot(biggest))
            built = len(whole.get_changes([]))
            results["index_build_per_shard"].append(per_change_us(
                lambda _: amhistory.Histories().check_merge(biggest, whole, whole.get_heads(), []), [0]))
            bare.close()
            seller.close()
            taker.close()
    out = {name: {"median_us": round(statistics.median(v), 1), "runs_us": [round(x, 1) for x in v]}
           for name, v in results.items()}
    out["sales"] = args.sales  # type: ignore[assignment]
    out["index_build_changes"] = built  # type: ignore[assignment]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
