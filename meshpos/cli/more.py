"""Subcommands of the later components: run, receipt, uplink, switch, acquirer-sim."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
from pathlib import Path

from meshpos.cli.args import path_arg as _path
from meshpos.domain.errors import ConfigError
from meshpos.domain.text import shown
from meshpos.infra.logfmt import OneLineFormatter
from meshpos.node import client


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run a node: mesh links, discovery, replication, forwarding, printing",
                       description="Run the node in NODE_DIR until SIGINT/SIGTERM: it discovers the site's "
                                   "nodes (mDNS and static peers), keeps links to some of them, replicates the "
                                   "ledger, forwards the site's queue when it has an uplink, prints receipts, "
                                   "and serves the terminal API: on NODE_DIR/api.sock (which `meshpos sell/sales/status/...` "
                                   "use; the node's own operations, /v1/node/..., only there) and on the TCP "
                                   "address of config.json's `api` (default 127.0.0.1:7480; HTTPS off loopback), "
                                   "with the bearer token of NODE_DIR/api-token (protocols/terminal-api.yaml).")
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    p.add_argument("--log-file", type=_path, metavar="FILE",
                   help=f"also write the log to FILE, rotated at {LOG_MAX_BYTES // 2**20} MiB keeping "
                        f"{LOG_BACKUPS} old files (FILE.1 ... FILE.{LOG_BACKUPS})")
    p.add_argument("--no-mdns", action="store_true", help="static peers only (networks that block multicast)")
    p.add_argument("--no-peer-exchange", action="store_true",
                   help="dial only static peers and what mDNS finds, not the addresses the other nodes' "
                        "signed statuses name (protocols/peer-exchange.md): a fixed topology")
    p.add_argument("--clock-offset", type=float, default=0.0, metavar="SECONDS",
                   help="TEST ONLY: run as if this machine's clock were SECONDS off (negative: behind), "
                        "to test how a site copes with a terminal whose clock is wrong (protocols/clocks.md). "
                        "Never use it to correct a clock: set the system time instead.")
    p.set_defaults(handler=cmd_run)

    r = sub.add_parser("receipt", help="print again, or preview, the receipt of a sale",
                       description="Queue a receipt of SALE_ID on the node's printer, or with --preview show "
                                   "it as text (what the printer would print).")
    r.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    r.add_argument("sale_id", metavar="SALE_ID")
    r.add_argument("--copy", choices=("customer", "merchant", "outcome"), default="customer")
    r.add_argument("--preview", action="store_true", help="render as text here instead of printing")
    r.set_defaults(handler=cmd_receipt)

    d = sub.add_parser("demo", help="a whole simulated fair on this machine (no root, loopback only)",
                       description="Start an acquirer simulator, the switch, a gateway and N terminals as "
                                   "separate processes with real TLS links on loopback; sell offline, kill and "
                                   "restart a terminal, give one terminal an uplink, and wait until every sale "
                                   "is final on every node. Exit 0 only then.")
    d.add_argument("--terminals", type=int, default=4, help="number of terminals (default 4)")
    d.add_argument("--sales", type=int, default=36, help="offline sales across the terminals (default 36)")
    d.add_argument("--out", type=_path, default=Path("demo-out"), help="folder for receipts, logs and state")
    d.add_argument("--stay", action="store_true",
                   help="keep the fair running after the scripted day, until Ctrl-C: try terminal 1's cashier app "
                        "in a browser at the address and PIN the demo prints")
    d.set_defaults(handler=cmd_demo)

    u = sub.add_parser("uplink", help="allow or forbid this node to forward the site's queue",
                       description="`on` lets the node forward the site's queue whenever the switch answers; "
                                   "`off` stops it. Persisted in config.json; applied at once to a running node.")
    u.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    u.add_argument("state", choices=("on", "off"))
    u.set_defaults(handler=cmd_uplink)

    from meshpos.cli import doctor_cmd, inspect_cmd, report_cmd  # issue 6: seeing the mesh
    inspect_cmd.register(sub)
    doctor_cmd.register(sub)
    report_cmd.register(sub)

    # Parsed by their own modules (see main.PASSTHROUGH); listed here for `meshpos --help`.
    sub.add_parser("switch", help="the processor-side switch: init, add-site, run (meshpos switch --help)")
    sub.add_parser("acquirer-sim", help="the acquirer host simulator (meshpos acquirer-sim --help)")


LOG_MAX_BYTES = 10 * 2**20  # --log-file: rotated at this size...
LOG_BACKUPS = 5  # ...keeping this many old files: at most 60 MiB of log in all


def open_log_file(path: Path) -> logging.Handler:
    """A rotating log file (a node that logs a flood of errors cannot fill its disk);
    ConfigError naming the file when it cannot be opened."""
    try:
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS,
                                                       encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open the log file: {exc.strerror or exc}") from exc
    handler.setFormatter(OneLineFormatter())
    return handler


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from meshpos.infra.clock import SYSTEM_CLOCK
    from meshpos.node.runner import run_node
    from meshpos.terminal.server import api_component
    if args.log_file:
        logging.getLogger().addHandler(open_log_file(args.log_file))
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    from meshpos.infra.clock import OffsetClock
    clock = SYSTEM_CLOCK if not args.clock_offset else OffsetClock(SYSTEM_CLOCK, int(args.clock_offset * 1000))
    if args.clock_offset:
        logging.getLogger(__name__).warning("TEST ONLY: this node's clock is shifted by %+g s", args.clock_offset)
    trio.run(run_node, args.node_dir, not args.no_mdns, not args.no_peer_exchange, clock, [api_component])
    return 0


def cmd_receipt(args: argparse.Namespace) -> int:
    if args.preview:
        from meshpos.devices.receipts import render_text
        from meshpos.node.core import NodeCore
        from meshpos.node.receipts import receipt_data, receipt_options
        with client.open_node(args.node_dir) as node:
            sale = node.sale(args.sale_id)
        core = None
        try:
            core = NodeCore.open(args.node_dir, lock=False)
            print(render_text(receipt_data(core, sale), receipt_options(core), args.copy))
        finally:
            if core is not None:
                core.store.close()
        return 0
    with client.running(args.node_dir) as running:
        result = running.reprint(args.sale_id, args.copy)
    print(f"{result.queued} copy of {result.sale_id} queued for printing")
    return 0


def cmd_uplink(args: argparse.Namespace) -> int:
    with client.open_node(args.node_dir) as node:
        result = node.uplink(args.state == "on")
    print(f"uplink {'allowed' if result.uplink else 'forbidden'} on {args.node_dir}")
    return 0




def cmd_demo(args: argparse.Namespace) -> int:
    import signal
    import sys

    from meshpos.apps.demo import Demo, prepare_out
    from meshpos.domain.errors import InputError, MeshposError
    if args.terminals < 1 or args.sales < 6:
        raise InputError("the demo needs at least 1 terminal and 6 sales")
    out: Path = args.out
    prepare_out(out)
    demo = Demo(out, args.terminals, args.sales, write=lambda line: print(line, flush=True))

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        code = demo.run()
        if args.stay:
            print("the fair keeps running (--stay): open the cashier app above; Ctrl-C stops it", flush=True)
            try:
                while True:
                    signal.pause()
            except KeyboardInterrupt:
                pass
        demo.procs.stop_all()
        demo.write_text_receipts()
        print(f"receipts as text: {out / 'receipts'}/*.txt; logs: {out / 'logs'}")
        return code
    except KeyboardInterrupt:
        print("\ndemo interrupted: stopping every process", file=sys.stderr)
        return 130
    except MeshposError as exc:
        print(f"demo failed: {shown(exc)}", file=sys.stderr)
        for name, child in demo.procs.children.items():
            print(f"--- last lines of {name} ---\n{child.log_tail(8)}", file=sys.stderr)
        return 1
    finally:
        demo.procs.stop_all()
