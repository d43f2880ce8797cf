"""How far this node's clock is off: estimated from its peers' statuses and from the switch.

Terminals at a fair often run with a wrong clock (no network time while offline). A node cannot
set the system time, but it can tell its cashier and the organizer (protocols/clocks.md).

* **Peers.** Every signed status carries its signer's clock (``at``). For each peer, a sample is
  ``our clock when the status arrived - at``: our offset from that peer's clock, plus the time
  the status took to arrive (a status relayed late, or handed over again on a new link, only
  makes a sample larger). So per peer we keep the *smallest* of its last PEER_SAMPLES samples,
  and the peers' estimate is the median over peers heard from within PEER_MAX_AGE_S (of two
  middle values, the one nearer zero): with three peers or more, one peer with a wrong clock, or
  lying about it, cannot move it past the others'; with two that disagree, the node does not
  blame its own clock. With fewer than MIN_PEERS (2) peers there is no peers' estimate: one peer
  alone, hostile or merely wrong, could otherwise tell the cashier to set a right clock days off.
* **Switch.** When the node reaches the switch, the health reply carries the switch's clock
  (``time_ms``, protocols/forwarding.md); the sample is ``our clock half-way through the
  exchange - time_ms``, good to half the round trip. The switch's clock is the one that decides
  expiry (protocols/offline-window.md), so a switch sample younger than SWITCH_MAX_AGE_S is
  preferred to the peers'.

An offset is positive when this node's clock is ahead. WARN_SKEW_MS is where `meshpos doctor`
and the inspector start to warn. Pure: times come in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WARN_SKEW_MS = 120_000
PEER_SAMPLES = 4
PEER_MAX_AGE_S = 300.0
SWITCH_MAX_AGE_S = 600.0
MIN_PEERS = 2  # one peer alone never decides (of two, the middle value nearer zero wins)
MAX_PEERS = 256


@dataclass(frozen=True)
class Estimate:
    offset_ms: int
    source: str  # "switch" | "peers"
    peers: int  # how many peers the peers' estimate is the median of (0 for the switch)

    def to_json(self) -> dict[str, object]:
        return {"offset_ms": self.offset_ms, "source": self.source, "peers": self.peers}


def too_far(offset_ms: int | None) -> bool:
    return offset_ms is not None and abs(offset_ms) > WARN_SKEW_MS


def describe(offset_ms: int) -> str:
    """'3 days 0 h behind', '5 min ahead'... for a warning."""
    s = round(abs(offset_ms) / 1000)
    m = round(abs(offset_ms) / 60_000)  # a sample is off by its transit time: minutes are enough
    if m >= 1440:
        text = f"{m // 1440} day(s) {m % 1440 // 60} h"
    elif m >= 60:
        text = f"{m // 60} h {m % 60} min"
    elif s >= 120:
        text = f"{m} min"
    else:
        text = f"{s} s"
    return f"{text} {'ahead' if offset_ms > 0 else 'behind'}"


def middle(offsets: list[int]) -> int:
    """The median of sorted ``offsets``; of the two middle values of an even count, the one nearer
    zero: when the evidence is split evenly, this node's clock gets the benefit of the doubt."""
    n = len(offsets)
    if n % 2:
        return offsets[n // 2]
    return min(offsets[n // 2 - 1], offsets[n // 2], key=abs)


class ClockSkew:
    def __init__(self) -> None:
        self._peers: dict[str, tuple[deque[int], float]] = {}  # node -> (samples, when last heard)
        self._switch: tuple[int, float] | None = None

    def peer_sample(self, node_id: str, received_at_ms: int, status_at_ms: int, now: float) -> None:
        """A status of ``node_id`` made at ``status_at_ms`` (its clock) arrived at
        ``received_at_ms`` (ours); ``now`` is monotonic seconds."""
        entry = self._peers.get(node_id)
        if entry is None:
            if len(self._peers) >= MAX_PEERS:
                oldest = min(self._peers, key=lambda n: self._peers[n][1])
                del self._peers[oldest]
            entry = (deque(maxlen=PEER_SAMPLES), now)
        entry[0].append(received_at_ms - status_at_ms)
        self._peers[node_id] = (entry[0], now)

    def forget(self, node_id: str) -> None:
        self._peers.pop(node_id, None)

    def switch_sample(self, sent_ms: int, received_ms: int, switch_ms: int, now: float) -> None:
        """A health exchange sent at ``sent_ms`` and answered at ``received_ms`` (our clock)
        carried the switch's ``switch_ms``."""
        self._switch = ((sent_ms + received_ms) // 2 - switch_ms, now)

    def peers_estimate(self, now: float) -> Estimate | None:
        offsets = sorted(min(samples) for samples, heard in self._peers.values() if now - heard <= PEER_MAX_AGE_S)
        if len(offsets) < MIN_PEERS:
            return None
        return Estimate(middle(offsets), "peers", len(offsets))

    def switch_estimate(self, now: float) -> Estimate | None:
        if self._switch is None or now - self._switch[1] > SWITCH_MAX_AGE_S:
            return None
        return Estimate(self._switch[0], "switch", 0)

    def estimate(self, now: float) -> Estimate | None:
        return self.switch_estimate(now) or self.peers_estimate(now)
