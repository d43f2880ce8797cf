"""``meshpos acquirer-sim``: run the acquirer host simulator until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
from pathlib import Path

import trio

from meshpos.cli.args import hostport_arg
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.domain.errors import ConfigError, MeshposError
from meshpos.domain.text import shown
from meshpos.wire.iso8583 import LengthHeader
from meshpos.acquirer.simulator import SimRules, Simulator, serve_simulator
from meshpos.acquirer.tls import self_signed, server_context

DESCRIPTION = """\
Run an acquirer host simulator for tests and demos. It answers ISO 8583 financial
advices (0220), repeats (0221) and reversals (0420) over TLS -- or the JSON adapter's
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

TLS (both formats): with --tls-cert and --tls-key it serves that certificate; without
them it makes a self-signed one for the listen address and writes it to --tls-cert-out,
the file a switch trusts (meshpos switch init --acquirer-ca FILE). --plain serves plain
TCP / HTTP instead (a switch then needs --acquirer-plain).

examples:
  meshpos acquirer-sim --listen 127.0.0.1:8583 --tls-cert-out acquirer-ca.pem \
      --rules devices/acquirer-rules.example.json
  meshpos acquirer-sim --listen 127.0.0.1:0 --format json --tls-cert c.pem --tls-key k.pem --stats s.json
  meshpos acquirer-sim --listen 127.0.0.1:8583 --plain
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshpos acquirer-sim",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", required=True, type=hostport_arg, metavar="HOST:PORT",
                   help="address to listen on; port 0 picks a free one (printed on start)")
    p.add_argument("--rules", type=Path, metavar="FILE", help="JSON rules file (default: approve everything)")
    p.add_argument("--stats", type=Path, metavar="FILE", help="write message counts here as JSON after every message")
    p.add_argument("--format", choices=("iso8583", "json"), default="iso8583",
                   help="ISO 8583 over TLS (default) or the JSON adapter over HTTPS")
    p.add_argument("--framing", choices=[h.value for h in LengthHeader], default=LengthHeader.BINARY2.value,
                   help="ISO 8583 length header: 2-byte binary (default), 4 ASCII digits, or none")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    p.add_argument("--tls-cert-out", type=Path, metavar="PEM",
                   help="without --tls-cert: make a self-signed certificate and write it here (for the switch)")
    p.add_argument("--client-ca", type=Path, metavar="PEM",
                   help="require client certificates issued by this CA (mutual TLS)")
    p.add_argument("--plain", "--plain-http", dest="plain", action="store_true",
                   help="no TLS: plain TCP / HTTP (local testing only)")
    return p


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.plain:
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key")
    if args.tls_cert is not None:
        return server_context(args.tls_cert, args.tls_key, args.client_ca)
    if args.tls_cert_out is None:
        raise ConfigError("TLS needs --tls-cert and --tls-key, or --tls-cert-out FILE to make a self-signed "
                          "certificate the switch can trust (or --plain for plain TCP)")
    host = args.listen[0]
    cert, key = self_signed([host, "localhost", "127.0.0.1", "::1"], SYSTEM_CLOCK.now_ms())
    try:
        args.tls_cert_out.write_bytes(cert)
    except OSError as exc:
        raise ConfigError(f"cannot write {args.tls_cert_out}: {exc.strerror}") from exc
    return server_context(cert, key, args.client_ca)


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
            print(f"acquirer simulator ({args.format}, {'plain' if context is None else 'TLS'}) listening on "
                  f"{host}:{sim.port}", flush=True)
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
        print(f"meshpos acquirer-sim: {shown(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"meshpos acquirer-sim: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0
