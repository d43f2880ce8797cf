"""The running node's status publisher: a small signed status, gossiped over the mesh.

Every STATUS_INTERVAL seconds, and within about CHECK_EVERY seconds of a change
(a new ledger entry, a link up or down, the printer or uplink state), the node
signs a ``status`` envelope, puts it on its own StatusBoard and floods it on
every link (meshpos.status.board). The status is ``meshpos.wire.status.StatusBody``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from meshpos import __version__
from meshpos.domain.hostport import parse_hostport
from meshpos.domain.rules import MAX_SKEW_MS
from meshpos.node.core import NodeCore
from meshpos.replication.discovery import local_addresses
from meshpos.replication.sync import Replicator
from meshpos.status.board import StatusBoard
from meshpos.wire import envelope
from meshpos.wire.status import (LedgerSize, LinkSeen, PendingCount, PrinterSeen, RefusedCount, StatusBody,
                                 UplinkSeen)

log = logging.getLogger(__name__)

STATUS_INTERVAL = 10.0  # seconds between two statuses of a node (NodeTuning may change it)
CHECK_EVERY = 1.0  # how often to look for a change worth publishing at once
MIN_GAP = 1.0  # never two statuses closer than this
# A change of counts only (new entries, pending sales) waits this long: during a busy day every
# node's counts change all the time, and 20 nodes flooding a status a second cost more CPU than
# the sales themselves. Links, printer and uplink changes still go out within MIN_GAP.
COUNTS_GAP = 5.0
MAX_LINKS = 48  # keeps the envelope well under 8 KiB


def battery_percent(root: Path = Path("/sys/class/power_supply")) -> int | None:
    """The first battery's charge in %, where the OS tells it."""
    try:
        for supply in sorted(root.iterdir()):
            cap = supply / "capacity"
            if (supply / "type").exists() and (supply / "type").read_text().strip() == "Battery" and cap.exists():
                return max(0, min(100, int(cap.read_text().strip())))
    except (OSError, ValueError):
        return None
    return None


def pending_of(core: NodeCore, terminal: str | None) -> PendingCount:
    """Count, amount and oldest ``created_at`` of the card sales (of one terminal, or all) awaiting
    their authorization; cash sales are final when taken, never pending."""
    now = core.clock.now_ms()
    window_start = now - core.policy.offline_window_ms
    count, amount, oldest = core.store.pending_summary(window_start, now + MAX_SKEW_MS, terminal)
    return PendingCount(count=count, amount_minor=amount, oldest_created_at=oldest)


MAX_REFUSED_TERMINALS = 16


def held_of(core: NodeCore) -> dict[str, int]:
    """What this node holds of each terminal's sales (protocols/link.md, "What a node holds")."""
    revoked = core.roster.revoked
    return {t: n for t, n in core.ledger.holdings.vector().items() if t not in revoked}


def refused_of(core: NodeCore) -> RefusedCount:
    """How many sales of the site this node holds as refused by the content rules, per terminal
    (the inspector warns about a terminal whose sales the site refuses)."""
    rows = core.store.refused_by_terminal(MAX_REFUSED_TERMINALS)
    return RefusedCount(count=sum(n for _, n in rows), by_terminal=dict(rows))


class StatusPublisher:
    """Signs and floods this node's status. It is handed what it shows: the board to publish on,
    the replicator whose links it lists (None without a mesh), and functions that tell the
    listening port, the printer's and the uplink's state."""

    def __init__(self, core: NodeCore, board: StatusBoard, replicator: Replicator | None, *,
                 listen_port: Callable[[], int | None], printer: Callable[[], PrinterSeen],
                 uplink: Callable[[], UplinkSeen], started_at: int, interval: float) -> None:
        self.core = core
        self.board = board
        self.replicator = replicator
        self.listen_port = listen_port
        self.printer = printer
        self.uplink = uplink
        self.started_at = started_at
        self.interval = interval
        self.published = 0

    def links(self) -> tuple[LinkSeen, ...]:
        if self.replicator is None:
            return ()
        out = []
        for s in list(self.replicator.sessions):
            if s.closed or not s.peer_node or s.conn.peer is None:
                continue
            rtt = s.conn.rtt
            out.append(LinkSeen(node=s.peer_node, role=s.conn.peer.role,
                                rtt_ms=None if rtt is None else int(math.ceil(rtt * 1000))))
        return tuple(sorted(out, key=lambda link: link.node)[:MAX_LINKS])

    def addresses(self) -> tuple[str, ...]:
        """Where peers can reach us: the listen host if it names one, else our IPv4 addresses."""
        host = parse_hostport(self.core.config.listen, "listen")[0] if self.core.config.listen else ""
        if host and host not in ("0.0.0.0", "::", "*"):
            return (host,)
        return tuple(local_addresses()[:8])

    def body(self) -> StatusBody:
        core = self.core
        return StatusBody(
            at=core.clock.now_ms(), role=core.identity.role, name=core.config.name, version=__version__,
            addresses=self.addresses(), port=self.listen_port(), links=self.links(),
            ledger=LedgerSize(entries=core.store.entry_count(), shards=len(core.ledger.shards())),
            pending=pending_of(core, core.node_id), site_pending=pending_of(core, None),
            refused=refused_of(core), held=held_of(core), uplink=self.uplink(), printer=self.printer(),
            battery=battery_percent(), every_ms=int(self.interval * 1000), started_at=self.started_at,
        )

    def publish(self) -> None:
        raw = envelope.seal("status", self.core.node_id, {"status": self.body().to_json()}, self.core.key)
        self.board.publish(raw)
        self.published += 1

    def _change_key(self) -> tuple[Any, ...]:
        """What makes a status worth sending at once (see COUNTS_GAP for the counts)."""
        links = frozenset(link.node for link in self.links())
        return (links, self.printer().state, self.uplink().state)

    def _counts_key(self) -> tuple[Any, ...]:
        return (self.core.store.entry_count(), pending_of(self.core, self.core.node_id).count)

    def statuses_json(self) -> list[dict[str, Any]]:
        return [{"node_id": s.node_id, "status": s.body.to_json(), "received_at": s.received_at_ms}
                for s in self.board.current().values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        clock = self.core.clock
        last_key: tuple[Any, ...] | None = None
        last_counts: tuple[Any, ...] | None = None
        last_pub = -math.inf
        while True:
            if self.replicator is not None:
                for session in list(self.replicator.sessions):
                    if not session.closed and session.peer_node:
                        session.ping()  # the next status carries the RTT
            key = self._change_key()
            now = clock.monotonic()
            since = now - last_pub
            counts = self._counts_key() if since >= COUNTS_GAP else last_counts
            if ((key != last_key and since >= MIN_GAP) or (counts != last_counts and since >= COUNTS_GAP)
                    or since >= self.interval):
                try:
                    self.publish()
                    last_key, last_counts, last_pub = key, self._counts_key(), now
                except Exception:  # a status must never take the node down
                    log.exception("status not published")
                    last_pub = now
            await trio.sleep(CHECK_EVERY)
