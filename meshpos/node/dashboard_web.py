"""The organizer dashboard over HTTP: a Starlette app (the page, its script and style, ``/api/state``)
behind the password gate; meshpos.node.dashboard serves it (Hypercorn, trio) and computes the state.

Every request passes :class:`PasswordGate` first, whatever its path (401 with a Basic challenge,
or 429 with Retry-After when the source address tried too many passwords); every answer carries
``SECURITY_HEADERS``: no caching, no framing, no referrer, and a Content-Security-Policy that lets
the page load nothing and connect nowhere but its own origin (no inline script or style, no
fonts, no other origin). The two pictures (the mesh, sales per hour) are SVG markup inside the
state; the script parses them as XML (``DOMParser``, which runs nothing) and puts the elements in
the page, so they are inline SVG that a test or a style sheet can reach. Read-only: GET and HEAD.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from meshpos.infra.asgi import ASGIApp, Message, Receive, Scope, Send

REALM = "meshpos dashboard"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "cache-control": "no-store", "x-frame-options": "DENY", "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer", "content-security-policy": CSP,
}


class DashboardData(Protocol):
    """What the app needs of meshpos.node.dashboard.Dashboard."""

    async def authorize(self, header: str, source: str) -> bool | float: ...

    def state(self) -> dict[str, Any]: ...


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return ""


class PasswordGate:
    """An ASGI middleware: the dashboard password before anything, the security headers on all."""

    def __init__(self, app: ASGIApp, dashboard: DashboardData) -> None:
        self.app = app
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {bytes(k).lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                                        if k.encode() not in names)]
            await send(message)

        client = scope.get("client")
        verdict = await self.dashboard.authorize(_header(scope, b"authorization"),
                                                 str(client[0]) if client else "unknown")
        if verdict is True:
            await self.app(scope, receive, send_secured)
            return
        if verdict is False:
            answer: Response = PlainTextResponse(
                "the organizer dashboard needs the site's dashboard password\n", 401,
                {"www-authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
        else:
            answer = PlainTextResponse("too many wrong passwords from this address: wait and try again\n", 429,
                                       {"retry-after": str(math.ceil(verdict))})
        await answer(scope, receive, send_secured)


def make_app(dashboard: DashboardData) -> ASGIApp:
    async def page(request: Request) -> Response:
        return Response(PAGE, media_type="text/html; charset=utf-8")

    async def script(request: Request) -> Response:
        return Response(SCRIPT, media_type="text/javascript; charset=utf-8")

    async def style(request: Request) -> Response:
        return Response(STYLE, media_type="text/css; charset=utf-8")

    async def state(request: Request) -> Response:
        return JSONResponse(dashboard.state())

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        text = "read-only\n" if exc.status_code == 405 else "not found\n" if exc.status_code == 404 else "refused\n"
        return PlainTextResponse(text, exc.status_code, dict(exc.headers or {}))

    routes = [Route("/", page, methods=["GET"]), Route("/app.js", script, methods=["GET"]),
              Route("/app.css", style, methods=["GET"]), Route("/api/state", state, methods=["GET"])]
    return PasswordGate(Starlette(routes=routes, exception_handlers={HTTPException: refused}), dashboard)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem 2rem;color:#222}
h1{font-size:1.4rem;margin-bottom:.2rem} .sub{color:#666;margin-top:0}
.cards{display:flex;gap:1rem;flex-wrap:wrap} .card{border:1px solid #ccc;border-radius:8px;padding:.6rem 1rem;min-width:12rem}
.big{font-size:1.8rem;font-weight:600} table{border-collapse:collapse;margin:.5rem 0 1rem}
th,td{border-bottom:1px solid #ddd;padding:.25rem .6rem;text-align:left} .down{color:#b00;font-weight:600}
.up{color:#070} #alerts li{color:#b00} .muted{color:#888}
.picture svg{display:block;max-width:100%;height:auto} #mesh svg{max-height:32rem} #per-hour-chart svg{max-height:14rem}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>meshpos dashboard</title>
<link rel="stylesheet" href="/app.css">
</head>
<body>
<h1 id="site">meshpos</h1><p class="sub">updated <span id="updated">never</span> by <span id="node"></span>
<span id="error" class="down"></span></p>
<div class="cards">
 <div class="card"><div>pending sales (site)</div><div class="big" id="site-pending">-</div><div id="site-pending-amount"></div></div>
 <div class="card"><div>offline window</div><div class="big" id="window-left">-</div><div id="window-closes" class="muted"></div></div>
 <div class="card"><div>all sales</div><div class="big" id="total-count">-</div><div id="total-amount"></div></div>
</div>
<h2>Alerts</h2><ul id="alerts"><li class="muted">none</li></ul>
<h2>The mesh <span class="muted">(links between devices; &#8593; uplink: filled when up)</span></h2>
<div id="mesh" class="picture"></div>
<h2>At risk <span class="muted">(pending sales held by fewer than 2 devices)</span></h2>
<table id="at-risk"><thead><tr><th>sale</th><th>terminal</th><th>amount</th><th>held by</th><th>taken</th>
</tr></thead><tbody></tbody></table>
<h2>Terminals</h2>
<table id="terminals"><thead><tr><th>name</th><th>role</th><th>state</th><th>pending</th><th>sales</th>
<th>uplink</th><th>printer</th><th>battery</th><th>rtt</th><th>status age</th><th>offline window</th></tr></thead>
<tbody></tbody></table>
<h2>Sales per hour <span class="muted">(UTC)</span></h2>
<div id="per-hour-chart" class="picture"></div>
<table id="per-hour"><thead><tr><th>hour</th><th>card</th><th>cash</th></tr></thead><tbody></tbody></table>
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
function picture(id, markup) {
  const box = document.getElementById(id);
  const doc = new DOMParser().parseFromString(markup || '', 'image/svg+xml');
  const root = doc.documentElement;
  if (!root || root.localName !== 'svg' || doc.getElementsByTagName('parsererror').length) {
    box.textContent = '(no picture)'; return;
  }
  box.replaceChildren(document.importNode(root, true));
}
function render(s) {
  text('site', s.site.name + ' (' + s.site.currency + ')');
  text('updated', s.generated_at); text('node', s.node); text('error', '');
  text('site-pending', s.queue.pending); text('site-pending-amount', s.queue.amount + ' ' + s.site.currency);
  text('window-left', s.queue.window_left_s === null ? 'no pending sale' : left(s.queue.window_left_s));
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
      t.status_age_s === null ? '-' : Math.round(t.status_age_s) + ' s',
      t.window_left_s === null ? '-' : left(t.window_left_s) + ' left'], [null, null, t.reachable ? 'up' : 'down']);
    tr.dataset.node = t.node_id; tb.appendChild(tr);
  });
  picture('mesh', s.mesh_svg);
  picture('per-hour-chart', s.sales_per_hour_svg);
  const ar = document.querySelector('#at-risk tbody'); ar.replaceChildren();
  if (!s.at_risk.sales.length) ar.appendChild(row(['none']));
  s.at_risk.sales.forEach(function (a) {
    const tr = row([a.id, a.terminal_name, a.amount + ' ' + s.site.currency, a.held_by, a.created_at]);
    tr.dataset.sale = a.id; ar.appendChild(tr);
  });
  const ph = document.querySelector('#per-hour tbody'); ph.replaceChildren();
  s.sales_per_hour.forEach(function (h) {
    const tr = row([h.hour.slice(0, 13).replace('T', ' ') + ':00', h.card.count + ' / ' + h.card.amount,
                    h.cash.count + ' / ' + h.cash.amount]);
    tr.dataset.hour = h.hour; ph.appendChild(tr);
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
