"""The mesh as a picture: an inline SVG drawn from a mesh view (:func:`meshview.analyze`).

What it shows, and how a reader (or a test) finds it in the markup:

* each node: ``<g class="node ..." data-node=ID>``, a circle (green: reachable; red and dashed:
  not), its name, its pending sales and the time left in its oldest pending sale's offline
  window; the hub of a star is drawn with a thick ring;
* its uplink: ``<g class="uplink" data-state=STATE>`` beside the node for every state but "off"
  (filled green when "up": this node forwards the site's queue; hollow red when "down");
* each link the view counts: ``<line class="link" data-a=ID data-b=ID>``;
* a partition: every part of the mesh in its own dashed box, ``<g class="part" data-part=K>``,
  labelled "part K of N"; the parts beyond the largest are "cut off". Nodes that never sent a
  status are in a last box of their own (they belong to no part: nothing is known of their links).

Layout (:func:`layout`): the parts side by side, largest first (the view's order); the nodes of a
part on a circle, gateway first at the top, then by name (the view's order), spaced so that their
labels do not touch; a part of more than RING_MAX nodes in a square grid, row by row; boxes wrap
into rows past ROW_MAX. Deterministic: the same view gives the same picture. Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshpos.domain.svg import document, el
from meshpos.domain.text import duration
from meshpos.status.meshview import MeshView, NodeRow

NODE_R = 16.0
SPACING = 120.0  # between neighbouring nodes on a ring: room for their labels
PAD = 46.0  # inside a part's box, around its ring (labels under the lowest node)
GAP = 24.0  # between two boxes
TOP = 22.0  # room for a box's label
ROW_MAX = 1600.0  # boxes go on in a new row past this width (a split into many small parts)


@dataclass(frozen=True)
class Spot:
    node_id: str
    x: float
    y: float
    part: int  # index into Picture.parts


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    width: float
    height: float
    label: str
    cut: bool  # a part cut off from the largest one


@dataclass(frozen=True)
class Picture:
    width: float
    height: float
    spots: dict[str, Spot]
    parts: list[Box]


RING_MAX = 16  # a larger part is laid out in a grid: a ring of 200 would be 60 spacings across


def _ring_radius(n: int) -> float:
    if n <= 1:
        return 0.0
    return max(SPACING / 2, SPACING / (2 * math.sin(math.pi / n)))


def _cols(n: int) -> int:
    return math.ceil(math.sqrt(n))


def _span(n: int) -> float:
    """How wide (and high) the nodes of a part of ``n`` are drawn, centre to centre."""
    return 2 * _ring_radius(n) if n <= RING_MAX else (_cols(n) - 1) * SPACING


def _offsets(n: int) -> list[tuple[float, float]]:
    """Each node's place around the part's centre: a ring from the top, clockwise; or grid rows."""
    if n <= RING_MAX:
        r = _ring_radius(n)
        return [(r * math.cos(-math.pi / 2 + 2 * math.pi * j / n), r * math.sin(-math.pi / 2 + 2 * math.pi * j / n))
                for j in range(n)]
    cols = _cols(n)
    half = (cols - 1) * SPACING / 2
    return [(j % cols * SPACING - half, j // cols * SPACING - half) for j in range(n)]


def _parts(view: MeshView) -> list[list[str]]:
    """The node ids of each part, in the view's node order; the nodes with no status last."""
    order = [n.node_id for n in view.nodes]
    rank = {node_id: i for i, node_id in enumerate(order)}
    parts = [sorted((i for i in group if i in rank), key=rank.__getitem__) for group in view.group_ids]
    parts = [p for p in parts if p]
    placed = {i for p in parts for i in p}
    unplaced = [i for i in order if i not in placed]
    if unplaced:
        parts.append(unplaced)
    return parts


def layout(view: MeshView) -> Picture:
    parts = _parts(view)
    statused = len(view.group_ids)
    spots: dict[str, Spot] = {}
    boxes: list[Box] = []
    x, y, row_h, width = GAP, GAP, 0.0, 0.0
    for k, members in enumerate(parts):
        side = _span(len(members)) + 2 * PAD
        if x > GAP and x + side > ROW_MAX:  # a new row of boxes
            x, y, row_h = GAP, y + row_h + GAP, 0.0
        cx, cy = x + side / 2, y + TOP + side / 2 - PAD / 4
        for node_id, (dx, dy) in zip(members, _offsets(len(members))):
            spots[node_id] = Spot(node_id, cx + dx, cy + dy, k)
        if k >= statused:
            label, cut = "no status received", False
        elif statused > 1:
            label, cut = f"part {k + 1} of {statused}" + (" (cut off)" if k else ""), k > 0
        else:
            label, cut = "", False
        boxes.append(Box(x, y, side, side + TOP, label, cut))
        x += side + GAP
        row_h = max(row_h, side + TOP)
        width = max(width, x)
    return Picture(max(width, 2 * PAD), y + max(row_h, 2 * PAD) + GAP, spots, boxes)


def _detail(n: NodeRow) -> str:
    pending = n.pending
    if not pending:
        return "no pending sale" if pending == 0 else "pending unknown"
    left = n.window_left_s
    window = "" if left is None else (" · window closed" if left <= 0 else f" · {duration(left)} left")
    return f"pending {pending}{window}"


def mesh_svg(view: MeshView) -> str:
    """The picture of ``view`` as one ``<svg>`` element (module docstring)."""
    pic = layout(view)
    nodes = {n.node_id: n for n in view.nodes}
    hub = view.topology.hub
    out: list[str] = []
    for k, box in enumerate(pic.parts):
        if not box.label:
            continue
        out.append(el("g", {"class": "part cut" if box.cut else "part", "data-part": k + 1},
                      el("rect", {"x": box.x, "y": box.y, "width": box.width, "height": box.height, "rx": 10.0,
                                  "fill": "#fff5f5" if box.cut else "#f7f7f7",
                                  "stroke": "#b00" if box.cut else "#999", "stroke-dasharray": "6 4"}),
                      el("text", {"x": box.x + 8, "y": box.y + 16, "font-size": 13,
                                  "fill": "#b00" if box.cut else "#555"}, text=box.label)))
    for a, b in view.edge_ids:
        if a not in pic.spots or b not in pic.spots:
            continue
        pa, pb = pic.spots[a], pic.spots[b]
        out.append(el("line", {"class": "link", "data-a": a, "data-b": b, "x1": pa.x, "y1": pa.y,
                               "x2": pb.x, "y2": pb.y, "stroke": "#777", "stroke-width": 2}))
    for node_id, spot in pic.spots.items():
        n = nodes[node_id]
        up = n.reachable
        classes = ["node", "reachable" if up else "unreachable"] + (["hub"] if n.name == hub else [])
        parts = [el("title", None, text=f"{n.name} ({n.role}): " + ("reachable" if up else "unreachable")
                    + (f", uplink {n.uplink}" if n.uplink else "")),
                 el("circle", {"cx": spot.x, "cy": spot.y, "r": NODE_R, "fill": "#e6f4e6" if up else "#fde8e8",
                               "stroke": "#070" if up else "#b00", "stroke-width": 4 if n.name == hub else 2,
                               "stroke-dasharray": None if up else "4 3"}),
                 el("text", {"x": spot.x, "y": spot.y + 4, "text-anchor": "middle", "font-size": 12,
                             "font-weight": "bold", "fill": "#333"}, text=(n.role or "?")[:1].upper()),
                 el("text", {"class": "name", "x": spot.x, "y": spot.y + NODE_R + 15, "text-anchor": "middle",
                             "font-size": 13, "fill": "#222"}, text=n.name),
                 el("text", {"class": "detail", "x": spot.x, "y": spot.y + NODE_R + 30, "text-anchor": "middle",
                             "font-size": 11, "fill": "#555"}, text=_detail(n))]
        state = n.uplink
        if state and state != "off":
            on = state == "up"
            parts.append(el("g", {"class": "uplink up" if on else "uplink", "data-state": state},
                            el("title", None, text=f"uplink {state}"),
                            el("circle", {"cx": spot.x + NODE_R, "cy": spot.y - NODE_R, "r": 7.0,
                                          "fill": "#070" if on else "#fff", "stroke": "#070" if on else "#b00",
                                          "stroke-width": 2}),
                            el("text", {"x": spot.x + NODE_R, "y": spot.y - NODE_R + 4, "text-anchor": "middle",
                                        "font-size": 10, "fill": "#fff" if on else "#b00"}, text="↑")))
        out.append(el("g", {"class": " ".join(classes), "data-node": node_id, "data-name": n.name,
                            "data-role": n.role, "data-uplink": state, "data-part": spot.part + 1}, *parts))
    parts_n = len(view.group_ids)
    label = (f"the mesh: {len(pic.spots)} node(s), {len(view.edge_ids)} link(s)"
             + (f", split into {parts_n} parts" if view.partition else ""))
    return document(pic.width, pic.height, label, *out, cls="mesh",
                    attrs={"data-partition": "true" if view.partition else "false", "data-parts": parts_n})
