"""How often an idle node speaks: status and keep-alive periods adapted to activity and battery.

A node that sells, or relays sales, publishes its status every ACTIVE_STATUS_S and pings a
silent link after ACTIVE_KEEPALIVE_S (the values of protocols/link.md before pacing existed).
Once no sale, void or result has been seen for ACTIVE_FOR_S it slows down to IDLE_STATUS_S, and
further to LOW_BATTERY_STATUS_S when its battery is low and not charging. The keep-alive of an
idle node is longer than its status period, so on an idle mesh the statuses alone keep every
link alive and no PING is sent at all (fewer wake-ups). Dead-link detection does not change:
a link is closed after IDLE_TIMEOUT (45 s, meshpos.wire.link) with nothing received, whatever
the keep-alive; every keep-alive here leaves a PONG at least 20 s to come back within it.

Status periods stay within ``meshview.MAX_EVERY_MS`` (60 s), so viewers of every version read
the ``every_ms`` a status carries. Pure: ``now`` (monotonic seconds) comes in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACTIVE_STATUS_S = 10.0
IDLE_STATUS_S = 20.0
LOW_BATTERY_STATUS_S = 40.0
ACTIVE_KEEPALIVE_S = 15.0
IDLE_KEEPALIVE_S = 25.0  # > IDLE_STATUS_S: statuses keep an idle link alive; < 45 - 20
ACTIVE_FOR_S = 60.0  # after the last sale/void/result seen, the node counts as active this long
LOW_BATTERY_PERCENT = 15  # below this (and not charging) a node says it is low, and slows down
ACTIVE_CHECK_S = 1.0  # how often an active node looks for a status-worthy change
IDLE_CHECK_S = 5.0  # the same when idle (link changes and new entries still wake it at once)


@dataclass(frozen=True)
class Battery:
    """What the OS tells of the node's battery."""

    percent: int
    charging: bool

    @property
    def low(self) -> bool:
        return self.percent < LOW_BATTERY_PERCENT and not self.charging


@dataclass(frozen=True)
class Periods:
    status_s: float
    keepalive_s: float
    check_s: float


class Pace:
    """The node's activity: ``touch(now)`` when a sale, void or result is seen."""

    def __init__(self) -> None:
        self.last_activity = -math.inf

    def touch(self, now: float) -> None:
        self.last_activity = max(self.last_activity, now)

    def active(self, now: float) -> bool:
        return now - self.last_activity < ACTIVE_FOR_S

    def periods(self, now: float, battery: Battery | None) -> Periods:
        if self.active(now):
            return Periods(ACTIVE_STATUS_S, ACTIVE_KEEPALIVE_S, ACTIVE_CHECK_S)
        status = LOW_BATTERY_STATUS_S if battery is not None and battery.low else IDLE_STATUS_S
        return Periods(status, IDLE_KEEPALIVE_S, IDLE_CHECK_S)
