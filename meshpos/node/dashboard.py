"""The organizer dashboard: a read-only web page served by the gateway on the local network.

``dashboard: "HOST:PORT"`` in the node's config.json turns it on. Every
request needs HTTP Basic auth whose password matches the hash in the node's
``dashboard.json`` (0600, written when a gateway is enrolled with
``--dashboard`` from a site with a dashboard password: the hash is in no policy,
so no terminal or inspector holds it; meshpos.domain.policy.check_password; the user
name is not checked). With no hash the dashboard is not served at all.

Logins are bounded: each source address may try ``LOGIN_BURST`` passwords, then
one per ``LOGIN_REFILL_S`` (429 with Retry-After meanwhile; a table of at most
``MAX_LOGIN_SOURCES`` addresses, least recently seen forgotten), and at most
``SCRYPT_AT_ONCE`` password checks (16 MiB of scrypt each) run at once, so
failed logins cost a fixed amount of memory. Connections are bounded before any
TLS work (``LIMITS``: meshpos.infra.asgi.serve_gated). On a loopback address the page is
plain HTTP; on any other it is HTTPS only, with a P-256 certificate the gateway
makes for it (browsers refuse the nodes' Ed25519 certificates): its SHA-256
fingerprint is logged and shown by ``meshpos status``.

Served by Starlette on Hypercorn's trio worker, the terminal API's stack (the routes and
the page: meshpos.node.dashboard_web). The page polls ``/api/state`` every few seconds:
the mesh as a picture (meshpos.status.meshsvg, drawn from the same view as ``meshpos
inspect``: nodes, links, uplinks, partitions), terminals and their state with each one's
offline window (the time left for its oldest pending card sale), the site-wide pending
queue (card sales awaiting authorization: cash is final when taken) and the time left in
its offline window, the sales at risk (pending, held by fewer than 2 devices:
meshpos.status.holders) with terminal and amount, sales per hour by method (a chart:
meshpos.node.hourchart, and a table), settled totals by status, alerts. Nothing here writes.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import hashlib
import ipaddress
import logging
import math
import os
import ssl
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import trio

from meshpos.domain.currency import format_amount
from meshpos.domain.hostport import parse_hostport
from meshpos.infra.asgi import HypercornConfig, bind_tcp, serve_gated
from meshpos.infra.netguard import InboundLimits
from meshpos.status.fieldwarn import PendingSale
from meshpos.status.meshsvg import mesh_svg
from meshpos.status.meshview import Known, analyze
from meshpos.node.core import NodeCore, iso
from meshpos.node.dashboard_web import make_app
from meshpos.node.hourchart import hour_chart
from meshpos.domain.policy import check_password
from meshpos.node.report import METHODS, OUT_OF_TOTALS, _totals
from meshpos.node.status import DashboardStatus
from meshpos.replication.discovery import PeerSeen
from meshpos.replication.sync import Replicator
from meshpos.status.board import StatusBoard
from meshpos.status.holders import MIN_HOLDERS, at_risk

log = logging.getLogger(__name__)

AUTH_CACHE = 64
LOGIN_BURST = 5
LOGIN_REFILL_S = 12.0
MAX_LOGIN_SOURCES = 4096
SCRYPT_AT_ONCE = 2
# connections held at once; not yet past their first request, in all and from one address; seconds
# a connection may take to send its first request (meshpos.infra.netguard, meshpos.infra.asgi)
LIMITS = InboundLimits(total=128, pending=32, per_source=8, proof_timeout=10.0)
HANDSHAKE_TIMEOUT_S = 5.0
KEEP_ALIVE_S = 10.0  # the page asks every REFRESH_MS: one connection stays open between
TLS_CERT, TLS_KEY = "dashboard-tls.pem", "dashboard-tls.key"
TLS_VALID_DAYS = 825
REFRESH_MS = 2000


class LoginLimiter:
    """A token bucket per source address, in an LRU table of bounded size (time injected)."""

    def __init__(self, now: Callable[[], float] = time.monotonic, burst: int = LOGIN_BURST,
                 refill_s: float = LOGIN_REFILL_S, max_sources: int = MAX_LOGIN_SOURCES) -> None:
        self.now, self.burst, self.refill_s, self.max_sources = now, burst, refill_s, max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)

    def take(self, source: str) -> float | None:
        """None: one attempt allowed now (a token taken); else seconds until the next one."""
        now = self.now()
        tokens, at = self._buckets.get(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) / self.refill_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) * self.refill_s


class LinkedMesh(Protocol):
    """What the dashboard reads of the node's mesh (node/runner.py's Mesh is one)."""

    @property
    def replicator(self) -> Replicator: ...

    @property
    def discovered(self) -> dict[str, PeerSeen]: ...


class Dashboard:
    def __init__(self, core: NodeCore, mesh: LinkedMesh | None, board: StatusBoard | None,
                 password_hash: str) -> None:
        self.core = core
        self.mesh = mesh
        self.board = board
        self.password_hash = password_hash
        self._ok: dict[bytes, None] = {}  # digests of Authorization headers that passed (bounded)
        self._sales_cache: tuple[tuple[int, int], dict[str, Any]] | None = None
        self.logins = LoginLimiter(core.clock.monotonic)
        self.scrypt = trio.CapacityLimiter(SCRYPT_AT_ONCE)

    # -- the password ---------------------------------------------------------------------

    async def authorize(self, header: str, source: str) -> bool | float:
        """True, False (no or a wrong password), or seconds to wait before ``source`` (an
        address) may try again. ``header``: the request's Authorization header, "" if none."""
        stored = self.password_hash
        if not stored or not header.lower().startswith("basic "):
            return False
        key = hashlib.sha256(f"{stored}\0{header}".encode()).digest()
        if key in self._ok:
            return True
        try:
            user_pass = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        _, sep, password = user_pass.partition(":")
        if not sep:
            return False
        wait = self.logins.take(source)
        if wait is not None:
            return wait
        ok = await trio.to_thread.run_sync(check_password, stored, password, limiter=self.scrypt)
        if ok:
            if len(self._ok) >= AUTH_CACHE:
                self._ok.pop(next(iter(self._ok)))
            self._ok[key] = None
        return ok

    # -- the state ------------------------------------------------------------------------

    def _known(self) -> dict[str, Known]:
        roster = self.core.roster
        mesh = self.mesh
        linked: dict[str, Any] = {}
        discovered: dict[str, Any] = {}
        if mesh is not None:
            linked = {s.peer_node: s for s in mesh.replicator.sessions if s.peer_node and not s.closed}
            discovered = dict(mesh.discovered)
        out = {}
        for node_id in set(roster.identities) | set(linked) | set(discovered):
            ident = roster.identities.get(node_id)
            seen = discovered.get(node_id)
            session = linked.get(node_id)
            rtt = session.conn.rtt if session is not None else None
            out[node_id] = Known(name=ident.name if ident else None, role=ident.role if ident else None,
                                 address=f"{seen.addresses[0]}:{seen.port}" if seen and seen.addresses else None,
                                 linked=session is not None,
                                 rtt_ms=None if rtt is None else int(math.ceil(rtt * 1000)),
                                 revoked=node_id in roster.revoked)
        return out

    def _sales_summary(self, now: int) -> dict[str, Any]:
        key = (self.core.store.entry_count(), now // 5000)
        if self._sales_cache is not None and self._sales_cache[0] == key:
            return self._sales_cache[1]
        sales = self.core.sales()
        pending = [s for s in sales if s["status"] == "pending"]
        per_terminal: dict[str, list[dict[str, Any]]] = {}
        for s in sales:
            per_terminal.setdefault(s["terminal"], []).append(s)
        risky = [{"id": s["id"], "terminal": s["terminal"], "terminal_name": s["terminal_name"],
                  "amount": s["amount"], "amount_minor": s["amount_minor"], "method": s["method"],
                  "held_by": s["held_by"], "created_at": s["created_at"], "deadline": s["deadline"]}
                 for s in pending if at_risk(s["status"], s["held_by"])]
        oldest: dict[str, int] = {}  # terminal -> created_at of its oldest pending (card) sale
        for p in pending:
            oldest[p["terminal"]] = min(oldest.get(p["terminal"], p["created_at_ms"]), p["created_at_ms"])
        hours = per_hour(sales, self.core.policy.currency)
        summary = {"site": _totals(sales), "pending": pending, "at_risk": risky,
                   "terminals": {t: _totals(ts) for t, ts in per_terminal.items()},
                   "per_hour": hours, "per_hour_svg": hour_chart(hours, self.core.policy.currency),
                   "oldest_pending": oldest}
        self._sales_cache = (key, summary)
        return summary

    def state(self) -> dict[str, Any]:
        core = self.core
        policy = core.policy
        now = core.clock.now_ms()
        cur = policy.currency
        board = self.board
        statuses = {s.node_id: s.body for s in board.current().values()} if board is not None else {}
        summary = self._sales_summary(now)
        pending = summary["pending"]
        view = analyze(statuses, self._known(), now_ms=now, offline_window_ms=policy.offline_window_ms,
                       warn_before_ms=policy.warn_before_s * 1000, currency=cur, me=None,
                       pending_sales=[PendingSale.of(p) for p in pending])
        oldest = min((p["created_at_ms"] for p in pending if p["method"] == "card"), default=None)
        closes = None if oldest is None else oldest + policy.offline_window_ms
        alerts = list(view.warnings)
        if closes is not None and closes - now <= policy.warn_before_s * 1000:
            alerts.insert(0, f"the offline window of the oldest pending sale closes at {iso(closes)}: "
                             "the site's queue must be forwarded before then")
        terminals = []
        for n in view.nodes:
            t = summary["terminals"].get(n.node_id)
            first = summary["oldest_pending"].get(n.node_id)
            window_closes = None if first is None else first + policy.offline_window_ms
            terminals.append({
                "node_id": n.node_id, "name": n.name, "role": n.role, "reachable": n.reachable,
                "pending": n.pending, "pending_amount": format_amount(n.pending_amount_minor or 0, cur),
                "sales": t["total"]["count"] if t else 0,
                "sales_amount": format_amount(t["total"]["amount_minor"] if t else 0, cur),
                "uplink": n.uplink, "printer": n.printer, "battery": n.battery, "rtt_ms": n.rtt_ms,
                "status_age_s": n.status_age_s, "behind": n.behind, "warnings": n.warnings,
                # the offline window of its oldest pending card sale this node holds (None: nothing pending)
                "window_closes_at": iso(window_closes),
                "window_left_s": None if window_closes is None else max(0, (window_closes - now) // 1000)})
        settled = [{"status": status, "count": b["count"], "amount": format_amount(b["amount_minor"], cur),
                    "amount_minor": b["amount_minor"]}
                   for status, b in summary["site"]["by_status"].items()]
        return {
            "site": {"id": policy.site_id, "name": policy.name, "currency": cur},
            "node": core.config.name, "generated_at": iso(now), "refresh_ms": REFRESH_MS,
            "queue": {"pending": len(pending), "amount_minor": sum(p["amount_minor"] for p in pending),
                      "amount": format_amount(sum(p["amount_minor"] for p in pending), cur),
                      "oldest_created_at": iso(oldest), "window_closes_at": iso(closes),
                      "window_left_s": None if closes is None else max(0, (closes - now) // 1000)},
            "settled": settled, "total": {"count": summary["site"]["total"]["count"],
                                          "amount": format_amount(summary["site"]["total"]["amount_minor"], cur)},
            "terminals": terminals, "partition": view.partition, "alerts": alerts,
            "at_risk": {"min_holders": MIN_HOLDERS, "sales": summary["at_risk"]},
            "sales_per_hour": summary["per_hour"], "sales_per_hour_svg": summary["per_hour_svg"],
            "mesh_svg": mesh_svg(view), "mesh_groups": view.groups,
        }


MAX_HOURS = 48
HOUR_MS = 3_600_000


def per_hour(sales: list[dict[str, Any]], currency: str) -> list[dict[str, Any]]:
    """Sales taken per hour (UTC, by the selling terminal's clock) and method, as the totals count
    them (refused and deferred sales in none); the last MAX_HOURS hours that had a sale."""
    hours: dict[int, dict[str, dict[str, int]]] = {}
    for sale in sales:
        if sale["status"] in OUT_OF_TOTALS:
            continue
        hour = sale["created_at_ms"] // HOUR_MS * HOUR_MS
        bucket = hours.setdefault(hour, {m: {"count": 0, "amount_minor": 0} for m in METHODS})
        by_method = bucket.setdefault(sale["method"], {"count": 0, "amount_minor": 0})
        by_method["count"] += 1
        by_method["amount_minor"] += sale["amount_minor"]
    return [{"hour": iso(hour), **{m: {**b, "amount": format_amount(b["amount_minor"], currency)}
                                   for m, b in hours[hour].items()}}
            for hour in sorted(hours)[-MAX_HOURS:]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tls_context(node_dir: Path, name: str, host: str, now_ms: int) -> tuple[ssl.SSLContext, str]:
    """The dashboard's HTTPS context and its certificate's SHA-256 fingerprint; the P-256 key and
    self-signed certificate are made on first use and kept in the node directory (key 0600)."""
    cert_path, key_path = node_dir / TLS_CERT, node_dir / TLS_KEY
    if not (cert_path.exists() and key_path.exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshpos dashboard {name}"[:64])])
        now = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.timezone.utc)
        alt: list[x509.GeneralName] = [x509.DNSName("localhost")]
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
            if not ip.is_unspecified:
                alt.append(x509.IPAddress(ip))
        except ValueError:
            alt.append(x509.DNSName(host))
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=TLS_VALID_DAYS))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .sign(key, hashes.SHA256()))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx, fingerprint


class DashboardServer:
    """Serves the dashboard when config.json asks for it (a gateway enrolled with --dashboard);
    ``status`` tells where, once it listens."""

    def __init__(self, core: NodeCore, mesh: LinkedMesh | None, board: StatusBoard | None) -> None:
        self.core = core
        self.mesh = mesh
        self.board = board
        self.status: DashboardStatus | None = None

    def _password_hash(self) -> str | None:
        core = self.core
        stored = core.dir.dashboard_hash()
        if not stored and core.policy.dashboard_password:
            stored = core.policy.dashboard_password
            log.warning("the dashboard password hash comes from the site policy, which every node receives: make "
                        "a new site (its hash stays in the site and this gateway's %s only)",
                        core.dir.dashboard_path.name)
        if not stored:
            log.error("dashboard not served: no dashboard password for this node (%s); enroll the gateway with "
                      "--dashboard from a site made with a dashboard password", core.dir.dashboard_path)
        return stored or None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        core = self.core
        cfg = core.config
        stored = self._password_hash() if cfg.dashboard else None
        if not cfg.dashboard or stored is None:
            task_status.started()
            return
        host, port = parse_hostport(cfg.dashboard, "dashboard")
        context, fingerprint = (None, None) if is_loopback(host) else tls_context(core.dir.path, cfg.name, host,
                                                                                    core.clock.now_ms())
        dashboard = Dashboard(core, self.mesh, self.board, stored)
        config = HypercornConfig(context, log_name="meshpos.node.dashboard.http", keep_alive_s=KEEP_ALIVE_S,
                                 handshake_timeout_s=HANDSHAKE_TIMEOUT_S, read_timeout_s=LIMITS.proof_timeout)
        sock = bind_tcp(host, port)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve_gated, make_app(dashboard), sock, context, LIMITS,
                                                          config=config))
            scheme = "http" if context is None else "https"
            url = f"{scheme}://{host}:{bound}/"
            self.status = DashboardStatus(url=url, port=bound, tls_fingerprint_sha256=fingerprint)
            if fingerprint:
                log.info("organizer dashboard on %s (certificate SHA-256 %s)", url, fingerprint)
            else:
                log.info("organizer dashboard on %s (loopback: plain HTTP)", url)
            task_status.started()
