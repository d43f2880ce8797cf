"""Replication over links: one sans-IO SyncSession per link, one Replicator per node.

What a session does (protocols/link.md, "Replication"):

* On LinkUp it compares the peer's HELLO summary with ours. A shard the peer
  lacks entirely goes over as one SNAPSHOT (a fresh node pays about the size
  of the data, not the ~3x of the sync protocol from nothing). A shard whose
  digest differs runs the Automerge sync protocol for that shard only, with
  a SyncState per (link, shard).
* Afterwards every change of a local shard (``Ledger.on_changes``, whether a
  sale, a merge from another link, or a re-assertion) goes out on every other
  open link. A version-3 link gets the new Automerge changes themselves in a
  PUSH frame, with our digest of the shard once they are applied; the peer
  applies them and answers nothing unless its digest then differs, in which
  case it runs the sync protocol for that shard (as for HAVE, below). One
  frame per link per change, where the sync protocol costs three. An older
  link marks the shard; the next ``data_to_send`` generates its sync message.
  Only touched shards cost anything, whatever the ledger's size.
* On a version-4 link the pushes of each origin (the node whose log a shard holds) follow a
  push tree (meshpos.replication.pushtree, Plumtree): a link that brought a change we held
  already is pruned to lazy for that origin, and gets IHAVE announcements of change hashes
  instead of PUSH; an announced change that does not arrive within a timeout is pulled from its
  announcer by the sync protocol and that link grafted back to eager. So each change reaches a
  node about once, where version 3 brings it over most links.
* When a sync exchange on a shard ends on our side (a peer's message needs no
  answer) we send HAVE with our digest of it. A peer whose digest differs
  restarts that shard's sync from a fresh SyncState (once per pair of
  digests), which repairs a lost or reordered message without a full resync.
* A shard's name names its node: frames for a shard that no known node can have written yet
  (an unknown node id, a segment far past its log) go to the node's ``ShardPark``
  (meshpos.replication.shardpark: bounded, kept out of our summary) and are taken into the ledger once its
  node's certificate arrives; so a peer's made-up shard names never grow our HELLO.
* Every entry a peer sends goes through ``Ledger.receive_sync`` /
  ``receive_snapshot``, which verify it; the rejected ones are counted per
  link, and a peer past ``max_rejected`` is cut off with the reason logged.
* A read-only peer (an inspector) is served but never trusted: its sync
  messages are applied to a throw-away fork of the shard (so the sync state
  learns what it has and needs) and its snapshots and STATUS frames are ignored.
* A link this node no longer needs is **drained**, not cut (version 5, ``SyncSession.drain``):
  both ends graft elsewhere, at once, each origin the link was their last eager way in for
  (``PushTree.drain_link``), the draining end tells its peer by DRAIN and goes on pushing until
  the peer answers DRAIN (after which the peer sends nothing), then closes: what either end had
  in flight on the link arrives, where a cut lost it and it came again only by announcement and
  graft 1.5 s later. Below version 5 the draining end grafts and lingers as long, then closes.
* Node statuses (version-2 links) are gossip, not ledger: on LinkUp a session
  sends every status the node's ``StatusGossip`` holds; a STATUS from a
  writing peer goes to the gossip, which verifies it and, if newer, has the
  Replicator flood it to the other links (``broadcast_status``).

Nothing here does I/O: bytes in with ``receive_data``, bytes out with
``data_to_send``, timers with ``tick``; time comes from the injected Clock.
"""

from __future__ import annotations

import dataclasses
import contextlib
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import automerge.core as am

from meshpos.domain.roles import READ_ONLY_ROLES
from meshpos.infra.clock import Clock
from meshpos.domain.errors import EncodingError, MeshposError
from meshpos.ledger.amguard import automerge_input
from meshpos.ledger.ledger import IngestReport, Ledger
from meshpos.replication.pushtree import ANNOUNCE_DELAY, PushTree, change_hash, origin_of
from meshpos.replication.shardpark import ShardPark
from meshpos.wire.link_frames import MAX_PAYLOAD
from meshpos.wire.shards import SEGMENT
from meshpos.wire.link import (PUSH_VERSION, SUPPORTED_VERSIONS, TREE_VERSION, Closed, Drain, Goodbye, Graft, Have,
                            Hello, Ihave, LinkConnection, LinkState, LinkUp, Ping, Pong, Prune, Push, Snapshot,
                            STATUS_VERSION, Status, Summary, Sync, Timeouts)

if TYPE_CHECKING:
    from meshpos.site.roster import Verified

log = logging.getLogger(__name__)

MAX_REJECTED = 16
FLUSH_BUDGET = 1 << 20
STALL_ROUNDS = 8  # sync messages on one shard that change nothing before we suspect a lost message
RESYNC_INTERVAL = 300.0  # full SUMMARY comparison on an open link, in case a message went astray
PUSH_QUEUE_LIMIT = 512 * 1024  # unsent pushed changes per (link, shard); past it, the sync protocol
MAX_ORPHAN_PUSHES = 256  # PUSH frames in a row that neither apply nor match: a peer gone wrong
MAX_ANNOUNCED = 2048  # change hashes in one IHAVE frame
PEER_HAS_LIMIT = 4096  # change hashes a link's peer announced, remembered so as not to announce them back


def shard_digest(ledger: Ledger, shard: str) -> bytes:
    """One shard's entry of ``Ledger.summary()`` without hashing every shard."""
    return ledger.shard_digest(shard)


@dataclass(frozen=True)
class SyncConfig:
    timeouts: Timeouts = Timeouts()
    max_rejected: int = MAX_REJECTED
    flush_budget: int = FLUSH_BUDGET
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    max_payload: int = MAX_PAYLOAD
    resync_interval: float = RESYNC_INTERVAL


@dataclass(frozen=True)
class LinkHealth:
    label: str
    peer_node: str | None
    peer_role: str | None
    read_only: bool
    state: str  # SyncSession.link_state: await-hello, open, draining, closed
    opened_at: float
    rtt: float | None
    last_sync_at: float | None
    bytes_in: int
    bytes_out: int
    entries_received: int
    entries_rejected: int
    entries_reasserted: int
    snapshots_sent: int
    snapshots_received: int
    close_reason: str | None
    changes_pushed_in: int = 0  # changes received in PUSH frames
    changes_pushed_dup: int = 0  # of which this node held already (version 4: each prunes the link)


@dataclass
class _Counters:
    entries_received: int = 0
    entries_rejected: int = 0
    entries_reasserted: int = 0
    snapshots_sent: int = 0
    snapshots_received: int = 0
    last_sync_at: float | None = None
    last_rejection: str = ""
    changes_pushed_in: int = 0
    changes_pushed_dup: int = 0


class StatusGossip(Protocol):
    """Where STATUS frames go (meshpos.status.board.StatusBoard)."""

    def received(self, raw: bytes, session: "SyncSession") -> None: ...

    def known(self) -> list[bytes]: ...

    def links_of(self, node_id: str) -> frozenset[str]: ...


class Replicator:
    """The node-wide side: owns the ledger hook and the set of live sessions."""

    def __init__(self, ledger: Ledger, site_id: str, node_id: str, role: str, clock: Clock,
                 config: SyncConfig = SyncConfig()) -> None:
        self.ledger = ledger
        self.site_id = site_id
        self.node_id = node_id
        self.role = role
        self.clock = clock
        self.config = config
        self.sessions: list[SyncSession] = []
        self.park = ShardPark(ledger, clock)
        self.gossip: StatusGossip | None = None
        self.tree: PushTree[SyncSession] = PushTree()
        # called when a link opens (HELLO accepted) or closes: the node's loops wait on it
        # instead of polling the session list
        self.on_links_changed: list[Callable[[], None]] = []
        ledger.on_changes.append(self._on_changes)
        self._origin: SyncSession | None = None  # the session whose frames are being applied
        ledger.on_accept.append(self._on_accept)
        # Set while the node's store was re-created (NodeCore.recovery_flag): no selling until a peer
        # has given its own log back, so no sale id is used twice (see ``recovered``).
        self.recovery_flag: Path | None = None

    def _on_accept(self, verified: "Verified") -> None:
        """A revocation that reaches this node cuts every open link to the revoked node at once
        (new links are refused by ``link.tls.peer_identity``, its entries by the roster)."""
        if verified.env.type != "revocation":
            return
        revoked = verified.env.body["node_id"]
        for session in list(self.sessions):
            if session.peer_node == revoked and not session.closed:
                session.cut_off(f"peer {revoked} is revoked")

    def recovered(self, session: "SyncSession") -> None:
        """A writing peer holds nothing of our own log that we lack: sell again, with sale ids and
        log positions past everything the mesh gave back."""
        flag, self.recovery_flag = self.recovery_flag, None
        if flag is None:
            return
        own = [s for s in self.ledger.shards() if s.startswith(self.node_id + "/")]
        store = self.ledger.store
        with store.transaction():
            position = int(store.get_meta("log_seq") or 0)
            if own:
                position = max(position, (max(int(s.rsplit("/", 1)[1]) for s in own) + 1) * SEGMENT)
            store.set_meta("log_seq", str(position))
        flag.unlink(missing_ok=True)
        log.warning("store recovery: peer %s gave back this node's log (%d own sales, last seq %d); selling "
                    "resumes", session.peer_node, len(store.sales(self.node_id)), store.last_seq(self.node_id))

    def open_session(self, *, label: str = "", expect_node: str | None = None, read_only: bool = False) -> "SyncSession":
        """A session for one new link. ``expect_node``/``read_only`` come from the peer's certificate."""
        session = SyncSession(self, label=label, expect_node=expect_node, read_only=read_only)
        self.sessions.append(session)
        return session

    def detach(self, reason: str = "node shutting down") -> None:
        """Close every session and unhook from the ledger (before closing the NodeCore)."""
        for session in list(self.sessions):
            session.close(reason)
        if self._on_changes in self.ledger.on_changes:
            self.ledger.on_changes.remove(self._on_changes)
        if self._on_accept in self.ledger.on_accept:
            self.ledger.on_accept.remove(self._on_accept)

    def health(self) -> list[LinkHealth]:
        return [s.health() for s in self.sessions]

    def set_keepalive(self, seconds: float) -> None:
        """Ping a silent link after ``seconds`` (meshpos.domain.pace), on open links and new ones.
        The idle timeout, and so dead-link detection, stays as it is."""
        if seconds == self.config.timeouts.keepalive:
            return
        self.config = dataclasses.replace(
            self.config, timeouts=dataclasses.replace(self.config.timeouts, keepalive=seconds))
        for session in self.sessions:
            session.conn.timeouts = self.config.timeouts

    def links_changed(self) -> None:
        for hook in list(self.on_links_changed):
            hook()

    def _drain(self, session: "SyncSession") -> None:
        """``session`` drains: graft elsewhere what it was this node's last eager way in for."""
        for other, origin in self.tree.drain_link(session, [s for s in self.sessions if s.conn.state is LinkState.OPEN]):
            other.graft_origin(origin, "a link drains")

    def _forget(self, session: "SyncSession") -> None:
        for other, origin in self.tree.drop_link(session, [s for s in self.sessions if s.conn.state is LinkState.OPEN]):
            other.graft_origin(origin)
        if session in self.sessions:
            self.sessions.remove(session)
            self.links_changed()

    def _on_changes(self, shard: str, changes: list[bytes] | None) -> None:
        # Not back to the link they came from: a SYNC there is answered by its own exchange, a
        # PUSH needs nothing. Nor to the neighbours of the peer they came from: it pushed them
        # to all of its links itself (its status lists them), unless both links speak version 4,
        # where that peer may only have announced them (push trees). On a version-4 link, a
        # push if the link is eager for the shard's origin, else an announcement.
        origin = self._origin
        theirs = self._links_of(origin)
        tree_origin = origin is not None and origin.version >= TREE_VERSION
        hashes = [change_hash(c) for c in changes] if changes else None
        if hashes:
            self.tree.saw(hashes)
        author = origin_of(shard)
        for session in self.sessions:
            if session is origin:
                continue
            tree_link = session.version >= TREE_VERSION
            if session.peer_node in theirs and not (tree_origin and tree_link):
                continue
            if hashes and tree_link and not self.tree.eager(session, author):
                session.announce(shard, hashes)
            else:
                session.local_change(shard, changes)

    def run_timers(self) -> None:
        """Pull the announced changes that no push brought in time (push trees)."""
        for due in self.tree.due(self.clock.monotonic()):
            if due.link in self.sessions:
                due.link.graft_pull(due.shard)

    def next_deadline(self) -> float:
        return self.tree.next_deadline()

    def _links_of(self, session: "SyncSession | None") -> frozenset[str]:
        """The nodes ``session``'s peer is linked to, by its fresh status (none if unknown)."""
        if session is None or not session.peer_node or self.gossip is None:
            return frozenset()
        return self.gossip.links_of(session.peer_node)

    def broadcast_status(self, raw: bytes, exclude: "SyncSession | None" = None) -> int:
        """Send one status envelope on every open version-2 link but ``exclude`` and the links to
        the nodes ``exclude``'s peer is linked to (it sent the status to them); how many got it."""
        theirs = self._links_of(exclude)
        sent = 0
        for session in list(self.sessions):
            if session is not exclude and session.peer_node not in theirs and session.send_status(raw):
                sent += 1
        return sent

    def hello(self) -> Hello:
        return Hello(self.config.versions, self.site_id, self.node_id, self.role, self.ledger.summary())


class SyncSession:
    def __init__(self, replicator: Replicator, *, label: str, expect_node: str | None, read_only: bool) -> None:
        self.replicator = replicator
        self.ledger = replicator.ledger
        self.clock = replicator.clock
        self.config = replicator.config
        self.label = label or "link"
        self.read_only = read_only
        self.conn = LinkConnection(replicator.hello(), self.clock.monotonic(), timeouts=self.config.timeouts,
                                   expect_node=expect_node, max_payload=self.config.max_payload)
        self.opened_at = self.clock.monotonic()
        self.states: dict[str, am.SyncState] = {}
        self._dirty: dict[str, bool] = {}  # shard -> "answers a peer message" (send HAVE if nothing to say)
        self._snapshots: list[str] = []
        self._snapshot_set: set[str] = set()
        self._last_reset: dict[str, tuple[bytes, bytes]] = {}
        self._last_summary = self.opened_at
        self._stale: dict[str, int] = {}
        self._stall_reset: dict[str, bytes] = {}
        self._whole_sent: dict[str, bytes] = {}  # shard -> our digest when we last sent it whole
        self._out = bytearray(self.conn.start())
        self._counters = _Counters()
        self._theirs: dict[str, bytes] = {}  # the peer's digest of each shard, as it last told us
        self._push: dict[str, list[bytes]] = {}  # shard -> changes to PUSH (version-3 links)
        self._push_size: dict[str, int] = {}
        self._orphans = 0
        self._announce: dict[str, list[bytes]] = {}  # shard -> change hashes to announce (IHAVE)
        self._announce_due: float | None = None
        # hashes the peer announced to us (most recent last): it holds them, so they are not
        # announced back to it (on a link lazy both ways both ends announce most changes)
        self._peer_has: dict[bytes, None] = {}
        self._prune_out: set[str] = set()
        self._graft_out: set[str] = set()
        self._rearm = False  # a new timer: the driver must recompute its deadline
        self.wakeup: Callable[[], None] | None = None

    # -- driver API -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.conn.state is LinkState.CLOSED

    @property
    def close_reason(self) -> str | None:
        return self.conn.close_reason

    @property
    def peer_node(self) -> str | None:
        return self.conn.peer.node_id if self.conn.peer else None

    @property
    def version(self) -> int:
        """The link's protocol version (0 until HELLO)."""
        return self.conn.version or 0

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer (``b""``: it closed). Never raises for anything the peer sends."""
        self.conn.receive_data(data, self.clock.monotonic())
        self._process()

    def tick(self) -> None:
        now = self.clock.monotonic()
        self._out += self.conn.tick(now)
        if self.conn.state is LinkState.OPEN and now - self._last_summary >= self.config.resync_interval:
            self.request_summary()
        if self.version >= TREE_VERSION:
            self.replicator.run_timers()
        self._process()

    def next_deadline(self) -> float:
        deadline = self.conn.next_deadline()
        if self.conn.state is LinkState.OPEN:
            deadline = min(deadline, self._last_summary + self.config.resync_interval)
            if self._announce_due is not None:
                deadline = min(deadline, self._announce_due)
            if self.version >= TREE_VERSION:
                deadline = min(deadline, self.replicator.next_deadline())
        return deadline

    def _announce_ready(self) -> bool:
        return self._announce_due is not None and self.clock.monotonic() >= self._announce_due

    @property
    def wants_write(self) -> bool:
        if self.conn.draining:
            return bool(self._out) or (self.conn.may_push and bool(self._push))
        return bool(self._out) or (self.conn.state is LinkState.OPEN
                                   and bool(self._push or self._dirty or self._snapshots or self._prune_out
                                            or self._graft_out or self._announce_ready()))

    @property
    def draining(self) -> bool:
        """Closing gracefully (``drain``, or the peer's DRAIN): it carries no more than pushes."""
        return self.conn.draining

    def data_to_send(self, budget: int | None = None) -> bytes:
        """What to write now: at most about ``budget`` bytes of replication data; call again while
        ``wants_write``."""
        budget = self.config.flush_budget if budget is None else budget
        out = self._out
        self._out = bytearray()
        if self.conn.state is not LinkState.OPEN:
            return bytes(out)
        try:
            self._generate(out, budget)
        except MeshposError as exc:
            log.error("link %s: local failure while generating sync data: %s", self.label, exc)
            out += self._close_now(f"local failure: {exc}")
        return bytes(out)

    def close(self, reason: str) -> None:
        """Say GOODBYE; the bytes come out of the next ``data_to_send``."""
        self._out += self.conn.send(Goodbye(reason))
        self._process()

    def drain(self, reason: str) -> bool:
        """Close this link gracefully (protocols/link.md, "Draining a link"): graft elsewhere, at
        once, each origin it is this node's last eager way in for, tell the peer (DRAIN, version 5),
        go on pushing until it answers, then close; ``conn.timeouts.drain`` at the latest. False if
        the link is not open or drains already."""
        if self.conn.state is not LinkState.OPEN or self.conn.draining:
            return False
        log.info("link %s: draining: %s", self.label, reason)
        self.replicator._drain(self)
        self._clear_work(pushes=False)  # the pushes waiting still go
        self._out += self.conn.drain(self.clock.monotonic(), reason)
        if self.wakeup is not None:
            self.wakeup()
        return True

    def local_change(self, shard: str, changes: list[bytes] | None = None) -> None:
        """Our shard changed: push ``changes`` (version-3 link) or mark the shard for a sync message."""
        if self.conn.state is not LinkState.OPEN:
            return
        if self.conn.draining and not (self.conn.may_push and changes and (self.conn.version or 0) >= PUSH_VERSION):
            return  # a draining link carries pushes only, and only until the peer's DRAIN
        was_idle = not self.wants_write
        size = self._push_size.get(shard, 0) + sum(map(len, changes or ()))
        if changes and (self.conn.version or 0) >= PUSH_VERSION and size <= PUSH_QUEUE_LIMIT:
            self._push.setdefault(shard, []).extend(changes)
            self._push_size[shard] = size
        else:
            self._push.pop(shard, None)
            self._push_size.pop(shard, None)
            self._dirty.setdefault(shard, False)
        if was_idle and self.wakeup is not None:
            self.wakeup()

    def announce(self, shard: str, hashes: list[bytes]) -> None:
        """Our shard changed and this (version-4) link is lazy for its origin: announce the
        changes' hashes in an IHAVE, after ``ANNOUNCE_DELAY`` with whatever else comes meanwhile."""
        if self.conn.state is not LinkState.OPEN or self.version < TREE_VERSION or self.conn.draining:
            return
        peer_has = self._peer_has
        if peer_has:
            hashes = [h for h in hashes if h not in peer_has]
            if not hashes:
                return
        self._announce.setdefault(shard, []).extend(hashes)
        if self._announce_due is None:
            self._announce_due = self.clock.monotonic() + ANNOUNCE_DELAY
            if self.wakeup is not None:
                self.wakeup()  # a new deadline for the driver

    def tree_ready(self) -> bool:
        """Open, and speaking push trees (version 4): GRAFT and PRUNE mean something here."""
        return self.conn.state is LinkState.OPEN and self.version >= TREE_VERSION and not self.conn.draining

    def graft_origin(self, origin: str, why: str = "its eager link closed") -> bool:
        """GRAFT ``origin`` on this link: its peer pushes that origin's changes here again (by
        default because this node's eager way in for it closed:
        meshpos.replication.pushtree.PushTree.drop_link). False if the link cannot (not open,
        or below version 4)."""
        if not self.tree_ready():
            return False
        log.debug("link %s: grafting %s (%s)", self.label, origin, why)
        self._graft_out.add(origin)
        self._prune_out.discard(origin)
        if self.wakeup is not None:
            self.wakeup()
        return True

    def graft_pull(self, shard: str) -> None:
        """An announced change of ``shard`` did not come: GRAFT its origin on this link and pull
        the shard from the peer by the sync protocol."""
        if not self.graft_origin(origin_of(shard), f"a change of {shard} announced, not pushed"):
            return
        self.states[shard] = am.SyncState()
        self._dirty.setdefault(shard, False)
        if self.wakeup is not None:
            self.wakeup()

    def request_summary(self) -> None:
        """Ask for a full comparison (the peer answers with shards to sync and snapshots)."""
        if self.conn.state is LinkState.OPEN and not self.conn.draining:
            self._last_summary = self.clock.monotonic()
            self._out += self.conn.send(Summary(self.ledger.summary()))
            if self.wakeup is not None:
                self.wakeup()

    def send_status(self, raw: bytes) -> bool:
        """Queue one STATUS frame (False if the link is not open or speaks version 1)."""
        if (self.conn.state is not LinkState.OPEN or (self.conn.version or 0) < STATUS_VERSION
                or self.conn.draining):
            return False
        was_idle = not self.wants_write
        self._out += self.conn.send(Status(raw))
        if was_idle and self.wakeup is not None:
            self.wakeup()
        return True

    def ping(self) -> bool:
        """Send a PING now if none is outstanding (its PONG updates ``conn.rtt``)."""
        data = self.conn.ping(self.clock.monotonic())
        if data:
            self._out += data
            if self.wakeup is not None:
                self.wakeup()
        return bool(data)

    def link_state(self) -> str:
        """The link's state as its health shows it: ``await-hello``, ``open``, ``draining`` (open
        but closing gracefully: it carries no more than pushes and closes within seconds) or
        ``closed``."""
        if self.conn.state is LinkState.OPEN and self.conn.draining:
            return "draining"
        return self.conn.state.value

    def health(self) -> LinkHealth:
        c = self._counters
        peer = self.conn.peer
        return LinkHealth(
            label=self.label, peer_node=peer.node_id if peer else None, peer_role=peer.role if peer else None,
            read_only=self.read_only, state=self.link_state(), opened_at=self.opened_at, rtt=self.conn.rtt,
            last_sync_at=c.last_sync_at, bytes_in=self.conn.bytes_in, bytes_out=self.conn.bytes_out,
            entries_received=c.entries_received, entries_rejected=c.entries_rejected,
            entries_reasserted=c.entries_reasserted, snapshots_sent=c.snapshots_sent,
            snapshots_received=c.snapshots_received, close_reason=self.conn.close_reason,
            changes_pushed_in=c.changes_pushed_in, changes_pushed_dup=c.changes_pushed_dup)

    # -- events -----------------------------------------------------------------

    def _process(self) -> None:
        # Every frame that arrived together is taken in ONE store transaction: one fsync per
        # read from the socket instead of one per sync message (the node's hottest cost).
        self.replicator._origin = self
        store = self.ledger.store
        try:
            # (a held store, the running node, commits in groups anyway: no savepoint per read)
            with contextlib.nullcontext() if store.held else store.transaction():
                self._process_events()
        finally:
            self.replicator._origin = None
        if self.replicator.recovery_flag is not None:
            self._check_recovered()
        rearm, self._rearm = self._rearm, False
        if (rearm or self.wants_write) and self.wakeup is not None:
            self.wakeup()

    def _process_events(self) -> None:
        while (event := self.conn.next_event()) is not None:
            try:
                if isinstance(event, LinkUp):
                    self._on_link_up(event)
                elif isinstance(event, Summary):
                    self._theirs.update(self._admissible(event.summary))
                    self._compare(event.summary, restart=True)
                elif isinstance(event, Sync):
                    self._on_sync(event)
                elif isinstance(event, Snapshot):
                    self._on_snapshot(event)
                elif isinstance(event, Push):
                    self._on_push(event)
                elif isinstance(event, Have):
                    self._on_have(event)
                elif isinstance(event, Ihave):
                    self._on_ihave(event)
                elif isinstance(event, Prune):
                    for origin in event.origins:
                        self.replicator.tree.prune(self, origin)
                elif isinstance(event, Graft):
                    for origin in event.origins:
                        self.replicator.tree.graft(self, origin)
                elif isinstance(event, Drain):
                    self._on_drain(event)
                elif isinstance(event, Ping):
                    self._out += self.conn.send(Pong(event.nonce))
                elif isinstance(event, Pong):
                    pass  # conn.rtt holds it
                elif isinstance(event, Status):
                    self._on_status(event)
                elif isinstance(event, Closed):
                    self._on_closed(event)
                if isinstance(event, (Sync, Snapshot, Push)):
                    self._take_in()
            except EncodingError as exc:
                self._out += self._close_now(f"peer sent bad replication data: {exc}", warn=True)
            except MeshposError as exc:
                log.error("link %s: local failure: %s", self.label, exc)
                self._out += self._close_now(f"local failure: {exc}")

    def _digest(self, shard: str) -> bytes:
        """Our digest of a shard: the ledger's, or the parked document's while it is parked."""
        park = self.replicator.park
        if shard not in self.ledger.docs and park.holds(shard):
            return park.digest(shard)
        return shard_digest(self.ledger, shard)

    def _admissible(self, shards: dict[str, bytes]) -> dict[str, bytes]:
        """Of shards a peer names, those worth a thought: admitted or parked ones, and no more than
        one peer may park of the others (the rest may not exist: see meshpos.replication.shardpark)."""
        park = self.replicator.park
        out: dict[str, bytes] = {}
        others = 0
        for shard, digest in shards.items():
            if park.admitted(shard) or park.holds(shard):
                out[shard] = digest
            elif others < park.limits.max_per_peer:
                others += 1
                out[shard] = digest
        return out

    def _take_in(self) -> None:
        """Parked shards that are admitted now (a certificate arrived, a log grew) enter the ledger."""
        for report in self.replicator.park.take_in():
            self._count(report)

    def _check_recovered(self) -> None:
        """While the store recovers: has this writing peer given back all it holds of our own log?"""
        if self.conn.state is not LinkState.OPEN or self.read_only:
            return
        prefix = self.replicator.node_id + "/"
        own = {s: d for s, d in self._theirs.items() if s.startswith(prefix)}
        if own and all(shard_digest(self.ledger, s) == d for s, d in own.items()):
            self.replicator.recovered(self)

    def cut_off(self, reason: str) -> None:
        """Close this link now, as for a misbehaving peer (the reason is logged as a warning)."""
        self._out += self._close_now(reason, warn=True)
        if self.wakeup is not None:
            self.wakeup()

    def _on_link_up(self, event: LinkUp) -> None:
        peer = event.peer
        if peer.role in READ_ONLY_ROLES:
            self.read_only = True
        if peer.node_id != self.label and self.label == "link":
            self.label = peer.node_id
        log.info("link %s up: peer %s (%s), protocol v%d%s", self.label, peer.node_id, peer.role, event.version,
                 ", read-only" if self.read_only else "")
        self._theirs = self._admissible(peer.summary)
        self._compare(peer.summary)
        self.replicator.links_changed()
        gossip = self.replicator.gossip
        if gossip is not None and not self.closed and (self.conn.version or 0) >= STATUS_VERSION:
            for raw in gossip.known():
                self._out += self.conn.send(Status(raw))

    def _on_status(self, event: Status) -> None:
        if self.read_only:
            log.debug("link %s: ignoring STATUS from read-only peer", self.label)
            return
        gossip = self.replicator.gossip
        if gossip is not None:
            gossip.received(event.envelope, self)

    def _compare(self, theirs: dict[str, bytes], restart: bool = False) -> None:
        """Plan the work a peer's summary calls for; ``restart`` (a later SUMMARY) also restarts the
        sync of every differing shard from a fresh state, which repairs a lost message."""
        mine = self.ledger.summary()
        if restart and not self.read_only:
            for shard in self._admissible(theirs).keys() - mine.keys():  # pull what we lack by the sync protocol
                self.states[shard] = am.SyncState()
                self._dirty.setdefault(shard, False)
        for shard, ours in mine.items():
            if shard not in theirs:
                if shard not in self._snapshot_set:
                    self._snapshot_set.add(shard)
                    self._snapshots.append(shard)
            elif theirs[shard] != ours:
                if restart:
                    self.states[shard] = am.SyncState()
                self._dirty.setdefault(shard, False)

    def _state(self, shard: str) -> am.SyncState:
        state = self.states.get(shard)
        if state is None:
            state = self.states[shard] = am.SyncState()
        return state

    def _on_sync(self, event: Sync) -> None:
        shard = event.shard
        park = self.replicator.park
        parked = not self.read_only and not park.admitted(shard)
        if parked and not park.holds(shard):
            self.states.pop(shard, None)  # a new shard that may not exist: a fresh exchange if parked
        state = self._state(shard)
        before = self._digest(shard)
        if self.read_only:
            self._absorb_read_only(shard, state, event.data)
        elif parked:
            if not park.receive_sync(shard, state, event.data, self._peer_name()):
                self.states.pop(shard, None)
                return
        else:
            self._count(self.ledger.receive_sync(shard, state, event.data, self._peer_name()))
        after = self._digest(shard)
        if after != before:
            self._stale[shard] = 0
            self._dirty[shard] = True
            return
        # The Automerge sync protocol assumes no message is ever lost: after a loss both ends can
        # trade messages forever, each waiting for a change the other believes it sent. Restart the
        # shard once per state of our heads; if that does not help, stop answering until it changes.
        stale = self._stale[shard] = self._stale.get(shard, 0) + 1
        if stale <= STALL_ROUNDS:
            self._dirty[shard] = True
            return
        self._stale[shard] = 0
        if self._stall_reset.get(shard) != after:
            self._stall_reset[shard] = after
            log.info("link %s: sync of %s makes no progress; restarting it", self.label, shard)
            self.states[shard] = am.SyncState()
            self._dirty[shard] = False
        else:
            log.info("link %s: sync of %s makes no progress; pausing it until the shard changes",
                     self.label, shard)
            if not parked and shard in self.ledger.docs and self._whole_sent.get(shard) != after:
                # A last resort that always converges: the whole shard, which the peer merges whole
                # (Automerge's own merge takes every change it lacks, dependencies included). Seen
                # after a crash, when a restarted sync stays stuck on one shard; once per state.
                self._whole_sent[shard] = after
                if shard not in self._snapshot_set:
                    log.info("link %s: sending the whole of %s instead", self.label, shard)
                    self._snapshots.append(shard)
                    self._snapshot_set.add(shard)

    def _absorb_read_only(self, shard: str, state: am.SyncState, data: bytes) -> None:
        """Let the sync state learn a read-only peer's heads and needs; drop any change it carries."""
        with automerge_input(f"bad Automerge sync message for shard {shard}"):
            msg = am.Message.decode(data)
        doc = self.ledger.docs.get(shard)
        scratch = doc.fork() if doc is not None else am.Document()
        with automerge_input(f"Automerge refused a sync message for shard {shard}"):  # a panic spoils only the scratch
            scratch.receive_sync_message(state, msg)
        if doc is not None and scratch.get_heads() != doc.get_heads():
            # It offered changes we will not take from a read-only peer: forget what it told us.
            self.states[shard] = am.SyncState()

    def _on_snapshot(self, event: Snapshot) -> None:
        if self.read_only:
            log.warning("link %s: ignoring SNAPSHOT of %s from read-only peer", self.label, event.shard)
            return
        self._counters.snapshots_received += 1
        park = self.replicator.park
        if not park.admitted(event.shard):
            park.receive_snapshot(event.shard, event.data, self._peer_name())
            return
        self._count(self.ledger.receive_snapshot(event.shard, event.data, self._peer_name()))

    def _on_push(self, event: Push) -> None:
        if self.read_only:
            log.debug("link %s: ignoring PUSH from read-only peer", self.label)
            return
        shard = event.shard
        before = self._digest(shard)
        park = self.replicator.park
        tree = self.replicator.tree
        self._counters.changes_pushed_in += len(event.changes)
        held = all(tree.seen(change_hash(c)) for c in event.changes)
        if not park.admitted(shard):
            if not park.receive_push(shard, list(event.changes), self._peer_name()):
                return
        else:
            self._count(self.ledger.receive_push(shard, list(event.changes), self._peer_name()))
        after = self._digest(shard)
        duplicate = held and after == before
        if duplicate:
            self._counters.changes_pushed_dup += len(event.changes)
        if self.version >= TREE_VERSION and park.admitted(shard) and (duplicate or after != before):
            # a duplicate prunes this link for the shard's origin; news makes it eager again
            if tree.pushed(self, origin_of(shard), new=not duplicate):
                self._prune_out.add(origin_of(shard))
                self._graft_out.discard(origin_of(shard))
        if after == event.digest or after != before:
            self._orphans = 0
        else:
            self._orphans += 1
            if self._orphans > MAX_ORPHAN_PUSHES:
                self._out += self._close_now(
                    f"peer pushed {self._orphans} changes in a row that do not apply", warn=True)
                return
        # A digest that differs once applied (a dependency missing, or we hold more): sync the shard.
        self._on_have(Have({shard: event.digest}))

    def _on_have(self, event: Have) -> None:
        shards = self._admissible(event.shards)
        self._theirs.update(shards)
        now = self.clock.monotonic()
        for shard, theirs in shards.items():
            ours = self._digest(shard)
            if ours == theirs:
                self._counters.last_sync_at = now
                continue
            pair = (ours, theirs)
            if self._last_reset.get(shard) == pair or shard in self._snapshot_set and shard in self._snapshots:
                continue
            self._last_reset[shard] = pair
            self.states[shard] = am.SyncState()
            self._dirty.setdefault(shard, False)

    def _on_ihave(self, event: Ihave) -> None:
        if self.read_only or self.conn.draining:
            return
        tree = self.replicator.tree
        before = tree.next_deadline()
        shards = self._admissible({shard: b"" for shard, _ in event.entries})
        now = self.clock.monotonic()
        pending, peer_has = self._announce, self._peer_has
        for shard, hashes in event.entries:
            if shard in shards:
                tree.announced(self, shard, hashes, now)
            for h in hashes:
                peer_has[h] = None
            queued = pending.get(shard)
            if queued:  # the peer holds them: our announcement of them would tell it nothing
                kept = [h for h in queued if h not in peer_has]
                if kept:
                    pending[shard] = kept
                else:
                    del pending[shard]
        if not pending:
            self._announce_due = None
        if len(peer_has) > 2 * PEER_HAS_LIMIT:  # keep the most recent ones
            self._peer_has = dict.fromkeys(list(peer_has)[-PEER_HAS_LIMIT:])
        if tree.next_deadline() < before:
            self._rearm = True

    def _on_drain(self, event: Drain) -> None:
        """The peer drains this link: graft elsewhere what it was our last eager way in for, write
        the pushes waiting, and answer DRAIN, our last frame but GOODBYE; the peer then closes."""
        log.info("link %s: peer drains the link: %s", self.label, event.reason)
        self.replicator._drain(self)
        out = bytearray()
        self._write_pushes(out)
        self._clear_work()
        self._out += out
        self._out += self.conn.drain(self.clock.monotonic(), "answer")

    def _on_closed(self, event: Closed) -> None:
        if event.error or event.by_peer:
            level = logging.WARNING if event.error else logging.INFO
            log.log(level, "link %s closed: %s", self.label, event.reason)
        else:
            log.info("link %s closed by us: %s", self.label, event.reason)
        self._out += self.conn.send(Goodbye(event.reason))
        self._clear_work()
        self.replicator._forget(self)

    def _count(self, report: IngestReport) -> None:
        c = self._counters
        c.entries_received += len(report.accepted)
        c.entries_reasserted += report.reasserted
        c.last_sync_at = self.clock.monotonic()
        if report.rejected:
            c.entries_rejected += len(report.rejected)
            c.last_rejection = report.rejected[-1][1]
            if c.entries_rejected > self.config.max_rejected:
                self._out += self._close_now(
                    f"peer sent {c.entries_rejected} invalid entries (last: {c.last_rejection})", warn=True)

    def _close_now(self, reason: str, warn: bool = False) -> bytes:
        if self.conn.state is not LinkState.CLOSED:
            log.log(logging.WARNING if warn else logging.INFO, "link %s: cutting off peer: %s", self.label, reason)
        data = self.conn.send(Goodbye(reason))
        for event in self.conn.events():
            if isinstance(event, Closed):
                self._clear_work()
                self.replicator._forget(self)
        return data

    def _clear_work(self, pushes: bool = True) -> None:
        if pushes:
            self._push.clear()
            self._push_size.clear()
        self._announce.clear()
        self._announce_due = None
        self._prune_out.clear()
        self._graft_out.clear()
        self._dirty.clear()
        self._snapshots.clear()
        self._snapshot_set.clear()

    def _peer_name(self) -> str:
        return self.conn.peer.node_id if self.conn.peer else self.label

    # -- output -----------------------------------------------------------------

    def _write_pushes(self, out: bytearray) -> None:
        for shard in list(self._push):  # first: small and waited for
            changes = self._push.pop(shard)
            self._push_size.pop(shard, None)
            if shard not in self._snapshot_set:  # else its snapshot holds them
                out += self.conn.send(Push(shard, self._digest(shard), tuple(changes)))

    def _generate(self, out: bytearray, budget: int) -> None:
        if self.conn.draining:
            if self.conn.may_push:
                self._write_pushes(out)
            return
        start = len(out)
        if self._prune_out:
            out += self.conn.send(Prune(tuple(sorted(self._prune_out))))
            self._prune_out.clear()
        if self._graft_out:
            out += self.conn.send(Graft(tuple(sorted(self._graft_out))))
            self._graft_out.clear()
        if self._announce and self._announce_ready():
            # only when due, not along with every PUSH: under load a push goes out on some link
            # nearly all the time, and an IHAVE of one or two hashes each time cost a frame per
            # push to build, parse and look up, where one frame per ANNOUNCE_DELAY carries them all
            self._send_announcements(out)
        self._write_pushes(out)
        while self._snapshots and len(out) - start < budget:
            shard = self._snapshots.pop(0)
            self._snapshot_set.discard(shard)
            out += self.conn.send(Snapshot(shard, self.ledger.snapshot(shard)))
            self._counters.snapshots_sent += 1
        have: dict[str, bytes] = {}
        for shard in list(self._dirty):
            if len(out) - start >= budget:
                break
            if shard in self._snapshot_set:
                continue  # its snapshot goes first
            answers = self._dirty.pop(shard)
            park = self.replicator.park
            if not park.admitted(shard):
                msg = park.generate_sync(shard, self._state(shard), self._peer_name())
                if msg is not None:
                    out += self.conn.send(Sync(shard, msg))
                elif answers and park.holds(shard):
                    have[shard] = park.digest(shard)
                continue
            try:
                msg = self.ledger.generate_sync(shard, self._state(shard))
            except Exception as exc:  # a state confused by a dropped message: start that shard afresh
                log.info("link %s: restarting sync of %s (%s)", self.label, shard, exc)
                self.states[shard] = am.SyncState()
                msg = self.ledger.generate_sync(shard, self._state(shard))
            if msg is not None:
                out += self.conn.send(Sync(shard, msg))
            elif answers:
                have[shard] = self._digest(shard)
        if have:
            out += self.conn.send(Have(have))

    def _send_announcements(self, out: bytearray) -> None:
        pending, self._announce, self._announce_due = self._announce, {}, None
        batch: list[tuple[str, tuple[bytes, ...]]] = []
        size = 0
        for shard, hashes in pending.items():
            unique = list(dict.fromkeys(hashes))
            for i in range(0, len(unique), MAX_ANNOUNCED):
                part = tuple(unique[i:i + MAX_ANNOUNCED])
                if batch and (i > 0 or size + len(part) > MAX_ANNOUNCED):  # one entry per shard and frame
                    out += self.conn.send(Ihave(tuple(batch)))
                    batch, size = [], 0
                batch.append((shard, part))
                size += len(part)
        if batch:
            out += self.conn.send(Ihave(tuple(batch)))
