"""``meshpos acquirer-sim``: run the acquirer host simulator until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
from pathlib import Path

import trio

from ..errors import ConfigError, MeshposError
from .iso8583 import LengthHeader
from .simulator import SimRules, Simulator, serve_simulator

DESCRIPTION = """\
Run an acquirer host simulator for tests and demos. It answers ISO 8583 financial
advices (0220), repeats (0221) and reversals (0420) over TCP -- or the JSON adapter's
POST /v1/advices and /v1/reversals over HTTPS -- by the rules in a JSON file:
decline by card prefix, decline above an amount, a fixed delay, a drop rate (no
answer), a close rate (connection closed instead), all with a fixed seed.
It never stores or logs a full card number.
"""

EPILOG = """\
rules file (all keys optional):
  {"seed": 1, "delay_ms": 50, "drop_rate": 0.0, "close_rate": 0.0,
   "decline_above": {"amount_minor": 1000000, "response_code": "61"},
   "cards": [{"prefix": "4000000000000002", "response_code": "05"},
             {"prefix": "4111", "delay_ms": 200, "drop_first": 1, "close_first": 0}]}

stats file: rewritten atomically after every message received, as
  {"totals": {"0220": n, "0221": n, "0420": n, "charged": n, ...},
   "by_sale": {"<rrn or Idempotency-Key>": {"0220": n, ...}}, "charged": [...], ...}

examples:
  meshpos acquirer-sim --listen 127.0.0.1:8583 --rules devices/acquirer-rules.example.json
  meshpos acquirer-sim --listen 127.0.0.1:0 --format json --tls-cert c.pem --tls-key k.pem --stats s.json
"""


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshpos acquirer-sim",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", required=True, type=_listen, metavar="HOST:PORT",
                   help="address to listen on; port 0 picks a free one (printed on start)")
    p.add_argument("--rules", type=Path, metavar="FILE", help="JSON rules file (default: approve everything)")
    p.add_argument("--stats", type=Path, metavar="FILE", help="write message counts here as JSON after every message")
    p.add_argument("--format", choices=("iso8583", "json"), default="iso8583",
                   help="ISO 8583 over TCP (default) or the JSON adapter over HTTPS")
    p.add_argument("--framing", choices=[h.value for h in LengthHeader], default=LengthHeader.BINARY2.value,
                   help="ISO 8583 length header: 2-byte binary (default), 4 ASCII digits, or none")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain (json format)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key (json format)")
    p.add_argument("--client-ca", type=Path, metavar="PEM",
                   help="require client certificates issued by this CA (json format)")
    p.add_argument("--plain-http", action="store_true", help="json format without TLS (local testing only)")
    return p


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.format != "json" or args.plain_http:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigError("--format json needs --tls-cert and --tls-key (or --plain-http)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.client_ca is not None:
            ctx.load_verify_locations(args.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files: {exc}") from exc
    return ctx


async def _run(args: argparse.Namespace, rules: SimRules, context: ssl.SSLContext | None) -> None:
    host, port = args.listen
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            sim: Simulator = await nursery.start(
                lambda task_status: serve_simulator(
                    rules, host, port, format=args.format, ssl_context=context, stats_path=args.stats,
                    header=LengthHeader(args.framing), task_status=task_status,
                )
            )
            print(f"acquirer simulator ({args.format}) listening on {host}:{sim.port}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main_acquirer_sim(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        rules = SimRules.load(args.rules) if args.rules is not None else SimRules()
        context = _ssl_context(args)
        trio.run(_run, args, rules, context)
    except MeshposError as exc:
        print(f"meshpos acquirer-sim: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"meshpos acquirer-sim: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0
