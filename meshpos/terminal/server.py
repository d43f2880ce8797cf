"""The terminal API as a component of the running node (``meshpos run``).

One app, two transports, each with its own Guard:
- ``NODE_DIR/api.sock``: a UNIX socket (0600, in the 0700 node directory), for the CLI and
  programs on the device; any Host.
- TCP at config ``api`` (default 127.0.0.1:7480): plain HTTP on loopback; any other address only
  over TLS with the node's own certificate (site CA signed; clients trust ``NODE_DIR/ca.pem``).
  If the port cannot be bound the node keeps selling and says so in its log and status.

Served by Hypercorn's HTTP/1.1 connection handler on trio (the node is a trio program: the server
runs inside the node's own nursery, beside its links); Starlette routes (meshpos.terminal.app).

Connections are bounded per listener (meshpos.infra.netguard, numbers in ``API_LIMITS``): a
connection is *pending* until one of its requests passes the Guard (the right Host, Origin and
token); a pending connection is closed after ``proof_timeout`` seconds, whatever it sends, and
past the caps on pending or held connections a new one is closed at once. Without this, idle or
half-sent requests (slowloris) from any local program, or from the Wi-Fi when the API listens
beyond loopback, held a file descriptor each for as long as they liked, until the node could
open no link, file or database. A client that takes no byte of what is sent to it for
WRITE_STALL_S is disconnected (``_StallGuard``).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from meshpos.devices.reader import CardReader
from meshpos.domain.errors import ConfigError
from meshpos.domain.hostport import parse_hostport
from meshpos.infra.netguard import InboundGate, InboundLimits, serve_bounded
from meshpos.node.dashboard import is_loopback
from meshpos.node.runner import RunningNode
from meshpos.node.status import ApiStatus
from meshpos.site.apitoken import ensure_api_token
from meshpos.terminal.app import TerminalApi, make_app
from meshpos.terminal.events import EventJournal
from meshpos.terminal.feed import EventFeed
from meshpos.replication.discovery import local_addresses
from meshpos.terminal.guard import WILDCARDS, ASGIApp, Guard, GuardPolicy, Receive, Scope, Send, host_names
from meshpos.terminal.openapi import OpenApiDocument
from meshpos.terminal.sales import TerminalSales

log = logging.getLogger(__name__)

BACKLOG = 128
KEEP_ALIVE_S = 75  # POS apps keep one connection open between sales
# per listener: connections held (event streams and keep-alive included); connections with no request
# past the Guard yet, in all and from one address (on loopback every client is one address)
API_LIMITS = InboundLimits(total=256, pending=64, per_source=32, proof_timeout=10.0)
WRITE_STALL_S = 20.0  # a client that takes no byte of an answer (or event) for this long is gone
WRITE_PIECE = 64 * 1024


class _Config(Config):
    """Hypercorn's config with our own TLS context (the node's certificate, no client certificate)."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._context = context
        self.accesslog = None  # request lines are not logged: nothing of a request reaches a log
        self.errorlog = logging.getLogger("meshpos.terminal.http")
        self.keep_alive_timeout = KEEP_ALIVE_S
        self.graceful_timeout = 1.0
        self.ssl_handshake_timeout = API_LIMITS.proof_timeout

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


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


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _StallGuard:
    """A connection's stream whose ``send_all`` fails (BrokenResourceError, which Hypercorn takes
    for a closed connection) when the client accepts no byte for WRITE_STALL_S. Hypercorn writes
    in a cancel-shielded scope: a client that stopped reading (a tablet asleep with an event
    stream open) held its connection for ever, and the node could not stop while it did."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:  # everything else is the stream's own (TLS or not)
        return getattr(self._inner, name)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_PIECE):
            with trio.move_on_after(WRITE_STALL_S) as scope:
                await self._inner.send_all(view[start:start + WRITE_PIECE])
            if scope.cancelled_caught:  # closed, so that the read waiting beside this write ends too
                await trio.aclose_forcefully(self._inner)
                raise trio.BrokenResourceError(f"the client took nothing for {WRITE_STALL_S:g} s")


class _Proving:
    """The app behind one connection's Guard: the first request that gets here proves the connection."""

    def __init__(self, app: ASGIApp, proof: "_Proof") -> None:
        self.app = app
        self.proof = proof

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.proof.done()
        await self.app(scope, receive, send)


class _Proof:
    """Whether a connection has proved itself; tells the gate once."""

    def __init__(self, proved: Callable[[], None]) -> None:
        self.proved = proved
        self.ok = False

    def done(self) -> None:
        if not self.ok:
            self.ok = True
            self.proved()


async def serve(app: ASGIApp, policy: GuardPolicy, sock: socket.socket, context: ssl.SSLContext | None, *,
                limits: InboundLimits = API_LIMITS,
                task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` behind a Guard of ``policy`` on one bound, listening socket until cancelled, with
    bounded connections (the module's docstring)."""
    config = _Config(context)
    worker = WorkerContext(None)
    gate = InboundGate(limits)

    async def connection(stream: Any, source: str, where: str, proved: Callable[[], None]) -> None:
        if context is not None:
            stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        proof = _Proof(proved)
        guarded = Guard(_Proving(app, proof), policy)
        async with trio.open_nursery() as nursery:
            async def deadline() -> None:
                await trio.sleep(limits.proof_timeout)
                if not proof.ok:
                    nursery.cancel_scope.cancel()
            nursery.start_soon(deadline)
            await TCPServer(wrap_app(guarded, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                            config, worker, {}, _StallGuard(stream))  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()

    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    await serve_bounded(connection, [listener], gate, what="terminal API connection", task_status=task_status)


async def api_component(node: RunningNode, *, reader: CardReader | None = None,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The run_node component: the terminal API on the UNIX socket and the configured TCP address."""
    service = node.service
    core = node.core
    token = ensure_api_token(core.dir.api_token_path)  # node directories enrolled before the API had none
    journal = EventJournal(epoch=core.clock.now_ms())
    feed = EventFeed(node, journal)
    api = TerminalApi(service, TerminalSales(core, reader), journal, feed.node_status,
                      lambda: node.status().to_json(), OpenApiDocument())
    app = make_app(api)
    path: Path = core.dir.api_socket_path
    node.report_api(ApiStatus(socket=str(path), url=None, error=None))
    host, port = parse_hostport(core.config.api_address, "api")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, app, GuardPolicy(token, None, frozenset()), bind_unix(path), None)
            tls = not is_loopback(host)
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
                await nursery.start(serve, app, GuardPolicy(token, hosts, origins), tcp, context)
                shown = f"[{host}]" if ":" in host else host
                url = f"{'https' if tls else 'http'}://{shown}:{bound}/v1/"
                node.report_api(ApiStatus(socket=str(path), url=url, error=None))
                log.info("terminal API on %s and %s", url, path)
            nursery.start_soon(feed.run)
            task_status.started()
    finally:
        feed.close()
        path.unlink(missing_ok=True)
