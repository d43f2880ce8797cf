"""Forwarding leases: which uplink node forwards which part of the site's queue. Pure rules.

A ``lease`` ledger entry says: ``holder`` forwards ``scope`` from ``granted_at`` until
``until`` (ms, the holder's clock). Scopes are hash buckets of sale ids
(``bucket/<n>``), so their number stays fixed however many terminals sell.

Rules (protocols/forwarding.md, "Leases"). ``now`` is the deciding node's clock; a
lease's ``received_at`` is that node's clock when it accepted the entry.

1. A lease *counts* on a node only if
   a. its ``granted_at`` is not more than ``rules.MAX_SKEW_MS`` ahead of ``now``;
   b. its holder is not revoked (whatever the lease's times: a revoked node may no
      longer forward, so its leases stop counting the moment the revocation arrives);
   c. its holder is reachable from this node, or is this node. *Reachable* means: this
      node holds an open link to it, or a fresh status of it (gossiped over the mesh):
      one that arrived within its staleness bound (``meshview.stale_after_ms``) on this
      node's clock, and is itself not older than that bound plus the skew
      (:func:`meshpos.uplink.reach.is_reachable`). A holder this node cannot reach may be
      dead or cut off: its scopes are taken over at once (at worst a batch travels twice).
2. Of one holder's counting leases for one scope only the newest (greatest
   ``granted_at``) counts; a lease with ``until <= granted_at`` is therefore a *release*.
3. A counting lease is live at ``now`` when ``0 < until - granted_at <= MAX_LEASE_MS``
   (its *life*) and ``now < end``, where ``end = min(until, received_at + life)``: a
   lease holds for at most its life counted from when this node received it, so no
   choice of times (a clock running ahead, an attacker's) makes one count longer.
4. The holder of a scope at ``now`` is, among the live leases of that scope, the one of
   the best rank: a gateway before a terminal, then the lowest node id. Concurrent claims
   made before the nodes saw each other's therefore resolve the same way on every node.
5. A node claims a scope it has work in only when no other node holds it; it renews its
   lease when less than ``renew_left_ms`` is left, and forwards a scope only while it
   holds it. A node that dies stops renewing: its scopes are taken over once its lease
   ends or it is no longer reachable, whichever comes first. A node releases its leases
   when it loses its uplink (it may no longer forward, or its probe finds the switch
   unreachable); failed batches alone never release them, but one that found no connection
   makes the node probe at once (``run_forwarder``'s ``recheck``), so an uplink lost mid-batch
   is handed over without waiting for a back-off.
6. A holder must also settle what it holds: a sale that has waited ``forwarder.STALL_S`` in a
   scope another node holds is forwarded by this node too (``Forwarder._stalled``), so a
   holder that renews and never forwards delays the site's sales, never stops them.

Leases save the site's uplink from carrying one batch twice; they are not what makes
charging exactly-once (the switch de-duplicates on sale ids), so clock skew between
nodes, or two nodes that cannot see each other, can cost a duplicate batch, never a
second charge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from meshpos.domain.rules import MAX_SKEW_MS

BUCKETS = 4
LEASE_MS = 60_000
RENEW_LEFT_MS = 30_000
MAX_LEASE_MS = 600_000

Rank = Callable[[str], int]


@dataclass(frozen=True)
class Lease:
    holder: str
    scope: str
    granted_at: int
    until: int
    received_at: int | None = None  # this node's clock when it accepted the entry; None: at granted_at

    @classmethod
    def from_body(cls, body: dict[str, Any], received_at: int | None = None) -> "Lease":
        return cls(holder=body["holder"], scope=body["scope"], granted_at=body["granted_at"], until=body["until"],
                   received_at=received_at)

    @property
    def life(self) -> int:
        return self.until - self.granted_at

    @property
    def end(self) -> int:
        """Rule 3: when it stops holding on this node."""
        if self.received_at is None:
            return self.until
        return min(self.until, self.received_at + self.life)

    def credible(self, now: int) -> bool:
        """Rule 1a: not granted beyond the allowed skew ahead of ``now``."""
        return self.granted_at - now <= MAX_SKEW_MS

    def live(self, now: int) -> bool:
        """Rules 1a and 3 (1b and 1c depend on the roster and the mesh: see :func:`counting`)."""
        return 0 < self.life <= MAX_LEASE_MS and self.credible(now) and now < self.end


@dataclass(frozen=True)
class LeaseWrite:
    scope: str
    granted_at: int
    until: int


@dataclass(frozen=True)
class LeasePlan:
    forward: frozenset[str]  # scopes this node forwards now
    write: tuple[LeaseWrite, ...] = field(default=())  # claims and renewals to put into the ledger
    held_by_others: dict[str, str] = field(default_factory=dict)  # scope -> holder


def scope_of(sale_id: str, buckets: int = BUCKETS) -> str:
    h = int.from_bytes(hashlib.sha256(sale_id.encode("utf-8")).digest()[:4], "big")
    return f"bucket/{h % buckets}"


def counting(leases: Iterable[Lease], now: int, ignore: Collection[str] = frozenset()) -> Iterator[Lease]:
    """Rule 1: the leases that count at ``now``; ``ignore`` names the holders whose leases do not
    (revoked, or not reachable from this node: rules 1b and 1c, which the caller knows)."""
    return (lease for lease in leases if lease.holder not in ignore and lease.credible(now))


def newest(leases: Iterable[Lease]) -> dict[tuple[str, str], Lease]:
    """Rule 2: the newest lease of each (holder, scope)."""
    out: dict[tuple[str, str], Lease] = {}
    for lease in leases:
        key = (lease.holder, lease.scope)
        if key not in out or lease.granted_at > out[key].granted_at:
            out[key] = lease
    return out


def holder_of(scope: str, current: dict[tuple[str, str], Lease], now: int, rank: Rank) -> str | None:
    """Rules 3 and 4."""
    live = [lease for lease in current.values() if lease.scope == scope and lease.live(now)]
    if not live:
        return None
    return min(live, key=lambda lease: (rank(lease.holder), lease.holder)).holder


def plan(me: str, scopes: Iterable[str], leases: Iterable[Lease], now: int, rank: Rank,
         lease_ms: int = LEASE_MS, renew_left_ms: int = RENEW_LEFT_MS,
         ignore: Collection[str] = frozenset()) -> LeasePlan:
    """Rule 5 for the scopes this node has work in; ``ignore`` as in :func:`counting`."""
    current = newest(counting(leases, now, ignore))
    forward: set[str] = set()
    writes: list[LeaseWrite] = []
    others: dict[str, str] = {}
    for scope in sorted(set(scopes)):
        holder = holder_of(scope, current, now, rank)
        if holder is None:
            mine = current.get((me, scope))
            granted = now if mine is None or mine.granted_at < now else mine.granted_at + 1
            writes.append(LeaseWrite(scope, granted, granted + lease_ms))
            forward.add(scope)
        elif holder == me:
            forward.add(scope)
            mine = current[(me, scope)]
            if mine.end - now < renew_left_ms and mine.granted_at < now:
                writes.append(LeaseWrite(scope, now, now + lease_ms))
        else:
            others[scope] = holder
    return LeasePlan(forward=frozenset(forward), write=tuple(writes), held_by_others=others)


def releases(me: str, leases: Iterable[Lease], now: int) -> list[LeaseWrite]:
    """Release entries for every live lease ``me`` holds (rule 2: newest wins, until == granted_at)."""
    out: list[LeaseWrite] = []
    for (holder, scope), lease in sorted(newest(counting(leases, now)).items()):
        if holder == me and lease.live(now):
            granted = max(now, lease.granted_at + 1)
            out.append(LeaseWrite(scope, granted, granted))
    return out
