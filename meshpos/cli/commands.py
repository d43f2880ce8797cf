"""The subcommands of ``meshpos``: each one parses, calls the library, prints."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from typing import Any

from meshpos.cli.args import path_arg as _path
from meshpos.domain.roles import ROLES
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.domain.currency import check_currency, format_amount, parse_amount
from meshpos.domain.errors import InputError
from meshpos.domain.policy import MAX_SWITCH_INSTANCES
from meshpos.infra.jsonfile import read_json, write_json
from meshpos.node import client
from meshpos.node.ops import SealedCard
from meshpos.node.enroll import create_request, enroll_one_step, install_answer
from meshpos.site.sitedir import check_switch_url, init_site, load_site, read_switch_key_file
from meshpos.wire.cards import check_pan, seal_card
from meshpos.cli import secret_input
from meshpos.cli.output import emit_json, table


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _site(sub)
    _enroll(sub)
    _sell(sub)
    _sales(sub)
    _status(sub)
    _void(sub)
    from meshpos.cli import cashier_cmd, more
    more.register(sub)
    cashier_cmd.register(sub)


# -- site ----------------------------------------------------------------------------

def _site(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("site", help="create and manage a site (the organizer's CA and policy)",
                       description="The organizer's site: its CA key, its policy, revocations.")
    s = p.add_subparsers(dest="site_command", metavar="SITE_COMMAND", required=True)
    i = s.add_parser("init", help="create a new site directory with its CA and policy",
                     description="Create SITE_DIR: the site CA (Ed25519), its certificate and the signed "
                                 "site policy. Keep ca.key offline: whoever holds it can enroll devices.")
    i.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    i.add_argument("--name", required=True, help="the event or site name shown on receipts")
    i.add_argument("--currency", default="EUR", help="ISO 4217 currency of every sale (default EUR)")
    i.add_argument("--switch-key", type=_path, metavar="FILE",
                   help="the switch's public key file (switch.pub, 64 hex characters); card sales need it")
    i.add_argument("--switch-url", metavar="URL", action="append", default=[], help=SWITCH_URL_HELP)
    i.add_argument("--dashboard-password", nargs="?", const=secret_input.ASK, metavar="-",
                   help="set a password for the organizer dashboard: `-` reads it from standard input (one "
                        "line), no value asks for it without echo; never on the command line")
    _limit_options(i, "(default 24)", "(default 500.00)", "(default 10000.00)", "(default 100000.00)")
    i.add_argument("--json", action="store_true", help="print the site as JSON")
    i.set_defaults(handler=cmd_site_init)

    sp = s.add_parser("set-policy", help="change the offline rules (window, caps) from a given time on",
                      description="Sign a new policy version with other offline limits. Each sale is judged by "
                                  "the version in force at its own time (protocols/rules.md), so a lower cap "
                                  "never refuses what was sold before it takes effect; it takes effect "
                                  "--effective-in minutes from now (default 10), so every terminal has it "
                                  "before it applies. Hand it to a node with `meshpos site push`.")
    sp.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    _limit_options(sp, "", "", "", "")
    sp.add_argument("--effective-in", type=int, default=10, metavar="MINUTES",
                    help="minutes from now when the new limits apply (default 10; 0: at once)")
    sp.set_defaults(handler=cmd_site_set_policy)

    w = s.add_parser("set-switch", help="set the switch's key and addresses in the site policy",
                     description="Sign a new policy version naming the switch: its key and every instance's "
                                 "address (repeat --switch-url; the list replaces the previous one). Enrolled "
                                 "nodes receive it through the ledger once one of them imports it (meshpos site "
                                 "push). A policy with more than one instance is refused by nodes and switches "
                                 "older than this option: upgrade them first (protocols/files.md).")
    w.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    w.add_argument("--switch-key", type=_path, metavar="FILE", required=True)
    w.add_argument("--switch-url", metavar="URL", action="append", required=True, help=SWITCH_URL_HELP)
    w.set_defaults(handler=cmd_site_set_switch)

    r = s.add_parser("revoke", help="revoke an enrolled node (stolen, lost, misbehaving)",
                     description="Sign a revocation of NODE (name or node id). Its sales up to the "
                                 "revocation's cut stay valid and are forwarded; later ones are refused by "
                                 "every node and the switch. The cut is --cut-seq, or with --node the last sale "
                                 "of NODE that node holds, or else the time of the revocation. With --node, the "
                                 "revocation is put into that node's ledger at once and replicates to the whole "
                                 "mesh.")
    r.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    r.add_argument("node", metavar="NODE", help="name or node id of the node to revoke")
    r.add_argument("--reason", help="why (kept in the revocation)")
    r.add_argument("--node", dest="via", type=_path, metavar="NODE_DIR", help="a node that takes it into the ledger")
    r.add_argument("--cut-seq", type=int, metavar="N",
                   help="keep the node's sales up to sequence number N (default with --node: the last one it holds)")
    r.set_defaults(handler=cmd_site_revoke)

    push = s.add_parser("push", help="hand the current policy and revocations to a node's ledger",
                        description="Put the site's current signed policy and all revocations into NODE_DIR's "
                                    "ledger (running or not); the mesh spreads them.")
    push.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    push.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    push.set_defaults(handler=cmd_site_push)

    sh = s.add_parser("show", help="show the site, its policy and enrolled nodes")
    sh.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(handler=cmd_site_show)


def _minor(text: str | None, currency: str) -> int | None:
    return None if text is None else parse_amount(text, currency)


def _limit_options(p: argparse.ArgumentParser, window: str, sale: str, terminal: str, site: str) -> None:
    p.add_argument("--offline-window", type=int, metavar="HOURS", help=f"hours a sale may stay offline {window}")
    p.add_argument("--max-sale", metavar="AMOUNT", help=f"per-sale offline cap {sale}")
    p.add_argument("--max-terminal-pending", metavar="AMOUNT", help=f"stored-total cap per terminal {terminal}")
    p.add_argument("--max-site-pending", metavar="AMOUNT", help=f"stored-total cap for the site {site}")


def _limits(args: argparse.Namespace, currency: str) -> dict[str, int]:
    """The policy limits given by the options of ``_limit_options``, checked."""
    limits: dict[str, int] = {}
    if args.offline_window is not None:
        if args.offline_window <= 0:
            raise InputError("--offline-window must be a positive number of hours")
        limits["offline_window_s"] = args.offline_window * 3600
    for opt, field in (("max_sale", "max_sale_minor"), ("max_terminal_pending", "max_terminal_pending_minor"),
                       ("max_site_pending", "max_site_pending_minor")):
        value = _minor(getattr(args, opt), currency)
        if value is not None:
            limits[field] = value
    return limits


def cmd_site_set_policy(args: argparse.Namespace) -> int:
    site = load_site(args.site_dir)
    limits = _limits(args, site.policy.currency)
    if not limits:
        raise InputError("nothing to change: give --offline-window, --max-sale, --max-terminal-pending or "
                         "--max-site-pending")
    if args.effective_in < 0:
        raise InputError("--effective-in must be 0 or more minutes")
    effective_at = SYSTEM_CLOCK.now_ms() + args.effective_in * 60_000
    policy = site.update_policy(effective_at=effective_at, **limits)
    print(f"policy version {policy.version}: {', '.join(f'{k}={v}' for k, v in sorted(limits.items()))}, "
          f"in force from {dt.datetime.fromtimestamp(effective_at / 1000, tz=dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    print("push it to a node with `meshpos site push SITE_DIR NODE_DIR`; the mesh spreads it")
    return 0


SWITCH_URL_HELP = ("a switch instance's forwarding address, https://HOST:PORT; repeat it for every instance "
                   "of the switch, in order of preference: a node uses the first that works and moves to the "
                   "next on connection errors or 5xx answers")


def _switch_urls(given: list[str]) -> list[str]:
    urls = [check_switch_url(u) for u in given]
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise InputError(f"--switch-url given twice: {', '.join(twice)}")
    if len(urls) > MAX_SWITCH_INSTANCES:
        raise InputError(f"at most {MAX_SWITCH_INSTANCES} switch instances (--switch-url)")
    return urls


def cmd_site_init(args: argparse.Namespace) -> int:
    secret_input.refuse_argv(args.dashboard_password, "--dashboard-password", "password")
    currency = check_currency(args.currency.upper())
    key = read_switch_key_file(args.switch_key) if args.switch_key else None
    urls = _switch_urls(args.switch_url)
    limits = _limits(args, currency)
    password = None
    if args.dashboard_password is not None:
        password = secret_input.read_password(args.dashboard_password, "--dashboard-password")
    # Everything is checked above and in init_site before SITE_DIR appears: a bad option leaves nothing.
    site = init_site(args.site_dir, args.name, currency, key, urls[0] if urls else None, password, limits=limits,
                     more_switch_urls=urls[1:])
    return _show_site(site, args.json, created=True)


def _show_site(site: Any, as_json: bool, created: bool = False) -> int:
    policy = {k: v for k, v in site.policy.to_json().items() if k != "dashboard_password"}
    if as_json:
        emit_json({"site_id": site.site_id, "name": site.policy.name, "path": str(site.path), "policy": policy,
                   "enrolled": site.enrolled()})
        return 0
    if created:
        print(f"created site {site.policy.name!r} ({site.site_id}) in {site.path}")
        print(f"keep {site.path / 'ca.key'} offline: it enrolls devices")
    else:
        print(f"site {site.policy.name!r} ({site.site_id})")
    for key, value in policy.items():
        print(f"  {key}: {value}")
    if not site.policy.switch_key:
        print("  note: no switch key yet: card sales are refused until `meshpos site set-switch`")
    nodes = site.enrolled()
    if nodes:
        print(table([[n["name"], n["role"], n["node_id"]] for n in nodes], ["NAME", "ROLE", "NODE ID"]))
    return 0


def cmd_site_show(args: argparse.Namespace) -> int:
    return _show_site(load_site(args.site_dir), args.json)


def cmd_site_set_switch(args: argparse.Namespace) -> int:
    site = load_site(args.site_dir)
    urls = _switch_urls(args.switch_url)
    policy = site.update_policy(switch_key=read_switch_key_file(args.switch_key),
                                switch_url=urls[0], switch_more_urls=tuple(urls[1:]))
    print(f"policy version {policy.version}: switch {', '.join(policy.switch_urls)} "
          f"key {(policy.switch_key or '')[:16]}...")
    print("push it to a node with `meshpos site push SITE_DIR NODE_DIR`; the mesh spreads it")
    return 0


def cmd_site_revoke(args: argparse.Namespace) -> int:
    site = load_site(args.site_dir)
    node_id = site.find_node(args.node)
    cut_seq = args.cut_seq
    if cut_seq is None and args.via:
        with client.open_node(args.via) as node:
            held = node.sales(node_id)
        cut_seq = max((int(s["seq"]) for s in held), default=0)
    raw = site.revoke(node_id, args.reason, cut_seq=cut_seq)
    cut = f"its sales up to #{cut_seq} stay valid" if cut_seq is not None else "its sales made until now stay valid"
    print(f"revoked {args.node} ({node_id}); {cut}; revocation in "
          f"{site.path / 'revocations' / (node_id + '.env')}")
    if args.via:
        with client.open_node(args.via) as node:
            node.ingest(raw)
        print(f"taken into the ledger of {args.via}; it spreads to every node it reaches")
    else:
        print("hand it to any node: `meshpos site push SITE_DIR NODE_DIR`")
    return 0


def cmd_site_push(args: argparse.Namespace) -> int:
    site = load_site(args.site_dir)
    items = [site.policy_envelope()] + [p.read_bytes() for p in sorted((site.path / "revocations").glob("*.env"))]
    with client.open_node(args.node_dir) as node:
        for raw in items:
            node.ingest(raw)
    print(f"pushed policy v{site.policy.version} and {len(items) - 1} revocation(s) to {args.node_dir}")
    return 0


# -- enrollment ------------------------------------------------------------------------

def _enroll_node_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--name", required=True, help="the node's human name (on receipts and in the inspector)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address the node accepts mesh links on")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a static peer (repeat); for networks that block multicast")
    p.add_argument("--uplink", action="store_true", help="allow this node to forward the site's queue")
    p.add_argument("--language", default="en", choices=("en", "it"), help="receipt language")
    p.add_argument("--dashboard", metavar="HOST:PORT",
                   help="serve the organizer dashboard here (a gateway; password from the site policy)")
    p.add_argument("--api", metavar="HOST:PORT",
                   help="the terminal API's TCP address for a POS app (default 127.0.0.1:7480; an address off "
                        "loopback is served over TLS with the node's certificate). Bearer token: NODE_DIR/api-token")
    from meshpos.cli.cashier_cmd import add_pin_option
    add_pin_option(p)


def _enroll(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "enroll", help="enroll a device into a site (one step, or request/sign/install)",
        description="One-step shortcut (organizer and device on one machine):\n"
                    "  meshpos enroll SITE_DIR NODE_DIR --role ROLE --name NAME\n"
                    "Real flow, the private key never leaves the device:\n"
                    "  meshpos enroll request NODE_DIR --role ROLE --name NAME --out REQUEST.json\n"
                    "  meshpos enroll sign SITE_DIR REQUEST.json --out ANSWER.json   (organizer)\n"
                    "  meshpos enroll install NODE_DIR ANSWER.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    _enroll_node_opts(p)
    p.add_argument("--valid-days", type=int, default=90, help="certificate validity (default 90 days)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_enroll)

    r = sub.add_parser("enroll-request", help="(enroll request) make this device's key and request")
    r.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    _enroll_node_opts(r)
    r.add_argument("--out", type=_path, required=True, metavar="FILE", help="where to write the request")
    r.set_defaults(handler=cmd_enroll_request)

    s = sub.add_parser("enroll-sign", help="(enroll sign) the organizer signs a request")
    s.add_argument("site_dir", type=_path, metavar="SITE_DIR")
    s.add_argument("request", type=_path, metavar="REQUEST")
    s.add_argument("--out", type=_path, required=True, metavar="FILE", help="where to write the answer")
    s.add_argument("--valid-days", type=int, default=90)
    s.set_defaults(handler=cmd_enroll_sign)

    i = sub.add_parser("enroll-install", help="(enroll install) install the organizer's answer")
    i.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    i.add_argument("answer", type=_path, metavar="ANSWER")
    i.set_defaults(handler=cmd_enroll_install)


def _print_enrolled(cfg: Any, as_json: bool = False) -> None:
    if as_json:
        emit_json(cfg.to_json())
    else:
        print(f"enrolled {cfg.role} {cfg.name!r} as node {cfg.node_id} of site {cfg.site_id}")


def cmd_enroll(args: argparse.Namespace) -> int:
    if args.valid_days <= 0:
        raise InputError("--valid-days must be positive")
    from meshpos.cli.cashier_cmd import read_checked_pin, save_pin
    pin = read_checked_pin(args.cashier_pin, "--cashier-pin")
    site = load_site(args.site_dir)
    cfg = enroll_one_step(site, args.node_dir, args.role, args.name, args.listen, args.peer, args.uplink,
                          args.language, args.valid_days, dashboard=args.dashboard, api=args.api)
    if pin is not None:
        save_pin(args.node_dir, pin)
    _print_enrolled(cfg, args.json)
    return 0


def cmd_enroll_request(args: argparse.Namespace) -> int:
    from meshpos.cli.cashier_cmd import read_checked_pin, save_pin
    pin = read_checked_pin(args.cashier_pin, "--cashier-pin")
    request = create_request(args.node_dir, args.role, args.name, args.listen, args.peer, args.uplink,
                             args.language, dashboard=args.dashboard, api=args.api)
    if pin is not None:
        save_pin(args.node_dir, pin)
    write_json(args.out, request)
    print(f"request written to {args.out}: give it to the organizer (`meshpos enroll sign`)")
    return 0


def cmd_enroll_sign(args: argparse.Namespace) -> int:
    site = load_site(args.site_dir)
    answer = site.sign_request(read_json(args.request, "enrollment request"), valid_days=args.valid_days)
    write_json(args.out, answer)
    print(f"answer written to {args.out}: install it on the device (`meshpos enroll install`)")
    return 0


def cmd_enroll_install(args: argparse.Namespace) -> int:
    _print_enrolled(install_answer(args.node_dir, read_json(args.answer, "enrollment answer")))
    return 0


# -- selling ---------------------------------------------------------------------------------

def _sell(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sell", help="take a sale (card or cash); prints it once it is durable",
                       description="Take one offline sale. The card number is sealed to the switch's key at "
                                   "once; only brand and last 4 digits are kept. The sale is acknowledged "
                                   "(printed) only after it is on disk.")
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    p.add_argument("--amount", required=True, help="amount in the site currency, e.g. 12.50")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--card", nargs="?", const=secret_input.ASK, metavar="-",
                     help="a card sale (keyed card numbers stand in for the reader): `--card -` reads one line "
                          "`PAN [MMYY]` from standard input, `--card` alone asks for the number without echo; "
                          "never on the command line")
    how.add_argument("--cash", action="store_true", help="a cash sale")
    p.add_argument("--expiry", metavar="MMYY", help="card expiry (or after the card number on its line)")
    p.add_argument("--entry-mode", default="manual", choices=("chip", "contactless", "magstripe", "manual"))
    p.add_argument("--description", help="what was sold")
    p.add_argument("--json", action="store_true", help="print the sale as JSON (as `sales --json` lists it)")
    p.set_defaults(handler=cmd_sell)


def cmd_sell(args: argparse.Namespace) -> int:
    secret_input.refuse_argv(args.card, "--card", "card number")
    with client.open_node(args.node_dir) as node:
        return _sell_on(node, args)


def _sell_on(node: client.Node, args: argparse.Namespace) -> int:
    policy = node.policy()
    amount = parse_amount(args.amount, policy.currency)
    card = None
    if args.card is not None:
        pan, expiry = secret_input.read_card(args.card, args.expiry)
        pan = check_pan(pan)
        if not policy.switch_key:
            from meshpos.domain.errors import PolicyError
            raise PolicyError("this site's policy names no switch key, so card data cannot be sealed: take cash, "
                              "or have the organizer run `meshpos site set-switch`")
        # an expired card is refused here, by this machine's clock, before anything is signed
        capture = seal_card(pan, expiry, args.entry_mode, bytes.fromhex(policy.switch_key),
                            at_ms=SYSTEM_CLOCK.now_ms())
        del pan
        card = SealedCard.of(capture)
    sale = node.sell(amount, card, args.description)
    if args.json:
        emit_json(sale)
    else:
        how = f"{sale['card_brand']} **** {sale['card_last4']}" if sale["method"] == "card" else "cash"
        print(f"sale {sale['id']}: {sale['amount']} {sale['currency']} {how}, {sale['status']}")
    return 0


def _sales(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sales", help="list the sales this node knows (the whole site's)")
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    p.add_argument("--terminal", help="only this terminal's sales (node id)")
    p.add_argument("--json", action="store_true", help="one JSON object per sale, in a list")
    p.set_defaults(handler=cmd_sales)


def cmd_sales(args: argparse.Namespace) -> int:
    with client.open_node(args.node_dir) as node:
        sales = node.sales(args.terminal)
    if args.json:
        emit_json(sales)
        return 0
    rows = [[s["id"], s["terminal_name"], s["amount"], s["currency"], s["method"],
             s["card_last4"] and f"**** {s['card_last4']}", s["status"], s["auth_code"], s["created_at"]]
            for s in sales]
    print(table(rows, ["SALE", "TERMINAL", "AMOUNT", "CUR", "METHOD", "CARD", "STATUS", "AUTH", "CREATED"]))
    print(f"{len(sales)} sale(s)")
    return 0


def _status(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="the node's identity, ledger, queue and devices",
                       description="The node's identity, ledger, sales (card sales pending authorization; cash "
                                   "is final when taken), devices, and its own sales at risk: pending sales that "
                                   "fewer than 2 devices are known to hold (by the statuses the running node has "
                                   "received; a stopped node knows only itself).")
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    with client.open_node(args.node_dir) as node:
        st = node.status()
    if args.json:
        emit_json(st)
        return 0
    print(f"{st['role']} {st['name']!r} ({st['node_id']}) of site {st['site_name']!r} ({st['site_id']})")
    print(f"  certificate expires {st['certificate_expires']}"
          + ("" if st["certificate_valid"] else "  ** NOT VALID NOW **"))
    print(f"  ledger: {st['ledger']['entries']} entries in {st['ledger']['shards']} shard(s)")
    pend = st["pending"]
    print(f"  sales: {st['sales']['total']} known, {st['sales']['own']} own; pending {pend['count']}")
    risk = st["at_risk"]
    print(f"  at risk: {risk['count']} of this terminal's pending sale(s)"
          + (f" ({format_amount(risk['amount_minor'], st['policy']['currency'])} {st['policy']['currency']})"
             if risk["count"] else "")
          + f" held by fewer than {risk['min_holders']} devices")
    print("  by status: " + ", ".join(f"{k} {v}" for k, v in st["sales"]["by_status"].items() if v))
    print(f"  uplink allowed: {'yes' if st['uplink_allowed'] else 'no'};"
          f" switch configured: {'yes' if st['switch_configured'] else 'no'}")
    for key in ("running", "peers", "printer", "uplink", "api"):
        if key in st:
            print(f"  {key}: {json.dumps(st[key])}")
    _print_instances(st.get("uplink"))
    return 0


def _print_instances(uplink: Any) -> None:
    """Which switch instance the node reaches, and how each of the policy's instances fares."""
    if not isinstance(uplink, dict) or not uplink.get("instances"):
        return
    instances = uplink["instances"]
    print(f"  switch instance reached: {uplink.get('switch_url') or 'none yet'}")
    for k, inst in enumerate(instances, 1):
        how = ("in use" if inst["current"] else "standby") + (
            f", {inst['failures']} failure(s) in a row, next try in {inst['retry_in_s']:g} s"
            if inst["failures"] else "")
        print(f"    {k}/{len(instances)} {inst['url']}: {how}")


def _void(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("void", help="void a pending sale of this terminal")
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    p.add_argument("sale_id", metavar="SALE_ID")
    p.add_argument("--reason")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_void)


def cmd_void(args: argparse.Namespace) -> int:
    with client.open_node(args.node_dir) as node:
        sale = node.void(args.sale_id, args.reason)
    if args.json:
        emit_json(sale)
    else:
        print(f"sale {sale['id']} is {sale['status']}")
    return 0



