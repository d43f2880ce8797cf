"""Bounded inbound connections, and logs that a peer cannot flood.

Rules (used by the link listener and the HTTP server; the numbers are the callers'):

* A connection is *pending* from accept until it has proved itself (a link:
  the TLS handshake and the peer's HELLO; HTTP: its first whole request),
  then *open*. At most ``per_source`` connections of one source address may be
  pending at once, at most ``pending`` from all sources, and at most ``total``
  connections may be held at all. A connection past a cap is closed at once,
  before any TLS work, and the refusal is logged at most once per
  ``LOG_INTERVAL`` per reason.
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


class InboundGate:
    """Counts of inbound connections; ``admit`` says whether one more may be held."""

    def __init__(self, limits: InboundLimits) -> None:
        self.limits = limits
        self.held = 0
        self.pending: dict[str, int] = {}
        self.refused = 0

    @property
    def pending_total(self) -> int:
        return sum(self.pending.values())

    def admit(self, source: str) -> str | None:
        """None: take it (now pending); else why it must be closed at once."""
        lim = self.limits
        if self.held >= lim.total:
            reason = f"{self.held} connections held (limit {lim.total})"
        elif self.pending.get(source, 0) >= lim.per_source:
            reason = f"{lim.per_source} connections from {source} not yet authenticated"
        elif self.pending_total >= lim.pending:
            reason = f"{lim.pending} connections not yet authenticated"
        else:
            self.held += 1
            self.pending[source] = self.pending.get(source, 0) + 1
            return None
        self.refused += 1
        return reason

    def proved(self, source: str) -> None:
        """The connection proved itself: it no longer counts as pending."""
        n = self.pending.get(source, 0)
        if n <= 1:
            self.pending.pop(source, None)
        else:
            self.pending[source] = n - 1

    def release(self, source: str, proved: bool) -> None:
        self.held -= 1
        if not proved:
            self.proved(source)


def _socket_of(stream: Any) -> Any:
    while not hasattr(stream, "socket") and hasattr(stream, "transport_stream"):
        stream = stream.transport_stream
    return getattr(stream, "socket", None)


def source_of(stream: Any) -> tuple[str, str]:
    """(source address, "host:port") of an accepted stream (TLS or not)."""
    try:
        addr = _socket_of(stream).getpeername()
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

    async def run_one(stream: Any, source: str, where: str) -> None:
        done = False

        def proved() -> None:
            nonlocal done
            if not done:
                done = True
                gate.proved(source)
        try:
            await handler(stream, source, where, proved)
        finally:
            gate.release(source, done)
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
                reason = gate.admit(source)
                if reason is not None:
                    await trio.aclose_forcefully(stream)
                    ok, suppressed = limited.allow(("refused", reason))
                    if ok:
                        log.warning("refused %s from %s at once: %s (%d refused so far)%s", what, where, reason,
                                    gate.refused,
                                    f"; {suppressed} similar refusals not logged" if suppressed else "")
                    continue
                nursery.start_soon(run_one, stream, source, where)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(list(listeners))
