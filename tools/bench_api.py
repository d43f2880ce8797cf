#!/usr/bin/env python3
"""Benchmark: POST /v1/sales through the terminal API, beside the bare in-process sale commit.

Per run, on fresh nodes in a temporary directory:
1. in process: ``NodeCore.sell`` of N keyed card sales (tools/bench_sale.py's measurement: seal,
   sign, SQLite FULL commit), median and p99 of the acknowledgement;
2. over HTTP: a ``meshpos run`` node process with its API on 127.0.0.1 (plain HTTP on loopback),
   one keep-alive TCP connection, N ``POST /v1/sales`` of keyed card sales (each its own
   Idempotency-Key), median and p99 of request-to-201;
3. cash sales in the same node, alternating blocks: the CLI's way (``POST /v1/node/sales`` on
   ``NODE_DIR/api.sock``, one connection per call; the newline-JSON control socket it replaced
   was measured here before) and through ``POST /v1/sales`` over TCP: CPU per
   sale of the node and median latency of each, the fair comparison of the two front doors
   (same node, same sale path, same store size); then N requests that replay one key and body
   (200 with the stored sale: the API's request path without a commit);
4. N keyed card sales through the API in blocks alternating between no event stream and 100
   idle clients connected to ``GET /v1/events`` (each gets every ``sale.created`` event; they
   connect before their block and leave after it): the selling rate with them as a ratio to
   without, and the same for the node's CPU per sale (without / with: the load-robust figure),
   both sides from the same minutes of the host's load;
5. the framework's floor (tools/bench_api_floor.py): a bare Starlette app on Hypercorn's trio
   worker answering ``POST /v1/sales`` with a constant sale-sized object, in a process of its own,
   over Hypercorn's own accept loop ("plain"), over the terminal API's own transport and Guard
   ("gated"), and the same with the terminal API's lane for new sales ("lane",
   meshpos.infra.asgi.Lane, as the node serves it); N requests on one keep-alive connection, CPU per request and median latency. The
   node's CPU per cash sale through the API minus the in-process commit, beside this floor, says
   how much of the HTTP layer's cost is the framework's and how much is ours.
6. keyed card sales alternating in blocks of 50 between (1)'s way, on a second node of the site
   opened in this process, and (2)'s: the two doors' medians from the same minutes of the host's
   load, the fairest wall-clock comparison on a shared host.
The figures are medians of the per-run figures over --runs runs; the HTTP layer's cost is
(2) - (1) at the median. On a shared, loaded machine the wall-clock figures of (2) carry the
scheduling delays of two processes (client and node) waking each other per request; so CPU time
per sale is measured too, in process (this process) and in the node process (from /proc), which
the load of other processes hardly changes: their difference is what the HTTP layer costs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nacl.signing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sale import one_run as in_process_run  # noqa: E402  (the baseline, measured the same way)

from meshpos.apps.procs import ProcessGroup  # noqa: E402
from meshpos.identity import keys  # noqa: E402
from meshpos.node import client  # noqa: E402
from meshpos.node.core import NodeCore  # noqa: E402
from meshpos.node.enroll import enroll_one_step  # noqa: E402
from meshpos.site.sitedir import init_site  # noqa: E402

PAN = "4111111111111111"
IDLE_CLIENTS = 100


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(sales: int) -> dict[str, float]:
    cpu = time.process_time()
    figures = in_process_run(sales)
    return {**figures, "cpu_ms_per_sale": (time.process_time() - cpu) * 1000 / sales}


def _percentiles(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {"median_ms": statistics.median(lat) * 1000, "p99_ms": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000}


def _post_sales(host: str, port: int, token: str, n: int) -> tuple[list[float], float]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Host": f"{host}:{port}", "Content-Type": "application/json"}
    lat = []
    start = time.perf_counter()
    for i in range(n):
        body = json.dumps({"amount": f"{1 + i % 90}.00", "method": "card", "card": {"pan": PAN, "expiry": "1230"}})
        t = time.perf_counter()
        conn.request("POST", "/v1/sales", body=body, headers={**headers, "Idempotency-Key": str(uuid.uuid4())})
        resp = conn.getresponse()
        resp.read()
        lat.append(time.perf_counter() - t)
        if resp.status != 201:
            raise SystemExit(f"POST /v1/sales answered {resp.status}")
    elapsed = time.perf_counter() - start
    conn.close()
    return lat, n / elapsed


def _floor(mode: str, sales: int, root: Path) -> dict[str, float]:
    """CPU per request and median latency of the bare framework (``mode``: plain or gated)."""
    portfile = root / f"floor-{mode}.port"
    portfile.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "bench_api_floor.py"), mode,
                             str(portfile)])
    try:
        deadline = time.monotonic() + 30
        while not portfile.exists() or not portfile.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the {mode} floor server did not start")
            time.sleep(0.05)
        port = int(portfile.read_text())
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": "Bearer floor", "Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
        lat = []
        for i in range(50 + sales):  # 50 to warm up
            if i == 50:
                cpu = _cpu_s(proc.pid)
            t = time.perf_counter()
            conn.request("POST", "/v1/sales", body='{"amount": "1.00", "method": "cash"}',
                         headers={**headers, "Idempotency-Key": str(uuid.uuid4())})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 201:
                raise SystemExit(f"the {mode} floor answered {resp.status}")
            if i >= 50:
                lat.append(time.perf_counter() - t)
        cpu_ms = (_cpu_s(proc.pid) - cpu) * 1000 / sales
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return {f"floor_{mode}_cpu_ms": cpu_ms, f"floor_{mode}_median_ms": statistics.median(lat) * 1000}


def _interleaved(core: NodeCore, host: str, port: int, token: str, n: int) -> dict[str, float]:
    """The same keyed card sale in process (``core``: a second node of the same site, opened in this
    process, as tools/bench_sale.py does) and through the API, alternating in blocks of 50: both
    doors see the same minutes of the host's load. Median and p99 of each."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Host": f"{host}:{port}", "Content-Type": "application/json"}
    lat: dict[str, list[float]] = {"in_process": [], "api": []}
    for block in range(max(1, n // 50)):
        for i in range(50):
            t = time.perf_counter()
            core.sell(100 + i, card=core.seal_card(PAN, "1230", "chip"))
            lat["in_process"].append(time.perf_counter() - t)
        for i in range(50):
            body = json.dumps({"amount": f"{1 + i}.00", "method": "card", "card": {"pan": PAN, "expiry": "1230"}})
            t = time.perf_counter()
            conn.request("POST", "/v1/sales", body=body, headers={**headers, "Idempotency-Key": str(uuid.uuid4())})
            resp = conn.getresponse()
            resp.read()
            lat["api"].append(time.perf_counter() - t)
            if resp.status != 201:
                raise SystemExit(f"POST /v1/sales answered {resp.status}")
    conn.close()
    out = {}
    for door, values in lat.items():
        out.update({f"interleaved_{door}_{k}": v for k, v in _percentiles(values).items()})
    return out


def _replays(pid: int, host: str, port: int, token: str, n: int) -> dict[str, float]:
    """``POST /v1/sales`` with one key and body again and again: the API answers 200 with the stored
    sale (the idempotency lookup and the sale read), no new sale is made. The request path of the
    terminal API without the commit, in the running node: CPU per request and median latency."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Host": f"{host}:{port}", "Content-Type": "application/json",
               "Idempotency-Key": str(uuid.uuid4())}
    body = '{"amount": "1.00", "method": "cash"}'
    lat = []
    for i in range(50 + n):
        if i == 50:
            cpu = _cpu_s(pid)
        t = time.perf_counter()
        conn.request("POST", "/v1/sales", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != (201 if i == 0 else 200):
            raise SystemExit(f"POST /v1/sales (replay) answered {resp.status}")
        if i >= 50:
            lat.append(time.perf_counter() - t)
    cpu_ms = (_cpu_s(pid) - cpu) * 1000 / n
    conn.close()
    return {"replay_cpu_ms": cpu_ms, "replay_median_ms": statistics.median(lat) * 1000}


def _idle_streams(host: str, port: int, token: str, n: int) -> list[http.client.HTTPConnection]:
    conns = []
    for _ in range(n):
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request("GET", "/v1/events", headers={"Authorization": f"Bearer {token}", "Host": f"{host}:{port}"})
        resp = c.getresponse()
        if resp.status != 200:
            raise SystemExit(f"GET /v1/events answered {resp.status}")
        conns.append(c)
    return conns


def _with_and_without_streams(pid: int, host: str, port: int, token: str, n: int, blocks: int = 4) -> dict[str, float]:
    """Keyed card sales in ``blocks`` pairs of blocks: without event streams, then with
    IDLE_CLIENTS idle clients connected to ``GET /v1/events`` (each gets every ``sale.created``;
    connected before the block, closed after it): the selling rate and the node's CPU per sale of
    each, from the same minutes of the host's load."""
    elapsed = {"none": 0.0, "sse": 0.0}
    cpu = {"none": 0.0, "sse": 0.0}
    per_block = max(1, n // blocks)
    for _ in range(blocks):
        for side in ("none", "sse"):
            streams = _idle_streams(host, port, token, IDLE_CLIENTS) if side == "sse" else []
            before = _cpu_s(pid)
            _, rate = _post_sales(host, port, token, per_block)
            cpu[side] += _cpu_s(pid) - before
            elapsed[side] += per_block / rate
            for c in streams:
                c.close()
    total = per_block * blocks
    return {"sales_per_s_no_sse": total / elapsed["none"], "sales_per_s_100_sse": total / elapsed["sse"],
            "cpu_ms_per_sale_no_sse": cpu["none"] * 1000 / total, "cpu_ms_per_sale_100_sse": cpu["sse"] * 1000 / total}


def _control_vs_api(node: Path, pid: int, host: str, port: int, token: str, n: int) -> dict[str, float]:
    """Cash sales alternating in blocks of 50: the CLI's socket path ("control"), then the TCP API
    (the store grows evenly)."""
    cpu = {"control": 0.0, "api": 0.0}
    lat: dict[str, list[float]] = {"control": [], "api": []}
    conn = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Host": f"{host}:{port}", "Content-Type": "application/json"}
    for _ in range(max(1, n // 100)):
        for door in ("control", "api"):
            before = _cpu_s(pid)
            for _ in range(50):
                t = time.perf_counter()
                if door == "control":
                    client.running(node).sell(100)
                else:
                    conn.request("POST", "/v1/sales", body='{"amount": "1.00", "method": "cash"}',
                                 headers={**headers, "Idempotency-Key": str(uuid.uuid4())})
                    conn.getresponse().read()
                lat[door].append(time.perf_counter() - t)
            cpu[door] += _cpu_s(pid) - before
    conn.close()
    count = len(lat["api"])
    return {"control_cpu_ms_per_sale": cpu["control"] * 1000 / count, "cash_cpu_ms_per_sale": cpu["api"] * 1000 / count,
            "control_median_ms": statistics.median(lat["control"]) * 1000,
            "cash_median_ms": statistics.median(lat["api"]) * 1000}


def api_run(sales: int, with_floor: bool = True) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        switch = nacl.signing.SigningKey.generate()
        site = init_site(root / "site", "Bench", switch_key=keys.x25519_public_of(switch).hex())
        node = root / "t1"
        enroll_one_step(site, node, "terminal", "T1", api="127.0.0.1:0")
        enroll_one_step(site, root / "t2", "terminal", "T2", api="127.0.0.1:0")  # the in-process twin
        site.update_policy(max_terminal_pending_minor=10**12, max_site_pending_minor=10**12)
        (node / "inbox").mkdir(exist_ok=True)
        (node / "inbox" / "policy.env").write_bytes(site.policy_envelope())  # taken in when the node starts
        group = ProcessGroup(root / "logs")
        twin = NodeCore.open(root / "t2")
        twin.ingest(site.policy_envelope(), "organizer")
        try:
            group.start_node("t1", node, "--no-mdns")
            status = client.running(node).status()
            url, pid = status["api"]["url"], int(status["running"]["pid"])
            host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
            token = (node / "api-token").read_text().strip()
            _post_sales(host, int(port), token, 50)  # warm-up
            cpu = _cpu_s(pid)
            lat, rate = _post_sales(host, int(port), token, sales)
            cpu_per_sale = (_cpu_s(pid) - cpu) * 1000 / sales
            doors = _control_vs_api(node, pid, host, int(port), token, sales)
            doors.update(_replays(pid, host, int(port), token, sales))
            doors.update(_interleaved(twin, host, int(port), token, sales))
            sse = _with_and_without_streams(pid, host, int(port), token, sales)
        finally:
            group.stop_all()
            twin.close()
        modes = ("plain", "gated", "lane")
        floor = {k: v for mode in modes for k, v in _floor(mode, sales, root).items()} if with_floor else {
            f"floor_{mode}_{k}": float("nan") for mode in modes for k in ("cpu_ms", "median_ms")}
        return {**_percentiles(lat), "sales_per_s": rate, "cpu_ms_per_sale": cpu_per_sale, **sse, **doors, **floor}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-floor", action="store_true", help="skip (5), the bare framework's floor")
    args = ap.parse_args()
    base, api = [], []
    for r in range(args.runs):
        base.append(in_process(args.sales))
        api.append(api_run(args.sales, with_floor=not args.no_floor))
        print(f"run {r + 1}: in process median {base[-1]['median_ms']:.2f} ms p99 {base[-1]['p99_ms']:.2f} ms; "
              f"API median {api[-1]['median_ms']:.2f} ms p99 {api[-1]['p99_ms']:.2f} ms, "
              f"{api[-1]['sales_per_s']:.0f}/s; alternating blocks without / with {IDLE_CLIENTS} SSE clients "
              f"{api[-1]['sales_per_s_no_sse']:.0f} / {api[-1]['sales_per_s_100_sse']:.0f} sales/s, "
              f"{api[-1]['cpu_ms_per_sale_no_sse']:.2f} / {api[-1]['cpu_ms_per_sale_100_sse']:.2f} ms CPU per sale; "
              f"CPU per sale in process {base[-1]['cpu_ms_per_sale']:.2f} ms, node {api[-1]['cpu_ms_per_sale']:.2f} ms; "
              f"cash: CLI socket path {api[-1]['control_cpu_ms_per_sale']:.2f} ms CPU / "
              f"{api[-1]['control_median_ms']:.2f} ms, API {api[-1]['cash_cpu_ms_per_sale']:.2f} ms CPU / "
              f"{api[-1]['cash_median_ms']:.2f} ms; interleaved in process "
              f"{api[-1]['interleaved_in_process_median_ms']:.2f} ms / API {api[-1]['interleaved_api_median_ms']:.2f} ms "
              f"(median); replayed key {api[-1]['replay_cpu_ms']:.2f} ms CPU / {api[-1]['replay_median_ms']:.2f} ms; "
              f"framework floor plain {api[-1]['floor_plain_cpu_ms']:.2f} ms CPU / "
              f"{api[-1]['floor_plain_median_ms']:.2f} ms, gated {api[-1]['floor_gated_cpu_ms']:.2f} ms CPU / "
              f"{api[-1]['floor_gated_median_ms']:.2f} ms, lane {api[-1]['floor_lane_cpu_ms']:.2f} ms CPU / "
              f"{api[-1]['floor_lane_median_ms']:.2f} ms; "
              f"load {os.getloadavg()[0]:.1f}",
              file=sys.stderr)
    med = {f"api_{k}": statistics.median(r[k] for r in api) for k in api[0]}
    med.update({f"in_process_{k}": statistics.median(r[k] for r in base)
                for k in ("median_ms", "p99_ms", "cpu_ms_per_sale")})
    med["http_overhead_median_ms"] = med["api_median_ms"] - med["in_process_median_ms"]
    med["interleaved_overhead_median_ms"] = (med["api_interleaved_api_median_ms"]
                                             - med["api_interleaved_in_process_median_ms"])
    med["http_overhead_cpu_ms"] = med["api_cpu_ms_per_sale"] - med["in_process_cpu_ms_per_sale"]
    med["api_vs_control_cpu_ms"] = med["api_cash_cpu_ms_per_sale"] - med["api_control_cpu_ms_per_sale"]
    med["cash_over_in_process_cpu_ms"] = med["api_cash_cpu_ms_per_sale"] - med["in_process_cpu_ms_per_sale"]
    med["load_average_1m"] = os.getloadavg()[0]
    med["sse_100_ratio"] = med["api_sales_per_s_100_sse"] / med["api_sales_per_s_no_sse"]
    med["sse_100_cpu_ratio"] = med["api_cpu_ms_per_sale_no_sse"] / med["api_cpu_ms_per_sale_100_sse"]
    med["sales"], med["runs"] = args.sales, args.runs
    if args.json:
        print(json.dumps(med))
    else:
        print(f"POST /v1/sales over loopback TCP keep-alive, {args.sales} card sales, median of {args.runs} runs: "
              f"median {med['api_median_ms']:.2f} ms, p99 {med['api_p99_ms']:.2f} ms; in process (bench_sale) "
              f"median {med['in_process_median_ms']:.2f} ms, p99 {med['in_process_p99_ms']:.2f} ms; HTTP layer "
              f"+{med['http_overhead_median_ms']:.2f} ms at the median; in alternating blocks "
              f"+{med['interleaved_overhead_median_ms']:.2f} ms; CPU per sale in the node "
              f"{med['api_cpu_ms_per_sale']:.2f} ms vs {med['in_process_cpu_ms_per_sale']:.2f} ms in process "
              f"(+{med['http_overhead_cpu_ms']:.2f} ms); cash sales in the node, TCP API vs CLI socket path: "
              f"+{med['api_vs_control_cpu_ms']:.2f} ms CPU; the bare framework answering a constant "
              f"{med['api_floor_plain_cpu_ms']:.2f} ms CPU per request (plain Hypercorn), "
              f"{med['api_floor_gated_cpu_ms']:.2f} ms (our transport and Guard), "
              f"{med['api_floor_lane_cpu_ms']:.2f} ms (with the lane for new sales); with {IDLE_CLIENTS} idle SSE clients "
              f"{med['sse_100_ratio']:.2f} x the selling rate without (CPU per sale: {med['sse_100_cpu_ratio']:.2f} x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
