"""Warnings of the mesh view about batteries and clocks (issue 15), from gossiped statuses. Pure.

* **Clock.** A node's status carries its own estimate of its clock's offset (``clock``:
  ``{"offset_ms", "source", "peers"}``, meshpos.domain.clockskew); past WARN_SKEW_MS the view
  warns. The estimate also dates the status on true time for its freshness: a node whose clock
  is days behind is not "unheard of for days" when its statuses keep arriving.
* **Battery.** A status carries ``battery`` (%) and ``battery_low`` (below 15 % and not
  charging; an older node sends no flag: below 15 % then counts as low). A node on a low battery
  is warned about; louder for every pending sale that is held *only* by nodes on a low battery.
  Who holds a sale comes from the statuses' ``held`` vectors (meshpos.status.holders: a node
  holds sale ``(terminal, seq)`` when its vector says ``held[terminal] >= seq``) plus the
  terminal that made it; a revoked node holds nothing that counts. The pending sales themselves
  come from the viewer's own ledger (the inspector's, the dashboard node's): :class:`PendingSale`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from meshpos.domain.clockskew import describe, too_far
from meshpos.domain.currency import format_amount
from meshpos.domain.pace import LOW_BATTERY_PERCENT
from meshpos.wire.status import StatusBody

if TYPE_CHECKING:  # meshview imports this module
    from meshpos.status.meshview import NodeRow

MAX_OFFSET_MS = 10 * 365 * 86_400_000  # a reported offset beyond this is nonsense


def clock_offset_ms(status: StatusBody | None) -> int | None:
    """The offset a status reports of its own clock (positive: ahead), or None."""
    value = status.clock.offset_ms if status is not None and status.clock is not None else None
    if value is None or abs(value) > MAX_OFFSET_MS:
        return None
    return value


def battery_low(status: StatusBody | None) -> bool:
    if status is None:
        return False
    if status.battery_low is not None:
        return status.battery_low
    return status.battery is not None and status.battery < LOW_BATTERY_PERCENT


@dataclass(frozen=True)
class PendingSale:
    """A sale the viewer holds that still waits for its authorization."""

    sale_id: str
    terminal: str
    seq: int
    amount_minor: int

    @classmethod
    def of(cls, sale: Mapping[str, Any]) -> "PendingSale":
        """From a sale object (as `meshpos sales --json` and the terminal API give it)."""
        return cls(str(sale["id"]), str(sale["terminal"]), int(sale["seq"]), int(sale["amount_minor"]))


def holders_of(sale: PendingSale, nodes: Mapping[str, NodeRow], held: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The nodes (ids, among ``nodes``) known to hold ``sale``: the terminal that made it and every
    node whose held vector covers it (``held``: node id -> its status's vector)."""
    return sorted(node_id for node_id, n in nodes.items() if not n.revoked
                  and (node_id == sale.terminal or held.get(node_id, {}).get(sale.terminal, 0) >= sale.seq))


def field_warnings(nodes: Mapping[str, NodeRow], held: Mapping[str, Mapping[str, int]],
                   pending_sales: Sequence[PendingSale], warn: Callable[[NodeRow | None, str], None],
                   currency: str = "EUR") -> None:
    """Add the clock and battery warnings to ``nodes`` (meshview.analyze's node rows, which carry
    ``clock_offset_ms`` and ``battery_low``); ``held``: node id -> the held vector of its status."""
    for n in sorted(nodes.values(), key=lambda n: n.name):
        offset = n.clock_offset_ms
        if too_far(offset):
            assert offset is not None
            warn(n, f"{n.name}: its clock is {describe(offset)} (by {n.clock_source or 'its peers'}): "
                    "sale times, offline windows and the site's view of it are off; set its time")
        if n.battery_low:
            warn(n, f"{n.name}: battery {_level(n)}")
    # pending sales held only by nodes on a low battery, grouped by who holds them
    alone: dict[tuple[str, ...], list[PendingSale]] = {}
    for sale in pending_sales:
        who = holders_of(sale, nodes, held)
        if who and all(nodes[h].battery_low for h in who):
            alone.setdefault(tuple(who), []).append(sale)
    for group, sales in sorted(alone.items(), key=lambda kv: [nodes[h].name for h in kv[0]]):
        rows = sorted((nodes[h] for h in group), key=lambda r: r.name)
        names = ", ".join(f"{r.name} ({_level(r)})" for r in rows)
        amount = format_amount(sum(s.amount_minor for s in sales), currency)
        text = (f"{len(sales)} pending sale(s) ({amount} {currency}) held only by nodes on a low battery: {names}; "
                "charge one, or link a charged node to them before they die")
        warn(None, text)
        for r in rows:
            r.warnings.append(text)


def _level(n: NodeRow) -> str:
    return f"{n.battery} %" if n.battery is not None else "low"
