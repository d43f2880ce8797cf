"""Injected time. Every rule that depends on time takes ``now`` from a Clock.

Wall time is integer milliseconds since the Unix epoch (UTC), the unit used on
every wire and in every envelope.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in ms since the epoch."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes back."""


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, now_ms: int | None = None, monotonic: float = 0.0) -> None:
        self._now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        self._mono = monotonic

    def now_ms(self) -> int:
        return self._now_ms

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now_ms += int(seconds * 1000)
        self._mono += seconds


class OffsetClock:
    """Another clock's wall time shifted by ``offset_ms`` (monotonic time unchanged): how a test
    runs a real node process whose clock is wrong (``meshpos run --clock-offset``, test only)."""

    def __init__(self, base: Clock, offset_ms: int) -> None:
        self.base = base
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return self.base.now_ms() + self.offset_ms

    def monotonic(self) -> float:
        return self.base.monotonic()


SYSTEM_CLOCK = SystemClock()
