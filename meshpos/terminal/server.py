"""The terminal API as a component of the running node (``meshpos run``).

One app, two transports, each with its own Guard:
- ``NODE_DIR/api.sock``: a UNIX socket (0600, in the 0700 node directory), for the CLI and
  programs on the device; any Host. Only here: the node's own operations, ``/v1/node/...``
  (meshpos.terminal.admin), which the TCP listener does not route (404).
- TCP at config ``api`` (default 127.0.0.1:7480): plain HTTP on loopback; any other address only
  over TLS with the node's own certificate (site CA signed; clients trust ``NODE_DIR/ca.pem``).
  If the port cannot be bound the node keeps selling and says so in its log and status.

Served by Hypercorn's HTTP/1.1 connection handler on trio (the node is a trio program: the server
runs inside the node's own nursery, beside its links); Starlette routes (meshpos.terminal.app).
A new sale (``POST /v1/sales``, ``sale_request``) is answered by a plain h11 loop on each connection
until its first other request, after which Hypercorn serves it (meshpos.infra.asgi.Lane): the
same answers, ~0.13 ms less per sale.

Connections are bounded per listener (meshpos.infra.netguard, numbers in ``API_LIMITS``): a
connection is *pending* until one of its requests passes the Guard (the right Host, Origin and
token); a pending connection is closed after ``proof_timeout`` seconds, whatever it sends, and
past the caps on pending or held connections a new one closes the oldest pending one that waited
``evict_after`` (so idle connections cannot lock a client out), or is closed at once. Without this, idle or
half-sent requests (slowloris) from any local program, or from the Wi-Fi when the API listens
beyond loopback, held a file descriptor each for as long as they liked, until the node could
open no link, file or database. A client that takes no byte of what is sent to it for
WRITE_STALL_S is disconnected (meshpos.infra.asgi.StallGuard).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from pathlib import Path

import trio

from meshpos.devices.reader import CardReader, reader_from_config
from meshpos.domain.currency import minor_units
from meshpos.domain.errors import ConfigError
from meshpos.domain.hostport import parse_hostport
from meshpos.infra import asgi
from meshpos.infra.asgi import BACKLOG, ASGIApp, HypercornConfig, bind_tcp
from meshpos.infra.netguard import InboundLimits
from meshpos.node.dashboard import is_loopback
from meshpos.node.runner import RunningNode
from meshpos.node.status import ApiStatus
from meshpos.site.apitoken import ensure_api_token
from meshpos.terminal.admin import admin_routes
from meshpos.terminal.app import TerminalApi, make_app
from meshpos.terminal.cashier import CashierLogin, CookiePolicy
from meshpos.terminal.cashier_app import PUBLIC, CashierPage, CashierSetup
from meshpos.terminal.events import EventJournal
from meshpos.terminal.feed import EventFeed
from meshpos.replication.discovery import local_addresses
from meshpos.terminal.guard import WILDCARDS, Guard, GuardPolicy, host_names
from meshpos.terminal.openapi import OpenApiDocument
from meshpos.terminal.sales import TerminalSales
from meshpos.terminal.stream import heartbeat

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 75  # POS apps keep one connection open between sales
# per listener: connections held (event streams and keep-alive included); connections with no request
# past the Guard yet, in all and from one address (on loopback every client is one address)
API_LIMITS = InboundLimits(total=256, pending=64, per_source=32, proof_timeout=10.0)
WRITE_STALL_S = 20.0  # a client that takes no byte of an answer (or event) for this long is gone


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{cert}: cannot serve the terminal API over TLS with it: {exc}") from exc
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def bind_unix(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        path.unlink()  # stale: the node holds node.lock, so no live node owns it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def serve(app: ASGIApp, policy: GuardPolicy, sock: socket.socket, context: ssl.SSLContext | None, *,
                limits: InboundLimits = API_LIMITS,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` behind a Guard of ``policy`` on one bound, listening socket until cancelled, with
    bounded connections (the module's docstring; meshpos.infra.asgi.serve_gated)."""
    config = HypercornConfig(context, log_name="meshpos.terminal.http", keep_alive_s=KEEP_ALIVE_S,
                             handshake_timeout_s=limits.proof_timeout)
    await asgi.serve_gated(app, sock, context, limits, config=config, front=lambda inner: Guard(inner, policy),
                           stall_s=WRITE_STALL_S, what="terminal API connection", lane=sale_request,
                           task_status=task_status)


def sale_request(method: bytes, target: bytes) -> bool:
    """The request the connections' lane answers (meshpos.infra.asgi.Lane): a new sale, a till's
    most frequent call; everything else goes through Hypercorn."""
    return method == b"POST" and target == b"/v1/sales"


async def api_component(node: RunningNode, *, reader: CardReader | None = None,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The run_node component: the terminal API on the UNIX socket and the configured TCP address."""
    service = node.service
    core = node.core
    token = ensure_api_token(core.dir.api_token_path)  # node directories enrolled before the API had none
    if reader is None:
        try:
            reader = reader_from_config(core.config.reader, bytes.fromhex(core.policy.switch_key)
                                        if core.policy.switch_key else None)
        except ConfigError as exc:  # the node sells on: cash and keyed cards, as without a reader
            log.error("card reader not used: %s", exc)
    journal = EventJournal(epoch=core.clock.now_ms())
    feed = EventFeed(node, journal)
    api = TerminalApi(service, TerminalSales(core, reader), journal, feed.node_status,
                      lambda: node.status().to_json(), OpenApiDocument())
    host, port = parse_hostport(core.config.api_address, "api")
    tls = not is_loopback(host)
    cashier = CashierPage(
        CashierLogin(core.dir.cashier_pin_path, core.dir.cashier_lock_path, core.clock.now_ms),
        CookiePolicy(secure=tls),
        lambda: CashierSetup(core.config.name, core.config.language, core.policy.currency,
                             minor_units(core.policy.currency), keyed=core.policy.switch_key is not None, reader=reader is not None))
    app = make_app(api, cashier.routes())  # on TCP: the till's API and the cashier app
    socket_app = make_app(api, admin_routes(node))  # on the socket: the same API plus the node's own operations
    path: Path = core.dir.api_socket_path
    node.report_api(ApiStatus(socket=str(path), url=None, error=None))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, socket_app, GuardPolicy(token, None, frozenset()), bind_unix(path), None)
            try:
                tcp = bind_tcp(host, port)
            except OSError as exc:
                error = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                node.report_api(ApiStatus(socket=str(path), url=None, error=error))
                log.error("terminal API: %s (the API answers on %s only)", error, path)
            else:
                bound = tcp.getsockname()[1]
                hosts, origins = host_names(host, bound, tls, local_addresses() if host in WILDCARDS else ())
                context = tls_context(core.dir.cert_path, core.dir.key_path) if tls else None
                policy = GuardPolicy(token, hosts, origins, public=PUBLIC, session=cashier.session_ok)
                await nursery.start(serve, app, policy, tcp, context)
                shown = f"[{host}]" if ":" in host else host
                url = f"{'https' if tls else 'http'}://{shown}:{bound}/v1/"
                node.report_api(ApiStatus(socket=str(path), url=url, error=None))
                log.info("terminal API on %s and %s", url, path)
            nursery.start_soon(feed.run)
            nursery.start_soon(heartbeat, journal)
            task_status.started()
    finally:
        feed.close()
        path.unlink(missing_ok=True)
