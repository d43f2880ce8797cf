"""Cash is final when taken (issue 14, part 4): no view shows or counts a cash sale as pending
authorization: the sale object (`sales`), `status`, the status gossip (inspector and dashboard
terminal columns), the dashboard's queue and totals, the report. One test per place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from meshpos.node.core import NodeCore
from meshpos.node.dashboard import Dashboard
from meshpos.node.receipts import receipt_data
from meshpos.node.report import collect, render_text, summarize
from meshpos.node.status_pub import pending_of
from tests.helpers import run_cli

VISA = "4111111111111111"


def three_cash_one_card(core: NodeCore) -> tuple[list[str], str]:
    cash = [core.sell(amount)["id"] for amount in (300, 450, 1000)]
    card = core.sell(1250, card=core.seal_card(VISA, "1230"))["id"]
    return cash, card


def test_the_sale_object_shows_cash_paid_with_no_deadline(make_node: Callable[..., Path]) -> None:
    path = make_node("T1")
    core = NodeCore.open(path)
    try:
        cash, card = three_cash_one_card(core)
    finally:
        core.close()
    listed = {s["id"]: s for s in json.loads(run_cli("sales", str(path), "--json", check=True).stdout)}
    assert [listed[i]["status"] for i in cash] == ["paid"] * 3
    assert all(listed[i]["deadline"] is None for i in cash)
    assert listed[card]["status"] == "pending" and listed[card]["deadline"]
    text = run_cli("sales", str(path), check=True).stdout
    assert text.count(" paid ") == 3 and text.count(" pending ") == 1


def test_status_and_the_gossiped_pending_count_card_sales_only(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> None:
    core = open_node(make_node("T1"))
    three_cash_one_card(core)
    st = core.status().to_json()
    assert st["pending"]["count"] == 1 and st["pending"]["amount_minor"] == 1250
    assert st["sales"]["by_status"]["paid"] == 3 and st["sales"]["by_status"]["pending"] == 1
    # what the status gossip carries, hence the inspector's and the dashboard's PENDING columns
    for terminal in (core.node_id, None):
        assert pending_of(core, terminal).count == 1 and pending_of(core, terminal).amount_minor == 1250


def test_the_dashboard_counts_no_cash_sale_as_pending(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> None:
    """The issue's reproduction: three cash sales were counted pending on the dashboard."""
    core = open_node(make_node("T1"))
    for amount in (300, 450, 1000):
        core.sell(amount)
    dash = Dashboard(core, None, None, "")
    state = dash.state()
    assert state["queue"]["pending"] == 0 and state["queue"]["window_left_s"] is None
    settled = {s["status"]: s["count"] for s in state["settled"]}
    assert settled["pending"] == 0 and settled["paid"] == 3
    assert state["at_risk"]["sales"] == []  # nothing is pending, so nothing is at risk
    card = core.sell(1250, card=core.seal_card(VISA, "1230"))["id"]
    core.clock.advance(10)  # the sales summary is cached for 5 s
    state = dash.state()
    assert state["queue"]["pending"] == 1 and state["queue"]["amount"] == "12.50"
    # the card sale is held by this node alone: at risk, with its terminal and amount
    assert [(s["id"], s["terminal_name"], s["amount"], s["held_by"]) for s in state["at_risk"]["sales"]] == [
        (card, "T1", "12.50", 1)]


def test_the_report_lists_no_cash_sale_as_pending(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> None:
    core = open_node(make_node("T1"))
    cash, card = three_cash_one_card(core)
    rep = summarize(collect(core))
    assert [p["sale_id"] for p in rep["pending"]] == [card]
    assert rep["site"]["by_status"]["paid"]["count"] == 3
    assert "1 sale(s) still pending" in render_text(rep)


def test_a_paid_cash_sale_can_be_voided_and_prints_as_paid(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> None:
    core = open_node(make_node("T1"))
    sale = core.sell(300)
    assert receipt_data(core, sale).method == "cash"  # a paid sale makes a valid receipt
    assert core.void(sale["id"], "wrong change")["status"] == "voided"
