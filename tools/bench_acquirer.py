#!/usr/bin/env python3
"""Advices per second through the ISO 8583 link against the simulator answering after 50 ms.

    python tools/bench_acquirer.py [--count 10000] [--delay-ms 50] [--runs 3]

Everything runs in one process on 127.0.0.1; prints each run and the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshpos.wire.acquirer import AcquirerRequest  # noqa: E402
from meshpos.acquirer.iso8583_link import open_iso8583_link  # noqa: E402
from meshpos.acquirer.simulator import SimRules, Simulator, serve_simulator  # noqa: E402


def sale(n: int) -> AcquirerRequest:
    return AcquirerRequest(
        sale_id=f"bench-{n}", pan="4111111111111111", expiry="1228", amount_minor=1000 + n % 5000,
        currency="EUR", created_at_ms=1767268245000, entry_mode="contactless", terminal_id="BENCH001",
        merchant_id="MERCHANT0000001", stan=n % 999_999 + 1, rrn=f"{n:012d}",
    )


async def one_run(count: int, delay_ms: int, max_outstanding: int) -> float:
    reqs = [sale(n) for n in range(count)]
    async with trio.open_nursery() as nursery:
        sim: Simulator = await nursery.start(serve_simulator, SimRules(delay_ms=delay_ms), "127.0.0.1", 0)
        async with open_iso8583_link("127.0.0.1", sim.port, timeout=60, max_outstanding=max_outstanding) as link:
            approved = 0

            async def advise(req: AcquirerRequest) -> None:
                nonlocal approved
                result = await link.advise(req, repeat=False)
                approved += result.approved

            start = time.perf_counter()
            async with trio.open_nursery() as senders:
                for req in reqs:
                    senders.start_soon(advise, req)
            elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    if approved != count or sim.stats.totals["0220"] != count:
        raise SystemExit(f"lost advices: {approved} approved, {sim.stats.totals['0220']} received of {count}")
    return count / elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--delay-ms", type=int, default=50)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-outstanding", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args()
    rates = []
    for i in range(args.runs):
        rate = trio.run(one_run, args.count, args.delay_ms, args.max_outstanding)
        rates.append(rate)
        print(f"run {i + 1}: {rate:,.0f} advices/s")
    print(f"median of {args.runs}: {statistics.median(rates):,.0f} advices/s "
          f"({args.count} advices, host answers after {args.delay_ms} ms, one connection)")
    if args.json:
        print(json.dumps({"advices_per_s": statistics.median(rates), "runs": rates, "count": args.count,
                          "delay_ms": args.delay_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
