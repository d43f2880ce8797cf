#!/usr/bin/env python3
"""Settlement propagation: the time from the acquirer's answer to the settlement result being on
EVERY node of the site. Goal: p99 <= 1.5 s.

    python tools/bench_settlement.py                  # 20 nodes, 400-sale backlog, then 10 sales/s for 30 s
    python tools/bench_settlement.py --nodes 8 --backlog 100 --live-rate 5 --live-seconds 10 --json

The parts, all on 127.0.0.1: N `meshpos run` node processes with static peers (the topology of
tools/bench_mesh.py), the switch as a `meshpos switch run` process, and the acquirer host simulator
(meshpos.acquirer.simulator, answering after --delay-ms) running in a trio thread of THIS process,
so that the moment it writes each answer onto the wire is known exactly: the stream it answers on
is wrapped, the wall time is taken just before each answer is written, and the answer's field 37
(RRN) names the sale (the switch's RRN is its sale reference: switch.db maps it to the sale id).

Two phases, reported apart:
  backlog  card sales taken while no node has an uplink; once every node holds them, one node
           gets its uplink (`uplink on`) and forwards the site's queue in batches (up to 200 sales
           per batch, 2 batches in flight), the realistic "signal is back" burst;
  live     with the uplink on, card sales at a steady rate: each is forwarded, answered and settled
           while the mesh is also carrying new sales.

Presence on a node = that node's own `received_at` stamp of the `result/<sale>` entry (ms wall
clock, taken when it ingests it); all processes share one clock. Also reported: the breakdown
answer -> result signed by the switch (its `settled_at`) -> on the forwarding node -> everywhere.
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_mesh import (Mesh, Observer, diameter, free_ports, latencies, machine, pct, read_ro,  # noqa: E402
                        run_load, wait_everywhere)
from meshpos.wire import envelope  # noqa: E402
from meshpos.wire.iso8583 import DEFAULT_SPEC, LengthHeader, decode_message  # noqa: E402
from meshpos.acquirer.simulator import SimRules, Simulator  # noqa: E402
from meshpos.identity import keys  # noqa: E402
from meshpos.node import client  # noqa: E402
from meshpos.site.nodedir import NodeDir  # noqa: E402
from meshpos.apps.procs import wait_for  # noqa: E402
from meshpos.switch.processor import rrn_of  # noqa: E402
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch  # noqa: E402


class _TimedStream(trio.abc.Stream):
    """The simulator's side of one acquirer connection; notes when each answer goes out."""

    def __init__(self, inner: trio.abc.Stream, sent: list[tuple[float, bytes]]) -> None:
        self.inner = inner
        self.sent = sent

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        t = time.time()
        await self.inner.send_all(data)
        self.sent.append((t, bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class SimThread:
    """The acquirer simulator (ISO 8583, 2-byte length header) in a trio thread of this process."""

    def __init__(self, port: int, delay_ms: int) -> None:
        self.port = port
        self.delay_ms = delay_ms
        self.sent: list[tuple[float, bytes]] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.token: trio.lowlevel.TrioToken | None = None
        self.scope: trio.CancelScope | None = None

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        sim = Simulator(SimRules(seed=1, delay_ms=self.delay_ms), None, "127.0.0.1")
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")

        async def serve_one(stream: trio.SocketStream) -> None:
            await sim.serve_iso_connection(_TimedStream(stream, self.sent), LengthHeader.BINARY2, DEFAULT_SPEC)

        async with trio.open_nursery() as nursery:
            self.scope = nursery.cancel_scope
            await nursery.start(trio.serve_listeners, serve_one, listeners)
            self.ready.set()

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(30):
            raise SystemExit("the acquirer simulator did not start")

    def stop(self) -> None:
        if self.token is not None and self.scope is not None:
            try:
                trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
            except trio.RunFinishedError:
                pass
        self.thread.join(10)

    def answer_times(self) -> dict[str, float]:
        """RRN -> wall time its (first) answer was written."""
        out: dict[str, float] = {}
        for t, data in list(self.sent):
            o = 0
            while o + 2 <= len(data):
                n = int.from_bytes(data[o:o + 2], "big")
                doc = decode_message(data[o + 2:o + 2 + n])
                o += 2 + n
                rrn = doc.get("37")
                if rrn is not None and doc.get("t") in ("0230",):
                    out.setdefault(rrn, t)
        return out


def sale_of_rrn(switch_db: Path) -> dict[str, str]:
    conn = read_ro(switch_db)
    try:
        return {rrn_of(int(ref)): str(sid) for ref, sid in conn.execute("SELECT ref, sale_id FROM sales")}
    finally:
        conn.close()


def settled_at(db: Path) -> dict[str, int]:
    """sale id -> the switch's settled_at of its result (ms), from one node's ledger."""
    conn = read_ro(db)
    try:
        rows = conn.execute("SELECT raw FROM entries WHERE type='result'").fetchall()
    finally:
        conn.close()
    out = {}
    for (raw,) in rows:
        body = envelope.decode(bytes(raw)).body
        out[body["sale_id"]] = int(body["settled_at"])
    return out


def stamp_on(db: Path) -> dict[str, int]:
    conn = read_ro(db)
    try:
        return {str(k)[len("result/"):]: int(t) for k, t in
                conn.execute("SELECT key, received_at FROM entries WHERE type='result'")}
    finally:
        conn.close()


def phase_result(mesh: Mesh, sim: SimThread, switch_db: Path, sale_ids: set[str], uplink: int,
                 observer: Observer | None) -> dict[str, Any]:
    dbs = [NodeDir(p).db_path for p in mesh.nodes]
    by_rrn = sale_of_rrn(switch_db)
    answered = {by_rrn[r]: t for r, t in sim.answer_times().items() if r in by_rrn and by_rrn[r] in sale_ids}
    res = latencies(dbs, "result", answered, lambda sid: f"result/{sid}", observer)
    res["answered"] = len(answered)
    signed = settled_at(dbs[uplink])
    on_uplink = stamp_on(dbs[uplink])
    sign_lag = [signed[s] / 1000 - t for s, t in answered.items() if s in signed]
    fwd_lag = [on_uplink[s] / 1000 - t for s, t in answered.items() if s in on_uplink]
    if sign_lag:
        res["answer_to_signed_p50_ms"] = pct(sign_lag, 50) * 1000
        res["answer_to_signed_p99_ms"] = pct(sign_lag, 99) * 1000
    if fwd_lag:
        res["answer_to_forwarder_p50_ms"] = pct(fwd_lag, 50) * 1000
        res["answer_to_forwarder_p99_ms"] = pct(fwd_lag, 99) * 1000
    return res


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--backlog", type=int, default=400, help="card sales taken offline, then forwarded at once")
    ap.add_argument("--backlog-rate", type=float, default=40.0, help="how fast the backlog is sold")
    ap.add_argument("--live-rate", type=float, default=10.0, help="card sales/s with the uplink on")
    ap.add_argument("--live-seconds", type=float, default=30.0)
    ap.add_argument("--delay-ms", type=int, default=50, help="acquirer answer delay")
    ap.add_argument("--topology", choices=("planner", "prev2"), default="planner")
    ap.add_argument("--tmpdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshpos-bench-settle-", dir=args.tmpdir))
    sim_port, switch_port = free_ports(2)
    key = keys.generate()
    switch_dir = tmp / "switch"
    init_switch(switch_dir, f"127.0.0.1:{switch_port}", f"127.0.0.1:{sim_port}", key=key,
                acquirer_plain=True)  # its simulator thread serves plain TCP
    switch_pub = keys.x25519_public_of(key)
    uplink = args.nodes - 1
    mesh = Mesh(tmp, args.nodes, args.topology, switch_key=switch_pub.hex(),
                switch_url=f"https://127.0.0.1:{switch_port}")
    sim = SimThread(sim_port, args.delay_ms)
    out: dict[str, Any] = {}
    try:
        mesh.build()
        add_site(switch_dir, mesh.site.path)
        sim.start()
        mesh.procs.start("switch", "switch", "run", str(switch_dir))
        wait_for(lambda: port_open(switch_port), 60, "the switch did not start", interval=0.2)
        startup = mesh.start()
        print(f"{args.nodes} nodes ({len(mesh.edges)} links, diameter {diameter(mesh.adjacency())}), switch and "
              f"simulator up in {startup:.1f} s", file=sys.stderr, flush=True)
        dbs = [NodeDir(p).db_path for p in mesh.nodes]
        observer = Observer(dbs, "result", 0.05)
        observer.start()
        # -- backlog: offline sales, every node holds them, then the uplink comes back
        sold = run_load(mesh.nodes, args.backlog_rate, args.backlog / args.backlog_rate, switch_pub, card_share=3)
        backlog_ids = {s.sale_id for s in sold if s.sale_id}
        if not wait_everywhere(dbs, "sale", {f"sale/{s}" for s in backlog_ids}, timeout=180):
            print("warning: the backlog did not reach every node", file=sys.stderr)
        t_on = time.time()
        client.running(mesh.nodes[uplink]).uplink(True)
        done = wait_everywhere(dbs, "result", {f"result/{s}" for s in backlog_ids}, timeout=300)
        drain_s = time.time() - t_on
        out["backlog"] = phase_result(mesh, sim, switch_dir / "switch.db", backlog_ids, uplink, observer)
        out["backlog"].update(sales=len(backlog_ids), all_settled=done, drain_s=drain_s)
        print(f"backlog of {len(backlog_ids)} settled everywhere {drain_s:.1f} s after uplink on",
              file=sys.stderr, flush=True)
        # -- live: steady card sales with the uplink on
        if args.live_seconds > 0 and args.live_rate > 0:
            sold = run_load(mesh.nodes, args.live_rate, args.live_seconds, switch_pub, card_share=3,
                            first_k=args.backlog)
            live_ids = {s.sale_id for s in sold if s.sale_id}
            done = wait_everywhere(dbs, "result", {f"result/{s}" for s in live_ids}, timeout=300)
            out["live"] = phase_result(mesh, sim, switch_dir / "switch.db", live_ids, uplink, observer)
            out["live"].update(sales=len(live_ids), all_settled=done, rate=args.live_rate,
                               seconds=args.live_seconds)
        observer.stop_flag.set()
        observer.join()
    finally:
        mesh.stop()
        sim.stop()
    out.update(nodes=args.nodes, topology=args.topology, links=len(mesh.edges), diameter=diameter(mesh.adjacency()),
               delay_ms=args.delay_ms, resolution="node received_at stamps: 1 ms; answer time: simulator send, "
               "wall clock (us)", **{"machine_" + k: v for k, v in machine().items()})
    if args.json:
        print(json.dumps(out))
    else:
        print(f"settlement propagation, {args.nodes} nodes ({args.topology}, {out['links']} links), acquirer answers "
              f"after {args.delay_ms} ms; goal p99 <= 1500 ms")
        for phase in ("backlog", "live"):
            r = out.get(phase)
            if not r or not r.get("samples"):
                continue
            print(f"  {phase:8} answer -> on every node: p50 {r['p50_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms, "
                  f"p99 {r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms over {r['samples']} results "
                  f"({r['missing']} missing)")
            print(f"  {'':8} answer -> signed by switch p50 {r.get('answer_to_signed_p50_ms', 0):.0f} / p99 "
                  f"{r.get('answer_to_signed_p99_ms', 0):.0f} ms; -> on the forwarding node p50 "
                  f"{r.get('answer_to_forwarder_p50_ms', 0):.0f} / p99 {r.get('answer_to_forwarder_p99_ms', 0):.0f} ms")
            if r.get("observer_samples"):
                print(f"  {'':8} observer (DB poll every 50 ms, cycle {r['observer_cycle_ms']:.0f} ms): p50 "
                      f"{r['observer_p50_ms']:.0f} ms, p99 {r['observer_p99_ms']:.0f} ms (upper bound)")
    if args.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
