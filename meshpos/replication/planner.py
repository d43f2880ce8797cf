"""Peer management: which peers a node keeps links to, and when it retries.

Rules (the planner is pure; time comes in as ``now``):

* Membership is what discovery and the static peers tell us, for this site.
* Each node dials its ``RING_SUCCESSORS`` successors on the ring of node ids
  (sorted, wrapping) plus ``CHORDS`` pseudo-random chords chosen by hashing its
  own id. Every node knowing the same membership builds the same ring, so the
  mesh is connected (the ring alone is) and multi-hop, while each node holds
  about 2 × (successors + chords) links whatever the size of the site: a site
  of 100 terminals holds ~300 links, not 4,950.
* Static peers (config) are always dialled: the operator asked for them.
* At most one link per pair: when both ends dial at once, the link initiated by
  the smaller node id is kept and the other is closed.
* New targets wait until the membership is known (``to_dial``). Nodes learn the site a few
  members at a time (mDNS answers, statuses flooding in), and each partial ring has other
  targets: dialled at once, each becomes a surplus link to drain a little later, while the site
  sells (in the 20-node benchmark ~40 links opened in the first seconds and drained 30 s into the
  load). So a node that holds a link already dials a new target only once the membership has
  stayed the same for ``DIAL_QUIET`` seconds, or once it has been a target for ``DIAL_WAIT_MAX``
  seconds (a site whose membership never stays still still forms its ring). A node with no link
  at all dials at once: getting into the site comes first.
* Surplus links are closed (``to_prune``). Nodes learn the site a few members at a
  time, and each partial ring has other targets: without pruning, a node keeps
  every link it ever dialled (50 nodes started one after another held ~580
  links, not ~190). A node closes a link it dialled once the link is neither
  its target nor, by its view of the membership, the peer's (the peer would
  not dial it back), provided its own targets have been the same for
  ``PRUNE_AFTER`` seconds, each is linked or backing off, and the link has been
  up that long. Only the dialling end prunes: when the two ends' views of the
  membership differ, the end that still wants the link dials it itself, and
  that link is its to keep. Links to static peers are never pruned.
* Inbound links are bounded (MAX_INBOUND held, MAX_PENDING_* not yet
  authenticated, AUTH_TIMEOUT to authenticate): see meshpos.infra.netguard.
* A failed dial backs off exponentially (BACKOFF_MIN .. BACKOFF_MAX, with
  jitter); a link that stayed up for BACKOFF_RESET seconds resets the back-off.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from meshpos.domain.backoff import exponential_backoff

RING_SUCCESSORS = 2
CHORDS = 1
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
DIAL_BACKOFF = exponential_backoff(BACKOFF_MIN, BACKOFF_MAX)
BACKOFF_RESET = 10.0
DIAL_QUIET = 3.0  # seconds the membership must stay the same before a node that holds a link dials a new target
DIAL_WAIT_MAX = 15.0  # a target is dialled at the latest this long after it became one, however the membership moves
PRUNE_AFTER = 30.0  # seconds the targets must stay the same, and a link up, before a surplus link is closed
# Inbound links (meshpos.infra.netguard rules): held at once; not yet authenticated (TLS handshake and
# HELLO), from all sources and from one address; and how long authenticating may take. MAX_INBOUND
# is sized for the gateway of a large fair: every terminal is configured with its address, and where
# the Wi-Fi filters multicast or isolates clients that link is a terminal's only way into the site.
# At 64 the 65th terminal was refused at once, for good (the first 64 keep their static links), and
# never learnt another address. Only enrolled nodes authenticate, one link per pair: the site's size
# bounds what is held; the pending caps bound what strangers can hold.
MAX_INBOUND = 256
MAX_PENDING_INBOUND = 16
MAX_PENDING_PER_SOURCE = 4
AUTH_TIMEOUT = 5.0


@dataclass(frozen=True)
class PeerInfo:
    node_id: str
    addresses: tuple[str, ...]
    port: int
    role: str = "terminal"
    uplink: bool = False
    name: str = ""


@dataclass
class _Backoff:
    failures: int = 0
    next_try: float = 0.0


def ring_targets(me: str, members: set[str], successors: int = RING_SUCCESSORS, chords: int = CHORDS) -> set[str]:
    """The node ids ``me`` dials out to, given the site's members (``me`` included or not)."""
    ring = sorted(members | {me})
    n = len(ring)
    if n <= 1:
        return set()
    i = ring.index(me)
    targets = {ring[(i + k) % n] for k in range(1, min(successors, n - 1) + 1)}
    seed = int.from_bytes(hashlib.sha256(me.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    others = [m for m in ring if m != me and m not in targets]
    for _ in range(min(chords, len(others))):
        targets.add(others.pop(rng.randrange(len(others))))
    targets.discard(me)
    return targets


def wanted_by(me: str, peer: str, members: set[str]) -> bool:
    """True if either end of the link me-peer dials it, given the site's members."""
    everyone = members | {me, peer}
    return peer in ring_targets(me, everyone) or me in ring_targets(peer, everyone)


def keep_link(me: str, peer: str, initiated_by_me: bool) -> bool:
    """Of two simultaneous links between ``me`` and ``peer``, keep the one the smaller id dialled."""
    initiator = me if initiated_by_me else peer
    return initiator == min(me, peer)


@dataclass
class PeerPlanner:
    me: str
    rng: random.Random = field(default_factory=random.Random)
    peers: dict[str, PeerInfo] = field(default_factory=dict)
    backoff: dict[str, _Backoff] = field(default_factory=dict)
    connected: dict[str, float] = field(default_factory=dict)  # peer -> link up since
    _targets: frozenset[str] = frozenset()
    _targets_since: float = 0.0
    _members: frozenset[str] = frozenset()
    _members_since: float = float("-inf")  # when the membership last changed, as ``to_dial`` saw it
    _wanted_since: dict[str, float] = field(default_factory=dict)  # unlinked target -> a target since

    def seen(self, info: PeerInfo) -> None:
        if info.node_id != self.me:
            self.peers[info.node_id] = info

    def gone(self, node_id: str) -> None:
        self.peers.pop(node_id, None)

    def link_up(self, peer: str, now: float) -> None:
        self.connected[peer] = now

    def link_down(self, peer: str, now: float) -> None:
        since = self.connected.pop(peer, None)
        b = self.backoff.setdefault(peer, _Backoff())
        if since is not None and now - since >= BACKOFF_RESET:
            b.failures = 0
        self._fail(b, now)

    def dial_failed(self, peer: str, now: float) -> None:
        self._fail(self.backoff.setdefault(peer, _Backoff()), now)

    def _fail(self, b: _Backoff, now: float) -> None:
        delay = DIAL_BACKOFF(b.failures + 1)
        b.failures += 1
        b.next_try = now + delay * (0.75 + 0.5 * self.rng.random())

    def targets(self) -> set[str]:
        return ring_targets(self.me, set(self.peers))

    def to_dial(self, now: float) -> list[PeerInfo]:
        """Targets that have no link, whose back-off has run out, and that may be dialled now
        (module docstring: ``DIAL_QUIET``, ``DIAL_WAIT_MAX``)."""
        members = frozenset(self.peers)
        if members != self._members:
            self._members, self._members_since = members, now
        quiet = not self.connected or now - self._members_since >= DIAL_QUIET
        out = []
        waiting: dict[str, float] = {}
        for peer in sorted(self.targets()):
            if peer in self.connected or peer not in self.peers:
                continue
            since = waiting[peer] = self._wanted_since.get(peer, now)
            if not quiet and now - since < DIAL_WAIT_MAX:
                continue
            b = self.backoff.get(peer)
            if b is None or b.next_try <= now:
                out.append(self.peers[peer])
        self._wanted_since = waiting
        return out

    def to_prune(self, now: float, dialled: AbstractSet[str], keep: AbstractSet[str] = frozenset()) -> list[str]:
        """The peers whose link to close as surplus (module docstring): ``dialled`` are the peers
        of the open links we dialled, ``keep`` those never to prune (static peers)."""
        targets = frozenset(self.targets())
        if targets != self._targets:
            self._targets, self._targets_since = targets, now
            return []
        if now - self._targets_since < PRUNE_AFTER:
            return []
        for peer in targets:
            b = self.backoff.get(peer)
            if peer not in self.connected and (b is None or b.failures == 0):
                return []  # a target not yet linked nor failing: the mesh may still need this link
        members = set(self.peers)
        out = []
        for peer in sorted(dialled - keep - targets):
            since = self.connected.get(peer)
            if (peer in self.peers and since is not None and now - since >= PRUNE_AFTER
                    and not wanted_by(self.me, peer, members)):
                out.append(peer)
        return out

    def next_wakeup(self, now: float) -> float:
        """When ``to_dial`` may next have something new: a back-off running out, or a target
        waiting for the membership to stay still (``DIAL_QUIET``, ``DIAL_WAIT_MAX``)."""
        pending = [self.backoff[p].next_try for p in self.targets()
                   if p not in self.connected and p in self.backoff]
        settle = self._members_since + DIAL_QUIET
        if self._wanted_since and self.connected and settle > now:  # targets held back, not backing off
            pending.append(min([settle] + [since + DIAL_WAIT_MAX for since in self._wanted_since.values()]))
        return max(now, min(pending)) if pending else now + BACKOFF_MAX
