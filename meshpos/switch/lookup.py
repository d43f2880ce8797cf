"""The switch's answer to a results lookup (protocols/forwarding.md, "Resuming a batch"): what it
already knows of sales a node sent without getting the answer, so the node forwards only the rest.
Reads the store only; settles nothing and sends nothing to the acquirer."""

from __future__ import annotations

from meshpos.switch.store import SwitchStore
from meshpos.wire.forwarding import ForwardReply, Pending


def results_for(store: SwitchStore, site_id: str, sale_ids: list[str]) -> ForwardReply:
    """The signed result of each named sale of ``site_id`` that is settled; ``pending`` for those
    received and not settled yet; sales of other sites, or never received, are not mentioned."""
    results: list[bytes] = []
    pending: list[Pending] = []
    wanted = list(dict.fromkeys(sale_ids))
    rows = store.sales_of(wanted)  # one read for the batch, whichever backend
    for sale_id in wanted:
        row = rows.get(sale_id)
        if row is None or row.site_id != site_id:
            continue
        if row.result is not None:
            results.append(row.result)
        else:
            pending.append(Pending(sale_id, "received, not settled yet: forward it again"))
    return ForwardReply(results=tuple(results), pending=tuple(pending))
