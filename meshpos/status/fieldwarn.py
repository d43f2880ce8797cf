"""Warnings of the mesh view about batteries and clocks (issue 15), from gossiped statuses. Pure.

* **Clock.** A node's status carries its own estimate of its clock's offset (``clock``:
  ``{"offset_ms", "source", "peers"}``, meshpos.domain.clockskew); past WARN_SKEW_MS the view
  warns. The estimate also dates the status on true time for its freshness: a node whose clock
  is days behind is not "unheard of for days" when its statuses keep arriving.
* **Battery.** A status carries ``battery`` (%) and ``battery_low`` (below 15 % and not
  charging; an older node sends no flag: below 15 % then counts as low). A node on a low battery
  is warned about; louder when it has pending sales and no other node *known to hold them* has a
  good battery. Statuses do not say who holds which sale, so "known to hold" is: another fresh
  node in the same part of the mesh whose ledger holds at least as many entries as the low node's
  (every node replicates the whole ledger, so it holds the low node's sales unless it is behind).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

from meshpos.domain.clockskew import describe, too_far
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


def field_warnings(nodes: Mapping[str, NodeRow], group_of: Callable[[str], str | None],
                   warn: Callable[[NodeRow, str], None]) -> None:
    """Add the clock and battery warnings to ``nodes`` (meshview.analyze's node rows, which carry
    ``clock_offset_ms`` and ``battery_low``); ``group_of`` names a node's part of the mesh."""
    for n in sorted(nodes.values(), key=lambda n: n.name):
        offset = n.clock_offset_ms
        if too_far(offset):
            assert offset is not None
            warn(n, f"{n.name}: its clock is {describe(offset)} (by {n.clock_source or 'its peers'}): "
                    "sale times, offline windows and the site's view of it are off; set its time")
        if not n.battery_low:
            continue
        level = f"{n.battery} %" if n.battery is not None else "low"
        if not n.pending:
            warn(n, f"{n.name}: battery {level}")
            continue
        group = group_of(n.node_id)
        held_elsewhere = [m for m in nodes.values()
                          if m is not n and m.fresh and not m.battery_low and m.role != "inspector"
                          and group is not None and group_of(m.node_id) == group
                          and m.ledger_entries is not None and n.ledger_entries is not None
                          and m.ledger_entries >= n.ledger_entries]
        if held_elsewhere:
            warn(n, f"{n.name}: battery {level}")
        else:
            warn(n, f"{n.name}: battery {level} and {n.pending} pending sale(s) that no node with a good "
                    "battery is known to hold: charge it, or link it to the mesh before it dies")
