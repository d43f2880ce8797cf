"""Short node ids against the roster: the width a node writes its status at, and which member of
the roster each record of a peer's status names (protocols/link.md, "Short ids").

* A sender writes every table of its status at the narrowest width (4..8 bytes) at which no two
  members of its roster (every certificate it holds, revoked ones included) share a prefix: 4 on
  any site but one where someone made such a pair on purpose (2^32 key pairs to match one given
  id), where the site moves to 5 for everyone who has that certificate.
* A reader counts a record only when its prefix is the start of exactly one member's id in its
  own roster. A prefix that names nobody (a certificate that has not arrived yet) or several (a
  member the sender did not know yet) is left out, and the reason logged: the status's other
  records and fields still count. When a certificate arrives, the statuses with a record its id
  starts with are read again (``StatusBoard``), so a link waits for the certificate, not for the
  next status.

No I/O: the roster comes in, what it says of the records goes out.
"""

from __future__ import annotations

import dataclasses

from meshpos.site.roster import Roster
from meshpos.wire.shortids import ID_BYTES, MIN_WIDTH, ShortTable, node_bytes, rtt_of
from meshpos.wire.status import LinkSeen, StatusBody

_SEVERAL = ""  # an index entry for a prefix that starts more than one member's id


class ShortIds:
    """The roster's ids by their leading bytes, rebuilt when a certificate is added (a roster only
    ever gains certificates: a revocation leaves the certificate in place)."""

    def __init__(self, roster: Roster) -> None:
        self.roster = roster
        self._size = -1
        self._by_width: dict[int, dict[bytes, str]] = {}
        self._width: int | None = None

    def _current(self) -> None:
        if len(self.roster.identities) != self._size:
            self._size = len(self.roster.identities)
            self._by_width = {}
            self._width = None

    def index(self, width: int) -> dict[bytes, str]:
        """prefix of ``width`` bytes -> the member whose id starts with it (_SEVERAL: more than one)."""
        self._current()
        index = self._by_width.get(width)
        if index is None:
            index = {}
            for node in self.roster.identities:
                raw = node_bytes(node)
                if raw is not None:
                    index[raw[:width]] = _SEVERAL if raw[:width] in index else node
            self._by_width[width] = index
        return index

    def width(self) -> int:
        """The narrowest width at which every member of the roster has a prefix of its own."""
        self._current()
        if self._width is None:
            self._width = next((w for w in range(MIN_WIDTH, ID_BYTES) if _SEVERAL not in self.index(w).values()),
                               ID_BYTES)
        return self._width

    def table(self, values: dict[str, int]) -> ShortTable:
        """``values`` (node id -> value) as a table at the roster's width: what a sender writes."""
        return ShortTable.of(self.width(), values)

    def names(self, table: ShortTable | None, problems: list[str]) -> dict[str, int] | None:
        """node id -> value of the records of ``table`` that name one member each (None for no
        table); why any record was left out is appended to ``problems``."""
        if table is None:
            return None
        if table.problem is not None:
            problems.append(table.problem)
            return {}
        if not table.records:
            return {}
        index = self.index(table.width)
        out: dict[str, int] = {}
        nobody = several = 0
        for prefix, value in table.records.items():
            node = index.get(prefix)
            if node is None:
                nobody += 1
            elif node == _SEVERAL:
                several += 1
            else:
                out[node] = value
        if nobody:
            problems.append(f"{nobody} record(s) of width {table.width} name no member of our roster "
                            f"(left out until a certificate names them)")
        if several:
            problems.append(f"{several} record(s) of width {table.width} name several members of our roster "
                            f"(left out)")
        return out

    def resolve(self, body: StatusBody) -> tuple[StatusBody, list[str]]:
        """``body`` with its short tables read against the roster: they stand for ``links`` and
        ``held`` (and are gone from the result); the reasons for any record left out. A body
        without short tables (an older sender) comes back as it is."""
        if body.links_short is None and body.held_short is None:
            return body, []
        problems: list[str] = []
        changes: dict[str, object] = {"links_short": None, "held_short": None}
        linked = self.names(body.links_short, problems)
        if linked is not None:
            identities = self.roster.identities
            changes["links"] = tuple(LinkSeen(node=node, role=identities[node].role, rtt_ms=rtt_of(value))
                                     for node, value in sorted(linked.items()))
        held = self.names(body.held_short, problems)
        if held is not None:
            changes["held"] = held
        return dataclasses.replace(body, **changes), problems  # type: ignore[arg-type]


def names_prefix_of(body: StatusBody | None, node: str) -> bool:
    """Whether a short table of ``body`` (as received) has a record that ``node``'s id starts with:
    what a new certificate may change in how that status reads."""
    raw = node_bytes(node)
    if body is None or raw is None:
        return False
    return any(t is not None and t.width and raw[:t.width] in t.records
               for t in (body.links_short, body.held_short))
