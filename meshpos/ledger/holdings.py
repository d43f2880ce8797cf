"""What this node holds of each terminal's sales, as a version vector (protocols/link.md,
"What a node holds").

Per terminal, the contiguous high-water mark: the greatest ``n`` such that sales
``1..n`` are all in the view. Kept incrementally: a sale accepted at ``n + 1``
advances the mark (and past any sales that arrived early, which wait in a small
set of their own); one that arrives after a gap waits in that set. Rebuilt from
the store when the ledger is (re)loaded. Pure: the ledger feeds it.
"""

from __future__ import annotations

from typing import Iterable


class Holdings:
    def __init__(self) -> None:
        self._mark: dict[str, int] = {}
        self._ahead: dict[str, set[int]] = {}  # seqs held beyond a gap, per terminal

    def rebuild(self, marks: Iterable[tuple[str, int]], ahead: Iterable[tuple[str, int]]) -> None:
        """Start again from the store: each terminal's contiguous mark, and the seqs held beyond it."""
        self._mark = {t: n for t, n in marks if n > 0}
        self._ahead = {}
        for terminal, seq in ahead:
            self.add(terminal, seq)

    def add(self, terminal: str, seq: int) -> None:
        """A sale of ``terminal`` with sequence number ``seq`` is now in the view."""
        mark = self._mark.get(terminal, 0)
        if seq <= mark:
            return
        waiting = self._ahead.get(terminal)
        if seq != mark + 1:
            self._ahead.setdefault(terminal, set()).add(seq)
            return
        mark = seq
        if waiting:
            while mark + 1 in waiting:
                mark += 1
                waiting.discard(mark)
            if not waiting:
                del self._ahead[terminal]
        self._mark[terminal] = mark

    def mark(self, terminal: str) -> int:
        return self._mark.get(terminal, 0)

    def highest(self, terminal: str) -> int:
        """The greatest sequence number of ``terminal`` held, gap or not (0: none)."""
        return max(self._ahead.get(terminal, ()), default=self.mark(terminal))

    def holds(self, terminal: str, seq: int) -> bool:
        return seq <= self.mark(terminal) or seq in self._ahead.get(terminal, ())

    def vector(self) -> dict[str, int]:
        """terminal -> contiguous high-water mark (terminals of which sale 1 is missing are absent)."""
        return dict(self._mark)
