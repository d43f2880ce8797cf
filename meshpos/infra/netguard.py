"""Bounded inbound connections, and logs that a peer cannot flood.

Rules (used by the link listener and the HTTP server; the numbers are the callers'):

* A connection is *pending* from accept until it has proved itself (a link:
  the TLS handshake and the peer's HELLO; HTTP: its first whole request),
  then *open*. At most ``per_source`` connections of one source address may be
  pending at once, at most ``pending`` from all sources, and at most ``total``
  connections may be held at all. A new connection past a cap first makes room:
  the oldest pending connection of its own source (the per-source cap), else of the
  source with the most pending connections (the pending or total cap) is closed, if
  it has been pending for at least ``evict_after`` (default: a fifth of
  ``proof_timeout``). Only when no pending connection is that old (or all held
  ones have proved themselves) is the new connection closed at once, before any
  TLS work; either is logged at most once per ``LOG_INTERVAL`` per reason. So
  connections that never prove themselves cannot lock a client out for
  ``proof_timeout`` after ``proof_timeout``: a client that proves itself within
  ``evict_after`` of being taken is never closed for another, and one arriving
  while the flood's connections are older than that is taken. (A source that opens
  more than ``per_source`` connections per ``evict_after`` can still keep its own
  address's slots young; from another address it takes only what the caps leave.)
* The caller closes a pending connection that has not proved itself within
  its own short deadline, so an idle connection costs a few seconds, not ten.
* Running out of file descriptors (``EMFILE`` and the like) while accepting is
  logged once per ``LOG_INTERVAL`` (how many since), never as a traceback per
  accept; the listener waits ``ACCEPT_RETRY`` and goes on.
* :class:`RateLimitFilter` bounds what any one log call site may write: at most
  ``burst`` lines per ``interval`` per message template (logger, level, format
  string), then one line saying how many were suppressed. Installed on the
  running node's log handlers, so a hostile peer cannot fill the disk through
  refused entries or connections.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)

LOG_INTERVAL = 60.0
ACCEPT_RETRY = 0.1
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
MAX_LOG_KEYS = 4096


class LogLimiter:
    """At most ``burst`` events per key per ``interval`` seconds (keys bounded, oldest forgotten)."""

    def __init__(self, interval: float = LOG_INTERVAL, burst: int = 1, max_keys: int = MAX_LOG_KEYS,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        self.now = now
        self._keys: OrderedDict[Hashable, list[float | int]] = OrderedDict()  # key -> [window start, n, suppressed]

    def allow(self, key: Hashable) -> tuple[bool, int]:
        """(log this one?, how many were suppressed since the last one logged)."""
        now = self.now()
        slot = self._keys.get(key)
        if slot is None or now - slot[0] >= self.interval:
            suppressed = int(slot[2]) if slot is not None else 0
            self._keys[key] = [now, 1, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            return True, suppressed
        if slot[1] < self.burst:
            slot[1] = int(slot[1]) + 1
            return True, 0
        slot[2] = int(slot[2]) + 1
        return False, 0


class RateLimitFilter(logging.Filter):
    """A logging filter: at most ``burst`` records per message template per ``interval``."""

    def __init__(self, interval: float = LOG_INTERVAL, burst: int = 20,
                 now: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limiter = LogLimiter(interval, burst, now=now)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_meshpos_rate_checked", False):  # one verdict per record, however many handlers
            return bool(getattr(record, "_meshpos_rate_ok"))
        ok, suppressed = self.limiter.allow((record.name, record.levelno, str(record.msg)))
        if ok and suppressed:
            record.msg = f"{record.msg} [{suppressed} similar line(s) suppressed in the last {self.limiter.interval:g} s]"
        record._meshpos_rate_checked = True
        record._meshpos_rate_ok = ok
        return ok


def install_log_limits(logger: logging.Logger | None = None) -> RateLimitFilter:
    """Put one RateLimitFilter on every handler of ``logger`` (the root logger) that has none."""
    target = logger or logging.getLogger()
    shared = next((f for h in target.handlers for f in h.filters if isinstance(f, RateLimitFilter)), None)
    limit = shared or RateLimitFilter()
    for handler in target.handlers:
        if limit not in handler.filters:
            handler.addFilter(limit)
    return limit


@dataclass(frozen=True)
class InboundLimits:
    total: int  # connections held at once, pending and open
    pending: int  # connections not yet proved, from all sources
    per_source: int  # connections not yet proved, from one source address
    proof_timeout: float  # seconds a connection may stay pending (the caller enforces it)
    evict_after: float | None = None  # seconds pending before one may be closed for a newcomer (None: proof_timeout / 5)

    @property
    def grace(self) -> float:
        return self.proof_timeout / 5 if self.evict_after is None else self.evict_after


@dataclass(frozen=True)
class Admission:
    """``admit``'s answer: ``ticket`` (None: refused, ``reason`` says why) and the tickets of pending
    connections to close now to make room for it (already no longer counted)."""
    ticket: int | None
    reason: str = ""
    evict: tuple[int, ...] = ()


class InboundGate:
    """Counts of inbound connections; ``admit`` says whether one more may be held, and which
    pending connections must go to make room for it (module docstring). Pure: time comes in."""

    def __init__(self, limits: InboundLimits, now: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.now = now
        self.open = 0  # held connections that proved themselves
        self._pending: OrderedDict[int, tuple[str, float]] = OrderedDict()  # ticket -> (source, since), oldest first
        self._by_source: dict[str, int] = {}
        self._next = 0
        self.refused = 0
        self.evicted = 0

    @property
    def held(self) -> int:
        return self.open + len(self._pending)

    @property
    def pending(self) -> dict[str, int]:
        """Pending connections per source."""
        return dict(self._by_source)

    @property
    def pending_total(self) -> int:
        return len(self._pending)

    def admit(self, source: str) -> Admission:
        """Take a new connection from ``source`` (pending) unless a cap forbids it even after
        closing old pending connections; see :class:`Admission`."""
        lim = self.limits
        now = self.now()
        gone: list[int] = []
        counts = dict(self._by_source)

        def victim(src: str) -> int | None:  # the oldest pending of src, if it waited long enough
            for ticket, (of, since) in self._pending.items():  # oldest first
                if of == src and ticket not in gone:
                    return ticket if now - since >= lim.grace else None
            return None

        while True:
            waiting = len(self._pending) - len(gone)
            if counts.get(source, 0) >= lim.per_source:
                cap, ticket = f"{lim.per_source} connections from {source} not yet authenticated", victim(source)
            elif waiting >= lim.pending or self.open + waiting >= lim.total:
                cap = (f"{lim.pending} connections not yet authenticated" if waiting >= lim.pending
                       else f"{self.open + waiting} connections held (limit {lim.total})")
                heaviest = max(counts, key=lambda src: counts[src]) if counts else None
                ticket = victim(heaviest) if heaviest is not None else None
            else:
                break
            if ticket is None:
                self.refused += 1
                return Admission(None, cap)
            gone.append(ticket)
            of = self._pending[ticket][0]
            counts[of] -= 1
            if not counts[of]:
                del counts[of]
        for ticket in gone:
            self._drop(ticket)
        self.evicted += len(gone)
        self._next += 1
        self._pending[self._next] = (source, now)
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return Admission(self._next, evict=tuple(gone))

    def _drop(self, ticket: int) -> bool:
        """Stop counting ``ticket`` as pending; False if it was not (proved, closed for another)."""
        entry = self._pending.pop(ticket, None)
        if entry is None:
            return False
        n = self._by_source[entry[0]] - 1
        if n:
            self._by_source[entry[0]] = n
        else:
            del self._by_source[entry[0]]
        return True

    def proved(self, ticket: int) -> bool:
        """The connection proved itself: it no longer counts as pending (nor can it be closed for
        another); False if it was closed for another already (it is on its way out)."""
        if self._drop(ticket):
            self.open += 1
            return True
        return False

    def release(self, ticket: int, proved: bool) -> None:
        """The connection ended (if it was closed for another, it counts no longer already)."""
        if proved:
            self.open -= 1
        else:
            self._drop(ticket)


def socket_of(stream: Any) -> Any:
    """The socket under an accepted stream, through any TLS layers (None if there is none)."""
    while not hasattr(stream, "socket") and hasattr(stream, "transport_stream"):
        stream = stream.transport_stream
    return getattr(stream, "socket", None)


def source_of(stream: Any) -> tuple[str, str]:
    """(source address, "host:port") of an accepted stream (TLS or not)."""
    try:
        addr = socket_of(stream).getpeername()
        return str(addr[0]), f"{addr[0]}:{addr[1]}"
    except (OSError, AttributeError, TypeError, IndexError):
        return "unknown", "unknown peer"


Connection = Callable[[Any, str, str, Callable[[], None]], Awaitable[None]]


async def serve_bounded(handler: Connection, listeners: Sequence[trio.abc.Listener[Any]], gate: InboundGate, *,
                        what: str = "connection",
                        task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept on every listener for ever; ``handler(stream, source, where, proved)`` runs each admitted
    connection (it calls ``proved()`` once the peer has shown who it is); the stream is closed after."""
    limited = LogLimiter()

    running: dict[int, tuple[trio.CancelScope, str]] = {}  # pending connections: ticket -> (scope, where)

    async def run_one(stream: Any, ticket: int, source: str, where: str, scope: trio.CancelScope) -> None:
        done = False

        def proved() -> None:
            nonlocal done
            if not done and gate.proved(ticket):
                done = True
                running.pop(ticket, None)
        try:
            with scope:
                await handler(stream, source, where, proved)
        except Exception as exc:  # a fault in one connection's handling closes it, not the listener
            ok, suppressed = limited.allow(("failed", type(exc).__name__))
            if ok:  # the frames, not the message: it might quote what the peer sent
                log.error("%s from %s failed (%s) and is closed; the listener goes on%s", what, where,
                          type(exc).__name__, f" ({suppressed} more since the last report)" if suppressed else "",
                          extra={"connection_fault": True,
                                 "frames": "".join(traceback.format_tb(exc.__traceback__)).rstrip()})
        finally:
            running.pop(ticket, None)
            gate.release(ticket, done)
            await trio.aclose_forcefully(stream)

    async def accept_loop(listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    ok, suppressed = limited.allow(("accept", exc.errno))
                    if ok:
                        log.error("cannot accept %ss: %s (%s)%s; new ones wait until some close",
                                  what, errno.errorcode.get(exc.errno or 0, "?"), os.strerror(exc.errno or 0),
                                  f" ({suppressed} more times since the last report)" if suppressed else "")
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                source, where = source_of(stream)
                admission = gate.admit(source)
                if admission.ticket is None:
                    await trio.aclose_forcefully(stream)
                    ok, suppressed = limited.allow(("refused", admission.reason))
                    if ok:
                        log.warning("refused %s from %s at once: %s (%d refused so far)%s", what, where,
                                    admission.reason, gate.refused,
                                    f"; {suppressed} similar refusals not logged" if suppressed else "")
                    continue
                for old in admission.evict:  # pending too long while others wait: closed to make room
                    victim = running.pop(old, None)
                    if victim is None:
                        continue
                    victim[0].cancel()
                    old_where = victim[1]
                    ok, suppressed = limited.allow(("evicted", source))
                    if ok:
                        log.warning("closed %s from %s, not authenticated after %gs, to take one from %s "
                                    "(%d closed so far)%s", what, old_where, gate.limits.grace, where, gate.evicted,
                                    f"; {suppressed} similar not logged" if suppressed else "")
                scope = trio.CancelScope()
                running[admission.ticket] = (scope, where)
                nursery.start_soon(run_one, stream, admission.ticket, source, where, scope)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(list(listeners))
