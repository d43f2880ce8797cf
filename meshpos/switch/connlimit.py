"""Bounded connections at the switch: a cap in total, per source address and per forwarder, and no idling.

:class:`ConnectionGate` wraps the switch's TCP listeners (below TLS). A connection is
*anonymous* from accept until its TLS client certificate has been found to name a forwarder
of a registered site (:meth:`ConnectionGate.authenticate`, called by the service right after
the handshake); then it is *authenticated*. A source is the peer's IP address.

* Anonymous connections: at most ``per_source`` from one address. A further one first makes
  room: the oldest anonymous connection of that address open for ``evict_after_s`` or more
  (default: a fifth of ``handshake_s``) is closed, whatever it is doing (a handshake trickled a
  byte at a time is no work of the switch); only if there is none is the new one closed at once.
  A whole fair reaches the switch from one NAT address, so this is what keeps anyone on its
  Wi-Fi from holding that address's slots against its gateways.
* Authenticated connections: they leave their address's count and are never closed for a
  newcomer; at most ``per_client`` per forwarder (node id), beyond which a further one stays
  anonymous.
* In total at most ``total``; at that cap the gate stops accepting until one closes (the
  kernel's backlog holds the rest).
* Every accepted stream fails with ``BrokenResourceError`` when its peer sends nothing for
  ``idle_s`` while the switch waits for bytes (a TLS handshake or a request that stalls), so an
  idle connection holds its slot for seconds, not minutes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    total: int = 1024
    per_source: int = 64  # anonymous connections from one address (a whole fair may share one NAT address)
    per_client: int = 8  # authenticated connections of one forwarder
    idle_s: float = 5.0  # no byte for this long while the switch waits for one: closed
    handshake_s: float = 5.0  # the whole TLS handshake
    evict_after_s: float | None = None  # waiting this long, closed for a newcomer at the cap (None: handshake_s/5)

    @property
    def grace(self) -> float:
        return self.handshake_s / 5 if self.evict_after_s is None else self.evict_after_s


class ConnectionGate:
    """Counts open connections, in total and per source; shared by all listeners of a switch."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.slots = trio.Semaphore(limits.total)
        self.by_source: Counter[str] = Counter()  # anonymous connections per address
        self.by_client: Counter[str] = Counter()  # authenticated connections per forwarder
        self.refused = 0  # closed at once: over the per-source cap
        self.idled_out = 0  # closed for sending nothing
        self.evicted = 0  # anonymous, closed to make room for a newcomer of their source
        self.streams: dict[str, list["_Tracked"]] = {}  # source -> its anonymous connections, oldest first

    def make_room(self, source: str) -> bool:
        """At ``source``'s cap: close its oldest anonymous connection open for ``grace``; False if none."""
        now = trio.current_time()
        for tracked in self.streams.get(source, ()):
            if tracked.evictable(now, self.limits.grace):
                tracked.evict()
                self.evicted += 1
                return True
        return False

    def authenticate(self, stream: trio.abc.Stream, client: str) -> bool:
        """``stream`` (accepted through this gate) belongs to the forwarder ``client``: it leaves
        its address's count and cannot be closed for a newcomer, unless ``client`` holds
        ``per_client`` authenticated connections already (then False, and it stays anonymous)."""
        if not isinstance(stream, _Tracked) or stream.gate is not self or stream.client is not None:
            return False
        if self.by_client[client] >= self.limits.per_client:
            return False
        stream.client = client
        self._forget(stream)
        self.by_client[client] += 1
        return True

    def _forget(self, tracked: "_Tracked") -> None:
        """``tracked`` (anonymous) no longer counts for its address."""
        mine = self.streams.get(tracked.source, [])
        if tracked in mine:
            mine.remove(tracked)
        if not mine:
            self.streams.pop(tracked.source, None)
        self.by_source[tracked.source] -= 1
        if not self.by_source[tracked.source]:
            del self.by_source[tracked.source]

    def release(self, tracked: "_Tracked") -> None:
        if tracked.client is None:
            self._forget(tracked)
        else:
            self.by_client[tracked.client] -= 1
            if not self.by_client[tracked.client]:
                del self.by_client[tracked.client]
        self.slots.release()

    @property
    def open(self) -> int:
        return sum(self.by_source.values()) + sum(self.by_client.values())

    def wrap(self, listener: trio.SocketListener) -> "LimitedListener":
        return LimitedListener(listener, self)


class LimitedListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, inner: trio.SocketListener, gate: ConnectionGate) -> None:
        self.inner = inner
        self.gate = gate
        self.socket = inner.socket  # for listener_port()

    async def accept(self) -> trio.abc.Stream:
        gate = self.gate
        while True:
            await gate.slots.acquire()
            try:
                stream = await self.inner.accept()
            except BaseException:
                gate.slots.release()
                raise
            source = _source_of(stream)
            if gate.by_source[source] >= gate.limits.per_source and not gate.make_room(source):
                gate.slots.release()
                gate.refused += 1
                if gate.refused == 1 or gate.refused % 1000 == 0:
                    log.warning("closing connections from %s beyond %d at once (%d refused so far)", source,
                                gate.limits.per_source, gate.refused)
                await trio.aclose_forcefully(stream)
                continue
            gate.by_source[source] += 1
            tracked = _Tracked(stream, gate, source)
            gate.streams.setdefault(source, []).append(tracked)
            return tracked

    async def aclose(self) -> None:
        await self.inner.aclose()


def _source_of(stream: trio.SocketStream) -> str:
    try:
        peer: Any = stream.socket.getpeername()
    except OSError:
        return "?"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class _Tracked(trio.abc.Stream):
    """A connection that gives its slot back once, when closed, and does not wait forever."""

    def __init__(self, stream: trio.SocketStream, gate: ConnectionGate, source: str) -> None:
        self.stream = stream
        self.socket = stream.socket  # the peer's address, for the HTTP layer (meshpos.infra.netguard.source_of)
        self.gate = gate
        self.source = source
        self.client: str | None = None  # the forwarder, once authenticated
        self.since = trio.current_time()
        self._released = False
        self._waiting: trio.CancelScope | None = None  # while waiting for the peer's bytes
        self._evicted = False

    def evictable(self, now: float, grace: float) -> bool:
        return not self._evicted and self.client is None and now - self.since >= grace

    def evict(self) -> None:
        """Close it for a newcomer of its source: its wait for bytes (now or next) ends in BrokenResourceError."""
        self._evicted = True
        if self._waiting is not None:
            self._waiting.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._evicted:
            raise trio.BrokenResourceError(f"closed to make room for a newer connection from {self.source}")
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._evicted:
            raise trio.BrokenResourceError(f"closed to make room for a newer connection from {self.source}")
        with trio.move_on_after(self.gate.limits.idle_s) as self._waiting:
            try:
                return await self.stream.receive_some(max_bytes)
            finally:
                self._waiting = None
        if self._evicted:
            raise trio.BrokenResourceError(f"closed to make room for a newer connection from {self.source}")
        self.gate.idled_out += 1
        raise trio.BrokenResourceError(f"no byte from {self.source} for {self.gate.limits.idle_s:g} s")

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self.gate.release(self)
        await self.stream.aclose()


__all__ = ["ConnectionGate", "ConnectionLimits", "LimitedListener"]
