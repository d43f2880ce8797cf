#!/usr/bin/env python3
"""Benchmark: the organizer dashboard's page data, GET /api/state, over loopback with keep-alive.

A gateway with ``--sales`` sales (cards and cash, spread over ``--hours`` hours, so the per-hour
chart has that many hours) serves its dashboard on 127.0.0.1 (plain HTTP, the password checked
once, then cached); one client asks ``--requests`` times on one connection. Reports median and
p99 of the request time (server-side state, the pictures, JSON, HTTP), the CPU time of the whole
process (server and client) per request (less sensitive to a loaded host than wall time), and the
answer's size.
Runs against whichever checkout is the current directory (to compare two versions, run it from
each, alternately). Median of the per-run figures over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nacl.signing
import trio

from meshpos.identity import keys
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.node.dashboard import DashboardServer
from meshpos.node.enroll import enroll_one_step
from meshpos.site.sitedir import init_site

PASSWORD = "bench-password"
VISA = "4111111111111111"


def one_run(sales: int, hours: int, requests: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="meshpos-bench-dash-") as tmp:
        root = Path(tmp)
        switch = nacl.signing.SigningKey.generate()
        clock = FakeClock(1_780_000_000_000)
        site = init_site(root / "site", "Bench", "EUR", dashboard_password=PASSWORD,
                         switch_key=keys.x25519_public_of(switch).hex(), clock=clock)
        enroll_one_step(site, root / "g", "gateway", "Gateway", dashboard="127.0.0.1:0", clock=clock)
        core = NodeCore.open(root / "g", clock)
        step = hours * 3600 / max(1, sales)
        for i in range(sales):
            core.sell(300 + i % 5000, card=core.seal_card(VISA, "1230") if i % 2 else None)
            clock.advance(step)
        server = DashboardServer(core, None, None)
        auth = "Basic " + base64.b64encode(f"organizer:{PASSWORD}".encode()).decode()
        times: list[float] = []
        size = 0
        cpu = 0.0

        def client(port: int) -> None:
            nonlocal size, cpu
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for i in range(requests + 1):
                if i == 1:
                    cpu = time.process_time()
                t = time.perf_counter()
                conn.request("GET", "/api/state", headers={"Authorization": auth})
                response = conn.getresponse()
                body = response.read()
                assert response.status == 200, response.status
                if i:  # the first one checks the password (scrypt)
                    times.append(time.perf_counter() - t)
                size = len(body)
            cpu = time.process_time() - cpu
            conn.close()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                assert server.status is not None
                await trio.to_thread.run_sync(client, server.status.port)
                nursery.cancel_scope.cancel()
        try:
            trio.run(main)
        finally:
            core.close()
        times.sort()
        return {"median_ms": statistics.median(times) * 1000, "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
                "cpu_ms": cpu / requests * 1000, "bytes": float(size)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=2000, help="sales the gateway holds (default 2000)")
    ap.add_argument("--hours", type=int, default=12, help="hours they are spread over (default 12)")
    ap.add_argument("--requests", type=int, default=200, help="requests per run (default 200)")
    ap.add_argument("--runs", type=int, default=3, help="runs; the median of each figure is reported (default 3)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    runs = [one_run(args.sales, args.hours, args.requests) for _ in range(args.runs)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out.update(sales=args.sales, hours=args.hours, requests=args.requests, runs=args.runs)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"GET /api/state, {args.sales} sales over {args.hours} h: median {out['median_ms']:.2f} ms, "
              f"p99 {out['p99_ms']:.2f} ms, CPU {out['cpu_ms']:.2f} ms per request, {int(out['bytes'])} bytes (median of {args.runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
