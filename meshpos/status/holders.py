"""Who holds which sale: ``held_by`` from the ``held`` vectors of the nodes' statuses.

Every node's status carries, per terminal, the highest sequence number up to
which it holds that terminal's sales without a gap (meshpos.wire.heldvec,
protocols/link.md "What a node holds"). A node counts, for a sale ``(terminal,
seq)``, the other nodes whose newest status it holds says ``mark >= seq``, plus
itself when it holds the sale (an inspector does not count itself: it is no part
of the mesh's memory). A status that went stale still counts: what a node holds
is on its disk, whether or not we hear from it now; a revoked node does not.

A claim about this node's *own* sales covers only those it had made when the claim
arrived: that mark is cut to the highest sequence number of its own it held then
(``own``). A status (say a hostile node's ``2^53`` for every terminal) thus never
counts for a sale made after it: "held on 2" at a cashier means another node's
status arrived after the sale was made. (Claims about other terminals' sales are
taken whole: an observer may receive a sale after a status that truly covers it.)
What a member could have received it may claim, truly or not; no vector can prove
that it still has it.

A pending sale held by fewer than MIN_HOLDERS nodes is **at risk**: the loss of
one device loses it. Pure: statuses come in through ``update``.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable, Collection

from meshpos.status.board import NodeStatus

log = logging.getLogger(__name__)

MIN_HOLDERS = 2


def at_risk(status: str, held_by: int) -> bool:
    """The one rule: a sale still waiting for its authorization, held by too few nodes."""
    return status == "pending" and held_by < MIN_HOLDERS


class HeldIndex:
    """A frozen view: terminal -> the other nodes' marks, sorted, for a count by bisection."""

    def __init__(self, marks: dict[str, list[int]]) -> None:
        self._marks = marks

    def others_holding(self, terminal: str, seq: int) -> int:
        marks = self._marks.get(terminal)
        if not marks:
            return 0
        return len(marks) - bisect.bisect_left(marks, seq)


class Holders:
    def __init__(self, node_id: str, own: Callable[[], int] | None = None) -> None:
        self.node_id = node_id
        self.own = own  # the highest seq of this node's own sales it holds (None: claims taken whole)
        self._vectors: dict[str, dict[str, int]] = {}
        self._version = 0
        self._cached: tuple[int, frozenset[str], HeldIndex] | None = None

    def update(self, status: NodeStatus) -> None:
        """A newer verified status arrived (StatusBoard.on_new); our own is skipped."""
        if status.node_id == self.node_id:
            return
        vector = dict(status.body.held)  # a malformed one was read as empty (wire/status.py)
        if self.own is not None and self.node_id in vector:  # our sales: only those made before it came
            mark = min(vector[self.node_id], self.own())
            if mark > 0:
                vector[self.node_id] = mark
            else:
                del vector[self.node_id]
        if self._vectors.get(status.node_id) != vector:
            self._vectors[status.node_id] = vector
            self._version += 1

    def index(self, revoked: Collection[str] = ()) -> HeldIndex:
        """The current index, leaving out the ``revoked`` nodes (cached until a vector changes)."""
        gone = frozenset(revoked) & self._vectors.keys()
        if self._cached is not None and self._cached[0] == self._version and self._cached[1] == gone:
            return self._cached[2]
        marks: dict[str, list[int]] = {}
        for node, vector in self._vectors.items():
            if node in gone:
                continue
            for terminal, mark in vector.items():
                marks.setdefault(terminal, []).append(mark)
        for values in marks.values():
            values.sort()
        index = HeldIndex(marks)
        self._cached = (self._version, gone, index)
        return index
