"""The state of the mesh from gossiped statuses: one table, site totals, warnings, topology.

Pure (``now_ms`` comes in): the inspector (``meshpos inspect``) and the
organizer dashboard both call :func:`analyze`, so they agree.

* A status is **fresh** while ``now - at <= STALE_FACTOR * every_ms`` (at least
  MIN_STALE_MS): statuses flood through the mesh, so a node whose status stops
  arriving is cut off from us, whichever path it used to take.
* A node is **reachable** when its status is fresh, or when we hold an open
  link to it and it never sent a status (an older node).
* **Partition**: the link graph drawn from fresh statuses (an edge counts only
  between two fresh nodes: a working edge would carry the stale end's status)
  plus the stale nodes' last known links among themselves splits into more than
  one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshpos.status.fieldwarn import battery_low, clock_offset_ms, field_warnings

STALE_FACTOR = 3
MIN_STALE_MS = 5_000
DEFAULT_EVERY_MS = 10_000


MAX_EVERY_MS = 60_000


def stale_after_ms(status: dict[str, Any]) -> int:
    """How long after it was made a status stops being fresh (a period that is not a sane
    integer counts as the default one)."""
    every = status.get("every_ms")
    if not isinstance(every, int) or isinstance(every, bool) or not 0 < every <= MAX_EVERY_MS:
        every = DEFAULT_EVERY_MS
    return max(MIN_STALE_MS, STALE_FACTOR * every)
UNSEEN_WARN_MS = 60_000  # "not heard from for a while"
NON_NODE_ROLES = frozenset({"inspector"})


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


# A status is signed by its node, but only its ``at`` is checked on arrival: every other field is
# whatever that node wrote. Read through these, a field of the wrong type counts as absent and a
# text is cut short and stripped of control characters, so no status breaks a view or a terminal.
def _obj(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**15 else None


def _label(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return "".join(ch for ch in value[:40] if ch.isprintable()) or None


def _age_s(now_ms: int, at: int | None) -> float | None:
    return None if at is None else round(max(0, now_ms - at) / 1000, 1)


def _fmt_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _links(status: dict[str, Any] | None, known: dict[str, Known]) -> list[str]:
    """The nodes a status says it is linked to, minus those the roster calls inspectors."""
    out = []
    for link in (status or {}).get("links") or []:
        if not isinstance(link, dict) or not isinstance(link.get("node"), str):
            continue
        role = known[link["node"]].role if link["node"] in known else link.get("role")
        if role not in NON_NODE_ROLES:
            out.append(link["node"])
    return out


def analyze(statuses: dict[str, dict[str, Any]], known: dict[str, Known], *, now_ms: int,
            offline_window_ms: int, warn_before_ms: int, currency: str = "EUR",
            me: str | None = None) -> dict[str, Any]:
    """``statuses``: node id -> status object; ``known``: node id -> Known. JSON-ready view."""
    ids = sorted((set(statuses) | set(known)) - {me})
    nodes: dict[str, dict[str, Any]] = {}
    fresh: set[str] = set()
    for node_id in ids:
        st = statuses.get(node_id)
        k = known.get(node_id, Known())
        # who a node is comes from its certificate (the roster), never from what its status says
        role = k.role or "unknown"
        if role in NON_NODE_ROLES or (k.revoked and st is None):
            continue
        at = st.get("at") if st else None
        offset = clock_offset_ms(st)
        if at is not None and offset is not None:  # its time on our clock (fieldwarn: clocks)
            at = int(at) - offset
        is_fresh = at is not None and now_ms - int(at) <= stale_after_ms(st or {})
        if is_fresh:
            fresh.add(node_id)
        pend = _obj((st or {}).get("pending"))
        oldest = _count(pend.get("oldest_created_at"))
        addr = k.address
        addresses, port = (st or {}).get("addresses"), _count((st or {}).get("port"))
        if addr is None and isinstance(addresses, list) and addresses and _label(addresses[0]) and port:
            addr = f"{_label(addresses[0])}:{port}"
        uplink = _obj((st or {}).get("uplink"))
        printer = _obj((st or {}).get("printer"))
        nodes[node_id] = {
            "node_id": node_id, "name": k.name or node_id, "role": role,
            "address": addr, "reachable": bool(is_fresh or (k.linked and st is None)), "fresh": is_fresh,
            "linked": k.linked, "rtt_ms": k.rtt_ms, "status_age_s": _age_s(now_ms, at),
            "ledger_entries": _count(_obj((st or {}).get("ledger")).get("entries")), "behind": None,
            "pending": _count(pend.get("count")), "pending_amount_minor": _count(pend.get("amount_minor")),
            "oldest_pending_age_s": _age_s(now_ms, oldest),
            "window_left_s": None if oldest is None else round((oldest + offline_window_ms - now_ms) / 1000),
            "uplink": _label(uplink.get("state")), "last_forward_at": _count(uplink.get("last_forward_at")),
            "printer": _label(printer.get("state")), "battery": _count((st or {}).get("battery")),
            "battery_low": battery_low(st), "clock_offset_ms": offset,
            "clock_source": _label(_obj((st or {}).get("clock")).get("source")),
            "version": _label((st or {}).get("version")), "links": _links(st, known),
            "revoked": k.revoked, "refused": 0, "warnings": [],
        }
    # sales of a terminal that the site's rules refuse, as the freshest statuses count them (a
    # terminal's own status may lie about itself; any honest node's count shows it)
    for node_id, st in statuses.items():
        if node_id not in fresh:
            continue
        by_terminal = _obj(_obj((st or {}).get("refused")).get("by_terminal"))
        for terminal, count in by_terminal.items():
            if terminal in nodes and _count(count):
                nodes[terminal]["refused"] = max(nodes[terminal]["refused"], _count(count) or 0)
    entries = [n["ledger_entries"] for n in nodes.values() if n["fresh"] and n["ledger_entries"] is not None]
    top = max(entries) if entries else None
    for n in nodes.values():
        if top is not None and n["ledger_entries"] is not None:
            n["behind"] = max(0, top - n["ledger_entries"])

    # topology
    edges: set[tuple[str, str]] = set()
    uf = _Uf()
    with_status = [i for i in nodes if i in statuses]
    for a in with_status:
        uf.find(a)
        for b in nodes[a]["links"]:
            if b not in nodes:
                continue
            if (a in fresh) == (b in fresh) and b in statuses:
                edges.add((min(a, b), max(a, b)))
                uf.union(a, b)
    groups_map: dict[str, list[str]] = {}
    for a in with_status:
        groups_map.setdefault(uf.find(a), []).append(a)
    groups = sorted((sorted(g, key=lambda i: nodes[i]["name"]) for g in groups_map.values()),
                    key=lambda g: (-sum(1 for i in g if i in fresh), nodes[g[0]]["name"]))

    warnings: list[str] = []

    def warn(node: dict[str, Any] | None, text: str) -> None:
        warnings.append(text)
        if node is not None:
            node["warnings"].append(text)

    for n in sorted(nodes.values(), key=lambda n: n["name"]):
        if not n["reachable"]:
            if n["status_age_s"] is None:
                warn(n, f"{n['name']} is unreachable: no status ever received")
            elif n["status_age_s"] * 1000 >= UNSEEN_WARN_MS:
                warn(n, f"{n['name']} is unreachable: not heard from for {_fmt_duration(n['status_age_s'])}")
            else:
                warn(n, f"{n['name']} is unreachable: its status is stale "
                        f"({_fmt_duration(n['status_age_s'])} old) while others are fresh"
                     if fresh else f"{n['name']} is unreachable: its status is stale")
        if n["window_left_s"] is not None and n["pending"]:
            left = n["window_left_s"] * 1000
            if left <= 0:
                warn(n, f"{n['name']}: the offline window of its oldest pending sale has closed")
            elif left <= warn_before_ms:
                warn(n, f"{n['name']}: offline window closes in {_fmt_duration(left / 1000)} "
                        f"for {n['pending']} pending sale(s): get an uplink")
        if n["printer"] in ("unreachable", "paper_out", "cover_open", "misconfigured"):
            warn(n, f"{n['name']}: printer {n['printer']}")
        if n["refused"]:
            warn(n, f"{n['name']}: {n['refused']} of its sales refused by the site's rules "
                    "(kept out of every total; reasons in `meshpos report`)")
    field_warnings(nodes, lambda i: uf.find(i) if i in statuses else None, warn)
    partition = len(groups) > 1
    if partition:
        parts = " | ".join("{" + ", ".join(nodes[i]["name"] for i in g) + "}" for g in groups)
        warnings.append(f"partition: the mesh is split into {len(groups)} parts that cannot reach each other: "
                        f"{parts}")
        for g in groups[1:]:
            for i in g:
                nodes[i]["warnings"].append("partition: cut off from the largest part of the mesh")

    listed = sorted(nodes.values(), key=lambda n: (n["role"] != "gateway", n["name"]))
    reachable = [n for n in listed if n["reachable"]]
    # Site totals from the freshest view of each terminal's own pending sales.
    totals = {
        "nodes": len(listed), "reachable": len(reachable),
        "pending": sum(n["pending"] or 0 for n in listed),
        "pending_amount_minor": sum(n["pending_amount_minor"] or 0 for n in listed),
        "oldest_pending_age_s": max((n["oldest_pending_age_s"] for n in listed
                                     if n["oldest_pending_age_s"] is not None), default=None),
        "window_left_s": min((n["window_left_s"] for n in listed if n["window_left_s"] is not None and n["pending"]),
                             default=None),
        "max_ledger_entries": top, "currency": currency,
    }
    return {"nodes": listed, "totals": totals, "warnings": warnings, "partition": partition,
            "groups": [[nodes[i]["name"] for i in g] for g in groups],
            "edges": sorted(sorted([nodes[a]["name"], nodes[b]["name"]]) for a, b in edges),
            "generated_at": now_ms, "offline_window_s": offline_window_ms // 1000}


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


def to_dot(view: dict[str, Any]) -> str:
    """The link topology as a Graphviz graph: fresh nodes green, unreachable ones red and dashed.
    Every name is escaped (dot_escape): a name cannot break the graph or inject attributes."""
    def q(text: str) -> str:
        return '"' + dot_escape(text) + '"'

    lines = ["graph meshpos {", "  node [shape=box, style=rounded, fontname=Helvetica];"]
    rtt = {n["name"]: n["rtt_ms"] for n in view["nodes"]}
    for n in view["nodes"]:
        color = "darkgreen" if n["reachable"] else "red"
        style = "rounded" if n["reachable"] else "rounded,dashed"
        pending = n["pending"] if n["pending"] is not None else "?"
        label = f"{dot_escape(n['name'])}\\n{dot_escape(n['role'])}, pending {dot_escape(pending)}"
        if rtt.get(n["name"]) is not None:
            label += f"\\nrtt {dot_escape(rtt[n['name']])} ms"
        lines.append(f"  {q(n['name'])} [label=\"{label}\", color={color}, style=\"{style}\"];")
    for a, b in view["edges"]:
        lines.append(f"  {q(a)} -- {q(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
