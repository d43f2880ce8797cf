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
  unauthenticated connections costs a bounded amount. Optionally a :class:`Lane` (a plain h11
  loop) answers the requests the caller names until a connection's first other request, and
  hands the connection over to Hypercorn then.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import ssl
from typing import Any, Awaitable, Callable, MutableMapping
from urllib.parse import unquote

import h11
import trio
from hypercorn.config import Config, Sockets
from hypercorn.events import Event, RawData
from hypercorn.trio.run import worker_serve
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import build_and_validate_headers, parse_socket_addr, suppress_body, wrap_app

from meshpos.infra.netguard import InboundGate, InboundLimits, serve_bounded, socket_of

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

    def __init__(self, *args: Any, taken: bytes = b"", served: int = 0, **kwargs: Any) -> None:
        """``taken``: bytes already read from the connection and not yet answered (a :class:`Lane`
        hands them over), fed to Hypercorn before anything it reads itself; ``served``: requests
        the connection was already answered (Hypercorn's count towards ``keep_alive_max_requests``)."""
        super().__init__(*args, **kwargs)
        self._keep_alive = KeepAliveTimer(self.config.keep_alive_timeout, self._initiate_server_close)
        self.idle_task = self._keep_alive  # type: ignore[assignment]
        self._taken = taken
        self._served = served

    async def _read_data(self) -> None:
        if self._served:
            self.protocol.protocol.keep_alive_requests = self._served
        if self._taken:  # (b"" would be an end of stream to h11)
            taken, self._taken = self._taken, b""
            await self.protocol.handle(RawData(data=taken))
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


LANE_MAX_BODY = 64 * 1024  # a request with a larger body goes to Hypercorn
_HANDOVER = object()  # a request the lane does not take: Hypercorn answers it and all after it


class Lane:
    """A connection's requests served by a plain h11 loop, without Hypercorn's per-request machinery
    (a task and its queues per request, events through a protocol wrapper, a lock and a shielded
    scope per write: ~0.15 ms of CPU and of latency per request here, BENCHMARKS.md), for the
    requests ``wanted(method, target)`` names: the terminal API's ``POST /v1/sales``, a till's
    every sale. Only plain requests are taken: HTTP/1.1 with a ``Content-Length`` of at most
    LANE_MAX_BODY and no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``. At the first request it
    does not take (another route, an event stream, a malformed request), :meth:`run` stops and
    returns every byte of that request and of those after it, for Hypercorn's connection handler
    (:class:`_Connection`) to serve the rest of the connection's life as if it had read them.

    The app, its scope, and the answer's bytes are Hypercorn's (h11 makes the head, with the same
    headers Hypercorn adds), so an answer is the same whichever loop gave it; so are the keep-alive
    timeout (from the last answer to the next request's whole head), ``Connection: close``, the
    count towards ``keep_alive_max_requests``, pipelined requests, a 500 for an app that fails
    before answering (and a closed connection for one that fails in the middle). The app sees the
    request's whole body in one message; an answer leaves in one write once its last piece is
    given (the lane is for small, whole answers, not streams)."""

    def __init__(self, app: ASGIApp, config: Config, stream: Any, wanted: Callable[[bytes, bytes], bool]) -> None:
        self.app = app
        self.config = config
        self.stream = stream
        self.wanted = wanted
        self.served = 0  # requests answered on this connection (by the lane)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=config.h11_max_incomplete_size)
        self._raw = bytearray()  # every byte of the request being read, from its first
        self.scheme = "https" if hasattr(stream, "transport_stream") else "http"
        sock = socket_of(stream)
        self.client = parse_socket_addr(sock.family, sock.getpeername())
        self.server = parse_socket_addr(sock.family, sock.getsockname())

    async def run(self) -> bytes | None:
        """Serve until the connection ends (None: it is closed) or a request the lane does not take
        comes (its bytes and all after it: Hypercorn's from here)."""
        conn = self.h11
        idle_since = trio.current_time()
        while True:
            self._raw = bytearray(conn.trailing_data[0])
            request: object = None  # None: no whole head within the keep-alive timeout
            with trio.move_on_at(idle_since + self.config.keep_alive_timeout):
                request = await self._head()
            if isinstance(request, h11.Request) and not self._takes(request):
                request = _HANDOVER
            if request is _HANDOVER:
                return bytes(self._raw)
            if not isinstance(request, h11.Request):  # the client went, or kept it idle too long
                await self._close()
                return None
            body = await self._body()
            if body is None or not await self._answer(request, body):
                await self._close()
                return None
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:  # Connection: close
                await self._close()
                return None
            conn.start_next_cycle()
            idle_since = trio.current_time()

    async def _receive(self) -> bytes | None:
        """The next bytes (b"": the client closed its side); None if the connection broke."""
        try:
            with trio.fail_after(self.config.read_timeout or math.inf):
                data = bytes(await self.stream.receive_some(MAX_RECV))
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
            return None
        self._raw += data
        self.h11.receive_data(data)
        return data

    async def _head(self) -> h11.Request | object:
        """The next request's head; _HANDOVER for anything h11 takes for a protocol error (Hypercorn
        answers it as it would have); ConnectionClosed or None when the client has gone."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return _HANDOVER
            if event is h11.NEED_DATA:
                if await self._receive() is None:
                    return h11.ConnectionClosed()
                continue
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return event
            return _HANDOVER

    def _takes(self, request: h11.Request) -> bool:
        if request.http_version != b"1.1" or not self.wanted(request.method, request.target):
            return False
        length = None
        for name, value in request.headers:  # names in lower case (h11)
            if name in (b"transfer-encoding", b"expect", b"upgrade"):
                return False
            if name == b"content-length":
                length = int(value)  # h11 has checked it is a number, and the only one
        return length is not None and length <= LANE_MAX_BODY

    async def _body(self) -> bytes | None:
        """The request's whole body; None if the client went before the end of it."""
        body = bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return None
            if event is h11.NEED_DATA:
                if not await self._receive():
                    return None
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                return None

    async def _answer(self, request: h11.Request, body: bytes) -> bool:
        """Run the app on the request; False if the connection is to be closed (Hypercorn's own
        rules: a failed app, an unfinished answer, a client that went)."""
        path, _, query = request.target.partition(b"?")
        method = request.method.decode("ascii").upper()
        scope: Scope = {
            "type": "http", "http_version": "1.1", "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": method, "scheme": self.scheme, "path": unquote(path.decode("ascii")), "raw_path": path,
            "query_string": query, "root_path": self.config.root_path, "headers": list(request.headers),
            "client": self.client, "server": self.server, "state": {}, "extensions": {},
        }
        self.served += 1
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        start: Message | None = None
        pieces: list[bytes] = []
        done = False
        gone = False

        async def receive() -> Message:
            return pending.pop() if pending else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal start, done, gone
            if message["type"] == "http.response.start" and start is None:
                start = message
            elif message["type"] == "http.response.body" and start is not None and not done:
                pieces.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    done = True
                    gone = not await self._write(method, int(start["status"]), start.get("headers", []),
                                                 b"".join(pieces))
            else:
                raise RuntimeError(f"unexpected ASGI message {message['type']!r}")

        try:
            await self.app(scope, receive, send)
        except Exception:  # as Hypercorn's own task would
            await self.config.log.exception("Error in ASGI Framework")
        if start is None and not done:  # nothing answered: Hypercorn's 500
            await self._write(method, 500, [(b"content-length", b"0"), (b"connection", b"close")], b"")
            return False
        return done and not gone

    async def _write(self, method: str, status: int, headers: Any, body: bytes) -> bool:
        """The answer in one write, as Hypercorn would have made it; False if it could not be."""
        head = build_and_validate_headers(headers) + self.config.response_headers("h11")
        if self.served >= self.config.keep_alive_max_requests:
            head.append((b"connection", b"close"))
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=head))
            if body and not suppress_body(method, status):
                data += self.h11.send(h11.Data(data=body))
            data += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:  # an answer h11 cannot send: the connection goes
            await self.config.log.error("cannot send an answer: %s", exc)
            return False
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _close(self) -> None:
        """As Hypercorn closes a connection (``TCPServer._close``, private there: its steps kept
        here): an end of stream where there is one (not on TLS), then close."""
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, AttributeError, trio.BusyResourceError, trio.ClosedResourceError):
            pass
        await self.stream.aclose()


async def _lane(app: ASGIApp, config: Config, stream: Any, wanted: Callable[[bytes, bytes], bool]) -> Lane | bool:
    """A connection's :class:`Lane`, after its TLS handshake (within Hypercorn's handshake timeout,
    as Hypercorn's own); False if the handshake failed or the client has already gone (the
    connection is done), True if it is not HTTP/1.1 (Hypercorn serves it)."""
    try:
        handshake = stream.do_handshake
    except AttributeError:  # not TLS
        pass
    else:
        try:
            with trio.fail_after(config.ssl_handshake_timeout):
                await handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            return False
        if stream.selected_alpn_protocol() == "h2":
            return True
    try:
        return Lane(app, config, stream, wanted)
    except OSError:  # no peer any more
        return False


def _first_request(app: ASGIApp) -> ASGIApp:
    return app


async def serve_gated(app: ASGIApp, sock: socket.socket, context: ssl.SSLContext | None, limits: InboundLimits, *,
                      config: HypercornConfig, front: Callable[[ASGIApp], ASGIApp] = _first_request,
                      stall_s: float = 20.0, what: str = "HTTP connection",
                      lane: Callable[[bytes, bytes], bool] | None = None,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on one bound, listening socket (TCP or UNIX), each connection through
    ``limits`` (module docstring); ``task_status.started(port)`` once it accepts (0 on a UNIX socket).

    A connection proves itself with its first request that gets through ``front`` (a wrapper
    around the app, such as the terminal API's Guard: a request it refuses proves nothing); by
    default any whole request does. A client that takes no byte of an answer for ``stall_s`` is
    disconnected (:class:`StallGuard`). ``what`` names a connection in the log ("refused WHAT ...").
    ``lane(method, target)``: the requests a connection's :class:`Lane` answers until the first
    other one, after which Hypercorn serves the connection (None: Hypercorn from the start)."""
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
        entry = front(proving)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded.watch)
            async def deadline() -> None:
                with trio.move_on_after(limits.proof_timeout):
                    await asked.wait()
                    return
                nursery.cancel_scope.cancel()  # no request proved it in time: the connection goes
            nursery.start_soon(deadline)
            taken, served = b"", 0
            fast = True if lane is None else await _lane(entry, config, guarded, lane)
            if isinstance(fast, Lane):
                try:
                    left = await fast.run()
                except Exception:  # a fault of the lane's own: this connection goes, not the node
                    await config.log.exception("the HTTP lane failed on a connection")
                    left = None
                if left is None:  # the connection is done
                    fast = False
                else:
                    taken, served = left, fast.served
            if fast is False:
                nursery.cancel_scope.cancel()
                return
            server = _Connection(wrap_app(entry, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                                 config, worker, ConnectionState({}), guarded, taken=taken, served=served)
            await server.run()
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_bounded, connection, [listener], gate, what=what))
        task_status.started(port)
