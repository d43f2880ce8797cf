"""The dashboard's pictures (issue 14, part 4) from a mesh view and from sales per hour: what each
element says (nodes, links, uplinks, partitions, bars), the layout's geometry, and escaping. The
markup is parsed as XML, as the page's DOMParser does."""

from __future__ import annotations

import itertools
import math
import xml.etree.ElementTree as ET
from typing import Any

from meshpos.domain.svg import esc, num
from meshpos.node.hourchart import PLOT_H, hour_chart
from meshpos.status.meshsvg import SPACING, layout, mesh_svg
from meshpos.status.meshview import Known, MeshView, analyze
from meshpos.wire.status import StatusBody

NS = {"s": "http://www.w3.org/2000/svg"}
NOW = 10_000_000_000
HOUR_S = 3600


def st(links: list[str], *, at: int = NOW, uplink: str | None = None, pending: int = 0,
       oldest: int | None = None) -> StatusBody:
    return StatusBody.from_json({"at": at, "every_ms": 2000, "links": [{"node": n} for n in links],
                                 "uplink": {"state": uplink},
                                 "pending": {"count": pending, "amount_minor": 1250 * pending,
                                             "oldest_created_at": oldest}})


def view_of(statuses: dict[str, StatusBody], known: dict[str, Known]) -> MeshView:
    return analyze(statuses, known, now_ms=NOW, offline_window_ms=24 * HOUR_S * 1000, warn_before_ms=HOUR_S * 1000)


KNOWN = {"gw": Known(name="Gateway", role="gateway"), "t1": Known(name="Stall 1", role="terminal"),
         "t2": Known(name="Stall 2", role="terminal"), "t3": Known(name="Stall 3", role="terminal")}


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def nodes_of(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-node", ""): g for g in root.iterfind(".//s:g[@data-node]", NS)}


def links_of(root: ET.Element) -> set[frozenset[str]]:
    return {frozenset((ln.get("data-a", ""), ln.get("data-b", ""))) for ln in root.iterfind(".//s:line[@class='link']", NS)}


def test_every_node_link_and_uplink_of_a_whole_mesh_is_drawn() -> None:
    statuses = {"gw": st(["t1", "t2"], uplink="up"), "t1": st(["gw", "t2"], uplink="down", pending=1,
                                                              oldest=NOW - 2 * HOUR_S * 1000),
                "t2": st(["gw", "t1"], uplink="off")}  # t3: enrolled, never heard from
    root = parse(mesh_svg(view_of(statuses, KNOWN)))
    nodes = nodes_of(root)
    assert set(nodes) == {"gw", "t1", "t2", "t3"}
    assert links_of(root) == {frozenset(p) for p in (("gw", "t1"), ("gw", "t2"), ("t1", "t2"))}
    assert root.get("data-partition") == "false" and root.get("data-parts") == "1"
    # who has uplink: a filled marker on the node whose uplink is up, a hollow one when down, none when off
    up = nodes["gw"].find("s:g[@data-state]", NS)
    assert up is not None and up.get("class") == "uplink up" and up.get("data-state") == "up"
    down = nodes["t1"].find("s:g[@data-state]", NS)
    assert down is not None and down.get("class") == "uplink" and down.get("data-state") == "down"
    assert nodes["t2"].find("s:g[@data-state]", NS) is None and nodes["t2"].get("data-uplink") == "off"
    # names, and the offline window of the oldest pending sale: 24 h - 2 h
    assert nodes["gw"].findtext("s:text[@class='name']", namespaces=NS) == "Gateway"
    assert nodes["t1"].findtext("s:text[@class='detail']", namespaces=NS) == "pending 1 · 22 h 00 min left"
    assert "unreachable" in (nodes["t3"].get("class") or "") and "reachable" in (nodes["gw"].get("class") or "")
    # one part: no box for it; the node with no status sits in a box of its own
    boxes = root.findall(".//s:g[@data-part]", NS)
    boxes = [b for b in boxes if b.get("data-node") is None]
    assert [b.findtext("s:text", namespaces=NS) for b in boxes] == ["no status received"]


def test_a_cut_link_shows_as_a_partition_with_the_cut_off_part_boxed() -> None:
    statuses = {"gw": st(["t1"], uplink="up"), "t1": st(["gw"]),
                # t2 and t3 stopped hearing the gateway a minute ago; they still link to each other
                "t2": st(["gw", "t3"], at=NOW - 60_000), "t3": st(["t2"], at=NOW - 60_000)}
    view = view_of(statuses, KNOWN)
    assert view.partition
    root = parse(mesh_svg(view))
    assert root.get("data-partition") == "true" and root.get("data-parts") == "2"
    assert links_of(root) == {frozenset(("gw", "t1")), frozenset(("t2", "t3"))}  # the cut link is not drawn
    nodes = nodes_of(root)
    assert {k: v.get("data-part") for k, v in nodes.items()} == {"gw": "1", "t1": "1", "t2": "2", "t3": "2"}
    parts = {b.get("data-part"): b for b in root.iterfind("s:g[@data-part]", NS) if b.get("data-node") is None}
    assert parts["1"].findtext("s:text", namespaces=NS) == "part 1 of 2"
    assert parts["2"].findtext("s:text", namespaces=NS) == "part 2 of 2 (cut off)" and parts["2"].get("class") == "part cut"
    # each node is drawn inside its part's box
    for node_id, g in nodes.items():
        circle = g.find("s:circle", NS)
        assert circle is not None
        rect = parts[g.get("data-part")].find("s:rect", NS)
        assert rect is not None
        x, y = float(circle.get("cx", "")), float(circle.get("cy", ""))
        left, top = float(rect.get("x", "")), float(rect.get("y", ""))
        assert left < x < left + float(rect.get("width", "")) and top < y < top + float(rect.get("height", "")), node_id


def test_layout_spaces_nodes_keeps_boxes_apart_and_is_deterministic() -> None:
    ids = [f"n{i:02d}" for i in range(12)]
    known = {i: Known(name=f"T{i}", role="terminal") for i in ids}
    # two parts: a ring of 9 fresh nodes and 3 stale ones
    statuses = {i: st([ids[(k + 1) % 9], ids[(k - 1) % 9]]) for k, i in enumerate(ids[:9])}
    statuses.update({i: st([], at=NOW - 60_000) for i in ids[9:]})
    view = view_of(statuses, known)
    pic = layout(view)
    assert pic == layout(view) and mesh_svg(view) == mesh_svg(view)
    for a, b in itertools.combinations(pic.spots.values(), 2):
        if a.part == b.part:
            assert math.dist((a.x, a.y), (b.x, b.y)) >= SPACING * 0.99, (a, b)
    for one, two in itertools.combinations(pic.parts, 2):
        assert one.x + one.width <= two.x or two.x + two.width <= one.x
    for s in pic.spots.values():
        assert 0 < s.x < pic.width and 0 < s.y < pic.height
    first = [s for s in pic.spots.values() if s.part == 0]
    assert len(first) == 9 and min(first, key=lambda s: s.y).node_id == "n00"  # the first by name at the top


def test_a_site_of_200_terminals_is_a_grid_not_a_huge_ring() -> None:
    ids = [f"t{i:03d}" for i in range(200)]
    known = {i: Known(name=f"T{i}", role="terminal") for i in ids}
    statuses = {i: st([ids[(k + 1) % 200], ids[(k - 1) % 200]]) for k, i in enumerate(ids)}
    pic = layout(view_of(statuses, known))
    assert len(pic.spots) == 200 and len(pic.parts) == 1
    assert pic.width < 16 * SPACING and pic.height < 16 * SPACING  # 15 columns; a ring would be 64 spacings across
    for a, b in itertools.combinations(pic.spots.values(), 2):
        assert math.dist((a.x, a.y), (b.x, b.y)) >= SPACING * 0.99
    box = pic.parts[0]
    assert all(box.x < s.x < box.x + box.width and box.y < s.y < box.y + box.height for s in pic.spots.values())
    # split into 100 parts of two: the boxes wrap into rows, none overlaps another
    cut = {i: st([ids[k + 1 if k % 2 == 0 else k - 1]], at=NOW if k < 2 else NOW - 60_000) for k, i in enumerate(ids)}
    pic = layout(view_of(cut, known))
    assert len(pic.parts) == 100 and pic.width < 1700 and pic.height < 20 * 300
    for one, two in itertools.combinations(pic.parts, 2):
        assert (one.x + one.width <= two.x or two.x + two.width <= one.x
                or one.y + one.height <= two.y or two.y + two.height <= one.y)
    assert all(0 < s.x < pic.width and 0 < s.y < pic.height for s in pic.spots.values())


def test_a_hostile_name_cannot_break_the_markup() -> None:
    name = "<script>alert('x')</script> & \"q\" \x01\ud800"
    known = {"gw": Known(name=name, role="gateway")}
    svg = mesh_svg(view_of({"gw": st([])}, known))
    assert "<script" not in svg
    root = parse(svg)
    g = nodes_of(root)["gw"]
    assert g.get("data-name") == name.replace("\x01", "\ufffd").replace("\ud800", "\ufffd")
    assert g.findtext("s:text[@class='name']", namespaces=NS) == g.get("data-name")
    assert esc("a<b") == "a&lt;b" and num(-0.04) == "0" and num(12.0) == "12" and num(1.25) == "1.2"


def test_sales_per_hour_bars_by_method() -> None:
    hours = [{"hour": "2026-07-01T10:00:00Z", "card": {"count": 2, "amount_minor": 3250, "amount": "32.50"},
              "cash": {"count": 1, "amount_minor": 300, "amount": "3.00"}},
             {"hour": "2026-07-01T11:00:00Z", "card": {"count": 0, "amount_minor": 0, "amount": "0.00"},
              "cash": {"count": 2, "amount_minor": 1000, "amount": "10.00"}}]
    root = parse(hour_chart(hours, "EUR"))
    bars = {(b.get("data-hour"), b.get("data-method")): b for b in root.iterfind(".//s:rect[@data-method]", NS)}
    assert set(bars) == {(h["hour"], m) for h in hours for m in ("card", "cash")}
    card10 = bars[("2026-07-01T10:00:00Z", "card")]
    assert card10.get("data-count") == "2" and card10.get("data-amount") == "32.50" and card10.get("class") == "bar card"
    heights = {k: float(b.get("height", "")) for k, b in bars.items()}
    assert heights[("2026-07-01T10:00:00Z", "card")] == PLOT_H  # the largest amount fills the plot
    assert heights[("2026-07-01T11:00:00Z", "cash")] == round(PLOT_H * 1000 / 3250, 1)
    assert heights[("2026-07-01T11:00:00Z", "card")] == 0
    assert "32.50 EUR" in "".join(root.itertext())  # the axis names the top amount
    empty = parse(hour_chart([], "EUR"))
    assert empty.findall(".//s:rect[@data-method]", NS) == []
