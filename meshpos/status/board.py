"""Node statuses: the newest verified ``status`` envelope of every node, gossiped over links.

Rules (protocols/link.md, "Status gossip"):

* A status is a signed ``status`` envelope (protocols/envelope.md) whose body is
  ``{"status": {..., "at": ms}}``. It never enters the ledger: a status every
  10 s from every node would grow the Automerge history forever.
* The board keeps, per node, the one status with the greatest ``at`` that
  verifies against the roster (the signer's certificate, of a role that holds
  links, not an inspector: inspectors publish nothing). An older or equal one is
  ignored, so a flood ends at every node that has seen it.
* A newer status is flooded to every other link (``relay``); the inspector's
  board does not relay (nodes ignore what it sends anyway).
* A status whose signer's certificate has not arrived is parked (bounded) and
  tried again when a certificate is accepted.
* A signer's statuses are taken at most ``STATUS_RATE`` a second on average (bursts of
  ``STATUS_BURST``, our monotonic clock; only verified statuses count): one beyond that is
  ignored before any signature check and not relayed, so a hostile enrolled node that signs
  statuses as fast as it can costs each neighbour a hash per frame, and the rest of the site
  nothing (each of those statuses is newer, so each would otherwise flood every link).
* A status tells only what its signer may say: one dated more than
  ``rules.MAX_SKEW_MS`` ahead of our clock is refused (it would stay "fresh"
  for as long as it lies), a revoked node's statuses are refused and the one
  held is dropped when the revocation arrives. Who a node *is* (name, role)
  comes from its certificate, never from its status (meshpos.status.meshview).

* A status's links and ``held`` name nodes by short ids (format 3): the board reads them against
  the roster (meshpos.status.shortids), logs why it left any record out, and reads a status again
  when a certificate arrives whose id one of its records starts with.

No I/O here: time comes from the injected Clock, sending is the Replicator's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from meshpos.domain.roles import READ_ONLY_ROLES
from meshpos.domain import rules
from meshpos.infra.clock import Clock
from meshpos.domain.errors import EncodingError, MeshposError, VerificationError
from meshpos.status.meshview import stale_after_ms
from meshpos.site.roster import Roster, UnknownSigner, Verified
from meshpos.status.shortids import ShortIds, names_prefix_of
from meshpos.wire import envelope as env_mod
from meshpos.wire.status import StatusBody

if TYPE_CHECKING:
    from meshpos.replication.sync import Replicator, SyncSession

log = logging.getLogger(__name__)

MAX_PARKED = 256
MAX_NODES = 4096
MAX_SEEN = 16384
# A node publishes at most one status a second (meshpos.node.status_pub.MIN_GAP); a link that
# stalled may deliver a few at once. Past that a signer's newer statuses are ignored unverified.
STATUS_RATE = 1.0  # statuses per second per signer, on average
STATUS_BURST = 4


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    body: StatusBody  # the status object (body["status"] of the envelope), read field by field
    raw: bytes
    received_at_ms: int  # our clock, when this version arrived
    # the status as decoded, when it has short ids (``body`` is it read against our roster: shortids)
    wire: StatusBody | None = None

    @property
    def at(self) -> int:
        return self.body.at

    @functools.cached_property
    def links(self) -> frozenset[str]:
        """The nodes it says it is linked to."""
        return frozenset(link.node for link in self.body.links)


def check_status_body(body: dict[str, Any]) -> StatusBody:
    """The status object of an envelope body; EncodingError unless it has an integer ``at``."""
    status = body.get("status")
    if not isinstance(status, dict):
        raise EncodingError("status envelope: body.status must be an object")
    return StatusBody.from_json(status)


class StatusBoard:
    def __init__(self, roster: Roster, clock: Clock, *, relay: bool = True) -> None:
        self.roster = roster
        self.clock = clock
        self.relay = relay
        self.statuses: dict[str, NodeStatus] = {}
        self.short_ids = ShortIds(roster)  # what a status's short ids name (and the width we write ours at)
        self.replicator: "Replicator | None" = None
        # a newer status; or the same one read again because a certificate changed what its short ids name
        self.on_new: list[Callable[[NodeStatus], None]] = []
        # (signer, our clock when it arrived, its at) of every new status whose signature verifies,
        # those refused for coming from the future included: the node's clock estimate
        # (meshpos.domain.clockskew) needs them most when this node's clock is behind
        self.on_clock: list[Callable[[str, int, int], None]] = []
        self.rejected = 0
        self.throttled = 0  # newer statuses ignored because their signer sent more than its rate
        self._rate: dict[str, tuple[float, float]] = {}  # verified signer -> (tokens, monotonic time)
        self._parked: dict[str, bytes] = {}
        self._seen: set[bytes] = set()  # digests of statuses taken or refused for good

    def attach(self, replicator: "Replicator") -> None:
        self.replicator = replicator
        replicator.gossip = self

    # -- the gossip side (sync.StatusGossip) --------------------------------------------

    def known(self) -> list[bytes]:
        return [s.raw for s in self.statuses.values()]

    def links_of(self, node_id: str) -> frozenset[str]:
        """The nodes ``node_id`` is linked to, by its status, if that arrived recently enough to
        trust (``meshview.stale_after_ms``, on our clock); else none."""
        status = self.statuses.get(node_id)
        if status is None or self.clock.now_ms() - status.received_at_ms > stale_after_ms(status.body):
            return frozenset()
        return status.links

    def received(self, raw: bytes, session: "SyncSession | None") -> None:
        status = self.offer(raw, session.label if session is not None else "local")
        if status is not None and self.relay and self.replicator is not None:
            self.replicator.broadcast_status(raw, exclude=session)

    def publish(self, raw: bytes) -> NodeStatus | None:
        """Our own new status: into the board and out on every link."""
        status = self.offer(raw, "local")
        if status is not None and self.replicator is not None:
            self.replicator.broadcast_status(raw)
        return status

    # -- verification -------------------------------------------------------------------

    def offer(self, raw: bytes, origin: str) -> NodeStatus | None:
        """Take ``raw`` if it verifies and is newer than what we hold; the new NodeStatus or None."""
        # A flood brings the same bytes over several links: known ones cost a hash, not a decode.
        seen = hashlib.blake2b(raw, digest_size=16).digest()
        if seen in self._seen:
            return None
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        now = self.clock.now_ms()
        try:
            env = env_mod.decode(raw)
            if env.type != "status":
                raise EncodingError(f"a {env.type} envelope where a status was expected")
            status = check_status_body(env.body)
            mono = self.clock.monotonic()
            if self._tokens(env.signer, mono) < 1.0:  # a signer past its rate: not verified, not relayed
                self.throttled += 1
                return None
            ahead = rules.future_problem(status.at, now, "status time")
            if ahead is not None:
                if self.on_clock:
                    self.roster.verify(env, now)
                    self._spend(env.signer, mono)
                    self._clock_sample(env.signer, now, status.at)
                raise VerificationError(ahead)
            current = self.statuses.get(env.signer)
            if current is not None and current.at >= status.at:
                self._seen.add(seen)
                return None
            if current is None and len(self.statuses) >= MAX_NODES:
                raise VerificationError("too many nodes on the status board")
            self.roster.verify(env, now)
            if self.roster.identity(env.signer).role in READ_ONLY_ROLES:
                raise VerificationError("inspectors publish no status")
        except UnknownSigner:  # not remembered as seen: it is tried again when the certificate comes
            if len(self._parked) < MAX_PARKED or env.signer in self._parked:
                self._parked[env.signer] = raw
            return None
        except (MeshposError, KeyError, ValueError) as exc:
            self._seen.add(seen)
            self.rejected += 1
            log.info("status from %s refused: %s", origin, exc)
            return None
        self._seen.add(seen)
        self._spend(env.signer, mono)
        self._parked.pop(env.signer, None)
        body, problems = self.short_ids.resolve(status)
        if problems:
            log.info("status of %s from %s: %s", env.signer, origin, "; ".join(problems))
        node = NodeStatus(env.signer, body, raw, now, None if body is status else status)
        self.statuses[env.signer] = node
        self._clock_sample(env.signer, now, node.at)
        for hook in self.on_new:
            hook(node)
        return node

    def _tokens(self, signer: str, mono: float) -> float:
        """The statuses ``signer`` may still have taken now (a token bucket per signer)."""
        tokens, at = self._rate.get(signer, (float(STATUS_BURST), mono))
        return min(float(STATUS_BURST), tokens + max(0.0, mono - at) * STATUS_RATE)

    def _spend(self, signer: str, mono: float) -> None:
        """One verified status of ``signer`` was taken (or refused for its time)."""
        self._rate[signer] = (self._tokens(signer, mono) - 1.0, mono)

    def _clock_sample(self, signer: str, now: int, at: int) -> None:
        for hook in self.on_clock:
            hook(signer, now, at)

    def current(self) -> dict[str, NodeStatus]:
        """The statuses to show: those of nodes not revoked (a revocation may come after them)."""
        revoked = self.roster.revoked
        return {node: s for node, s in self.statuses.items() if node not in revoked}

    def on_accept(self, verified: Verified) -> None:
        """A ledger entry was accepted: a certificate may let parked statuses in; a revocation
        drops the revoked node's status."""
        if verified.env.type == "cert":
            self.reread(verified.env.signer)
            self.retry_parked()
        elif verified.env.type == "revocation":
            node = str(verified.env.body.get("node_id"))
            self.statuses.pop(node, None)
            self._parked.pop(node, None)

    def reread(self, node_id: str) -> None:
        """A certificate of ``node_id`` arrived: the statuses with a short id it starts with read
        differently now (a record that named nobody names it; one that named another member names
        two). Each is read again and, if that changed it, handed to ``on_new`` once more."""
        for signer, status in list(self.statuses.items()):
            if status.wire is None or not names_prefix_of(status.wire, node_id):
                continue
            body, problems = self.short_ids.resolve(status.wire)
            if body == status.body:
                continue
            if problems:
                log.info("status of %s read again: %s", signer, "; ".join(problems))
            node = NodeStatus(signer, body, status.raw, status.received_at_ms, status.wire)
            self.statuses[signer] = node
            for hook in self.on_new:
                hook(node)

    def retry_parked(self) -> None:
        """A certificate arrived: parked statuses may verify now."""
        for signer, raw in list(self._parked.items()):
            if signer in self.roster.identities:
                del self._parked[signer]
                self.received(raw, None)
