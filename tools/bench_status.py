#!/usr/bin/env python3
"""Benchmark: a gateway's signed status (issue 15), its size and its CPU, for N-terminal sites.

    python tools/bench_status.py                           # this checkout, 50/200/256 terminals
    python tools/bench_status.py --against ../base --runs 5   # alternate with another checkout

A gateway linked to every terminal of the site (client isolation: the star) and holding sales of
each (marks of 20,000..1,000,000, three LEB128 bytes); the status is what ``StatusPublisher``
signs (its links given, not opened: 256 TLS links are beside the point here). Per site size:

- size: the signed envelope in bytes (the bound is 8192), and how many of the N links and N
  ``held`` marks a reader gets out of it;
- build: ``StatusPublisher.body()`` + ``envelope.seal`` (the node does this every status period);
- take: ``StatusBoard.offer`` of a new status on another node (decode, Ed25519 check, reading the
  short ids against the roster): every node does this for every node's status each period;
- read: the decoding alone (``check_status_body`` and, where the checkout has it, the short-id
  reading), without the signature check.

Times are medians of --reps statuses in a run (ms per status, CPU time of this process). With
--against DIR the script runs itself in DIR's checkout (DIR/.venv/bin/python, DIR first on the
path) and in this one, alternately, --runs times each, and prints the medians of the runs side by
side: the same code measures both, in the same minutes. The host is whatever it is: say so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SIZES = (50, 200, 256)


def one_run(sizes: tuple[int, ...], reps: int) -> dict[str, Any]:
    import nacl.signing

    from meshpos.domain.clockskew import ClockSkew
    from meshpos.identity import certs, keys
    from meshpos.infra.clock import FakeClock, SYSTEM_CLOCK
    from meshpos.node.core import NodeCore
    from meshpos.node.memnode import enroll, make_site
    from meshpos.node import status_pub
    from meshpos.node.status_pub import StatusPublisher
    from meshpos.status.board import StatusBoard, check_status_body
    from meshpos.wire import canonical, envelope
    from meshpos.wire.status import LinkSeen, PrinterSeen, UplinkSeen

    class Publisher(StatusPublisher):
        def __init__(self, core: NodeCore, board: StatusBoard, links: tuple[LinkSeen, ...]) -> None:
            super().__init__(core, board, None, listen_port=lambda: 7300, printer=lambda: PrinterSeen("ok", 0),
                             uplink=lambda: UplinkSeen("up", None, None), started_at=core.clock.now_ms(),
                             skew=ClockSkew())
            self._links = links

        def links(self) -> tuple[LinkSeen, ...]:
            # what the checkout's own links() keeps of them (before issue 15: the 48 lowest ids)
            return self._links[:getattr(status_pub, "MAX_LINKS", None)]

    out: dict[str, Any] = {"short_ids": False}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        site = make_site(root / "site")
        clock = FakeClock(now_ms=SYSTEM_CLOCK.now_ms(), monotonic=1000.0)
        gw = NodeCore.open(enroll(site, root / "gw", "GW", "gateway"), clock)
        reader = NodeCore.open(enroll(site, root / "t", "T", "terminal"), clock)
        try:
            reader.ingest(gw.ledger.raw(f"cert/{gw.node_id}") or b"", "peer")
            members: list[str] = []
            rng = random.Random(15)
            for n in sizes:
                while len(members) < n:  # the site grows: the same first terminals at every size
                    key = nacl.signing.SigningKey(rng.randbytes(32))
                    public = bytes(key.verify_key)
                    der = certs.to_der(certs.issue(site.ca_cert, site.ca_key, public, "terminal",
                                                   f"T{len(members):03d}", clock.now_ms(), 30))
                    gw.roster.add_cert_der(der)
                    reader.roster.add_cert_der(der)
                    members.append(keys.node_id_of(public))
                links = tuple(sorted((LinkSeen(t, "terminal", rng.randint(1, 120)) for t in members),
                                     key=lambda link: link.node))
                gw.ledger.holdings.rebuild([(t, rng.randint(20_000, 1_000_000)) for t in members], ())
                pub = Publisher(gw, StatusBoard(gw.roster, clock), links)
                board = StatusBoard(reader.roster, clock)
                build, take, read, raws = [], [], [], []
                for _ in range(reps + 1):  # the first is a warm-up (caches), not counted
                    clock.advance(1.0)
                    t0 = time.process_time()
                    raw = envelope.seal("status", gw.node_id, {"status": pub.body().to_json()}, gw.key)
                    build.append(time.process_time() - t0)
                    raws.append(raw)
                for raw in raws:
                    clock.advance(1.0)
                    body = canonical.decode(raw)["body"]
                    t0 = time.process_time()
                    status = check_status_body(body)
                    short = getattr(board, "short_ids", None)
                    if short is not None:
                        short.resolve(status)
                    read.append(time.process_time() - t0)
                    t0 = time.process_time()
                    got = board.offer(raw, "gw")
                    take.append(time.process_time() - t0)
                    assert got is not None
                out["short_ids"] = getattr(board, "short_ids", None) is not None
                last = board.statuses[gw.node_id].body
                out[str(n)] = {
                    "bytes": len(raws[-1]), "links": len(last.links), "held": len(last.held),
                    "build_ms": statistics.median(build[1:]) * 1000,
                    "take_ms": statistics.median(take[1:]) * 1000,
                    "read_ms": statistics.median(read[1:]) * 1000,
                }
        finally:
            gw.close()
            reader.close()
    return out


def run_in(tree: Path | None, sizes: tuple[int, ...], reps: int) -> dict[str, Any]:
    """One run in a child process: this checkout, or ``tree``'s with its own venv."""
    python = str(tree / ".venv" / "bin" / "python") if tree else sys.executable
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = str(tree)
    else:
        env["PYTHONPATH"] = str(HERE.parent.parent)
    proc = subprocess.run([python, str(HERE), "--one", "--json", "--reps", str(reps),
                           "--terminals", ",".join(map(str, sizes))],
                          cwd=tree or HERE.parent.parent, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench run failed in {tree or 'this checkout'}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def medians(runs: list[dict[str, Any]], sizes: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"short_ids": runs[0]["short_ids"], "runs": len(runs)}
    for n in sizes:
        out[str(n)] = {k: statistics.median(r[str(n)][k] for r in runs) for k in runs[0][str(n)]}
    return out


def table(label: str, result: dict[str, Any], sizes: tuple[int, ...]) -> str:
    lines = [f"{label} (short ids: {'yes' if result['short_ids'] else 'no'}):",
             "  terminals  bytes  links kept  held kept  build ms  take ms  read ms"]
    for n in sizes:
        r = result[str(n)]
        lines.append(f"  {n:9d}  {r['bytes']:5.0f}  {r['links']:4.0f}/{n:<5d} {r['held']:4.0f}/{n:<4d}"
                     f"  {r['build_ms']:8.2f}  {r['take_ms']:7.2f}  {r['read_ms']:7.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--terminals", default=",".join(map(str, SIZES)),
                    help="site sizes, comma-separated (default %(default)s)")
    ap.add_argument("--reps", type=int, default=30, help="statuses built and taken per size and run")
    ap.add_argument("--runs", type=int, default=3, help="runs (each a new site), medians reported")
    ap.add_argument("--against", type=Path, help="another checkout (with its .venv) measured alternately")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one run, in this process
    args = ap.parse_args()
    sizes = tuple(int(s) for s in args.terminals.split(","))
    if args.one:
        print(json.dumps(one_run(sizes, args.reps)))
        return
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(args.runs):
        if args.against:
            theirs.append(run_in(args.against.resolve(), sizes, args.reps))
        ours.append(run_in(None, sizes, args.reps))
    result = {"this": medians(ours, sizes), "load": os.getloadavg()}
    if theirs:
        result["against"] = medians(theirs, sizes)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    if theirs:
        print(table(f"against ({args.against})", result["against"], sizes))
    print(table("this checkout", result["this"], sizes))
    print(f"medians of {args.runs} run(s) x {args.reps} statuses; load average at the end: "
          + " ".join(f"{x:.1f}" for x in result["load"]))


if __name__ == "__main__":
    main()
