"""Sales per hour by method as an inline SVG bar chart (the dashboard's ``sales_per_hour``).

One group of bars per hour (UTC, oldest left), one bar per method (card, cash), its height the
amount taken in that hour by that method; each bar is ``<rect class="bar METHOD"
data-hour=ISO data-method=METHOD data-count=N data-amount=AMOUNT>`` with a tooltip. A y-axis
line at the largest amount. Pure.
"""

from __future__ import annotations

from typing import Any

from meshpos.domain.svg import document, el

METHOD_COLORS = {"card": "#2a6fdb", "cash": "#e39b1b"}
BAR_W = 14.0
GROUP_GAP = 12.0
LEFT = 64.0  # room for the amount axis labels
PLOT_H = 140.0
TOP = 26.0
BOTTOM = 30.0


def hour_chart(hours: list[dict[str, Any]], currency: str, methods: tuple[str, ...] = ("card", "cash")) -> str:
    group_w = BAR_W * len(methods) + GROUP_GAP
    width = LEFT + group_w * max(1, len(hours)) + GROUP_GAP
    height = TOP + PLOT_H + BOTTOM
    top = max((h[m]["amount_minor"] for h in hours for m in methods if m in h), default=0)
    out: list[str] = []
    for i, m in enumerate(methods):  # the legend
        x = LEFT + i * 80
        out.append(el("rect", {"x": float(x), "y": 6.0, "width": 10.0, "height": 10.0, "fill": METHOD_COLORS.get(m, "#888")}))
        out.append(el("text", {"x": float(x + 14), "y": 15.0, "font-size": 12, "fill": "#333"}, text=m))
    base = TOP + PLOT_H
    out.append(el("line", {"x1": LEFT - 4, "y1": base, "x2": width, "y2": base, "stroke": "#999"}))
    if top:
        max_label = next(h[m]["amount"] for h in hours for m in methods if m in h and h[m]["amount_minor"] == top)
        out.append(el("line", {"x1": LEFT - 4, "y1": TOP, "x2": width, "y2": TOP, "stroke": "#ddd"}))
        out.append(el("text", {"x": LEFT - 8, "y": TOP + 4, "text-anchor": "end", "font-size": 11, "fill": "#555"},
                      text=f"{max_label} {currency}"))
    out.append(el("text", {"x": LEFT - 8, "y": base + 4, "text-anchor": "end", "font-size": 11, "fill": "#555"},
                  text="0"))
    for k, h in enumerate(hours):
        x0 = LEFT + GROUP_GAP / 2 + k * group_w
        for i, m in enumerate(methods):
            b = h.get(m, {"count": 0, "amount_minor": 0, "amount": "0"})
            bar_h = PLOT_H * b["amount_minor"] / top if top else 0.0
            out.append(el("rect", {"class": f"bar {m}", "data-hour": h["hour"], "data-method": m,
                                   "data-count": b["count"], "data-amount": b["amount"],
                                   "x": x0 + i * BAR_W, "y": base - bar_h, "width": BAR_W - 2, "height": float(bar_h),
                                   "fill": METHOD_COLORS.get(m, "#888")},
                          el("title", None, text=f"{h['hour'][11:16]} UTC, {m}: {b['count']} sale(s), "
                                                 f"{b['amount']} {currency}")))
        out.append(el("text", {"x": x0 + BAR_W * len(methods) / 2, "y": base + 16, "text-anchor": "middle",
                               "font-size": 11, "fill": "#555"}, text=h["hour"][11:13] + "h"))
    label = f"sales per hour by method ({len(hours)} hour(s), UTC)"
    return document(width, height, label, *out, cls="per-hour")
