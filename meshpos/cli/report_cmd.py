"""``meshpos report``: end-of-day reconciliation of one node's view of the site."""

from __future__ import annotations

import argparse

from meshpos.cli.args import path_arg as _path
from meshpos.cli.output import emit_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="end-of-day reconciliation: totals by status and method, pending, mismatches",
                       description="Per terminal and for the site: counts and totals by status and by method, the "
                                   "sales still pending with their deadline, and every mismatch between what the "
                                   "terminals recorded and what the switch settled. Any node holds the whole "
                                   "site's ledger; running or not.")
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    p.add_argument("--csv", type=_path, metavar="FILE", help="also write the report as CSV")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from meshpos.domain.errors import NodeNotRunningError
    from meshpos.node import client
    from meshpos.node.report import collect, render_text, summarize, write_csv
    try:
        with client.running(args.node_dir) as node:
            data = node.report()
    except NodeNotRunningError:
        from meshpos.node.core import NodeCore
        core = NodeCore.open(args.node_dir)
        try:
            data = collect(core)
        finally:
            core.close()
    rep = summarize(data)
    if args.csv is not None:
        try:
            n = write_csv(rep, args.csv)
        except OSError as exc:
            from meshpos.domain.errors import ConfigError
            raise ConfigError(f"{args.csv}: cannot write the CSV report: {exc.strerror or exc}") from exc
    if args.json:
        emit_json(rep)
    else:
        print(render_text(rep))
        if args.csv is not None:
            print(f"{n} rows written to {args.csv}")
    return 0
