"""What goes into the terminal API's event journal, and when.

- ``sale.created``, ``sale.voided``, ``sale.approved`` / ``sale.declined`` / ``sale.expired`` /
  ``sale.rejected`` / ``sale.voided`` (a settlement result), ``sale.reversed``: from the ledger's
  accept hook, for this terminal's own sales, whichever node's uplink settled them (the result
  reaches this node by replication). The data is the sale object, as ``GET /v1/sales/{id}``. A
  sale this node takes is sent once it is durable, from ``NodeCore.on_sold``: the very object
  the seller was answered (idempotency key included), read once for both.
- ``sale.replicated``: the number of devices known to hold one of this terminal's sales
  (``held_by``) changed, as peers' statuses arrive; checked every ``TICK_S`` while the sale is
  pending (a card sale) or paid (cash: final when taken, but until other devices hold it, the
  loss of this one loses the record of the money in the till), up to the end of the offline window
  from its creation. Only a change of the statuses' held vectors makes the check read anything.
- ``sale.expired`` also when a card sale's offline window ends with no result (a time, not an
  entry: checked every ``TICK_S``).
- ``node.status``: linked peers, uplink, printer, battery, this terminal's pending sales and the
  end of its offline window; checked every ``TICK_S``, sent when something changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from meshpos.domain.errors import MeshposError
from meshpos.site.roster import Verified
from meshpos.node.core import NodeCore, iso
from meshpos.node.runner import RunningNode
from meshpos.node.status_pub import pending_of
from meshpos.status.holders import HeldIndex
from meshpos.terminal.events import EventJournal

log = logging.getLogger(__name__)

TICK_S = 1.0
HELD_WATCHED = ("pending", "paid")  # the statuses in which a sale's held_by is followed live
ENTRY_EVENTS = {"sale": "sale.created", "void": "sale.voided", "reversal": "sale.reversed"}


@dataclass(frozen=True)
class Watched:
    """An own sale whose held_by is followed: its number, the end of its window, and how many other
    nodes held it when its held_by was last sent."""

    seq: int
    ends: int
    others: int


class EventFeed:
    def __init__(self, node: RunningNode, journal: EventJournal) -> None:
        self.node = node
        self.core: NodeCore = node.core
        self.journal = journal
        self.windows: dict[str, int] = {}  # own pending card sale -> when its window ends (ms)
        self.held: dict[str, Watched] = {}  # own sale whose held_by is followed -> as last sent
        self.held_seen: HeldIndex | None = None  # the held index of the last check
        self.last_status: dict[str, Any] | None = None
        for sale in self.core.sales(self.core.node_id):
            self._track(sale)
        self.core.ledger.on_accept.append(self.on_accept)
        self.core.on_sold.append(self.sold)

    def close(self) -> None:
        if self.on_accept in self.core.ledger.on_accept:
            self.core.ledger.on_accept.remove(self.on_accept)
        if self.sold in self.core.on_sold:
            self.core.on_sold.remove(self.sold)

    def _track(self, sale: dict[str, Any]) -> None:
        ends = int(sale["created_at_ms"]) + self.core.policy.offline_window_ms
        if sale["method"] == "card" and sale["status"] == "pending":
            self.windows[sale["id"]] = ends
        else:
            self.windows.pop(sale["id"], None)
        if sale["status"] in HELD_WATCHED and ends > self.core.clock.now_ms():
            if sale["id"] not in self.held:
                seq = int(sale["seq"])
                self.held[sale["id"]] = Watched(seq, ends, self._others(self.core.held_index(), seq))
        else:
            self.held.pop(sale["id"], None)

    def on_accept(self, verified: Verified) -> None:
        self.core.after_answer.run()  # a sale answered just now: its sale.created comes first
        env = verified.env
        sale_id = env.body.get("sale_id")
        if not isinstance(sale_id, str) or not sale_id.startswith(self.core.node_id + "-"):
            return
        if env.type == "sale" and sale_id == self.core.selling:
            return  # being sold here: ``sold`` sends it once it is durable, as the seller gets it
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

    def sold(self, sale: dict[str, Any]) -> None:
        """A sale this node took (NodeCore.on_sold): ``sale.created`` with the object the seller got."""
        self._track(sale)
        self.journal.append("sale.created", dict(sale))

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
        """``sale.replicated`` for each followed sale whose held_by changed since it was last sent.
        held_by counts this node and the others whose held vector covers the sale's number
        (NodeCore.held_by); while no vector changed (the index is the same cached one) nothing did."""
        now = self.core.clock.now_ms()
        for sale_id in [s for s, w in self.held.items() if w.ends <= now]:
            del self.held[sale_id]  # past its window: a card sale expired, a cash sale is old news
        index = self.core.held_index()
        if not self.held or index is self.held_seen:
            return
        self.held_seen = index
        for sale_id in sorted(self.held):
            watched = self.held[sale_id]
            others = self._others(index, watched.seq)
            if others == watched.others:
                continue
            row = self.core.store.sale(sale_id)
            if row is None:
                continue
            self.held[sale_id] = Watched(watched.seq, watched.ends, others)
            self.journal.append("sale.replicated", self.core.sale_json(row, index))

    def _others(self, index: HeldIndex, seq: int) -> int:
        """How many other nodes hold this node's sale number ``seq``: held_by's changing part."""
        return index.others_holding(self.core.node_id, seq)

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
