"""Serving an ASGI app (Starlette) with Hypercorn's trio worker, inside the caller's nursery.

Two ways, one Hypercorn configuration (:class:`HypercornConfig`: no access log, our own TLS
context, errors to a named logger):

* :func:`serve`: Hypercorn's own accept loop (``worker_serve``) on one bound socket; the terminal
  API (meshpos.terminal.server) serves its UNIX socket and its TCP listener so.
* :func:`serve_gated`: each accepted connection first passes an :class:`InboundGate`
  (meshpos.infra.netguard: caps on connections held, on connections that have not yet proved
  themselves, in all and per source address; a connection past a cap is closed at once, before
  any TLS work) and must prove itself (a request that gets through the caller's ``front``, e.g.
  a token check) within ``limits.proof_timeout``; then Hypercorn's connection handler serves it,
  and a client that stops taking what is sent to it is disconnected. For every listener a
  client can reach (the terminal API, the organizer dashboard): a flood of idle, slow or
  unauthenticated connections costs a bounded amount.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
from typing import Any, Awaitable, Callable, MutableMapping

import trio
from hypercorn.config import Config, Sockets
from hypercorn.events import Event, RawData
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


class StallGuard:
    """A connection's stream whose ``send_all`` fails (BrokenResourceError, which Hypercorn takes
    for a closed connection) when the client accepts no byte for ``stall_s``. Hypercorn writes in
    a cancel-shielded scope: a client that stopped reading (a tablet asleep with an event stream
    open) held its connection for ever, and the node could not stop while it did. Writes go out in
    pieces of ``piece`` bytes; :meth:`watch` (one task per connection, waking every ``stall_s``/4)
    closes the stream under a piece that has waited ``stall_s``, and that write fails. It was a
    deadline (a cancel scope) around every write: with 100 event streams, entering and leaving
    them took an eighth of the node's time."""

    def __init__(self, inner: Any, stall_s: float, piece: int = 64 * 1024) -> None:
        self._inner = inner
        self._stall_s = stall_s
        self._piece = piece
        self._since: float | None = None  # when the piece being written started
        self._stalled = False

    def __getattr__(self, name: str) -> Any:  # everything else is the stream's own (TLS or not)
        return getattr(self._inner, name)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if len(view) <= self._piece:
            view = view[self._write_now(view):]
            if not view:
                return
        try:
            for start in range(0, len(view), self._piece):
                self._since = trio.current_time()
                await self._inner.send_all(view[start:start + self._piece])
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            if self._stalled:
                raise trio.BrokenResourceError(f"the client took nothing for {self._stall_s:g} s") from exc
            raise
        finally:
            self._since = None

    def _write_now(self, view: memoryview) -> int:
        """Hand ``view`` to the kernel at once if the socket takes it (a plain socket, not TLS):
        how many bytes it took. trio's own send waits for its turn twice on the way (a checkpoint
        before and after the system call); for a small answer or a piece of an event stream, which
        the kernel almost always takes whole, those two trips through the scheduler cost more than
        the write (with 100 event streams, a round of writes was 200 extra task steps)."""
        sock = getattr(self._inner, "socket", None)
        fd = -1 if sock is None else sock.fileno()  # -1 once closed
        if fd < 0:
            return 0
        try:
            return os.write(fd, view)
        except BlockingIOError:
            return 0
        except OSError as exc:  # as trio's SocketStream would say it
            raise trio.BrokenResourceError(f"the client has gone: {exc}") from exc

    async def watch(self) -> None:
        """Until cancelled: close the stream once a piece has waited ``stall_s`` (so that the write,
        and the read waiting beside it, end)."""
        while True:
            await trio.sleep(self._stall_s / 4)
            since = self._since
            if since is not None and trio.current_time() - since >= self._stall_s:
                self._stalled = True
                await trio.aclose_forcefully(self._inner)
                return


class KeepAliveTimer:
    """Hypercorn's keep-alive timer (its ``idle_task``: ``restart`` when the connection goes idle,
    ``stop`` when a request comes), kept by one task per connection. Hypercorn starts a task of
    its own with a timer each time a connection goes idle, after every answer, and cancels it at
    the next request: two task starts and a cancellation per request on a keep-alive connection,
    ~0.1 ms of the node's CPU per request (a fifth of the bare framework's cost). Here a request
    only clears the time the connection went idle, and an answer sets it; the one task sleeps
    until ``timeout`` after that time and calls ``on_timeout`` (closing the connection) if the
    connection is still idle since then. ``close`` ends the task (the connection is done)."""

    def __init__(self, timeout: float, on_timeout: Callable[[], Awaitable[None]]) -> None:
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._idle_since: float | None = None
        self._scope: trio.CancelScope | None = None
        self._closed = False

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        """The connection is idle from now (``action``, Hypercorn's own timer, is not used)."""
        self._idle_since = trio.current_time()
        if self._scope is None and not self._closed:
            self._scope = trio.CancelScope()
            task_group.spawn(self._watch, self._scope)

    async def stop(self) -> None:
        self._idle_since = None

    def close(self) -> None:
        self._closed = True
        self._idle_since = None
        if self._scope is not None:
            self._scope.cancel()

    async def _watch(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                since = self._idle_since
                now = trio.current_time()
                if since is not None and now - since >= self._timeout:
                    break
                await trio.sleep_until((now if since is None else since) + self._timeout)
        if not self._closed:  # idle for the whole timeout
            with trio.CancelScope(shield=True):  # as Hypercorn's own: the close is not cut short
                await self._on_timeout()


class _Connection(TCPServer):
    """Hypercorn's connection handler, released as soon as the client has gone. Hypercorn's own
    waits out the keep-alive timer (``keep_alive_s``, 75 s on the terminal API) after the client
    closed an idle connection: every CLI call held a connection slot that long, and a till that
    asked twice a second filled the listener's cap (256) and was refused. The keep-alive timer is
    one task per connection (:class:`KeepAliveTimer`), not one per request."""

    _head = b""  # a response head held back until the next piece of the answer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_alive = KeepAliveTimer(self.config.keep_alive_timeout, self._initiate_server_close)
        self.idle_task = self._keep_alive  # type: ignore[assignment]

    async def _read_data(self) -> None:
        await super()._read_data()
        self._keep_alive.close()  # the keep-alive timer: nobody is left to keep alive

    async def protocol_send(self, event: Event) -> None:
        """Hypercorn writes a response's head and its body separately: two sends, and on loopback
        two wake-ups of the client, per answer. The head is held back and goes out with the next
        piece (the body, the end of the message, or a streamed answer's first chunk), so that a
        whole small answer leaves in one write."""
        if isinstance(event, RawData):
            if not self._head and event.data.startswith(b"HTTP/1.1 ") and event.data.endswith(b"\r\n\r\n"):
                self._head = event.data
                return
            if self._head:
                event, self._head = RawData(data=self._head + event.data), b""
            elif not event.data:  # the end of an answer of known length: nothing to write, no
                return            # trip through Hypercorn's send lock and shielded scope
        elif self._head:  # closing, or idle: what is held goes first
            head, self._head = self._head, b""
            await super().protocol_send(RawData(data=head))
        await super().protocol_send(event)


def _first_request(app: ASGIApp) -> ASGIApp:
    return app


async def serve_gated(app: ASGIApp, sock: socket.socket, context: ssl.SSLContext | None, limits: InboundLimits, *,
                      config: HypercornConfig, front: Callable[[ASGIApp], ASGIApp] = _first_request,
                      stall_s: float = 20.0, what: str = "HTTP connection",
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on one bound, listening socket (TCP or UNIX), each connection through
    ``limits`` (module docstring); ``task_status.started(port)`` once it accepts (0 on a UNIX socket).

    A connection proves itself with its first request that gets through ``front`` (a wrapper
    around the app, such as the terminal API's Guard: a request it refuses proves nothing); by
    default any whole request does. A client that takes no byte of an answer for ``stall_s`` is
    disconnected (:class:`StallGuard`). ``what`` names a connection in the log ("refused WHAT ...")."""
    listener: trio.abc.Listener[Any] = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    if context is not None:
        listener = trio.SSLListener(listener, context, https_compatible=True)
    gate = InboundGate(limits)
    worker = WorkerContext(None)
    name = sock.getsockname()
    port = int(name[1]) if isinstance(name, tuple) else 0

    async def connection(stream: Any, source: str, where: str, proved: Callable[[], None]) -> None:
        asked = trio.Event()

        async def proving(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and not asked.is_set():
                proved()
                asked.set()
            await app(scope, receive, send)

        guarded = StallGuard(stream, stall_s)
        server = _Connection(wrap_app(front(proving), config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                           config, worker, ConnectionState({}), guarded)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded.watch)
            async def deadline() -> None:
                with trio.move_on_after(limits.proof_timeout):
                    await asked.wait()
                    return
                nursery.cancel_scope.cancel()  # no request proved it in time: the connection goes
            nursery.start_soon(deadline)
            await server.run()
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_bounded, connection, [listener], gate, what=what))
        task_status.started(port)
