"""The dashboard's data (issue 14, part 4): sales per hour by method and each terminal's offline
window, server-side in /api/state."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.node.dashboard import HOUR_MS, Dashboard

VISA = "4111111111111111"


def test_sales_per_hour_by_method_and_each_terminals_offline_window(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    t1, t2 = open_node(make_node("T1")), open_node(make_node("T2"))
    t1.ingest(t2.ledger.raw(f"cert/{t2.node_id}") or b"", "peer")
    clock.advance((HOUR_MS - clock.now_ms() % HOUR_MS) / 1000 + 60)  # one minute into an hour
    hour0 = clock.now_ms() // HOUR_MS * HOUR_MS
    card = t1.sell(1250, card=t1.seal_card(VISA, "1230"))
    t1.sell(300)
    other = t2.sell(2000, card=t2.seal_card(VISA, "1230"))
    t1.ingest(t2.ledger.raw(f"sale/{other['id']}") or b"", "peer")
    clock.advance(3600)
    t1.sell(450)
    t1.sell(550)
    clock.advance(1800)
    state = Dashboard(t1, None, None, "").state()
    hours = state["sales_per_hour"]
    assert [h["hour"][:13] for h in hours] == [t1_iso(hour0)[:13], t1_iso(hour0 + HOUR_MS)[:13]]
    assert hours[0]["card"] == {"count": 2, "amount_minor": 3250, "amount": "32.50"}
    assert hours[0]["cash"] == {"count": 1, "amount_minor": 300, "amount": "3.00"}
    assert hours[1]["card"]["count"] == 0 and hours[1]["cash"] == {"count": 2, "amount_minor": 1000, "amount": "10.00"}
    # the window of each terminal's oldest pending card sale, 1.5 h into a 24 h window
    terminals = {t["name"]: t for t in state["terminals"]}
    window_s = t1.policy.offline_window_s
    assert terminals["T1"]["window_left_s"] == window_s - 5400
    assert terminals["T1"]["window_closes_at"] == card["deadline"]
    assert terminals["T2"]["window_left_s"] == window_s - 5400 and terminals["T2"]["window_closes_at"] == other["deadline"]
    t1.void(card["id"])  # nothing pending left on T1: no window
    clock.advance(10)
    terminals = {t["name"]: t for t in Dashboard(t1, None, None, "").state()["terminals"]}
    assert terminals["T1"]["window_left_s"] is None and terminals["T2"]["window_left_s"] is not None


def t1_iso(ms: int) -> str:
    from meshpos.node.core import iso
    return iso(ms) or ""
