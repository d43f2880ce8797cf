"""Forwarding leases: which uplink node forwards which part of the site's queue. Pure rules.

A ``lease`` ledger entry says: ``holder`` forwards ``scope`` from ``granted_at`` until
``until`` (ms, the holder's clock). Scopes are hash buckets of sale ids
(``bucket/<n>``), so their number stays fixed however many terminals sell.

Rules (protocols/forwarding.md, "Leases"):

1. Of one holder's leases for one scope only the newest (greatest ``granted_at``) counts;
   a lease with ``until <= granted_at`` is therefore a *release*.
2. A lease is live at ``now`` when ``now < until`` and ``0 < until - granted_at <= MAX_LEASE_MS``
   (a lease granted by a clock running ahead still counts; an endless one does not).
3. The holder of a scope at ``now`` is, among the live leases of that scope, the one of
   the best rank: a gateway before a terminal, then the lowest node id. Concurrent claims
   made before the nodes saw each other's therefore resolve the same way on every node.
4. A node claims a scope it has work in only when no other node holds it; it renews its
   lease when less than ``renew_left_ms`` is left, and forwards a scope only while it
   holds it. A node that dies stops renewing: its scopes are taken over once its lease
   lapses. A node that loses its uplink releases its leases at once.

Leases save the site's uplink from carrying one batch twice; they are not what makes
charging exactly-once (the switch de-duplicates on sale ids), so clock skew between
nodes can cost a duplicate batch, never a second charge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Lease":
        return cls(holder=body["holder"], scope=body["scope"], granted_at=body["granted_at"], until=body["until"])

    def live(self, now: int) -> bool:
        return 0 < self.until - self.granted_at <= MAX_LEASE_MS and now < self.until


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


def newest(leases: Iterable[Lease]) -> dict[tuple[str, str], Lease]:
    """Rule 1: the newest lease of each (holder, scope)."""
    out: dict[tuple[str, str], Lease] = {}
    for lease in leases:
        key = (lease.holder, lease.scope)
        if key not in out or lease.granted_at > out[key].granted_at:
            out[key] = lease
    return out


def holder_of(scope: str, current: dict[tuple[str, str], Lease], now: int, rank: Rank) -> str | None:
    """Rule 3."""
    live = [lease for lease in current.values() if lease.scope == scope and lease.live(now)]
    if not live:
        return None
    return min(live, key=lambda lease: (rank(lease.holder), lease.holder)).holder


def plan(me: str, scopes: Iterable[str], leases: Iterable[Lease], now: int, rank: Rank,
         lease_ms: int = LEASE_MS, renew_left_ms: int = RENEW_LEFT_MS) -> LeasePlan:
    """Rule 4 for the scopes this node has work in."""
    current = newest(leases)
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
            if mine.until - now < renew_left_ms and mine.granted_at < now:
                writes.append(LeaseWrite(scope, now, now + lease_ms))
        else:
            others[scope] = holder
    return LeasePlan(forward=frozenset(forward), write=tuple(writes), held_by_others=others)


def releases(me: str, leases: Iterable[Lease], now: int) -> list[LeaseWrite]:
    """Release entries for every live lease ``me`` holds (rule 1: newest wins, until == granted_at)."""
    out: list[LeaseWrite] = []
    for (holder, scope), lease in sorted(newest(leases).items()):
        if holder == me and lease.live(now):
            granted = max(now, lease.granted_at + 1)
            out.append(LeaseWrite(scope, granted, granted))
    return out
