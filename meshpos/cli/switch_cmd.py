"""``meshpos switch init | add-site | run | status``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import trio

from meshpos.cli.args import path_arg as _path
from meshpos.domain.errors import ConfigError, MeshposError
from meshpos.domain.text import shown
from meshpos.identity import keys
from meshpos.infra.logfmt import configure_logging
from meshpos.switch.database import ENV_VAR, migrate_database, redact
from meshpos.switch.switchdir import ACQUIRER_FORMATS, SwitchDir, add_site, init_switch, make_instance

DESCRIPTION = """\
The processor-side switch. Uplink nodes of registered sites forward their site's
signed sales to it over HTTPS (mutual TLS: nodes present their enrolled
certificates, and pin the switch by the key named in their site policy). The
switch verifies every sale, de-duplicates on the sale id, opens the sealed card
data with its key, advises the acquirer (ISO 8583 0220, repeats 0221, reversals
0420; or the JSON adapter) and answers with results signed by its key. The acquirer
link is TLS (optionally mutual) unless --acquirer-plain is given at init.

The switch keeps its state in SQLite (SWITCH_DIR/switch.db) by default: one
process on one machine. With PostgreSQL (init --db, or $MESHPOS_SWITCH_DB) any
number of instances serve at once (`switch instance`), every one active;
protocols/switch-instances.md says how they agree on each sale.
"""

EPILOG = """\
set-up, in order:
  meshpos switch init /srv/switch --listen 0.0.0.0:8443 --acquirer acq.example:8583 \
      --acquirer-ca acquirer-ca.pem [--acquirer-cert c.pem --acquirer-key k.pem]
  meshpos site init SITE_DIR --name "Fiera" --switch-key /srv/switch/switch.pub \\
      --switch-url https://switch.example:8443
  meshpos switch add-site /srv/switch SITE_DIR      (needs only site.json, ca.pem, policy.env, revocations/)
  meshpos switch run /srv/switch --metrics 127.0.0.1:9100

several instances on PostgreSQL (the password in the environment, never in a file):
  export MESHPOS_SWITCH_DB='postgresql://switch:PASSWORD@db.example/switch'
  meshpos switch init /srv/switch-a --listen 0.0.0.0:8443 --acquirer acq.example:8583 ...
  meshpos switch instance /srv/switch-a /srv/switch-b --listen 0.0.0.0:8444
  meshpos switch run /srv/switch-a & meshpos switch run /srv/switch-b &
  meshpos switch migrate /srv/switch-a              (after upgrading meshpos, once for all instances)
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
    i.add_argument("--db", metavar="URL",
                   help="keep the state in PostgreSQL at this postgresql:// URL (several instances can then "
                        f"share it) instead of SWITCH_DIR/switch.db; ${ENV_VAR}, when set, wins. The config keeps "
                        "the URL without its password: give that in $" + ENV_VAR + ", PGPASSWORD or ~/.pgpass")
    i.add_argument("--acquirer-connections", type=int, default=1, metavar="N",
                   help="ISO 8583 connections to the acquirer, 1..64 (default 1): calls go to the least busy "
                        "one, so one slow connection does not hold the others")
    i.add_argument("--json", action="store_true", help="print the result as JSON")

    n = sub.add_parser("instance", help="make another instance of this switch (same key, same PostgreSQL)",
                       description="Create NEW_DIR for another instance of the switch of SWITCH_DIR: the same "
                                   "key and TLS certificate, the same PostgreSQL database, its own instance name "
                                   "and listen address. Run each instance on its own directory; all serve at "
                                   "once. A switch on SQLite has one instance only.")
    n.add_argument("switch_dir", type=_path, metavar="SWITCH_DIR")
    n.add_argument("new_dir", type=_path, metavar="NEW_DIR")
    n.add_argument("--listen", required=True, metavar="HOST:PORT", help="where the new instance serves the API")
    n.add_argument("--json", action="store_true", help="print the result as JSON")

    m = sub.add_parser("migrate", help="bring the database schema to this program's version",
                       description="Create or change the switch's tables to this version of meshpos (a schema "
                                   "version table records where a database is). SQLite files migrate by "
                                   "themselves when opened; a PostgreSQL database is migrated only by this "
                                   "command, once for all instances (run it before starting upgraded ones).")
    m.add_argument("switch_dir", type=_path, metavar="SWITCH_DIR")
    m.add_argument("--json", action="store_true", help="print the result as JSON")

    a = sub.add_parser("add-site", help="register a site (its CA certificate and signed policy)",
                       description="Register SITE_DIR's site: its CA certificate (ca.pem), its signed policy "
                                   "(policy.env, which must name this switch's key) and its revocations. "
                                   "Running again updates the policy and revocations. The CA's private key "
                                   "is not needed. Running instances take the site (and new revocations) within "
                                   "seconds, without a restart.")
    a.add_argument("switch_dir", type=_path, metavar="SWITCH_DIR")
    a.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    a.add_argument("--merchant-id", metavar="ID15",
                   help="the acquirer's merchant id for this site, 15 characters (default: from the site id)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")

    r = sub.add_parser("run", help="serve the forwarding API until SIGINT / SIGTERM",
                       description="Serve HTTPS on the configured address until SIGINT or SIGTERM.")
    r.add_argument("switch_dir", type=_path, metavar="SWITCH_DIR")
    r.add_argument("--listen", metavar="HOST:PORT", help="override the configured address (port 0: any free one)")
    r.add_argument("--metrics", metavar="HOST:PORT",
                   help="also serve plain HTTP here: GET /healthz (alive), /readyz (database and acquirer "
                        "usable: 200, else 503) and /metrics (Prometheus); keep it to the monitoring network")

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
        if args.db and redact(args.db) != args.db:
            raise ConfigError("--db holds a password, which every local user could read in the process list: "
                              f"give the URL with its password in ${ENV_VAR} instead (or use PGPASSWORD, ~/.pgpass)")
        sd = init_switch(args.switch_dir, args.listen, args.acquirer, args.acquirer_format, args.acquirer_ca,
                         acquirer_cert=args.acquirer_cert, acquirer_key=args.acquirer_key,
                         acquirer_plain=args.acquirer_plain, db=args.db,
                         acquirer_connections=args.acquirer_connections)
        pub = sd.pub_path.read_text().strip()
        where = redact(sd.db_location())
        _emit({"switch_dir": str(sd.path), "switch_key": pub, "switch_pub": str(sd.pub_path), "database": where},
              args.json, [
            f"switch created in {sd.path}, database {where}",
            f"switch key (X25519): {pub}",
            f"give {sd.pub_path} to each organizer: meshpos site init SITE_DIR --switch-key {sd.pub_path} ...",
        ])
    elif args.switch_command == "instance":
        new = make_instance(args.switch_dir, args.new_dir, args.listen)
        cfg = new.config()
        _emit({"instance_dir": str(new.path), "instance": cfg.instance, "listen": cfg.listen}, args.json, [
            f"instance {cfg.instance} created in {new.path}, listening on {cfg.listen} once run",
            f"add its URL to each site: meshpos site set-switch SITE_DIR --switch-url https://{cfg.listen} ...",
        ])
    elif args.switch_command == "migrate":
        sd = SwitchDir(args.switch_dir)
        before, after = migrate_database(sd.db_location())
        _emit({"database": redact(sd.db_location()), "from": before, "to": after}, args.json, [
            f"schema of {redact(sd.db_location())}: version {before} -> {after}" if before != after else
            f"schema of {redact(sd.db_location())} is current (version {after})",
        ])
    elif args.switch_command == "add-site":
        from meshpos.site.sitedir import check_site_dir
        check_site_dir(args.site_dir)  # not a node directory: its policy may be stale, its revocations missing
        row = add_site(args.switch_dir, args.site_dir, args.merchant_id)
        _emit({"site_id": row.site_id, "name": row.name, "merchant_id": row.merchant_id}, args.json, [
            f"site {row.name!r} ({row.site_id}) registered, merchant id {row.merchant_id!r}",
            "running instances take it within seconds (no restart needed)",
        ])
    elif args.switch_command == "run":
        from meshpos.switch.service import run_until_signalled
        SwitchDir(args.switch_dir).config()
        try:
            def listening(port: int, metrics_port: int | None) -> None:
                extra = f", metrics on port {metrics_port}" if metrics_port is not None else ""
                print(f"switch listening on port {port}{extra} (Ctrl-C to stop)", flush=True)
            trio.run(run_until_signalled, args.switch_dir, args.listen, args.metrics, listening)
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
        cfg = sd.config()
        where = redact(sd.db_location())
        _emit({"switch_key": pub, "instance": cfg.instance, "database": where,
               "sites": [{"site_id": s.site_id, "name": s.name, "merchant_id": s.merchant_id} for s in sites],
               "sales": counts}, args.json, [
            f"switch key {pub}, instance {cfg.instance}, database {where}",
            *[f"site {s.name!r} ({s.site_id}), merchant id {s.merchant_id!r}" for s in sites],
            "sales: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        ])
    return 0


def main_switch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose or args.switch_command == "run":
        level = logging.WARNING - 10 * min(args.verbose + (1 if args.switch_command == "run" else 0), 2)
        configure_logging(level)
    try:
        return _cmd(args)
    except MeshposError as exc:
        print(f"meshpos switch: error: {shown(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"meshpos switch: error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main_switch(sys.argv[1:]))
