"""ISO 8583 over TLS (or, when configured so explicitly, plain TCP): one connection,
many outstanding requests, answers in any order.

A thin trio driver around :class:`meshpos.wire.iso8583.ClientConnection`:
a reader task matches answers to waiting callers, a writer task sends whatever
callers queued in one ``send_all``. If the connection drops, every request
waiting on it fails with AcquirerError (its caller retries it as a 0221) and the
next request opens a new connection. A request is encoded before ``before_send``
runs; one that does not encode raises UnsendableRequest and nothing is sent. An
answer whose caller stopped waiting goes to ``on_late_answer`` (never dropped).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.domain.errors import AcquirerError, EncodingError, ProtocolError
from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.acquirer.base import BeforeSend, LateAnswer, UnsendableRequest, Window
from meshpos.wire.iso8583 import (DEFAULT_SPEC, MAX_FRAME, NEED_DATA, AnswerReceived, ClientConnection, Family, LengthHeader,
                            MatchKey, RequestKind, Spec, UnusableAnswer)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_OUTSTANDING = 1000
RECEIVE_SIZE = 65536

Connector = Callable[[], Awaitable[trio.abc.Stream]]
LateAnswerSink = Callable[[LateAnswer], None]


class _Pending:
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: AcquirerResult | None = None
        self.error: str | None = None


class _Connection:
    def __init__(self, stream: trio.abc.Stream, proto: ClientConnection) -> None:
        self.stream = stream
        self.proto = proto
        self.pending: dict[MatchKey, _Pending] = {}
        self.outbox = bytearray()
        self.outbox_ready = trio.Event()
        self.closed = False
        self.lost_reason: str | None = None
        self.cancel_scope = trio.CancelScope()

    def fail_all(self, reason: str) -> None:
        self.closed = True
        for pending in self.pending.values():
            pending.error = reason
            pending.done.set()
        self.pending.clear()
        self.cancel_scope.cancel()


class Iso8583Link:
    """An :class:`~meshpos.acquirer.base.AcquirerLink` speaking ISO 8583 over one stream.

    Background tasks run in ``nursery``; :func:`open_iso8583_link` supplies one.
    ``timeout`` bounds each call, connecting included; ``clock`` gives field 7.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        connect: Connector,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = SYSTEM_CLOCK,
        header: LengthHeader = LengthHeader.BINARY2,
        spec: Spec = DEFAULT_SPEC,
        max_frame: int = MAX_FRAME,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        on_late_answer: LateAnswerSink | None = None,
    ) -> None:
        self._nursery = nursery
        self._on_late_answer = on_late_answer
        self._connect = connect
        self._timeout = timeout
        self._clock = clock
        self._header = header
        self._spec = spec
        self._max_frame = max_frame
        self._slots = Window(max_outstanding)
        self._connect_lock = trio.Lock()
        self._conn: _Connection | None = None
        self._closed = False
        self.connections_opened = 0

    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        return await self._exchange(req, RequestKind.ADVICE_REPEAT if repeat else RequestKind.ADVICE, before_send)

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        return await self._exchange(req, RequestKind.REVERSAL)

    async def check(self) -> None:
        """Raise AcquirerError unless a connection to the host is open or opens now (readiness)."""
        with trio.move_on_after(self._timeout) as scope:
            await self._connection("readiness check")
        if scope.cancelled_caught:
            raise AcquirerError(f"readiness check: no connection to the acquirer within {self._timeout:g} s")

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail_all("the acquirer link was closed")
            await trio.aclose_forcefully(conn.stream)

    async def _exchange(self, req: AcquirerRequest, kind: RequestKind,
                        before_send: BeforeSend | None = None) -> AcquirerResult:
        what = f"{kind.mti} for {req.describe()}"
        pending = _Pending()
        with trio.move_on_after(self._timeout) as scope:
            async with self._slots:
                conn = self._conn
                if conn is None or conn.closed or self._closed:  # the lock only to (re)connect
                    conn = await self._connection(what)
                try:
                    key, data = conn.proto.send_request(req, kind, now_ms=self._clock.now_ms())
                except EncodingError as exc:
                    raise UnsendableRequest(f"{what}: {exc}") from exc
                except ProtocolError as exc:
                    raise AcquirerError(f"{what}: {exc}") from exc
                if before_send is not None:
                    try:
                        with trio.CancelScope(shield=True):  # a record half-made by a timeout is worse
                            await before_send()
                    except BaseException:
                        conn.proto.forget(key)
                        raise
                    if conn.closed:  # the connection died while the caller recorded: nothing was sent
                        raise AcquirerError(f"{what}: {conn.lost_reason or 'connection to the acquirer lost'}")
                    # the caller's recording (a database commit) is not the acquirer's time: the
                    # host gets the whole timeout for its answer from here
                    scope.deadline = trio.current_time() + self._timeout
                conn.pending[key] = pending
                conn.outbox += data
                conn.outbox_ready.set()
                try:
                    await pending.done.wait()
                finally:
                    if not pending.done.is_set():
                        conn.pending.pop(key, None)
                        conn.proto.forget(key)
        if scope.cancelled_caught:
            raise AcquirerError(f"{what}: no answer within {self._timeout:g} s")
        if pending.error is not None:
            raise AcquirerError(f"{what}: {pending.error}")
        assert pending.result is not None
        return pending.result

    async def _connection(self, what: str) -> _Connection:
        if self._closed:
            raise AcquirerError(f"{what}: the acquirer link is closed")
        async with self._connect_lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            try:
                stream = await self._connect()
            except OSError as exc:
                raise AcquirerError(f"{what}: cannot connect to the acquirer: {exc.strerror or exc}") from exc
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                raise AcquirerError(f"{what}: TLS handshake with the acquirer failed: {cause}") from exc
            conn = _Connection(
                stream, ClientConnection(header=self._header, spec=self._spec, max_frame=self._max_frame)
            )
            self._conn = conn
            self.connections_opened += 1
            self._nursery.start_soon(self._run_connection, conn)
            return conn

    async def _run_connection(self, conn: _Connection) -> None:
        reason = "the acquirer link was closed"
        try:
            with conn.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn)
                    reason = await self._reader(conn)
                    nursery.cancel_scope.cancel()
        finally:
            reason = conn.lost_reason or reason
            conn.fail_all(reason)
            if self._conn is conn:
                self._conn = None
            await trio.aclose_forcefully(conn.stream)
        log.info("acquirer connection ended: %s", reason)

    async def _writer(self, conn: _Connection) -> None:
        while True:
            await conn.outbox_ready.wait()
            conn.outbox_ready = trio.Event()
            data, conn.outbox = bytes(conn.outbox), bytearray()
            try:
                await conn.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                conn.lost_reason = f"connection to the acquirer lost ({type(exc).__name__})"
                conn.cancel_scope.cancel()
                return

    async def _reader(self, conn: _Connection) -> str:
        while True:
            try:
                data = await conn.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                return f"connection to the acquirer lost ({type(exc).__name__})"
            if not data:
                return "the acquirer closed the connection"
            conn.proto.receive_data(data)
            while True:
                try:
                    event = conn.proto.next_event()
                except (EncodingError, ProtocolError) as exc:
                    # framing can no longer be trusted: drop everything on this connection
                    return f"unusable answer from the acquirer: {exc}"
                if event is NEED_DATA:
                    break
                if isinstance(event, UnusableAnswer):  # one bad message: its request alone fails
                    self._unusable(conn, event)
                    continue
                pending = conn.pending.pop(event.key, None) if isinstance(event, AnswerReceived) else None
                if pending is not None:
                    pending.result = event.result
                    pending.done.set()
                else:
                    self._late(event.mti, event.key, event.result)

    def _unusable(self, conn: _Connection, event: UnusableAnswer) -> None:
        pending = conn.pending.pop(event.key, None) if event.key is not None else None
        if pending is not None:
            assert event.key is not None  # only a named request is pending
            log.warning("unusable answer from the acquirer for rrn %s: %s", event.key.rrn, event.reason)
            pending.error = f"unusable answer from the acquirer: {event.reason}"
            pending.done.set()
            return
        log.warning("unusable answer from the acquirer, naming no outstanding request, dropped (%s); the request "
                    "it answered, if any, times out alone", event.reason)

    def _late(self, mti: str, key: MatchKey, result: AcquirerResult) -> None:
        """An answer nobody waits for any more: hand it on, so its sale is settled from it."""
        if self._on_late_answer is None:
            log.warning("answer %s for rrn %s matches no outstanding request (nobody takes late answers)",
                        mti, key.rrn)
            return
        log.info("late answer %s for rrn %s: handed on to settle its sale", mti, key.rrn)
        self._on_late_answer(LateAnswer(reversal=key.family is Family.REVERSAL, stan=key.stan, rrn=key.rrn,
                                        terminal_id=key.terminal_id, result=result))


@asynccontextmanager
async def open_iso8583_link(
    host: str,
    port: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    clock: Clock = SYSTEM_CLOCK,
    header: LengthHeader = LengthHeader.BINARY2,
    spec: Spec = DEFAULT_SPEC,
    max_frame: int = MAX_FRAME,
    max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    connect: Connector | None = None,
    ssl_context: ssl.SSLContext | None = None,
    on_late_answer: LateAnswerSink | None = None,
) -> AsyncIterator[Iso8583Link]:
    """``async with open_iso8583_link(host, port, ssl_context=ctx) as link:`` -- over TLS with
    ``ssl_context`` (server name ``host``), over plain TCP when it is None."""

    async def tcp() -> trio.abc.Stream:
        if ssl_context is None:
            return await trio.open_tcp_stream(host, port)
        return await tls_connect(host, port, ssl_context)

    async with trio.open_nursery() as nursery:
        link = Iso8583Link(
            nursery,
            connect or tcp,
            timeout=timeout,
            clock=clock,
            header=header,
            spec=spec,
            max_frame=max_frame,
            max_outstanding=max_outstanding,
            on_late_answer=on_late_answer,
        )
        try:
            yield link
        finally:
            await link.aclose()
            nursery.cancel_scope.cancel()


async def tls_connect(host: str, port: int, ssl_context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """A TLS stream to the acquirer with the handshake done, so a certificate the context does not
    trust fails here (trio.BrokenResourceError) and never after a request was recorded as sent."""
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=host)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


__all__ = ["Connector", "Iso8583Link", "LateAnswerSink", "open_iso8583_link", "tls_connect", "DEFAULT_TIMEOUT"]
