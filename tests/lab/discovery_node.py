"""A discovery-only node for the lab: advertises, browses, prints one JSON line per event.

Usage: python discovery_node.py --site S --node N [--role R] [--port P] [--ttl T]
Prints {"event": "ready"} once registered, then {"event": "seen"|"gone", ...}.
Ends on SIGTERM/SIGINT by cancelling run_discovery (which sends goodbyes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, when not installed

from meshpos.replication.discovery import DiscoveryEvent, PeerGone, run_discovery
from meshpos.wire.dnssd import LocalService


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps({**obj, "t": time.time()}) + "\n")
    sys.stdout.flush()


def on_event(event: DiscoveryEvent) -> None:
    kind = "gone" if isinstance(event, PeerGone) else "seen"
    emit({"event": kind, **dataclasses.asdict(event)})


async def main(args: argparse.Namespace) -> None:
    local = LocalService(
        site_id=args.site, node_id=args.node, role=args.role, name=f"node {args.node}",
        port=args.port, addresses=None, proto=1, uplink=args.uplink,
    )
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            handle = await nursery.start(
                lambda task_status: run_discovery(local, on_event, ttl=args.ttl, task_status=task_status)
            )
            emit({"event": "ready", "node_id": args.node})
            async def commands() -> None:
                # stdin lines: "uplink 1" / "uplink 0"
                stdin = trio.lowlevel.FdStream(0)
                buf = b""
                async for chunk in stdin:
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        parts = line.decode().split()
                        if parts[:1] == ["uplink"]:
                            await handle.set_uplink(parts[1] == "1")
                            emit({"event": "uplink", "value": parts[1] == "1"})
            if args.commands:
                nursery.start_soon(commands)
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()
    emit({"event": "stopped", "node_id": args.node})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--role", default="terminal")
    parser.add_argument("--port", type=int, default=7443)
    parser.add_argument("--ttl", type=int, default=120)
    parser.add_argument("--uplink", action="store_true")
    parser.add_argument("--commands", action="store_true", help="read commands from stdin")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)
    if args.debug:
        logging.getLogger("zeroconf").setLevel(logging.INFO)
    trio.run(main, args)
