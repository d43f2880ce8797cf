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
failed logins cost a fixed amount of memory. On a loopback address the page is
plain HTTP; on any other it is HTTPS only, with a P-256 certificate the gateway
makes for it (browsers refuse the nodes' Ed25519 certificates): its SHA-256
fingerprint is logged and shown by ``meshpos status``. The page (``/``, ``/app.js``) polls ``/api/state`` every few
seconds: terminals and their state (from the gossiped statuses, the same
analysis as ``meshpos inspect``), the site-wide pending queue and the time left
in its offline window, settled totals by status, alerts. Nothing here writes.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ipaddress
import logging
import math
import os
import ssl
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import trio

from meshpos.domain.currency import format_amount
from meshpos.domain.hostport import parse_hostport
from meshpos.infra.http import HttpLimits, Request, Response, json_response, listener_port, serve_http, text_response
from meshpos.status.meshview import Known, analyze
from meshpos.node.core import iso
from meshpos.domain.policy import check_password
from meshpos.node.report import _totals

if TYPE_CHECKING:
    from meshpos.node.service import NodeService

log = logging.getLogger(__name__)

REALM = "meshpos dashboard"
AUTH_CACHE = 64
LOGIN_BURST = 5
LOGIN_REFILL_S = 12.0
MAX_LOGIN_SOURCES = 4096
SCRYPT_AT_ONCE = 2
LIMITS = HttpLimits(max_body_bytes=4096, read_timeout=10.0, handshake_timeout=5.0, max_connections=128,
                    max_pending=32, max_pending_per_source=8)
TLS_CERT, TLS_KEY = "dashboard-tls.pem", "dashboard-tls.key"
TLS_VALID_DAYS = 825
REFRESH_MS = 2000
SECURITY_HEADERS = {
    "cache-control": "no-store", "x-frame-options": "DENY", "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self'",
}


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


class Dashboard:
    def __init__(self, service: "NodeService", password_hash: str) -> None:
        self.service = service
        self.core = service.core
        self.password_hash = password_hash
        self._ok: dict[bytes, None] = {}  # digests of Authorization headers that passed (bounded)
        self._sales_cache: tuple[tuple[int, int], dict[str, Any]] | None = None
        self.logins = LoginLimiter(service.clock.monotonic)
        self.scrypt = trio.CapacityLimiter(SCRYPT_AT_ONCE)

    # -- HTTP ---------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        verdict = await self._authorized(request)
        if verdict is not True:
            if verdict is not False:
                return Response(429, {"retry-after": str(math.ceil(verdict)),
                                      "content-type": "text/plain; charset=utf-8", **SECURITY_HEADERS},
                                b"too many wrong passwords from this address: wait and try again\n")
            return Response(401, {"www-authenticate": f'Basic realm="{REALM}", charset="UTF-8"',
                                  "content-type": "text/plain; charset=utf-8", **SECURITY_HEADERS},
                            b"the organizer dashboard needs the site's dashboard password\n")
        if request.method not in ("GET", "HEAD"):
            return text_response(405, "read-only\n")
        if request.path == "/":
            return Response(200, {"content-type": "text/html; charset=utf-8", **SECURITY_HEADERS}, PAGE.encode())
        if request.path == "/app.js":
            return Response(200, {"content-type": "text/javascript; charset=utf-8", **SECURITY_HEADERS},
                            SCRIPT.encode())
        if request.path == "/api/state":
            return json_response(200, self.state(), SECURITY_HEADERS)
        return text_response(404, "not found\n")

    async def _authorized(self, request: Request) -> bool | float:
        """True, False (no or a wrong password), or seconds to wait before this source may try again."""
        stored = self.password_hash
        header = request.headers.get("authorization", "")
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
        wait = self.logins.take(request.peer_addr or "unknown")
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
        mesh = getattr(self.service, "mesh", None)
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
        summary = {"site": _totals(sales), "pending": pending,
                   "terminals": {t: _totals(ts) for t, ts in per_terminal.items()}}
        self._sales_cache = (key, summary)
        return summary

    def state(self) -> dict[str, Any]:
        core = self.core
        policy = core.policy
        now = core.clock.now_ms()
        cur = policy.currency
        board = getattr(self.service, "statusboard", None)
        statuses = {s.node_id: s.body for s in board.current().values()} if board is not None else {}
        view = analyze(statuses, self._known(), now_ms=now, offline_window_ms=policy.offline_window_ms,
                       warn_before_ms=policy.warn_before_s * 1000, currency=cur, me=None)
        summary = self._sales_summary(now)
        pending = summary["pending"]
        oldest = min((p["created_at_ms"] for p in pending if p["method"] == "card"), default=None)
        closes = None if oldest is None else oldest + policy.offline_window_ms
        alerts = list(view["warnings"])
        if closes is not None and closes - now <= policy.warn_before_s * 1000:
            alerts.insert(0, f"the offline window of the oldest pending sale closes at {iso(closes)}: "
                             "the site's queue must be forwarded before then")
        terminals = []
        for n in view["nodes"]:
            t = summary["terminals"].get(n["node_id"])
            terminals.append({
                "node_id": n["node_id"], "name": n["name"], "role": n["role"], "reachable": n["reachable"],
                "pending": n["pending"], "pending_amount": format_amount(n["pending_amount_minor"] or 0, cur),
                "sales": t["total"]["count"] if t else 0,
                "sales_amount": format_amount(t["total"]["amount_minor"] if t else 0, cur),
                "uplink": n["uplink"], "printer": n["printer"], "battery": n["battery"], "rtt_ms": n["rtt_ms"],
                "status_age_s": n["status_age_s"], "behind": n["behind"], "warnings": n["warnings"]})
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
            "terminals": terminals, "partition": view["partition"], "alerts": alerts,
        }


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


async def dashboard_component(service: "NodeService", *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The run_node component: serve the dashboard if config.json asks for it."""
    core = service.core
    cfg = core.config
    if not cfg.dashboard:
        task_status.started()
        return
    stored = core.dir.dashboard_hash()
    if not stored and core.policy.dashboard_password:
        stored = core.policy.dashboard_password
        log.warning("the dashboard password hash comes from the site policy, which every node receives: make a "
                    "new site (its hash stays in the site and this gateway's %s only)", core.dir.dashboard_path.name)
    if not stored:
        log.error("dashboard not served: no dashboard password for this node (%s); enroll the gateway with "
                  "--dashboard from a site made with a dashboard password", core.dir.dashboard_path)
        task_status.started()
        return
    host, port = parse_hostport(cfg.dashboard, "dashboard")
    context, fingerprint = (None, None) if is_loopback(host) else tls_context(core.dir.path, cfg.name, host,
                                                                                core.clock.now_ms())
    dashboard = Dashboard(service, stored)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(lambda task_status: serve_http(dashboard.handle, (host, port, context),
                                                                       limits=LIMITS, task_status=task_status))
        bound = listener_port(listeners[0])
        scheme = "http" if context is None else "https"
        url = f"{scheme}://{host}:{bound}/"
        service.extra_status.append(lambda: {"dashboard": {"url": url, "port": bound,
                                                           "tls_fingerprint_sha256": fingerprint}})
        if fingerprint:
            log.info("organizer dashboard on %s (certificate SHA-256 %s)", url, fingerprint)
        else:
            log.info("organizer dashboard on %s (loopback: plain HTTP)", url)
        task_status.started()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>meshpos dashboard</title>
<style>
body{font-family:system-ui,sans-serif;margin:1rem 2rem;color:#222}
h1{font-size:1.4rem;margin-bottom:.2rem} .sub{color:#666;margin-top:0}
.cards{display:flex;gap:1rem;flex-wrap:wrap} .card{border:1px solid #ccc;border-radius:8px;padding:.6rem 1rem;min-width:12rem}
.big{font-size:1.8rem;font-weight:600} table{border-collapse:collapse;margin:.5rem 0 1rem}
th,td{border-bottom:1px solid #ddd;padding:.25rem .6rem;text-align:left} .down{color:#b00;font-weight:600}
.up{color:#070} #alerts li{color:#b00} .muted{color:#888}
</style></head>
<body>
<h1 id="site">meshpos</h1><p class="sub">updated <span id="updated">never</span> by <span id="node"></span>
<span id="error" class="down"></span></p>
<div class="cards">
 <div class="card"><div>pending sales (site)</div><div class="big" id="site-pending">-</div><div id="site-pending-amount"></div></div>
 <div class="card"><div>offline window</div><div class="big" id="window-left">-</div><div id="window-closes" class="muted"></div></div>
 <div class="card"><div>all sales</div><div class="big" id="total-count">-</div><div id="total-amount"></div></div>
</div>
<h2>Alerts</h2><ul id="alerts"><li class="muted">none</li></ul>
<h2>Terminals</h2>
<table id="terminals"><thead><tr><th>name</th><th>role</th><th>state</th><th>pending</th><th>sales</th>
<th>uplink</th><th>printer</th><th>battery</th><th>rtt</th><th>status age</th></tr></thead><tbody></tbody></table>
<h2>Settled totals by status</h2>
<table id="settled"><thead><tr><th>status</th><th>count</th><th>amount</th></tr></thead><tbody></tbody></table>
<script src="/app.js"></script>
</body></html>
"""

SCRIPT = r"""'use strict';
function text(id, value) { document.getElementById(id).textContent = value; }
function left(s) {
  if (s === null || s === undefined) return '-';
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h > 0 ? h + ' h ' + String(m).padStart(2, '0') + ' min' : m + ' min';
}
function row(cells, cls) {
  const tr = document.createElement('tr');
  cells.forEach(function (c, i) {
    const td = document.createElement('td');
    td.textContent = c === null || c === undefined ? '-' : String(c);
    if (cls && cls[i]) td.className = cls[i];
    tr.appendChild(td);
  });
  return tr;
}
function render(s) {
  text('site', s.site.name + ' (' + s.site.currency + ')');
  text('updated', s.generated_at); text('node', s.node); text('error', '');
  text('site-pending', s.queue.pending); text('site-pending-amount', s.queue.amount + ' ' + s.site.currency);
  text('window-left', s.queue.window_left_s === null ? (s.queue.pending ? 'cash only: no window' : 'no pending sale')
                                                     : left(s.queue.window_left_s));
  text('window-closes', s.queue.window_closes_at ? 'closes ' + s.queue.window_closes_at : '');
  text('total-count', s.total.count); text('total-amount', s.total.amount + ' ' + s.site.currency);
  const alerts = document.getElementById('alerts'); alerts.replaceChildren();
  if (!s.alerts.length) { const li = document.createElement('li'); li.className = 'muted'; li.textContent = 'none'; alerts.appendChild(li); }
  s.alerts.forEach(function (a) { const li = document.createElement('li'); li.textContent = a; alerts.appendChild(li); });
  const tb = document.querySelector('#terminals tbody'); tb.replaceChildren();
  s.terminals.forEach(function (t) {
    const tr = row([t.name, t.role, t.reachable ? 'reachable' : 'UNREACHABLE',
      t.pending === null ? '-' : t.pending + ' / ' + t.pending_amount, t.sales + ' / ' + t.sales_amount,
      t.uplink, t.printer, t.battery === null ? '-' : t.battery + '%', t.rtt_ms === null ? '-' : t.rtt_ms + ' ms',
      t.status_age_s === null ? '-' : Math.round(t.status_age_s) + ' s'], [null, null, t.reachable ? 'up' : 'down']);
    tr.dataset.node = t.node_id; tb.appendChild(tr);
  });
  const st = document.querySelector('#settled tbody'); st.replaceChildren();
  s.settled.forEach(function (b) { const tr = row([b.status, b.count, b.amount]); tr.dataset.status = b.status; st.appendChild(tr); });
}
let period = 2000;
async function poll() {
  try {
    const r = await fetch('/api/state', {cache: 'no-store', credentials: 'same-origin'});
    if (!r.ok) throw new Error('HTTP ' + r.status);
    const s = await r.json(); period = s.refresh_ms || period; render(s);
  } catch (e) { text('error', ' (not updated: ' + e.message + ')'); }
  setTimeout(poll, period);
}
poll();
"""
