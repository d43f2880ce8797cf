"""Serving an ASGI app (Starlette) with Hypercorn's trio worker, inside the caller's nursery.

Two ways, one Hypercorn configuration (:class:`HypercornConfig`: no access log, our own TLS
context, errors to a named logger):

* :func:`serve`: Hypercorn's own accept loop (``worker_serve``) on one bound socket; the terminal
  API (meshpos.terminal.server) serves its UNIX socket and its TCP listener so.
* :func:`serve_gated`: each accepted connection first passes an :class:`InboundGate`
  (meshpos.infra.netguard: caps on connections held, on connections that have not yet sent a
  whole request, in all and per source address; a connection past a cap is closed at once,
  before any TLS work) and must send its first request within ``limits.proof_timeout``; then
  Hypercorn's connection handler serves it. For a listener open to a whole network behind a
  password (the organizer dashboard): a flood of idle or slow connections costs a bounded amount.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from typing import Any, Awaitable, Callable, MutableMapping

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from meshpos.infra.netguard import InboundGate, InboundLimits, serve_bounded

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BACKLOG = 128
MAX_HEADER_BYTES = 16 * 1024


class HypercornConfig(Config):
    """Hypercorn's config with our own TLS context (no client certificate) and no access log:
    nothing of a request (a path, a header) reaches a log."""

    def __init__(self, context: ssl.SSLContext | None, *, log_name: str, keep_alive_s: float,
                 handshake_timeout_s: float = 60.0, read_timeout_s: float | None = None) -> None:
        super().__init__()
        self._context = context
        self.accesslog = None
        self.errorlog = logging.getLogger(log_name)
        self.keep_alive_timeout = keep_alive_s
        self.graceful_timeout = 1.0
        self.ssl_handshake_timeout = handshake_timeout_s
        self.read_timeout = None if read_timeout_s is None else int(read_timeout_s)
        self.h11_max_incomplete_size = MAX_HEADER_BYTES

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host``:``port`` (0: any free port); OSError if not."""
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


async def serve(app: ASGIApp, sock: socket.socket, context: ssl.SSLContext | None, *,
                config: HypercornConfig,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on one bound, listening socket with Hypercorn's accept loop until cancelled."""
    sockets = Sockets(secure_sockets=[sock] if context else [], insecure_sockets=[] if context else [sock],
                      quic_sockets=[])
    await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config,  # type: ignore[arg-type]
                       sockets=sockets, task_status=task_status)


async def serve_gated(app: ASGIApp, sock: socket.socket, context: ssl.SSLContext | None, limits: InboundLimits, *,
                      config: HypercornConfig,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on one bound, listening TCP socket, each connection through ``limits`` (module
    docstring); ``task_status.started(port)`` once it accepts."""
    listener: trio.abc.Listener[Any] = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    if context is not None:
        listener = trio.SSLListener(listener, context, https_compatible=True)
    gate = InboundGate(limits)
    worker = WorkerContext(None)
    port = int(sock.getsockname()[1])

    async def connection(stream: Any, source: str, where: str, proved: Callable[[], None]) -> None:
        asked = trio.Event()

        async def first_request_proves(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and not asked.is_set():
                proved()
                asked.set()
            await app(scope, receive, send)

        server = TCPServer(wrap_app(first_request_proves, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                           config, worker, ConnectionState({}), stream)
        async with trio.open_nursery() as nursery:
            async def deadline() -> None:
                with trio.move_on_after(limits.proof_timeout):
                    await asked.wait()
                    return
                nursery.cancel_scope.cancel()  # no whole request in time: the connection goes
            nursery.start_soon(deadline)
            await server.run()
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_bounded, connection, [listener], gate, what="HTTP connection"))
        task_status.started(port)
