"""Push trees: which links push a change eagerly and which only announce it (protocols/link.md,
"Push trees (version 4)").

Plumtree (Leitao, Pereira, Rodrigues, 2007), one tree per origin, where the origin of a change
is the node whose log its shard holds (``<node id>/<segment>``). Sans-IO: links are opaque
keys, time is the ``now`` the caller passes.

The rules, all of them:

* Every link starts **eager** for every origin, both ways: a change goes to it in a PUSH, as in
  version 3.
* A PUSH that brings nothing new (every change in it was held already) is a duplicate: the
  receiver answers PRUNE(origin) (once, until it grafts that link again); the PRUNE makes the link
  **lazy** for that origin in the direction towards the receiver only. Each node thus decides
  about what comes *in*: the link that brought a change first is never pruned for it, so every
  node keeps an eager way in for each origin and the eager links thin out to a tree. (Plumtree
  as published also makes the link lazy the other way; two nodes that push the same change to
  each other at once then cut a link that one of them needed, and a graft must mend it.)
* On a lazy link a change is only announced: its change hash goes in an IHAVE, a few of them
  per frame: a link's announcements wait ``ANNOUNCE_DELAY`` and go in one IHAVE.
* An announced hash the node has not seen starts a timer (``GRAFT_TIMEOUT``). If the change
  has not arrived by then the announcer is **grafted**: the link becomes eager for that origin
  again, GRAFT(origin) tells the peer so, and the caller pulls the shard from that peer by the
  sync protocol. If that does not bring it either, the next announcer is grafted one timeout
  later, and so on; a hash nobody else announced is dropped after its last try (the digest
  comparisons and the periodic SUMMARY of the link protocol still repair anything missed).
* A change that arrives (in a PUSH or any other frame) cancels the timers of its hash.
* A link that closes was maybe the only eager way in for some origins (every other link was
  pruned for them): the node grafts each such origin at once on all of its other links
  (``drop_link``), rather than waiting for an announcement and its timer (one of them may lead
  back to this node only; the duplicates the others bring prune them again).
* A link that **drains** (link protocol version 5: one end closes it gracefully, ``drain_link``)
  is mended the same way, but before it closes, while what it has in flight still arrives: the
  node grafts at once each origin the draining link was its last eager way in for, on one of its
  other (not draining) links. The draining link is no longer an announcer, nor a link to graft
  on, and a duplicate it brings prunes nothing; nor does a duplicate on a link grafted so, until
  the draining link has closed (the draining link and the grafted one both bring the origin's
  changes for that moment, and pruning the grafted link would leave only the one that closes).
* A link is lazy for at most ``ORIGIN_LIMIT`` origins (PRUNE names node ids, known or not): past
  that, PRUNEs of new origins are ignored and counted, and the link stays eager for them (more
  pushing, nothing lost). A peer sending PRUNEs of made-up node ids by the million cannot grow
  the node's memory without bound.
* ``seen`` remembers the most recent ``SEEN_LIMIT`` change hashes; an announced hash that has
  dropped out of it costs at most one needless pull. At most ``WANTED_LIMIT`` announced hashes
  are awaited at once (a peer announcing made-up hashes by the million costs bounded memory);
  past it new announcements are ignored, and the repairs below the tree find what they named.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, Hashable, Iterable, TypeVar

GRAFT_TIMEOUT = 0.5  # s: an announced change not pushed within this is pulled from its announcer
ANNOUNCE_DELAY = 1.0  # s: announcements of one link wait this long to share one frame
SEEN_LIMIT = 1 << 16  # change hashes remembered
WANTED_LIMIT = 1 << 14  # announced changes awaited at once; past it, announcements are ignored
ORIGIN_LIMIT = 4096  # origins one link may be lazy for (a site's nodes: status board's MAX_NODES)

L = TypeVar("L", bound=Hashable)


def origin_of(shard: str) -> str:
    """The node whose log a shard holds (protocols/ledger.md: ``<node id>/<segment>``)."""
    return shard.split("/", 1)[0]


@dataclass
class _Wanted(Generic[L]):
    shard: str
    deadline: float
    announcers: list[L] = field(default_factory=list)


@dataclass(frozen=True)
class GraftDue(Generic[L]):
    """Pull ``shard`` from the peer of ``link`` and tell it to push ``shard``'s origin again."""

    link: L
    shard: str


class PushTree(Generic[L]):
    def __init__(self, graft_timeout: float = GRAFT_TIMEOUT, seen_limit: int = SEEN_LIMIT,
                 wanted_limit: int = WANTED_LIMIT, origin_limit: int = ORIGIN_LIMIT) -> None:
        self.graft_timeout = graft_timeout
        self.origin_limit = origin_limit
        self.prunes_ignored = 0  # PRUNEs of an origin past ``origin_limit`` on their link
        self.seen_limit = seen_limit
        self.wanted_limit = wanted_limit
        self.ignored = 0  # announcements past ``wanted_limit``
        self._lazy: dict[L, set[str]] = {}  # link -> origins its peer asked us not to push (PRUNE)
        self._pruned: dict[L, set[str]] = {}  # link -> origins we asked its peer not to push
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._wanted: dict[bytes, _Wanted[L]] = {}
        # (deadline, order, hash) of every armed timer, earliest first; an entry whose hash is no
        # longer awaited, or awaited with another deadline, is stale and skipped when it comes up.
        # due() thus costs what is due, not what is awaited: a peer announcing made-up hashes
        # spread over time made each timer scan all WANTED_LIMIT of them (the node's loop saturated)
        self._timers: list[tuple[float, int, bytes]] = []
        self._order = 0
        self.timers_run = 0  # timer entries due() has looked at (its whole cost), stale ones included
        self.grafts = 0
        self.prunes = 0
        self.mended = 0  # GRAFTs sent because a link closed or drains (drop_link, drain_link)
        self._draining: dict[L, set[tuple[L, str]]] = {}  # draining link -> (link, origin) it had grafted

    # -- eager or lazy ------------------------------------------------------------------

    def eager(self, link: L, origin: str) -> bool:
        lazy = self._lazy.get(link)
        return lazy is None or origin not in lazy

    def prune(self, link: L, origin: str) -> None:
        """PRUNE received: stop pushing ``origin``'s changes on ``link`` (announce them)."""
        lazy = self._lazy.setdefault(link, set())
        if len(lazy) >= self.origin_limit and origin not in lazy:
            self.prunes_ignored += 1  # made-up origins by the million: the link stays eager for them
            return
        lazy.add(origin)

    def graft(self, link: L, origin: str) -> None:
        """GRAFT received: push ``origin``'s changes on ``link`` again."""
        lazy = self._lazy.get(link)
        if lazy is not None:
            lazy.discard(origin)

    def drain_link(self, link: L, live: Iterable[L] = ()) -> list[tuple[L, str]]:
        """``link`` drains (it closes within seconds): mend this node's trees now, as ``drop_link``
        does once it has closed, and keep the grafts it returns from being pruned by the duplicates
        both links bring meanwhile. ``live``: the links open (drained ones are skipped)."""
        if link in self._draining:
            return []
        for wanted in self._wanted.values():
            if link in wanted.announcers:
                wanted.announcers.remove(link)
        mend = self._mend(link, live)
        self._draining[link] = set(mend)
        return mend

    def draining(self, link: L) -> bool:
        return link in self._draining

    def drop_link(self, link: L, live: Iterable[L] = ()) -> list[tuple[L, str]]:
        """A link closed: forget its state (a new link to the same peer starts eager), and mend
        this node's trees. ``live``: the links still open. For each origin the closed link was
        this node's last eager way in for (every other live link was pruned for it), the other
        live links to GRAFT that origin on (``_mend``), counted as eager again here already: the
        caller sends the GRAFTs. Without them the origin's next changes came only by announcement and graft
        (ANNOUNCE_DELAY + GRAFT_TIMEOUT later) until every node on the way had grafted: the
        planner closing surplus links once a site had formed cost a second on every sale in flight."""
        mend = self._mend(link, live)
        self._pruned.pop(link, None)
        self._lazy.pop(link, None)
        self._draining.pop(link, None)
        for wanted in self._wanted.values():
            if link in wanted.announcers:
                wanted.announcers.remove(link)
        return mend

    def _mend(self, link: L, live: Iterable[L]) -> list[tuple[L, str]]:
        """The origins ``link`` is this node's last eager way in for, each with every other live
        (not draining) link to GRAFT it on, counted as eager there from now on. Every one, not
        one: the peer of a single link chosen may itself get the origin's changes only through
        this node (its eager way in is the link back to us), and would then push nothing; the
        changes came by announcement and graft, 1.5 s later. The copies the extra links bring
        prune them again, each after one duplicate."""
        closed = self._pruned.get(link, set())
        others = [other for other in live if other != link and other not in self._draining]
        pruned = [self._pruned.get(other) for other in others]
        if not others or any(not p for p in pruned):
            return []  # some link is still eager for every origin (or there is none to graft)
        orphans = set.intersection(*(p for p in pruned if p)) - closed
        mend: list[tuple[L, str]] = []
        for origin in sorted(orphans):
            for other in others:
                self._pruned[other].discard(origin)
                mend.append((other, origin))
        self.mended += len(mend)
        return mend

    # -- changes ------------------------------------------------------------------------

    def seen(self, change_hash: bytes) -> bool:
        return change_hash in self._seen

    def saw(self, hashes: Iterable[bytes]) -> None:
        """These changes are held now (made here, or merged from any link)."""
        for h in hashes:
            self._wanted.pop(h, None)  # its timer entry goes stale
            self._seen[h] = None
            self._seen.move_to_end(h)
        while len(self._seen) > self.seen_limit:
            self._seen.popitem(last=False)

    def pushed(self, link: L, origin: str, new: bool) -> bool:
        """A PUSH of ``origin``'s changes came on ``link``; ``new``: it brought something.
        True if a PRUNE should answer it (a duplicate, and not asked for already)."""
        if new or link in self._draining or any((link, origin) in g for g in self._draining.values()):
            return False  # (a draining link, or one grafted for it: drain_link)
        pruned = self._pruned.setdefault(link, set())
        if origin in pruned:
            return False
        pruned.add(origin)
        self.prunes += 1
        return True

    def announced(self, link: L, shard: str, hashes: Iterable[bytes], now: float) -> None:
        """``link``'s peer announced it holds these changes of ``shard``."""
        if link in self._draining:
            return  # it closes before a graft there could bring them
        for h in hashes:
            if h in self._seen:
                continue
            wanted = self._wanted.get(h)
            if wanted is None:
                if len(self._wanted) >= self.wanted_limit:
                    self.ignored += 1
                    continue
                wanted = self._wanted[h] = _Wanted(shard, now + self.graft_timeout)
                self._arm(h, wanted.deadline)
            if link not in wanted.announcers:
                wanted.announcers.append(link)

    # -- timers -------------------------------------------------------------------------

    def _arm(self, h: bytes, deadline: float) -> None:
        self._order += 1
        heapq.heappush(self._timers, (deadline, self._order, h))
        if len(self._timers) > 2 * len(self._wanted) + 1024:  # mostly stale (changes that came): rebuild
            self._timers = [(w.deadline, n, k) for n, (k, w) in enumerate(self._wanted.items())]
            heapq.heapify(self._timers)

    def _live(self, entry: tuple[float, int, bytes]) -> bool:
        wanted = self._wanted.get(entry[2])
        return wanted is not None and wanted.deadline == entry[0]

    def next_deadline(self) -> float:
        timers = self._timers
        while timers and not self._live(timers[0]):  # stale tops go, each once
            heapq.heappop(timers)
        return timers[0][0] if timers else float("inf")

    def due(self, now: float) -> list[GraftDue[L]]:
        """The grafts whose time has come (one per link and shard): send GRAFT and pull."""
        out: dict[tuple[L, str], GraftDue[L]] = {}
        while self._timers and self._timers[0][0] <= now:  # (_arm may rebuild the list)
            entry = heapq.heappop(self._timers)
            self.timers_run += 1
            if not self._live(entry):
                continue
            h = entry[2]
            wanted = self._wanted[h]
            if not wanted.announcers:
                del self._wanted[h]
                continue
            link = wanted.announcers.pop(0)
            wanted.deadline = now + self.graft_timeout
            self._arm(h, wanted.deadline)
            pruned = self._pruned.get(link)
            if pruned is not None:
                pruned.discard(origin_of(wanted.shard))
            out.setdefault((link, wanted.shard), GraftDue(link, wanted.shard))
        if out:
            self.grafts += len(out)
        return list(out.values())

    @property
    def wanted(self) -> int:
        return len(self._wanted)


def change_hash(chunk: bytes) -> bytes:
    """The hash of one Automerge change chunk, as its heads and IHAVE name it: SHA-256 of the
    chunk after its 4-byte magic and 4-byte checksum (Automerge binary format, "Change chunks")."""
    return hashlib.sha256(chunk[8:]).digest()
