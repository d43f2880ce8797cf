"""Which nodes this node can reach now: the "reachable" of lease rule 1c (leases.py). Pure.

A node is reachable when this node holds an open link to it, or holds a fresh status of
it: one that arrived (on this node's clock) within its staleness bound
(``meshview.stale_after_ms``: three status periods, at least 5 s) and whose own time is
not older than that bound plus the allowed skew. Statuses flood through the mesh, so a
node that stops publishing, or that nothing links to any more, is unreachable within
that bound whichever path its statuses took. The second condition keeps an old status,
handed over again by a peer that links up later, from passing as fresh.
"""

from __future__ import annotations

from collections.abc import Collection

from meshpos.status.meshview import stale_after_ms
from meshpos.domain.rules import MAX_SKEW_MS
from meshpos.status.board import NodeStatus


def is_reachable(node_id: str, now_ms: int, linked: Collection[str], status: NodeStatus | None) -> bool:
    if node_id in linked:
        return True
    if status is None:
        return False
    bound = stale_after_ms(status.body)
    return now_ms - status.received_at_ms <= bound and now_ms - status.at <= bound + MAX_SKEW_MS
