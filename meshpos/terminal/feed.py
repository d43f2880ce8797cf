"""What goes into the terminal API's event journal, and when.

- ``sale.created``, ``sale.voided``, ``sale.approved`` / ``sale.declined`` / ``sale.expired`` /
  ``sale.rejected`` / ``sale.voided`` (a settlement result), ``sale.reversed``: from the ledger's
  accept hook, for this terminal's own sales, whichever node's uplink settled them (the result
  reaches this node by replication). The data is the sale object, as ``GET /v1/sales/{id}``.
- ``sale.replicated``: the number of devices known to hold one of this terminal's pending card
  sales (``held_by``) changed, as peers' statuses arrive; checked every ``TICK_S``.
- ``sale.expired`` also when a card sale's offline window ends with no result (a time, not an
  entry: checked every ``TICK_S``).
- ``node.status``: linked peers, uplink, printer, battery, this terminal's pending sales and the
  end of its offline window; checked every ``TICK_S``, sent when something changed.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from meshpos.domain.errors import MeshposError
from meshpos.site.roster import Verified
from meshpos.node.core import NodeCore, iso
from meshpos.node.runner import RunningNode
from meshpos.node.status_pub import pending_of
from meshpos.terminal.events import EventJournal

log = logging.getLogger(__name__)

TICK_S = 1.0
ENTRY_EVENTS = {"sale": "sale.created", "void": "sale.voided", "reversal": "sale.reversed"}


class EventFeed:
    def __init__(self, node: RunningNode, journal: EventJournal) -> None:
        self.node = node
        self.core: NodeCore = node.core
        self.journal = journal
        self.windows: dict[str, int] = {}  # own pending card sale -> when its window ends (ms)
        self.held: dict[str, int] = {}  # own pending card sale -> its held_by as last sent
        self.last_status: dict[str, Any] | None = None
        for sale in self.core.sales(self.core.node_id):
            self._track(sale)
        self.core.ledger.on_accept.append(self.on_accept)

    def close(self) -> None:
        if self.on_accept in self.core.ledger.on_accept:
            self.core.ledger.on_accept.remove(self.on_accept)

    def _track(self, sale: dict[str, Any]) -> None:
        if sale["method"] == "card" and sale["status"] == "pending":
            self.windows[sale["id"]] = int(sale["created_at_ms"]) + self.core.policy.offline_window_ms
            self.held.setdefault(sale["id"], int(sale["held_by"]))
        else:
            self.windows.pop(sale["id"], None)
            self.held.pop(sale["id"], None)

    def on_accept(self, verified: Verified) -> None:
        env = verified.env
        sale_id = env.body.get("sale_id")
        if not isinstance(sale_id, str) or not sale_id.startswith(self.core.node_id + "-"):
            return
        if env.type == "result":
            kind = f"sale.{env.body['status']}"
        elif env.type in ENTRY_EVENTS:
            kind = ENTRY_EVENTS[env.type]
        else:
            return
        try:
            sale = self.core.sale(sale_id)
        except MeshposError:  # a void or result that arrived before its sale: the sale brings it
            return
        self._track(sale)
        self.journal.append(kind, sale)

    def tick(self) -> None:
        now = self.core.clock.now_ms()
        for sale_id, ends in sorted(self.windows.items(), key=lambda kv: kv[1]):
            if ends > now:
                break
            del self.windows[sale_id]
            self.held.pop(sale_id, None)
            try:
                sale = self.core.sale(sale_id)
            except MeshposError:
                continue
            if sale["status"] == "expired":
                self.journal.append("sale.expired", sale)
        self.replicated()
        status = self.node_status()
        if status != self.last_status:
            self.last_status = status
            self.journal.append("node.status", status)

    def replicated(self) -> None:
        if not self.held:
            return
        index = self.core.held_index()
        for sale_id in sorted(self.windows):
            row = self.core.store.sale(sale_id)
            if row is None:
                continue
            held = self.core.held_by(row, index)
            if held != self.held.get(sale_id):
                self.held[sale_id] = held
                self.journal.append("sale.replicated", self.core.sale_json(row, index))

    def node_status(self) -> dict[str, Any]:
        """The node state a till shows (the same as ``GET /v1/status``'s ``summary``)."""
        node = self.node
        pending = pending_of(self.core, self.core.node_id)
        oldest = pending.oldest_created_at
        return {
            "node_id": self.core.node_id, "peers": len(node.mesh.linked_peers()), "uplink": node.uplink.state(),
            "printer": node.printer_seen().state, "battery": node.publisher.battery_percent(),
            "pending": {"count": pending.count, "amount_minor": pending.amount_minor,
                        "window_ends_at": None if oldest is None else iso(oldest + self.core.policy.offline_window_ms)},
        }

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except MeshposError as exc:  # the store is busy or full: the next tick tries again
                log.warning("terminal API events: %s", exc)
            await trio.sleep(TICK_S)
