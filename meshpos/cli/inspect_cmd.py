"""``meshpos inspect``: the field-test view of the mesh, and ``meshpos inspect probe``."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from meshpos.domain.text import duration
from meshpos.cli.args import path_arg as _path
from meshpos.domain.currency import format_amount
from meshpos.domain.errors import InputError
from meshpos.cli.output import emit_json, table
from meshpos.status.holders import MIN_HOLDERS

if TYPE_CHECKING:  # imported where used: `meshpos --help` stays quick
    from meshpos.apps.inspector import InspectorView
    from meshpos.status.meshview import NodeRow

DEFAULT_WAIT = 6.0
GRAPH_FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf"}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "inspect", help="field test: find the site's nodes, join read-only, show the state of the mesh",
        description="meshpos inspect INSPECTOR_DIR [options]\n"
                    "  Find the site's nodes (mDNS, the config's peers, --peer), link to them read-only with the\n"
                    "  inspector enrollment in INSPECTOR_DIR, gather their statuses for --wait seconds and show\n"
                    "  one table: reachability, RTT, ledger lag, pending sales against the offline window,\n"
                    "  uplink, printer; site totals and warnings (unreachable nodes, partitions, windows);\n"
                    "  the sales at risk: pending card sales that fewer than 2 nodes are known to hold.\n"
                    "meshpos inspect probe NODE_ADDR INSPECTOR_DIR\n"
                    "  Measure the RTT (PING/PONG) and the throughput (the whole ledger's transfer) to one node.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="+", metavar="INSPECTOR_DIR | probe NODE_ADDR INSPECTOR_DIR")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="a node address to link to (repeat)")
    p.add_argument("--no-mdns", action="store_true", help="static addresses only")
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                   help=f"how long to gather before showing (default {DEFAULT_WAIT:g})")
    p.add_argument("--json", action="store_true", help="print the view as JSON (one object per refresh with --watch)")
    p.add_argument("--watch", action="store_true", help="keep running and refresh the view")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period of --watch")
    p.add_argument("--graph", type=_path, metavar="FILE",
                   help="write the link topology: Graphviz DOT, or SVG/PNG/PDF by the file's suffix (needs `dot`)")
    p.add_argument("--pings", type=int, default=10, help="probe: number of PING/PONG round trips")
    p.set_defaults(handler=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    import trio
    if args.target[0] == "probe":
        if len(args.target) != 3:
            raise InputError("usage: meshpos inspect probe NODE_ADDR INSPECTOR_DIR")
        return _probe(args, args.target[1], _path(args.target[2]))
    if len(args.target) != 1:
        raise InputError("usage: meshpos inspect INSPECTOR_DIR [options]  (or: inspect probe NODE_ADDR INSPECTOR_DIR)")
    if args.wait < 0 or args.interval <= 0:
        raise InputError("--wait must be >= 0 and --interval > 0")
    if args.graph is not None:
        _graph_format(args.graph)  # fail before gathering
    return int(trio.run(_inspect, args, _path(args.target[0])))


async def _inspect(args: argparse.Namespace, inspector_dir: Path) -> int:
    import trio

    from meshpos.apps.inspector import Inspector
    from meshpos.node.core import NodeCore
    core = NodeCore.open(inspector_dir)
    try:
        inspector = Inspector(core, args.peer, mdns=not args.no_mdns)
        async with trio.open_nursery() as nursery:
            await nursery.start(inspector.run)
            await trio.sleep(args.wait)
            while True:
                view = inspector.view()
                _show(view, args, clear=args.watch and not args.json)
                if args.graph is not None:
                    write_graph(view, args.graph)
                if not args.watch:
                    break
                await trio.sleep(args.interval)
            nursery.cancel_scope.cancel()
    finally:
        core.close()
    return 0


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else duration(seconds, compact=True)


def _uplink(n: NodeRow) -> str:
    """The uplink's state and, once it reached one, which switch instance (HOST:PORT)."""
    state = n.uplink or "-"
    return f"{state} via {n.switch}" if n.switch and n.uplink not in (None, "off") else state


def render(view: InspectorView) -> str:
    mesh = view.mesh
    t = mesh.totals
    cur = t.currency
    window = mesh.offline_window_s
    rows = []
    for n in mesh.nodes:
        pend = "-" if n.pending is None else f"{n.pending} / {format_amount(n.pending_amount_minor or 0, cur)}"
        oldest = "-" if n.oldest_pending_age_s is None else f"{_age(n.oldest_pending_age_s)} of {_age(window)}"
        rows.append([n.name, n.role, n.address or "-", "yes" if n.reachable else "NO",
                     "-" if n.rtt_ms is None else f"{n.rtt_ms} ms",
                     "-" if n.behind is None else str(n.behind), pend, oldest,
                     _uplink(n), n.printer or "-", _age(n.status_age_s)])
    out = [f"site {view.site.name!r} ({view.site.site_id}): {t.reachable}/{t.nodes} node(s) "
           f"reachable, {view.inspector.links} direct link(s)"
           + (f"; topology: a star through {mesh.topology.hub}" if mesh.topology.shape == "star" else ""),
           table(rows, ["NODE", "ROLE", "ADDRESS", "REACHABLE", "RTT", "BEHIND", "PENDING", "OLDEST/WINDOW",
                        "UPLINK", "PRINTER", "STATUS AGE"]),
           f"site: {t.pending} pending sale(s), {format_amount(t.pending_amount_minor, cur)} {cur}"
           + ("" if t.window_left_s is None else f"; first window closes in {_age(t.window_left_s)}")]
    risky = view.at_risk
    if risky:
        out.append(f"at risk: {len(risky)} pending sale(s) held by fewer than {MIN_HOLDERS} nodes "
                   "(one lost device loses them):")
        out.append(table([[s["id"], s["terminal_name"], f"{s['amount']} {s['currency']}", s["method"],
                           str(s["held_by"]), s["created_at"]] for s in risky],
                         ["SALE", "TERMINAL", "AMOUNT", "METHOD", "HELD BY", "CREATED"]))
    else:
        out.append(f"at risk: none (every pending sale is held by at least {MIN_HOLDERS} nodes)")
    if mesh.warnings:
        out.append("warnings:")
        out += [f"  ! {w}" for w in mesh.warnings]
    else:
        out.append("no warnings")
    return "\n".join(out)


def _show(view: InspectorView, args: argparse.Namespace, clear: bool) -> None:
    if args.json:
        if args.watch:
            sys.stdout.write(json.dumps(view.to_json(), sort_keys=True) + "\n")
            sys.stdout.flush()
        else:
            emit_json(view.to_json())
        return
    if clear:
        sys.stdout.write("\x1b[H\x1b[2J")
    print(render(view), flush=True)


def _graph_format(path: Path) -> str | None:
    fmt = GRAPH_FORMATS.get(path.suffix.lower())
    if fmt is not None and shutil.which("dot") is None:
        raise InputError(f"{path}: writing {fmt.upper()} needs Graphviz's `dot` program, which is not installed "
                         "(apt-get install graphviz), or name the file .dot to get the DOT text")
    return fmt


def write_graph(view: InspectorView, path: Path) -> None:
    from meshpos.status.meshview import to_dot
    dot = to_dot(view.mesh)
    fmt = _graph_format(path)
    if fmt is None:
        path.write_text(dot)
        return
    proc = subprocess.run(["dot", f"-T{fmt}", "-o", str(path)], input=dot.encode(), capture_output=True,
                          timeout=60)
    if proc.returncode != 0:
        raise InputError(f"dot failed to write {path}: {proc.stderr.decode(errors='replace').strip()}")


def _probe(args: argparse.Namespace, address: str, inspector_dir: Path) -> int:
    import trio

    from meshpos.infra.clock import SYSTEM_CLOCK
    from meshpos.apps.inspector import probe_node
    if args.pings < 1:
        raise InputError("--pings must be at least 1")
    result = trio.run(lambda: probe_node(inspector_dir, address, SYSTEM_CLOCK, pings=args.pings)).to_json()
    if args.json:
        emit_json(result)
        return 0
    rtt = result["rtt_ms"]
    print(f"{result['name'] or '?'} ({result['role']}, {result['node_id']}) at {result['address']}")
    print(f"  TCP + TLS + HELLO: {result['connect_ms']} ms")
    if rtt:
        print(f"  RTT over {result['pings']} PING/PONG: min {rtt['min']} / avg {rtt['avg']} / max {rtt['max']} ms")
    tp = result["throughput_kib_s"]
    print(f"  ledger transfer: {result['ledger_bytes']} bytes ({result['entries']} entries) in "
          f"{result['transfer_s']} s" + ("" if tp is None else f" = {tp} KiB/s"))
    return 0
