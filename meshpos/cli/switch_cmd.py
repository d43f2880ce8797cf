"""``meshpos switch init | add-site | run | status``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import trio

from meshpos.cli.args import path_arg as _path
from meshpos.domain.errors import MeshposError
from meshpos.identity import keys
from meshpos.switch.switchdir import ACQUIRER_FORMATS, SwitchDir, add_site, init_switch

DESCRIPTION = """\
The processor-side switch. Uplink nodes of registered sites forward their site's
signed sales to it over HTTPS (mutual TLS: nodes present their enrolled
certificates, and pin the switch by the key named in their site policy). The
switch verifies every sale, de-duplicates on the sale id, opens the sealed card
data with its key, advises the acquirer (ISO 8583 0220, repeats 0221, reversals
0420; or the JSON adapter) and answers with results signed by its key. The acquirer
link is TLS (optionally mutual) unless --acquirer-plain is given at init.
"""

EPILOG = """\
set-up, in order:
  meshpos switch init /srv/switch --listen 0.0.0.0:8443 --acquirer acq.example:8583 \
      --acquirer-ca acquirer-ca.pem [--acquirer-cert c.pem --acquirer-key k.pem]
  meshpos site init SITE_DIR --name "Fiera" --switch-key /srv/switch/switch.pub \\
      --switch-url https://switch.example:8443
  meshpos switch add-site /srv/switch SITE_DIR      (needs only site.json, ca.pem, policy.env, revocations/)
  meshpos switch run /srv/switch
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshpos switch", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="switch_command", metavar="SWITCH_COMMAND", required=True)

    i = sub.add_parser("init", help="create a switch directory: key, TLS certificate, config, database",
                       description="Create SWITCH_DIR with a new Ed25519 key (switch.key, mode 0600), a "
                                   "self-signed TLS certificate of that key, the config and the database. "
                                   "Prints the switch's public key; SWITCH_DIR/switch.pub holds it for "
                                   "`meshpos site init --switch-key`.")
    i.add_argument("switch_dir", type=_path, metavar="SWITCH_DIR")
    i.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to serve the forwarding API")
    i.add_argument("--acquirer", required=True, metavar="HOST:PORT", help="the acquirer host")
    i.add_argument("--acquirer-format", choices=ACQUIRER_FORMATS, default="iso8583",
                   help="ISO 8583 over TCP with a 2-byte length header (default), or JSON over HTTPS")
    i.add_argument("--acquirer-ca", type=_path, metavar="PEM",
                   help="CA certificate(s) to trust for the acquirer's TLS (default: the system's)")
    i.add_argument("--acquirer-cert", type=_path, metavar="PEM",
                   help="client certificate (chain) the switch presents to the acquirer: mutual TLS")
    i.add_argument("--acquirer-key", type=_path, metavar="PEM", help="the private key of --acquirer-cert")
    i.add_argument("--acquirer-plain", action="store_true",
                   help="ISO 8583 over plain TCP, without TLS (a private line or a local simulator only)")
    i.add_argument("--json", action="store_true", help="print the result as JSON")

    a = sub.add_parser("add-site", help="register a site (its CA certificate and signed policy)",
                       description="Register SITE_DIR's site: its CA certificate (ca.pem), its signed policy "
                                   "(policy.env, which must name this switch's key) and its revocations. "
                                   "Running again updates the policy and revocations. The CA's private key "
                                   "is not needed. Restart a running switch to let the new site connect.")
    a.add_argument("switch_dir", type=_path, metavar="SWITCH_DIR")
    a.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    a.add_argument("--merchant-id", metavar="ID15",
                   help="the acquirer's merchant id for this site, 15 characters (default: from the site id)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")

    r = sub.add_parser("run", help="serve the forwarding API until SIGINT / SIGTERM",
                       description="Serve HTTPS on the configured address until SIGINT or SIGTERM.")
    r.add_argument("switch_dir", type=_path, metavar="SWITCH_DIR")
    r.add_argument("--listen", metavar="HOST:PORT", help="override the configured address (port 0: any free one)")

    s = sub.add_parser("status", help="show registered sites and sale counts",
                       description="Registered sites and the de-duplication table's sales by state.")
    s.add_argument("switch_dir", type=_path, metavar="SWITCH_DIR")
    s.add_argument("--json", action="store_true", help="print as JSON")
    return p


def _emit(data: dict[str, object], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))


def _cmd(args: argparse.Namespace) -> int:
    if args.switch_command == "init":
        sd = init_switch(args.switch_dir, args.listen, args.acquirer, args.acquirer_format, args.acquirer_ca,
                         acquirer_cert=args.acquirer_cert, acquirer_key=args.acquirer_key,
                         acquirer_plain=args.acquirer_plain)
        pub = sd.pub_path.read_text().strip()
        _emit({"switch_dir": str(sd.path), "switch_key": pub, "switch_pub": str(sd.pub_path)}, args.json, [
            f"switch created in {sd.path}",
            f"switch key (X25519): {pub}",
            f"give {sd.pub_path} to each organizer: meshpos site init SITE_DIR --switch-key {sd.pub_path} ...",
        ])
    elif args.switch_command == "add-site":
        from meshpos.site.sitedir import check_site_dir
        check_site_dir(args.site_dir)  # not a node directory: its policy may be stale, its revocations missing
        row = add_site(args.switch_dir, args.site_dir, args.merchant_id)
        _emit({"site_id": row.site_id, "name": row.name, "merchant_id": row.merchant_id}, args.json, [
            f"site {row.name!r} ({row.site_id}) registered, merchant id {row.merchant_id!r}",
            "restart a running switch so the site's nodes can connect",
        ])
    elif args.switch_command == "run":
        from meshpos.switch.service import run_until_signalled
        SwitchDir(args.switch_dir).config()
        try:
            trio.run(run_until_signalled, args.switch_dir, args.listen,
                     lambda port: print(f"switch listening on port {port} (Ctrl-C to stop)", flush=True))
        except KeyboardInterrupt:
            pass
    else:
        sd = SwitchDir(args.switch_dir)
        sd.config()
        store = sd.open_store()
        try:
            sites = store.sites()
            counts = store.count_states()
        finally:
            store.close()
        pub = keys.x25519_public_of(sd.key()).hex()
        _emit({"switch_key": pub, "sites": [{"site_id": s.site_id, "name": s.name, "merchant_id": s.merchant_id}
                                            for s in sites], "sales": counts}, args.json, [
            f"switch key {pub}",
            *[f"site {s.name!r} ({s.site_id}), merchant id {s.merchant_id!r}" for s in sites],
            "sales: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        ])
    return 0


def main_switch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose or args.switch_command == "run":
        level = logging.WARNING - 10 * min(args.verbose + (1 if args.switch_command == "run" else 0), 2)
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _cmd(args)
    except MeshposError as exc:
        print(f"meshpos switch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"meshpos switch: error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main_switch(sys.argv[1:]))
