"""``meshpos doctor``: what a technician checks when a terminal "does not connect".

The checks run in this order, each ending OK, WARN, FAIL (with a remedy) or
SKIP (with the reason): configuration; key and certificate; database and
ledger integrity; free disk; local network address; multicast (mDNS);
each static or discovered peer's TCP connect and TLS handshake; the switch
(uplink); the printer. They only read: the database is opened read-only
(``mode=ro``), so the doctor runs beside a running node as well as alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import automerge.core as am
import trio

from meshpos.domain.roles import READ_ONLY_ROLES, SELLING_ROLES
from meshpos.domain.clockskew import WARN_SKEW_MS, describe, too_far
from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.replication.discovery import PeerGone, PeerSeen, local_addresses, run_discovery
from meshpos.domain.errors import MeshposError, NodeNotRunningError
from meshpos.domain.hostport import parse_hostport
from meshpos.identity import certs
from meshpos.site.nodedir import NodeConfig, NodeDir
from meshpos.domain.policy import SitePolicy
from meshpos.site.roster import Roster
from meshpos.infra.sqlite import is_disk_full
from meshpos.ledger.store import APPLICATION_ID, Store
from meshpos.wire import envelope as env_mod
from meshpos.wire.dnssd import LocalService

CERT_WARN_DAYS = 7
DISK_FAIL_MB = 50
DISK_WARN_MB = 500
MDNS_WAIT = 4.0
CONNECT_TIMEOUT = 3.0
PRINTER_TIMEOUT = 3.0


@dataclass
class Check:
    name: str
    state: str  # ok | warn | fail | skip
    detail: str
    remedy: str | None = None


@dataclass
class _Ctx:
    nd: NodeDir
    clock: Clock
    cfg: NodeConfig | None = None
    policy: SitePolicy | None = None
    ca: Any = None
    running: dict[str, Any] | None = None
    discovered: dict[str, PeerSeen] | None = None


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _fail(name: str, detail: str, remedy: str) -> Check:
    return Check(name, "fail", detail, remedy)


# -- the checks -------------------------------------------------------------------------

def check_config(ctx: _Ctx) -> Check:
    name = "configuration"
    try:
        ctx.cfg = cfg = ctx.nd.config()
    except MeshposError as exc:
        return _fail(name, str(exc), "enroll this directory (meshpos enroll ...) or fix config.json")
    try:
        ctx.ca = ctx.nd.ca_cert()
        ctx.policy = ctx.nd.policy(ctx.ca)
    except MeshposError as exc:
        return _fail(name, str(exc), "install the enrollment answer again (meshpos enroll install)")
    ctx.policy = _newest_policy(ctx) or ctx.policy
    parts = [f"{cfg.role} {cfg.name!r} of site {ctx.policy.name!r}", f"listen {cfg.listen or '-'}",
             f"{len(cfg.peers)} static peer(s)", f"mDNS {'on' if cfg.mdns else 'off'}",
             f"uplink {'allowed' if cfg.uplink else 'off'}"]
    if cfg.dashboard:
        parts.append(f"dashboard {cfg.dashboard}")
    if cfg.role in SELLING_ROLES and not cfg.listen and not cfg.peers:
        return Check(name, "warn", ", ".join(parts) + ": no listen address and no static peer",
                     "set `listen` (e.g. 0.0.0.0:7420) so that peers can link to this node")
    return _ok(name, ", ".join(parts))


def check_identity(ctx: _Ctx) -> Check:
    name = "key and certificate"
    remedy = ("enroll again: `meshpos enroll request NODE_DIR ...`, the organizer signs it "
              "(`meshpos enroll sign`), then `meshpos enroll install`")
    assert ctx.cfg is not None
    try:
        key = ctx.nd.key()
        cert = ctx.nd.cert()
        ident = certs.verify_node_cert(cert, ctx.ca, now_ms=None)
    except MeshposError as exc:
        return _fail(name, str(exc), remedy if "readable by others" not in str(exc) else f"chmod 600 {ctx.nd.key_path}")
    now = ctx.clock.now_ms()
    if ident.public_key != bytes(key.verify_key) or ident.node_id != ctx.cfg.node_id:
        return _fail(name, "node.key, node.pem and config.json do not belong together", remedy)
    if ident.site_id != ctx.cfg.site_id or certs.site_id_of(ctx.ca) != ctx.cfg.site_id:
        return _fail(name, f"certificate of site {ident.site_id}, config of site {ctx.cfg.site_id}", remedy)
    if now > ident.not_after_ms:
        days = (now - ident.not_after_ms) // 86_400_000
        return _fail(name, f"certificate expired {days} day(s) ago ({_iso(ident.not_after_ms)}): "
                           "every peer refuses its links", remedy)
    if now < ident.not_before_ms:
        return _fail(name, f"certificate not valid before {_iso(ident.not_before_ms)}: is this device's clock "
                           "right?", "set the clock (date/NTP), or enroll again")
    left_days = (ident.not_after_ms - now) // 86_400_000
    if left_days < CERT_WARN_DAYS:
        return Check(name, "warn", f"certificate expires in {left_days} day(s) ({_iso(ident.not_after_ms)})", remedy)
    return _ok(name, f"{ident.role} {ident.name} ({ident.node_id}), site {ident.site_id}, valid until "
                     f"{_iso(ident.not_after_ms)}")


def _iso(ms: int) -> str:
    from meshpos.node.core import iso
    return iso(ms) or "?"


def _ro_store(nd: NodeDir) -> Store:
    conn = sqlite3.connect(f"file:{nd.db_path}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    return Store(nd.db_path, conn)


def _newest_policy(ctx: _Ctx) -> SitePolicy | None:
    """The newest verified policy in the ledger (``site push`` may have brought one)."""
    from meshpos.site.sitedir import verify_policy_envelope
    if not ctx.nd.db_path.exists():
        return None
    try:
        store = _ro_store(ctx.nd)
        try:
            raws = store.entries_of_type("policy")
        finally:
            store.close()
        policies = [verify_policy_envelope(raw, ctx.ca, "ledger policy") for raw in raws]
    except (sqlite3.DatabaseError, MeshposError):
        return None
    return max(policies, key=lambda p: p.version, default=None)


def check_database(ctx: _Ctx) -> Check:
    name = "database and ledger"
    remedy = ("stop the node, move meshpos.db (and meshpos.db-wal, -shm) aside, keep them for analysis, and start "
              "the node again: it recovers the site's ledger from its peers")
    path = ctx.nd.db_path
    if not path.exists():
        return Check(name, "warn", f"{path} does not exist yet", "start the node once (meshpos run) to create it")
    full = ("free space on that disk: the database is not damaged (do not move it aside), the node keeps "
            "every sale it acknowledged and sells again once there is room")
    try:
        store = _ro_store(ctx.nd)
    except sqlite3.DatabaseError as exc:
        if is_disk_full(exc, path.parent):
            return _fail(name, f"{path} cannot be opened: the disk is full", full)
        return _fail(name, f"{path} cannot be opened: {exc}", remedy)
    try:
        conn = store.conn
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            return _fail(name, f"{path} is not a meshpos node database", remedy)
        quick = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
        if quick != ["ok"]:
            return _fail(name, f"SQLite quick_check: {'; '.join(quick[:3])}", remedy)
        entries = store.entry_count()
        bad_entries = 0
        for (raw,) in conn.execute("SELECT raw FROM entries"):
            try:
                env_mod.decode(bytes(raw))
            except MeshposError:
                bad_entries += 1
        shards, damaged, unloadable = store.shard_names(), 0, []
        for shard in shards:
            data = store.load_shard(shard)
            damaged += data.damaged
            try:
                am.Document.load((data.snapshot or b"") + b"".join(data.chunks))
            except Exception as exc:  # automerge raises bare Exception
                unloadable.append(f"{shard} ({exc})")
        sales = int(conn.execute("SELECT count(*) FROM sales").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        if is_disk_full(exc, path.parent):
            return _fail(name, f"{path} cannot be read: the disk is full", full)
        return _fail(name, f"{path} is damaged: {exc}", remedy)
    finally:
        store.close()
    if bad_entries or unloadable:
        return _fail(name, f"{bad_entries} undecodable entr(y/ies), {len(unloadable)} shard(s) that do not load: "
                           + "; ".join(unloadable[:3]), remedy)
    detail = f"quick_check ok, {entries} entries, {len(shards)} shard(s) load, {sales} sale(s)"
    if damaged:
        return Check(name, "warn", detail + f"; {damaged} damaged change chunk(s) (CRC)",
                     "none needed: the node rebuilds those shards from its verified entries at start")
    return _ok(name, detail)


def check_disk(ctx: _Ctx) -> Check:
    name = "free disk"
    usage = shutil.disk_usage(ctx.nd.path)
    free_mb = usage.free // (1024 * 1024)
    detail = f"{free_mb} MB free of {usage.total // (1024 * 1024)} MB on {ctx.nd.path}"
    if free_mb < DISK_FAIL_MB:
        return _fail(name, detail, "free space now: a sale is acknowledged only once it is written to disk")
    if free_mb < DISK_WARN_MB:
        return Check(name, "warn", detail, "free some space (old logs, receipts)")
    return _ok(name, detail)


def check_network(ctx: _Ctx) -> Check:
    name = "local network address"
    assert ctx.cfg is not None
    addresses = local_addresses()
    if not addresses:
        return _fail(name, "no IPv4 address but loopback: this device is on no network",
                     "join the site's Wi-Fi / plug the cable, then check `ip addr`")
    detail = "IPv4 " + ", ".join(addresses)
    if ctx.cfg.listen:
        host, port = parse_hostport(ctx.cfg.listen, "listen")
        if ctx.running is not None:
            bound = (ctx.running.get("peers") or {}).get("listen_port")
            detail += f"; the running node accepts links on port {bound}"
        elif port:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, port))
            except OSError as exc:
                return _fail(name, detail + f"; cannot listen on {ctx.cfg.listen}: {exc.strerror or exc}",
                             "another program holds that port, or the address is not this device's: "
                             "change `listen` in config.json")
            detail += f"; {ctx.cfg.listen} is free to listen on"
    return _ok(name, detail)


async def check_multicast(ctx: _Ctx, wait: float) -> Check:
    name = "multicast (mDNS)"
    assert ctx.cfg is not None
    if not ctx.cfg.mdns:
        return Check(name, "skip", "mDNS is off in config.json: static peers only")
    cfg = ctx.cfg
    probe_id = secrets.token_hex(8)
    heard: dict[str, PeerSeen] = {}

    def on_event(event: PeerSeen | PeerGone) -> None:
        if isinstance(event, PeerSeen):
            heard[event.node_id] = event

    probe = LocalService(site_id=cfg.site_id, node_id=probe_id, role="inspector", name=f"doctor of {cfg.name}",
                         port=9)
    listener = LocalService(site_id=cfg.site_id, node_id=secrets.token_hex(8), role="inspector",
                            name=f"doctor listener of {cfg.name}", port=9)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_discovery(probe, lambda e: None, ttl=10,
                                                                  task_status=task_status))
            from meshpos.apps.inspector import BrowseOnlyBackend
            await nursery.start(lambda task_status: run_discovery(listener, on_event, ttl=10,
                                                                  backend=BrowseOnlyBackend(),
                                                                  task_status=task_status))
            with trio.move_on_after(wait):
                while probe_id not in heard or (ctx.running is not None and cfg.node_id not in heard
                                                and (ctx.running.get("peers") or {}).get("mdns") is not False):
                    await trio.sleep(0.1)
            await trio.sleep(min(1.0, wait))  # the others' answers
            nursery.cancel_scope.cancel()
    except (MeshposError, OSError) as exc:
        return _fail(name, f"mDNS cannot start: {exc}", "check that UDP 5353 is free and a network is up, or set "
                                                        "`mdns: false` and static `peers` in config.json")
    ctx.discovered = {k: v for k, v in heard.items() if k not in (probe_id, cfg.node_id) and v.role not in READ_ONLY_ROLES}
    peers = ", ".join(sorted(f"{p.name} ({p.role})" for p in ctx.discovered.values())) or "none"
    if probe_id not in heard:
        return _fail(name, f"our own mDNS announcement did not come back within {wait:g} s; peers heard: {peers}",
                     "multicast is blocked here (Wi-Fi client isolation, IGMP snooping, firewall on UDP 5353): "
                     "allow it on the access point, or configure static `peers` in config.json")
    detail = "our own announcement came back"
    running_mdns = ctx.running is not None and (ctx.running.get("peers") or {}).get("mdns") is not False
    if running_mdns:
        detail += ("; the running node is announced" if cfg.node_id in heard
                   else "; the running node's announcement was NOT heard")
    elif ctx.running is not None:
        detail += "; the running node runs without mDNS (--no-mdns)"
    detail += f"; site peers heard: {peers}"
    if running_mdns and cfg.node_id not in heard:
        return Check(name, "warn", detail, "restart the node (meshpos run) and look for mDNS errors in its log")
    if not ctx.discovered and not cfg.peers:
        return Check(name, "warn", detail, "no other node of the site answers: are they on, on this network?")
    return _ok(name, detail)


async def _tls_check(ctx: _Ctx, address: str) -> tuple[bool, str]:
    from meshpos.replication import tls
    host, port = parse_hostport(address, "peer")
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        return False, f"{address}: no TCP answer within {CONNECT_TIMEOUT:g} s (off, out of range, or firewalled)"
    except OSError as exc:
        return False, f"{address}: TCP connect failed: {exc.strerror or exc} (is meshpos running there?)"
    nd = ctx.nd
    try:
        client_ctx = tls.client_context(nd.cert_path, nd.key_path, nd.ca_path.read_bytes())
    except MeshposError as exc:
        await trio.aclose_forcefully(tcp)
        return False, f"{address}: TCP ok; our TLS identity does not load: {exc}"
    stream = trio.SSLStream(tcp, client_ctx, server_hostname=None, https_compatible=False)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await stream.do_handshake()
        assert ctx.policy is not None
        peer = tls.peer_identity(stream, ctx.ca, Roster(ctx.ca, ctx.policy), ctx.clock.now_ms())
        return True, f"{address}: TCP and TLS ok, {peer.identity.name} ({peer.identity.role})"
    except trio.TooSlowError:
        return False, f"{address}: TCP ok, TLS handshake did not finish"
    except (trio.BrokenResourceError, MeshposError) as exc:
        return False, f"{address}: TCP ok, TLS refused: {exc.__cause__ or exc}"
    finally:
        await trio.aclose_forcefully(stream)


async def check_peers(ctx: _Ctx) -> Check:
    name = "peers (TCP + TLS)"
    assert ctx.cfg is not None
    targets = list(ctx.cfg.peers)
    for p in (ctx.discovered or {}).values():
        if p.addresses:
            targets.append(f"{p.addresses[0]}:{p.port}")
    targets = list(dict.fromkeys(targets))
    if not targets:
        return Check(name, "skip", "no static peer configured and none discovered")
    results = []
    async with trio.open_nursery() as nursery:
        async def one(address: str) -> None:
            results.append(await _tls_check(ctx, address))
        for address in targets:
            nursery.start_soon(one, address)
    bad = [text for ok, text in results if not ok]
    good = [text for ok, text in results if ok]
    if bad:
        return _fail(name, "; ".join(bad + good),
                     "for TCP: start meshpos on that node, check the address/port and that both are on the same "
                     "network; for TLS: both must hold valid certificates of this site (meshpos doctor there)")
    return _ok(name, "; ".join(good))


async def check_switch(ctx: _Ctx) -> Check:
    name = "switch (uplink)"
    assert ctx.cfg is not None and ctx.policy is not None
    if not ctx.cfg.uplink:
        return Check(name, "skip", "this node does not forward (uplink off)")
    url = ctx.policy.switch_url
    if not url or not ctx.policy.switch_key:
        return _fail(name, "the site policy names no switch", "the organizer runs `meshpos site set-switch` "
                                                              "and `meshpos site push` to a node")
    from meshpos.uplink.client import make_client_context, probe
    try:
        ssl_ctx = make_client_context(ctx.nd.path, ctx.policy)
    except MeshposError as exc:
        return _fail(name, str(exc), "fix the node's key and certificate first")
    urls = ctx.policy.switch_urls
    up = [u for u in urls if await probe(u, ssl_ctx)]
    down = [u for u in urls if u not in up]
    if up and not down:
        return _ok(name, f"{', '.join(up)} answer{'s' if len(up) == 1 else ''} and accept this node")
    if up:
        return Check(name, "warn", f"{', '.join(up)} answer; {', '.join(down)} do not (or refuse this node)",
                     "this node forwards through the instances that answer (protocols/forwarding.md, \"Switch "
                     "instances and failover\"); tell the processor that an instance is down")
    return _fail(name, f"{', '.join(urls)} do{'es' if len(urls) == 1 else ''} not answer (or refuse this node)",
                 "check the uplink (SIM / organizer's line: can this device reach the internet?), DNS, the switch "
                 "URL in the site policy; the site's queue waits meanwhile, any other uplink node can forward it")


def check_clock(ctx: _Ctx) -> Check:
    """The running node's estimate of its clock's offset (meshpos.domain.clockskew: its peers'
    statuses, the switch's health reply); past WARN_SKEW_MS a warning."""
    name = "clock"
    if ctx.running is None:
        return Check(name, "skip", "the node is not running: it estimates its clock from its peers and the switch "
                                   "while it runs")
    clock = ctx.running.get("clock") if isinstance(ctx.running.get("clock"), dict) else {}
    est = (clock or {}).get("estimate")
    if not isinstance(est, dict) or not isinstance(est.get("offset_ms"), int):
        return Check(name, "skip", "no estimate yet: no peer status and no switch answer received")
    offset = int(est["offset_ms"])
    source = "the switch" if est.get("source") == "switch" else f"{est.get('peers')} peer(s)"
    if too_far(offset):
        return Check(name, "warn", f"this node's clock is {describe(offset)} (by {source})",
                     "set the device's date and time (NTP when it has an uplink): sale times and the offline "
                     "window follow this clock (protocols/clocks.md)")
    return _ok(name, f"within {WARN_SKEW_MS // 60_000} min of {source} ({describe(offset)})")


async def check_printer(ctx: _Ctx) -> Check:
    name = "printer"
    assert ctx.cfg is not None
    if ctx.cfg.printer is None:
        return Check(name, "skip", "no printer configured")
    from meshpos.devices.printers import STATUS_QUERY, load_printer_config, status_condition
    from meshpos.domain.errors import PrinterError
    try:
        pc = load_printer_config(ctx.cfg.printer)
    except PrinterError as exc:
        return _fail(name, f"printer configuration: {exc}", "fix `printer` in config.json (devices/README.md)")
    where = pc.describe()
    if pc.kind == "network":
        assert pc.host is not None
        try:
            with trio.fail_after(PRINTER_TIMEOUT):
                stream = await trio.open_tcp_stream(pc.host, pc.port)
        except (OSError, trio.TooSlowError) as exc:
            return _fail(name, f"{where}: unreachable ({exc})",
                         "switch the printer on, check its cable/Wi-Fi and that its IP address is the configured one")
        async with stream:
            answer = b""
            try:
                await stream.send_all(STATUS_QUERY)
                with trio.move_on_after(PRINTER_TIMEOUT):
                    while len(answer) < 2:
                        data = await stream.receive_some(16)
                        if not data:
                            break
                        answer += data
            except (trio.BrokenResourceError, OSError) as exc:
                return _fail(name, f"{where}: connection broke: {exc}", "restart the printer")
        if not answer:
            return _ok(name, f"{where}: accepts connections (does not answer status queries)")
        condition = status_condition(answer)
        if condition == "paper_out":
            return _fail(name, f"{where}: out of paper", "load a paper roll")
        if condition == "cover_open":
            return _fail(name, f"{where}: cover open", "close the printer's cover")
        return _ok(name, f"{where}: ready")
    if pc.kind == "file":
        target = Path(str(pc.device))
        if not target.exists() or not os.access(target, os.W_OK):
            return _fail(name, f"{where}: {target} is missing or not writable",
                         "plug the printer in / check the device permissions (group lp)")
        return _ok(name, f"{where}: writable")
    if pc.kind == "serial":
        if not Path(str(pc.device)).exists():
            return _fail(name, f"{where}: {pc.device} does not exist", "plug the printer's cable in")
        return _ok(name, f"{where}: device present")
    if pc.kind == "usb":
        return Check(name, "warn", f"{where}: USB presence is not checked here", "look at `lsusb`")
    return _ok(name, f"{where}")


# -- running it ---------------------------------------------------------------------------

async def run_checks(path: Path, *, clock: Clock = SYSTEM_CLOCK, mdns_wait: float = MDNS_WAIT) -> list[Check]:
    ctx = _Ctx(NodeDir(path), clock)
    try:
        from meshpos.node import client
        ctx.running = await trio.to_thread.run_sync(lambda: client.running(path, timeout=5.0).status())
    except (NodeNotRunningError, MeshposError):
        ctx.running = None
    checks = [check_config(ctx)]
    if checks[0].state == "fail":
        return checks
    checks.append(check_identity(ctx))
    checks.append(check_database(ctx))
    checks.append(check_disk(ctx))
    checks.append(check_network(ctx))
    checks.append(await check_multicast(ctx, mdns_wait))
    checks.append(await check_peers(ctx))
    checks.append(await check_switch(ctx))
    checks.append(check_clock(ctx))
    checks.append(await check_printer(ctx))
    return checks


def to_json(checks: list[Check], running: bool | None = None) -> dict[str, Any]:
    return {"ok": not any(c.state == "fail" for c in checks), "checks": [asdict(c) for c in checks]}
