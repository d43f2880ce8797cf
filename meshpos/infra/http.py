"""A small HTTP/1.1 server and client on trio streams, built on h11.

Server: :func:`serve_http` runs ``handler(Request) -> Response`` for each request
with bounded header and body sizes (431 / 413), a read deadline per request,
keep-alive, and a 500 for a handler that raises; the connection and the server
live on. A handler's ``connection: close`` header ends the connection after that answer.
Connections are bounded (meshpos.infra.netguard): past ``HttpLimits``'s caps a
new one is closed at once, and running out of file descriptors is logged once a
minute, not as a traceback per accept. A connection proves itself with its first whole
request, or, over TLS with ``authenticate``, as soon as that accepts the finished handshake.
Over TLS the handler sees the client's certificate as ``Request.peer_cert_der``.

Client: :class:`HttpClientConnection` (keep-alive on one stream), the one-shot
:func:`request`, and :func:`open_https`. Failures become
:class:`meshpos.domain.errors.ProtocolError`.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs

import h11
import trio

from meshpos.domain.errors import ProtocolError
from meshpos.infra.netguard import InboundGate, InboundLimits, serve_bounded

log = logging.getLogger(__name__)

MAX_HEADER_BYTES: Final = 16 * 1024
MAX_BODY_BYTES: Final = 1024 * 1024
READ_TIMEOUT: Final = 30.0
HANDSHAKE_TIMEOUT: Final = 10.0
RECEIVE_SIZE: Final = 65536
SERVER_NAME: Final = "meshpos"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: str  # raw query string, "" if none
    headers: Mapping[str, str]  # names lowercased; repeated headers joined with ", "
    body: bytes
    peer_cert_der: bytes | None = None
    peer_addr: str | None = None  # the client's IP address

    def params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def json(self) -> Any:
        """The body as JSON; ProtocolError if it is not."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ProtocolError("request body is not JSON (or nested too deep)") from exc


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ProtocolError(f"HTTP {self.status} answer is not JSON (or nested too deep)") from exc


def json_response(status: int, value: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return Response(status, {"content-type": "application/json", **(headers or {})}, body)


def text_response(status: int, text: str) -> Response:
    return Response(status, {"content-type": "text/plain; charset=utf-8"}, text.encode("utf-8"))


class AbortConnection(Exception):
    """Raise from a handler to close the connection without answering."""


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = MAX_HEADER_BYTES
    max_body_bytes: int = MAX_BODY_BYTES
    read_timeout: float = READ_TIMEOUT  # for a whole request, idle keep-alive wait included
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    # connections held at once; connections that have not sent a whole request yet, in all and from one
    # address (meshpos.infra.netguard)
    max_connections: int = 1024
    max_pending: int = 256
    max_pending_per_source: int = 64


Handler = Callable[[Request], Awaitable[Response]]
Authenticate = Callable[[trio.SSLStream[Any]], bool]  # the handshake done: is this a known client?


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def peer_cert_der(stream: trio.abc.Stream) -> bytes | None:
    """The DER certificate the TLS peer presented, or None (plain TCP, or no certificate)."""
    if not isinstance(stream, trio.SSLStream):
        return None
    der = stream.getpeercert(binary_form=True)
    return der if isinstance(der, bytes) and der else None


# --- server ------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def _send(stream: trio.abc.Stream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _send_response(stream: trio.abc.Stream, conn: h11.Connection, response: Response, close: bool) -> None:
    headers = [(k.lower(), v) for k, v in response.headers.items() if k.lower() not in ("content-length", "connection")]
    headers.append(("content-length", str(len(response.body))))
    headers.append(("server", SERVER_NAME))
    if close:
        headers.append(("connection", "close"))
    await _send(stream, conn, h11.Response(status_code=response.status, headers=headers))
    if response.body:
        await _send(stream, conn, h11.Data(data=response.body))
    await _send(stream, conn, h11.EndOfMessage())


async def _read_request(
    stream: trio.abc.Stream, conn: h11.Connection, limits: HttpLimits, peer: bytes | None, addr: str | None = None
) -> Request | None:
    """The next request, None if the client closed or idled out; _Reject if it is unacceptable."""
    head: h11.Request | None = None
    body = bytearray()
    started = bool(conn.trailing_data[0])
    with trio.move_on_after(limits.read_timeout):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Reject(exc.error_status_hint, "malformed request") from exc
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await _send(stream, conn, h11.InformationalResponse(status_code=100, headers=[]))
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                started = started or bool(data)
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                head = event
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > limits.max_header_bytes:  # h11 bounds only a head still incomplete
                    raise _Reject(431, "request header fields too large")
                length = _headers(event.headers).get("content-length")
                if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
                    raise _Reject(413, "request body too large")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body_bytes:
                    raise _Reject(413, "request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                return Request(head.method.decode("ascii"), path, query, _headers(head.headers), bytes(body), peer,
                               addr)
            else:  # ConnectionClosed, or PAUSED after an error
                return None
    if started:
        raise _Reject(408, "request timeout")
    return None


async def _serve_connection(stream: trio.abc.Stream, handler: Handler, limits: HttpLimits,
                            addr: str | None = None, proved: Callable[[], None] = lambda: None,
                            authenticate: Authenticate | None = None) -> None:
    try:
        peer = None
        if isinstance(stream, trio.SSLStream):
            with trio.move_on_after(limits.handshake_timeout) as scope:
                await stream.do_handshake()
            if scope.cancelled_caught:
                return
            peer = peer_cert_der(stream)
            if authenticate is not None and authenticate(stream):
                proved()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        while True:
            try:
                request = await _read_request(stream, conn, limits, peer, addr)
            except _Reject as reject:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send_response(stream, conn, text_response(reject.status, f"{reject}\n"), close=True)
                return
            if request is None:
                return
            proved()  # a whole request arrived: no longer an idle connection of unknown purpose
            try:
                response = await handler(request)
            except AbortConnection:
                return
            except Exception:
                log.exception("HTTP handler failed on %s %s", request.method, request.path)
                response = text_response(500, "internal error\n")
            await _send_response(stream, conn, response, close=_closes(response))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError) as exc:
        log.debug("HTTP connection ended: %s", exc)
    finally:
        await trio.aclose_forcefully(stream)


def _closes(response: Response) -> bool:
    return any(k.lower() == "connection" and "close" in (t.strip() for t in v.lower().split(",")) for k, v in response.headers.items())


async def serve_http(
    handler: Handler,
    where: Sequence[trio.abc.Listener[Any]] | tuple[str, int, ssl.SSLContext | None],
    *,
    limits: HttpLimits = HttpLimits(),
    authenticate: Authenticate | None = None,
    task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``where`` is listeners or ``(host, port, ssl_context or None)``;
    ``authenticate`` (TLS only) is asked once per connection after its handshake.

    ``task_status.started`` receives the listeners (read the bound port from them).
    """
    if isinstance(where, tuple):
        host, port, context = where
        listeners: list[trio.abc.Listener[Any]]
        if context is None:
            listeners = list(await trio.open_tcp_listeners(port, host=host))
        else:
            listeners = list(await trio.open_ssl_over_tcp_listeners(port, context, host=host, https_compatible=True))
    else:
        listeners = list(where)

    async def serve_one(stream: trio.abc.Stream, source: str, where: str, proved: Callable[[], None]) -> None:
        await _serve_connection(stream, handler, limits, source, proved, authenticate)

    gate = InboundGate(InboundLimits(total=limits.max_connections, pending=limits.max_pending,
                                     per_source=limits.max_pending_per_source,
                                     proof_timeout=limits.handshake_timeout))
    await serve_bounded(serve_one, listeners, gate, what="HTTP connection", task_status=task_status)


def listener_port(listener: trio.abc.Listener[Any]) -> int:
    """The TCP port a (possibly TLS) listener from :func:`serve_http` is bound to."""
    inner: Any = listener
    if isinstance(inner, trio.SSLListener):
        inner = inner.transport_listener
    port: int = inner.socket.getsockname()[1]
    return port


# --- client ------------------------------------------------------------------


class HttpClientConnection:
    """Sequential requests on one stream, reusing it while the server keeps it alive."""

    def __init__(self, stream: trio.abc.Stream, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.stream = stream
        self._max_body = max_body_bytes
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._host = stream.server_hostname if isinstance(stream, trio.SSLStream) else None
        self._eof = False

    @property
    def reusable(self) -> bool:
        return self._conn.our_state is h11.IDLE and self._conn.their_state is h11.IDLE

    async def request(self, method: str, path: str, headers: Mapping[str, str], body: bytes = b"") -> Response:
        hdrs = {k.lower(): v for k, v in headers.items()}
        if "host" not in hdrs:
            hdrs["host"] = str(self._host or "localhost")
        hdrs["content-length"] = str(len(body))
        hdrs.pop("transfer-encoding", None)
        try:
            await _send(self.stream, self._conn, h11.Request(method=method, target=path, headers=list(hdrs.items())))
            if body:
                await _send(self.stream, self._conn, h11.Data(data=body))
            await _send(self.stream, self._conn, h11.EndOfMessage())
            response = await self._read_response()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ProtocolError(f"HTTP connection lost during {method} {path}") from exc
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            if self._eof:  # h11's words for it ("can't handle event type ConnectionClosed...") help nobody
                raise ProtocolError(f"HTTP connection lost during {method} {path}: closed before the "
                                    "whole answer came") from exc
            raise ProtocolError(f"bad HTTP exchange on {method} {path}: {exc}") from exc
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        return response

    async def _read_response(self) -> Response:
        head: h11.Response | None = None
        body = bytearray()
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                self._eof = not data
                self._conn.receive_data(bytes(data))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_body:
                    raise ProtocolError("HTTP answer body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return Response(head.status_code, _headers(head.headers), bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolError("server closed the HTTP connection without an answer")
            # InformationalResponse (1xx): keep reading

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def request(
    stream: trio.abc.Stream, method: str, path: str, headers: Mapping[str, str], body: bytes = b""
) -> Response:
    """One request and its answer on ``stream`` (which stays open)."""
    return await HttpClientConnection(stream).request(method, path, headers, body)


async def open_https(
    host: str, port: int, ssl_context: ssl.SSLContext, server_hostname: str | None = None
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS stream to ``host:port`` with the handshake done (client certificate from the context)."""
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ProtocolError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host, https_compatible=True)
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise ProtocolError(f"TLS handshake with {host}:{port} failed: {cause}") from exc
    return stream
