#!/usr/bin/env python3
"""Benchmark: ``POST /v1/sales`` of two checkouts' nodes side by side, in the same minutes.

On a shared host the load changes from minute to minute by more than a change to the API's
request path saves, so two runs of tools/bench_api.py taken one after the other compare the
host's minutes as much as the code. Here two ``meshpos run`` nodes of one site run at once:
"after", this checkout, and "before", the checkout given by ``--tree`` (its code imported through
``PYTHONPATH``, with this checkout's interpreter and packages), plus the in-process commit of
tools/bench_sale.py (``NodeCore.sell`` on a third node of the site, opened in this process). In
each of ``--rounds`` rounds, each of the three takes ``--per-block`` keyed card sales in turn
(the order turns round by round), the API ones over one keep-alive TCP connection each; then each
node answers ``--per-block`` replays of one Idempotency-Key and body (200 with the stored sale:
the request path without a commit). Per block: the node's CPU per request (from /proc) and the
median latency. The figures are medians over the rounds; "API minus in process" is taken per
round (the same minutes), then its median.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nacl.signing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import PAN, _cpu_s  # noqa: E402

from meshpos.apps.procs import ProcessGroup  # noqa: E402
from meshpos.identity import keys  # noqa: E402
from meshpos.node import client  # noqa: E402
from meshpos.node.core import NodeCore  # noqa: E402
from meshpos.node.enroll import enroll_one_step  # noqa: E402
from meshpos.site.sitedir import init_site  # noqa: E402


class Door:
    """One node's API over one keep-alive connection."""

    def __init__(self, node: Path) -> None:
        status = client.running(node).status()
        url = status["api"]["url"]
        self.pid = int(status["running"]["pid"])
        self.host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
        self.port = int(port)
        token = (node / "api-token").read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}", "Host": f"{self.host}:{self.port}",
                        "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.replay_key = str(uuid.uuid4())

    def post(self, body: str, key: str, expect: int) -> float:
        t = time.perf_counter()
        self.conn.request("POST", "/v1/sales", body=body, headers={**self.headers, "Idempotency-Key": key})
        resp = self.conn.getresponse()
        resp.read()
        took = time.perf_counter() - t
        if resp.status != expect:
            raise SystemExit(f"POST /v1/sales answered {resp.status}, not {expect}")
        return took

    def sales(self, n: int) -> tuple[float, list[float]]:
        before = _cpu_s(self.pid)
        lat = [self.post(json.dumps({"amount": f"{1 + i % 90}.00", "method": "card",
                                     "card": {"pan": PAN, "expiry": "1230"}}), str(uuid.uuid4()), 201)
               for i in range(n)]
        return (_cpu_s(self.pid) - before) * 1000 / n, lat

    def replays(self, n: int) -> tuple[float, list[float]]:
        body = '{"amount": "1.00", "method": "cash"}'
        before = _cpu_s(self.pid)
        lat = [self.post(body, self.replay_key, 200) for _ in range(n)]
        return (_cpu_s(self.pid) - before) * 1000 / n, lat


def in_process(core: NodeCore, n: int) -> tuple[float, list[float]]:
    cpu = time.process_time()
    lat = []
    for i in range(n):
        t = time.perf_counter()
        core.sell(100 + i % 900, card=core.seal_card(PAN, "1230", "chip"))
        lat.append(time.perf_counter() - t)
    return (time.process_time() - cpu) * 1000 / n, lat


def run(tree: Path, rounds: int, per_block: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        switch = nacl.signing.SigningKey.generate()
        site = init_site(root / "site", "Bench", switch_key=keys.x25519_public_of(switch).hex())
        for name in ("after", "before", "twin"):
            enroll_one_step(site, root / name, "terminal", name, api="127.0.0.1:0")
        site.update_policy(max_terminal_pending_minor=10**12, max_site_pending_minor=10**12)
        for name in ("after", "before"):
            (root / name / "inbox").mkdir(exist_ok=True)
            (root / name / "inbox" / "policy.env").write_bytes(site.policy_envelope())
        group = ProcessGroup(root / "logs")
        twin = NodeCore.open(root / "twin")
        twin.ingest(site.policy_envelope(), "organizer")
        figures: dict[str, list[float]] = {}
        lat: dict[str, list[float]] = {"in_process": [], "after": [], "before": []}

        def note(name: str, value: float) -> None:
            figures.setdefault(name, []).append(value)
        try:
            # Each node imports its own checkout, whatever the directory this runs from: `python -m`
            # puts the current directory first on the path, before PYTHONPATH (run from a checkout,
            # both nodes ran that checkout's code), unless PYTHONSAFEPATH is set.
            here = Path(__file__).resolve().parents[1]
            group.start_node("after", root / "after", "--no-mdns",
                             wrap=["env", "PYTHONSAFEPATH=1", f"PYTHONPATH={here}"])
            group.start_node("before", root / "before", "--no-mdns",
                             wrap=["env", "PYTHONSAFEPATH=1", f"PYTHONPATH={tree}"])
            doors = {"after": Door(root / "after"), "before": Door(root / "before")}
            for door in doors.values():  # warm-up, and the replayed key's first (201) answer
                door.sales(20)
                door.post('{"amount": "1.00", "method": "cash"}', door.replay_key, 201)
            for r in range(rounds):
                order = ["in_process", "after", "before"]
                order = order[r % 3:] + order[:r % 3]
                medians = {}
                for side in order:
                    cpu, got = in_process(twin, per_block) if side == "in_process" else doors[side].sales(per_block)
                    lat[side] += got
                    medians[side] = statistics.median(got) * 1000
                    note(f"{side}_cpu_ms", cpu)
                    note(f"{side}_median_ms", medians[side])
                for side in ("after", "before"):
                    note(f"{side}_minus_in_process_ms", medians[side] - medians["in_process"])
                for side in (["after", "before"] if r % 2 == 0 else ["before", "after"]):
                    cpu, got = doors[side].replays(per_block)
                    note(f"{side}_replay_cpu_ms", cpu)
                    note(f"{side}_replay_median_ms", statistics.median(got) * 1000)
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in figures.items())
                      + f"; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        finally:
            group.stop_all()
            twin.close()
    out: dict[str, object] = {k: statistics.median(v) for k, v in figures.items()}
    for side, values in lat.items():
        values.sort()
        out[f"{side}_p99_ms"] = values[max(0, int(len(values) * 0.99) - 1)] * 1000
        out[f"{side}_max_ms"] = values[-1] * 1000
    out.update({"rounds": rounds, "per_block": per_block, "load_average_1m": os.getloadavg()[0]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, required=True,
                    help="the checkout whose node is 'before' (its meshpos package is imported from there)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-block", type=int, default=100, help="sales (and replays) per block")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (args.tree / "meshpos" / "__init__.py").is_file():
        ap.error(f"{args.tree} is not a checkout of meshpos (no meshpos/__init__.py)")
    out = run(args.tree.resolve(), args.rounds, args.per_block)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"POST /v1/sales, keyed card, keep-alive, medians of {args.rounds} rounds of {args.per_block}: "
              f"after {out['after_median_ms']:.2f} ms ({out['after_cpu_ms']:.2f} ms node CPU), "
              f"before {out['before_median_ms']:.2f} ms ({out['before_cpu_ms']:.2f} ms), in process "
              f"{out['in_process_median_ms']:.2f} ms ({out['in_process_cpu_ms']:.2f} ms CPU); API minus in process "
              f"after +{out['after_minus_in_process_ms']:.2f} ms, before +{out['before_minus_in_process_ms']:.2f} ms; "
              f"replayed key after {out['after_replay_cpu_ms']:.2f} ms CPU, before {out['before_replay_cpu_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
