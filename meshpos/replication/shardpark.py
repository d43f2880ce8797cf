"""Shards that cannot exist yet are kept out of the ledger: a shard's name names its terminal.

A shard ``<node_id>/<segment>`` holds the log of node ``<node_id>`` (protocols/ledger.md), so
whatever a peer sends, a node only takes into its shard table (and so into its own HELLO and
SUMMARY) shards that can exist. Rules (``ShardPark``, used by every link's SyncSession):

* A shard is **admitted** when it is in the ledger already, or when the roster knows its node's
  certificate and its segment is at most ``MAX_SEGMENT_AHEAD`` past the highest segment of that
  node holding a verified entry (``-1`` when none): a node writes its log in order.
* Any other shard is **parked**: SYNC, PUSH and SNAPSHOT frames for it are applied to a document
  kept apart from the ledger (answered from it, so the sync protocol can run), never listed in
  our summary. At most ``max_per_peer`` shards brought by one peer are parked and
  ``max_bytes`` of frame data in all (a frame past these is dropped, counted, and logged once a
  minute); at most ``max_shards`` in all (the oldest of the peer that parked the most goes).
* A parked shard is **taken in** (loaded whole into the ledger, as a snapshot, and verified entry
  by entry there) as soon as it is admitted: its node's certificate arrived, whether through
  another shard or inside the parked shard itself (a ``cert/<node_id>`` entry that verifies: a
  node's log starts with its certificate), or its node's log reached its segment.

No I/O; time (for the log's rate) comes from the injected Clock.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import automerge.core as am

from meshpos.infra.clock import Clock
from meshpos.domain.errors import EncodingError, MeshposError
from meshpos.ledger.amguard import AutomergePanic, automerge_input
from meshpos.ledger.ledger import IngestReport, Ledger, changes_message, entry_bytes
from meshpos.infra.netguard import LogLimiter
from meshpos.wire import envelope as env_mod
from meshpos.wire.shards import valid_shard_name

log = logging.getLogger(__name__)

MAX_SEGMENT_AHEAD = 16
MAX_PARKED_SHARDS = 256
MAX_PARKED_PER_PEER = 64
MAX_PARKED_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ParkLimits:
    max_shards: int = MAX_PARKED_SHARDS
    max_per_peer: int = MAX_PARKED_PER_PEER
    max_bytes: int = MAX_PARKED_BYTES
    segment_ahead: int = MAX_SEGMENT_AHEAD


@dataclass
class _Parked:
    doc: am.Document
    peer: str
    size: int = 0
    checked: bool = False  # looked for its node's certificate since it last changed
    snapshot: bytes | None = None  # the one snapshot the document is exactly, if so (taken in as it is)


@dataclass
class ParkStats:
    parked: int = 0  # shards ever parked
    taken_in: int = 0  # parked shards later admitted into the ledger
    dropped: int = 0  # frames dropped because the bounds were reached
    by_peer: dict[str, int] = field(default_factory=dict)


def heads_digest(heads: list[bytes]) -> bytes:
    """The 8-byte digest of a document's heads, as ``Ledger.shard_digest`` computes it for a shard."""
    return hashlib.blake2b(b"".join(sorted(heads)), digest_size=8).digest()


class ShardPark:
    def __init__(self, ledger: Ledger, clock: Clock, limits: ParkLimits = ParkLimits()) -> None:
        self.ledger = ledger
        self.clock = clock
        self.limits = limits
        self.shards: dict[str, _Parked] = {}
        self.stats = ParkStats()
        self._bytes = 0
        self._log = LogLimiter(now=clock.monotonic)
        self._extents: dict[str, int] = {}
        self._extents_at = -1

    # -- the rule ------------------------------------------------------------------------

    def _extent(self, node: str) -> int:
        """The highest segment of ``node``'s log that holds a verified entry here (-1: none)."""
        version = len(self.ledger.index)  # homes change only when a verified entry is indexed
        if self._extents_at != version:
            extents: dict[str, int] = {}
            for shard, keys in self.ledger.homes.items():
                owner, _, segment = shard.partition("/")
                if keys and segment.isdigit():
                    extents[owner] = max(extents.get(owner, -1), int(segment))
            self._extents, self._extents_at = extents, version
        return self._extents.get(node, -1)

    def admitted(self, shard: str) -> bool:
        """May ``shard`` enter the ledger's shard table (see the module's rules)?"""
        if shard in self.ledger.docs:
            return True
        if not valid_shard_name(shard):
            return False
        node, _, segment = shard.partition("/")
        if node not in self.ledger.roster.identities:
            return False
        return int(segment) <= self._extent(node) + self.limits.segment_ahead

    def _carries_own_cert(self, shard: str, parked: _Parked) -> bool:
        """Does the parked shard begin its node's log with a certificate entry that verifies?"""
        node, _, segment = shard.partition("/")
        if int(segment) > self.limits.segment_ahead - 1:
            return False
        try:
            with self._unless_panic(shard), automerge_input(f"parked shard {shard}"):
                raw = entry_bytes(parked.doc.get(am.ROOT, f"cert/{node}"))
        except EncodingError:  # a value Automerge cannot read (the shard is forgotten)
            return False
        if raw is None:
            return False
        try:
            verified = self.ledger.roster.verify(env_mod.decode(raw), self.clock.now_ms(), f"cert/{node}")
        except (EncodingError, MeshposError):
            return False
        return verified.env.signer == node

    # -- frames for shards that are not admitted -------------------------------------------

    def holds(self, shard: str) -> bool:
        return shard in self.shards

    def digest(self, shard: str) -> bytes:
        parked = self.shards.get(shard)
        return heads_digest(parked.doc.get_heads() if parked is not None else [])

    def _slot(self, shard: str, peer: str, size: int) -> _Parked | None:
        """The parked document of ``shard`` with room for ``size`` more bytes, or None (dropped)."""
        parked = self.shards.get(shard)
        lim = self.limits
        problem = None
        if self._bytes + size > lim.max_bytes:
            problem = f"{lim.max_bytes} bytes of parked shards"
        elif parked is None:
            if self.stats.by_peer.get(peer, 0) >= lim.max_per_peer:
                problem = f"{lim.max_per_peer} parked shards brought by peer {peer}"
            else:
                if len(self.shards) >= lim.max_shards:
                    self._evict()
                parked = self.shards[shard] = _Parked(am.Document(), peer)
                self.stats.parked += 1
                self.stats.by_peer[peer] = self.stats.by_peer.get(peer, 0) + 1
        if problem is not None:
            self.stats.dropped += 1
            ok, suppressed = self._log.allow(problem)
            if ok:
                log.warning("dropped a frame for shard %s from peer %s, which no known node can have written: "
                            "%s held already (%d frames dropped in all%s)", shard[:60], peer, problem,
                            self.stats.dropped, f", {suppressed} not logged" if suppressed else "")
            return None
        assert parked is not None
        parked.size += size
        parked.checked = False
        parked.snapshot = None
        self._bytes += size
        return parked

    def receive_sync(self, shard: str, state: am.SyncState, data: bytes, peer: str) -> bool:
        """Apply a sync message to the parked shard; False if it was dropped."""
        parked = self._slot(shard, peer, len(data))
        if parked is None:
            return False
        with self._unless_panic(shard), automerge_input(f"Automerge refused a sync message for shard {shard}"):
            parked.doc.receive_sync_message(state, am.Message.decode(data))
        return True

    def receive_snapshot(self, shard: str, data: bytes, peer: str) -> bool:
        parked = self._slot(shard, peer, len(data))
        if parked is None:
            return False
        with self._unless_panic(shard), automerge_input(f"bad Automerge snapshot for shard {shard}"):
            loaded = am.Document.load(data)
            if parked.doc.get_heads():
                parked.doc.merge(loaded)
            else:
                parked.doc, parked.snapshot = loaded, data
        return True

    def receive_push(self, shard: str, changes: list[bytes], peer: str) -> bool:
        parked = self._slot(shard, peer, sum(map(len, changes)))
        if parked is None:
            return False
        with self._unless_panic(shard), automerge_input(f"Automerge refused pushed changes for shard {shard}"):
            parked.doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message(changes)))
        return True

    @contextmanager
    def _unless_panic(self, shard: str) -> Iterator[None]:
        """A parked document Automerge panicked in is unusable (meshpos.ledger.amguard): forgotten."""
        try:
            yield
        except AutomergePanic:
            if shard in self.shards:
                self._forget(shard)
            raise

    def generate_sync(self, shard: str, state: am.SyncState, peer: str) -> bytes | None:
        """Our side of the sync protocol for a shard that is not admitted (parking it if there is room:
        a peer's summary offered it)."""
        parked = self._slot(shard, peer, 0)
        if parked is None:
            return None
        with self._unless_panic(shard), automerge_input(f"Automerge cannot answer the sync of shard {shard}"):
            msg = parked.doc.generate_sync_message(state)
        return None if msg is None else msg.encode()

    # -- taking in --------------------------------------------------------------------------

    def take_in(self) -> list[IngestReport]:
        """Move every parked shard that is admitted now into the ledger; their ingest reports."""
        if not self.shards:
            return []
        reports = []
        progress = True
        while progress:  # one taken in may admit the next (its certificate, a longer log)
            progress = False
            for shard, parked in list(self.shards.items()):
                ready = self.admitted(shard)
                if not ready and not parked.checked:
                    parked.checked = True
                    ready = self._carries_own_cert(shard, parked)
                if not ready:
                    continue
                self._forget(shard)
                if not parked.doc.get_heads():
                    continue  # nothing arrived yet: the sync protocol goes on against the ledger
                data = parked.snapshot if parked.snapshot is not None else parked.doc.save()
                reports.append(self.ledger.receive_snapshot(shard, data, parked.peer))
                self.stats.taken_in += 1
                progress = True
        return reports

    def _evict(self) -> None:
        """Room for one more: the oldest shard parked by the peer that parked the most goes."""
        greediest = max(self.stats.by_peer, key=lambda p: self.stats.by_peer[p])
        shard = next(s for s, parked in self.shards.items() if parked.peer == greediest)
        self._forget(shard)
        self.stats.dropped += 1

    def _forget(self, shard: str) -> None:
        parked = self.shards.pop(shard)
        self._bytes -= parked.size
        n = self.stats.by_peer.get(parked.peer, 0) - 1
        if n > 0:
            self.stats.by_peer[parked.peer] = n
        else:
            self.stats.by_peer.pop(parked.peer, None)
