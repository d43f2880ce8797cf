"""Bounded connections at the switch: a cap in total and per source address, and no idling.

:class:`ConnectionGate` wraps the switch's TCP listeners (below TLS). A connection
beyond the per-source cap is closed at once; at the total cap the gate stops
accepting until one closes (the kernel's backlog holds the rest). Every accepted
stream fails with ``BrokenResourceError`` when its peer sends nothing for
``idle_s`` while the switch waits for bytes (a TLS handshake or a request that
stalls), so an idle connection holds its slot for seconds, not minutes.
A source is the peer's IP address.
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
    per_source: int = 64  # a whole fair may reach the switch from one NAT address
    idle_s: float = 5.0  # no byte for this long while the switch waits for one: closed
    handshake_s: float = 5.0  # the whole TLS handshake


class ConnectionGate:
    """Counts open connections, in total and per source; shared by all listeners of a switch."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.slots = trio.Semaphore(limits.total)
        self.by_source: Counter[str] = Counter()
        self.refused = 0  # closed at once: over the per-source cap
        self.idled_out = 0  # closed for sending nothing

    @property
    def open(self) -> int:
        return sum(self.by_source.values())

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
            if gate.by_source[source] >= gate.limits.per_source:
                gate.slots.release()
                gate.refused += 1
                if gate.refused == 1 or gate.refused % 1000 == 0:
                    log.warning("closing connections from %s beyond %d at once (%d refused so far)", source,
                                gate.limits.per_source, gate.refused)
                await trio.aclose_forcefully(stream)
                continue
            gate.by_source[source] += 1
            return _Tracked(stream, gate, source)

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
        self.gate = gate
        self.source = source
        self._released = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        with trio.move_on_after(self.gate.limits.idle_s):
            return await self.stream.receive_some(max_bytes)
        self.gate.idled_out += 1
        raise trio.BrokenResourceError(f"no byte from {self.source} for {self.gate.limits.idle_s:g} s")

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self.gate.by_source[self.source] -= 1
            if not self.gate.by_source[self.source]:
                del self.gate.by_source[self.source]
            self.gate.slots.release()
        await self.stream.aclose()


__all__ = ["ConnectionGate", "ConnectionLimits", "LimitedListener"]
