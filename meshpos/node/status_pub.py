"""The running node's status publisher: a small signed status, gossiped over the mesh.

Every STATUS_INTERVAL seconds, and within about CHECK_EVERY seconds of a change
(a new ledger entry, a link up or down, the printer or uplink state), the node
signs a ``status`` envelope, puts it on its own StatusBoard and floods it on
every link (meshpos.status.board). It also registers the control operations
``statuses`` (the board) and ``report`` (end-of-day reconciliation data).
"""

from __future__ import annotations

from meshpos.domain.rules import MAX_SKEW_MS

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshpos import __version__
from meshpos.replication.discovery import local_addresses
from meshpos.status.board import StatusBoard
from meshpos.wire import envelope
from meshpos.node.core import NodeCore

if TYPE_CHECKING:
    from meshpos.node.runner import Mesh
    from meshpos.node.service import NodeService

log = logging.getLogger(__name__)

# Seconds between two statuses of a node; the lab sets it low to see a cut host quickly.
STATUS_INTERVAL = float(os.environ.get("MESHPOS_STATUS_INTERVAL", "10"))
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


def pending_of(core: NodeCore, terminal: str | None) -> dict[str, Any]:
    """Count and amount of the pending sales (of one terminal, or all), and the ``created_at`` of the
    oldest pending card sale: the offline window bounds card authorization only (cash never expires)."""
    now = core.clock.now_ms()
    window_start = now - core.policy.offline_window_ms
    sql = ("SELECT count(*), coalesce(sum(amount_minor), 0), min(CASE WHEN method='card' THEN created_at END)"
           " FROM sales WHERE result_status IS NULL AND voided_at IS NULL AND refused IS NULL"
           " AND (method='cash' OR created_at >= ?) AND created_at <= ?")
    args: tuple[Any, ...] = (window_start, now + MAX_SKEW_MS)
    if terminal is not None:
        sql += " AND terminal=?"
        args += (terminal,)
    count, amount, oldest = core.store.conn.execute(sql, args).fetchone()
    return {"count": int(count), "amount_minor": int(amount), "oldest_created_at": oldest}


MAX_REFUSED_TERMINALS = 16


def refused_of(core: NodeCore) -> dict[str, Any]:
    """How many sales of the site this node holds as refused by the content rules, per terminal
    (the inspector warns about a terminal whose sales the site refuses)."""
    rows = core.store.conn.execute(
        "SELECT terminal, count(*) FROM sales WHERE refused IS NOT NULL GROUP BY terminal"
        " ORDER BY count(*) DESC, terminal LIMIT ?", (MAX_REFUSED_TERMINALS,)).fetchall()
    return {"count": sum(int(n) for _, n in rows), "by_terminal": {str(t): int(n) for t, n in rows}}


def printer_state(service: "NodeService") -> dict[str, Any]:
    if service.printer is not None:
        st = service.printer.status()
        return {"state": st.state, "queued": st.queued}
    if service.printer_problem:
        return {"state": "misconfigured", "queued": len(service.spool)}
    return {"state": "none", "queued": len(service.spool)}


def uplink_state(service: "NodeService") -> dict[str, Any]:
    for extra in service.extra_status:
        part = extra()
        if "uplink" in part:
            up = part["uplink"]
            return {"state": up.get("state"), "last_forward_at": up.get("last_forward_ms")}
    return {"state": "off" if not service.core.config.uplink else "unknown", "last_forward_at": None}


class StatusPublisher:
    def __init__(self, service: "NodeService", mesh: "Mesh | None", interval: float = STATUS_INTERVAL) -> None:
        self.service = service
        self.core = service.core
        self.mesh = mesh
        self.interval = interval
        self.board = StatusBoard(self.core.roster, self.core.clock)
        self.published = 0
        if mesh is not None:
            self.board.attach(mesh.replicator)
        self.core.ledger.on_accept.append(self.board.on_accept)
        service.extra_ops["statuses"] = lambda core, params: self.statuses_json()
        service.extra_ops["report"] = lambda core, params: _report_data(core)

    def links(self) -> list[dict[str, Any]]:
        if self.mesh is None:
            return []
        out = []
        for s in list(self.mesh.replicator.sessions):
            if s.closed or not s.peer_node or s.conn.peer is None:
                continue
            rtt = s.conn.rtt
            out.append({"node": s.peer_node, "role": s.conn.peer.role,
                        "rtt_ms": None if rtt is None else int(math.ceil(rtt * 1000))})
        return sorted(out, key=lambda link: str(link["node"]))[:MAX_LINKS]

    def addresses(self) -> list[str]:
        """Where peers can reach us: the listen host if it names one, else our IPv4 addresses."""
        host = (self.core.config.listen or "").rpartition(":")[0].strip("[]")
        if host and host not in ("0.0.0.0", "::", "*"):
            return [host]
        return local_addresses()[:8]

    def body(self) -> dict[str, Any]:
        core = self.core
        cfg = core.config
        return {
            "role": core.identity.role, "name": cfg.name, "version": __version__,
            "addresses": self.addresses(), "port": self.mesh.listen_port if self.mesh else None,
            "links": self.links(),
            "ledger": {"entries": core.store.entry_count(), "shards": len(core.ledger.shards())},
            "pending": pending_of(core, core.node_id), "site_pending": pending_of(core, None),
            "refused": refused_of(core),
            "uplink": uplink_state(self.service), "printer": printer_state(self.service),
            "battery": battery_percent(), "every_ms": int(self.interval * 1000),
            "started_at": self.service.started_at, "at": core.clock.now_ms(),
        }

    def publish(self) -> None:
        raw = envelope.seal("status", self.core.node_id, {"status": self.body()}, self.core.key)
        self.board.publish(raw)
        self.published += 1

    def _change_key(self) -> tuple[Any, ...]:
        """What makes a status worth sending at once (see COUNTS_GAP for the counts)."""
        links = frozenset(link["node"] for link in self.links())
        return (links, printer_state(self.service)["state"], uplink_state(self.service)["state"])

    def _counts_key(self) -> tuple[Any, ...]:
        return (self.core.store.entry_count(), pending_of(self.core, self.core.node_id)["count"])

    def statuses_json(self) -> list[dict[str, Any]]:
        return [{"node_id": s.node_id, "status": s.body, "received_at": s.received_at_ms}
                for s in self.board.current().values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        clock = self.core.clock
        last_key: tuple[Any, ...] | None = None
        last_counts: tuple[Any, ...] | None = None
        last_pub = -math.inf
        while True:
            if self.mesh is not None:
                for session in list(self.mesh.replicator.sessions):
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


def _report_data(core: NodeCore) -> Any:
    from meshpos.node.report import collect
    return collect(core)


async def status_component(service: "NodeService", *, task_status: trio.TaskStatus[None]) -> None:
    """The run_node component: needs the mesh component started before it."""
    publisher = StatusPublisher(service, getattr(service, "mesh", None))
    service.statusboard = publisher.board  # type: ignore[attr-defined]
    await publisher.run(task_status=task_status)
