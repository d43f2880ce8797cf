"""``meshpos doctor``: check a node piece by piece, each with OK or a remedy."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshpos.cli.output import emit_json

MARKS = {"ok": "[ OK ]", "warn": "[WARN]", "fail": "[FAIL]", "skip": "[SKIP]"}


def _path(text: str) -> Path:
    return Path(text).expanduser()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("doctor", help="check a node: config, certificate, database, network, mDNS, peers, switch, printer",
                       description="Run, in order, the checks a technician makes when a terminal \"does not "
                                   "connect\", and print for each OK or a remedy. Read-only: works beside a running "
                                   "node. Exit status 1 when a check fails.")
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    p.add_argument("--mdns-wait", type=float, default=4.0, metavar="SECONDS",
                   help="how long to listen for mDNS announcements (default 4)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    import trio

    from meshpos.apps.doctor import run_checks, to_json
    checks = trio.run(lambda: run_checks(args.node_dir, mdns_wait=args.mdns_wait))
    result = to_json(checks)
    if args.json:
        emit_json(result)
    else:
        for c in checks:
            print(f"{MARKS[c.state]} {c.name}: {c.detail}")
            if c.remedy and c.state in ("fail", "warn"):
                print(f"       remedy: {c.remedy}")
        failed = [c.name for c in checks if c.state == "fail"]
        print("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return 0 if result["ok"] else 1
