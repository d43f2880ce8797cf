"""The state of the mesh from gossiped statuses: one table, site totals, warnings, topology.

Pure (``now_ms`` comes in): the inspector (``meshpos inspect``) and the
organizer dashboard both call :func:`analyze`, so they agree.

* A status is **fresh** while ``now - at <= STALE_FACTOR * every_ms`` (at least
  MIN_STALE_MS): statuses flood through the mesh, so a node whose status stops
  arriving is cut off from us, whichever path it used to take.
* A node is **reachable** when its status is fresh, or when we hold an open
  link to it and it never sent a status (an older node).
* **Star**: at least ``STAR_MIN_LEAVES`` fresh nodes besides one hub, and every
  link among the fresh nodes (a link both ends list: one node's word alone does not
  unmake a star) has the hub at one end, each of them on one: every
  sale goes through the hub (client isolation, or a network where the others
  cannot reach each other), and if the hub goes the others are cut off from each
  other. ``topology`` says so, and a warning names the hub.
* **Partition**: the link graph drawn from fresh statuses (an edge counts only
  between two fresh nodes: a working edge would carry the stale end's status)
  plus the stale nodes' last known links among themselves splits into more than
  one group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshpos.domain.jsonable import json_object
from meshpos.domain.roles import READ_ONLY_ROLES
from meshpos.domain.text import duration
from meshpos.wire.status import StatusBody
from meshpos.status.fieldwarn import PendingSale, battery_low, clock_offset_ms, field_warnings

STALE_FACTOR = 3
MIN_STALE_MS = 5_000
DEFAULT_EVERY_MS = 10_000


MAX_EVERY_MS = 60_000


def stale_after_ms(status: StatusBody | None) -> int:
    """How long after it was made a status stops being fresh (a period that is not a sane
    integer counts as the default one)."""
    every = status.every_ms if status is not None else None
    if every is None or not 0 < every <= MAX_EVERY_MS:
        every = DEFAULT_EVERY_MS
    return max(MIN_STALE_MS, STALE_FACTOR * every)
_NO_STATUS = StatusBody(at=0)  # what a node without a status says: nothing
UNSEEN_WARN_MS = 60_000  # "not heard from for a while"
STAR_MIN_LEAVES = 3  # a hub with two leaves is a line, not yet worth a word


@dataclass(frozen=True)
class Known:
    """What we know of a node apart from its status: roster, discovery, our own link."""

    name: str | None = None
    role: str | None = None
    address: str | None = None
    linked: bool = False
    rtt_ms: int | None = None
    revoked: bool = False


@dataclass
class NodeRow:
    """One node as the view sees it (the inspector's and the dashboard's row); ``to_json`` in the
    view's JSON (`meshpos inspect --json`) keeps these members in this order."""

    node_id: str
    name: str
    role: str
    address: str | None
    reachable: bool
    fresh: bool
    linked: bool
    rtt_ms: int | None
    status_age_s: float | None
    ledger_entries: int | None
    behind: int | None
    pending: int | None
    pending_amount_minor: int | None
    oldest_pending_age_s: float | None
    window_left_s: int | None
    uplink: str | None
    last_forward_at: int | None
    switch: str | None  # HOST:PORT of the switch instance it last reached
    printer: str | None
    battery: int | None
    battery_low: bool
    clock_offset_ms: int | None
    clock_source: str | None
    version: str | None
    links: list[str]
    revoked: bool
    refused: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Totals:
    """Site totals from the freshest view of each terminal's own pending sales."""

    nodes: int
    reachable: int
    pending: int
    pending_amount_minor: int
    oldest_pending_age_s: float | None
    window_left_s: int | None
    max_ledger_entries: int | None
    currency: str


@dataclass(frozen=True)
class Topology:
    shape: str  # "star" | "mesh"
    hub: str | None  # a star's hub: its name in the view (its node id inside analyze)


@dataclass
class MeshView:
    """What :func:`analyze` makes of the statuses: one typed value for the inspector, the
    dashboard and its picture; ``to_json()`` is the view's JSON."""

    nodes: list[NodeRow]
    totals: Totals
    warnings: list[str]
    partition: bool
    topology: Topology
    groups: list[list[str]]  # node names of each part, largest part first
    edges: list[list[str]]  # [name, name] of each link counted
    # the same by node id (names need not be unique): the dashboard's picture (meshsvg)
    edge_ids: list[list[str]]
    group_ids: list[list[str]]
    generated_at: int
    offline_window_s: int

    def to_json(self) -> dict[str, Any]:
        return json_object(self)


@dataclass
class _Uf:
    parent: dict[str, str] = field(default_factory=dict)

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _age_s(now_ms: int, at: int | None) -> float | None:
    return None if at is None else round(max(0, now_ms - at) / 1000, 1)


def _links(status: StatusBody | None, known: dict[str, Known]) -> list[str]:
    """The nodes a status says it is linked to, minus those the roster calls inspectors."""
    out = []
    for link in status.links if status is not None else ():
        role = known[link.node].role if link.node in known else link.role
        if role not in READ_ONLY_ROLES:
            out.append(link.node)
    return out


def analyze(statuses: Mapping[str, StatusBody], known: dict[str, Known], *, now_ms: int,
            offline_window_ms: int, warn_before_ms: int, currency: str = "EUR",
            me: str | None = None, pending_sales: Sequence[PendingSale] = ()) -> MeshView:
    """``statuses``: node id -> its status; ``known``: node id -> Known; ``pending_sales``: the
    pending sales the viewer holds (for the battery warning: meshpos.status.fieldwarn)."""
    ids = sorted((set(statuses) | set(known)) - {me})
    nodes: dict[str, NodeRow] = {}
    fresh: set[str] = set()
    for node_id in ids:
        st = statuses.get(node_id)
        k = known.get(node_id, Known())
        # who a node is comes from its certificate (the roster), never from what its status says
        role = k.role or "unknown"
        if role in READ_ONLY_ROLES or (k.revoked and st is None):
            continue
        at = st.at if st is not None else None
        offset = clock_offset_ms(st)
        if at is not None and offset is not None:  # its time on our clock (fieldwarn: clocks)
            at = at - offset
        is_fresh = at is not None and now_ms - at <= stale_after_ms(st)
        if is_fresh:
            fresh.add(node_id)
        body = st if st is not None else _NO_STATUS
        oldest = body.pending.oldest_created_at
        addr = k.address
        if addr is None and body.addresses and body.port:
            addr = f"{body.addresses[0]}:{body.port}"
        nodes[node_id] = NodeRow(
            node_id=node_id, name=k.name or node_id, role=role,
            address=addr, reachable=bool(is_fresh or (k.linked and st is None)), fresh=is_fresh,
            linked=k.linked, rtt_ms=k.rtt_ms, status_age_s=_age_s(now_ms, at),
            ledger_entries=body.ledger.entries, behind=None,
            pending=body.pending.count, pending_amount_minor=body.pending.amount_minor,
            oldest_pending_age_s=_age_s(now_ms, oldest),
            window_left_s=None if oldest is None else round((oldest + offline_window_ms - now_ms) / 1000),
            uplink=body.uplink.state, last_forward_at=body.uplink.last_forward_at,
            switch=body.uplink.switch,
            printer=body.printer.state, battery=body.battery,
            battery_low=battery_low(st), clock_offset_ms=offset,
            clock_source=body.clock.source if body.clock is not None else None,
            version=body.version, links=_links(st, known),
            revoked=k.revoked)
    # sales of a terminal that the site's rules refuse, as the freshest statuses count them (a
    # terminal's own status may lie about itself; any honest node's count shows it)
    for node_id, st in statuses.items():
        if node_id not in fresh:
            continue
        for terminal, count in st.refused.by_terminal.items():
            if terminal in nodes and count:
                nodes[terminal].refused = max(nodes[terminal].refused, count)
    entries = [n.ledger_entries for n in nodes.values() if n.fresh and n.ledger_entries is not None]
    top = max(entries) if entries else None
    for n in nodes.values():
        if top is not None and n.ledger_entries is not None:
            n.behind = max(0, top - n.ledger_entries)

    # topology
    edges: set[tuple[str, str]] = set()
    claimed: set[tuple[str, str]] = set()  # (a, b): a's status lists a link to b
    uf = _Uf()
    with_status = [i for i in nodes if i in statuses]
    for a in with_status:
        uf.find(a)
        for b in nodes[a].links:
            if b not in nodes:
                continue
            claimed.add((a, b))
            if (a in fresh) == (b in fresh) and b in statuses:
                edges.add((min(a, b), max(a, b)))
                uf.union(a, b)
    groups_map: dict[str, list[str]] = {}
    for a in with_status:
        groups_map.setdefault(uf.find(a), []).append(a)
    groups = sorted((sorted(g, key=lambda i: nodes[i].name) for g in groups_map.values()),
                    key=lambda g: (-sum(1 for i in g if i in fresh), nodes[g[0]].name))

    warnings: list[str] = []

    def warn(node: NodeRow | None, text: str) -> None:
        warnings.append(text)
        if node is not None:
            node.warnings.append(text)

    for n in sorted(nodes.values(), key=lambda n: n.name):
        if not n.reachable:
            if n.status_age_s is None:
                warn(n, f"{n.name} is unreachable: no status ever received")
            elif n.status_age_s * 1000 >= UNSEEN_WARN_MS:
                warn(n, f"{n.name} is unreachable: not heard from for {duration(n.status_age_s)}")
            else:
                warn(n, f"{n.name} is unreachable: its status is stale "
                        f"({duration(n.status_age_s)} old) while others are fresh"
                     if fresh else f"{n.name} is unreachable: its status is stale")
        if n.window_left_s is not None and n.pending:
            left = n.window_left_s * 1000
            if left <= 0:
                warn(n, f"{n.name}: the offline window of its oldest pending sale has closed")
            elif left <= warn_before_ms:
                warn(n, f"{n.name}: offline window closes in {duration(left / 1000)} "
                        f"for {n.pending} pending sale(s): get an uplink")
        if n.printer in ("unreachable", "paper_out", "cover_open", "misconfigured"):
            warn(n, f"{n.name}: printer {n.printer}")
        if n.refused:
            warn(n, f"{n.name}: {n.refused} of its sales refused by the site's rules "
                    "(kept out of every total; reasons in `meshpos report`)")
    # a star is hidden by one node listing links it does not have: there, count a link only when
    # both ends list it (each status is only its signer's word)
    topology = _topology(fresh, {e for e in edges if e in claimed and (e[1], e[0]) in claimed})
    if topology.shape == "star" and topology.hub is not None:
        hub = nodes[topology.hub]
        topology = Topology("star", hub.name)
        warn(hub, f"star: every link goes through {hub.name} (the other nodes do not link to each other: "
                  f"client isolation?); if {hub.name} fails they are cut off from each other")
    field_warnings(nodes, {i: st.held for i, st in statuses.items()}, pending_sales, warn, currency)
    partition = len(groups) > 1
    if partition:
        parts = " | ".join("{" + ", ".join(nodes[i].name for i in g) + "}" for g in groups)
        warnings.append(f"partition: the mesh is split into {len(groups)} parts that cannot reach each other: "
                        f"{parts}")
        for g in groups[1:]:
            for i in g:
                nodes[i].warnings.append("partition: cut off from the largest part of the mesh")

    listed = sorted(nodes.values(), key=lambda n: (n.role != "gateway", n.name))
    reachable = [n for n in listed if n.reachable]
    totals = Totals(
        nodes=len(listed), reachable=len(reachable),
        pending=sum(n.pending or 0 for n in listed),
        pending_amount_minor=sum(n.pending_amount_minor or 0 for n in listed),
        oldest_pending_age_s=max((n.oldest_pending_age_s for n in listed if n.oldest_pending_age_s is not None),
                                 default=None),
        window_left_s=min((n.window_left_s for n in listed if n.window_left_s is not None and n.pending),
                          default=None),
        max_ledger_entries=top, currency=currency)
    return MeshView(nodes=listed, totals=totals, warnings=warnings, partition=partition, topology=topology,
                    groups=[[nodes[i].name for i in g] for g in groups],
                    edges=sorted(sorted([nodes[a].name, nodes[b].name]) for a, b in edges),
                    edge_ids=sorted([a, b] for a, b in edges), group_ids=groups,
                    generated_at=now_ms, offline_window_s=offline_window_ms // 1000)


def _topology(fresh: set[str], edges: set[tuple[str, str]]) -> Topology:
    """A star with its hub's node id when every link among the fresh nodes goes through one of
    them (module docstring), else a mesh."""
    live = {e for e in edges if e[0] in fresh and e[1] in fresh}
    if len(fresh) >= STAR_MIN_LEAVES + 1 and len(live) == len(fresh) - 1:
        common = set.intersection(*(set(e) for e in live))
        if len(common) == 1:
            return Topology("star", common.pop())
    return Topology("mesh", None)


def dot_escape(text: object) -> str:
    """Text inside a DOT double-quoted string, shown as it is: a backslash is doubled (Graphviz
    reads \\n, \\N, \\l... in labels), a quote escaped, a control character written as its escape."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ord(ch) < 32 or 127 <= ord(ch) < 160 or ch in "\u2028\u2029":
            out.append("\\\\" + ch.encode("unicode_escape").decode("ascii")[1:])  # newline: \\n, shown as \n
        else:
            out.append(ch)
    return "".join(out)


def to_dot(view: MeshView) -> str:
    """The link topology as a Graphviz graph: fresh nodes green, unreachable ones red and dashed.
    Every name is escaped (dot_escape): a name cannot break the graph or inject attributes."""
    def q(text: str) -> str:
        return '"' + dot_escape(text) + '"'

    lines = ["graph meshpos {", "  node [shape=box, style=rounded, fontname=Helvetica];"]
    hub = view.topology.hub
    for n in view.nodes:
        color = "darkgreen" if n.reachable else "red"
        style = "rounded" if n.reachable else "rounded,dashed"
        pending = n.pending if n.pending is not None else "?"
        label = f"{dot_escape(n.name)}\\n{dot_escape(n.role)}, pending {dot_escape(pending)}"
        if n.rtt_ms is not None:
            label += f"\\nrtt {dot_escape(n.rtt_ms)} ms"
        if n.name == hub:
            label += "\\nhub of a star"
            style += ",bold"
        lines.append(f"  {q(n.name)} [label=\"{label}\", color={color}, style=\"{style}\"];")
    for a, b in view.edges:
        lines.append(f"  {q(a)} -- {q(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
