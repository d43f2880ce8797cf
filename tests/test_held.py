"""How many devices hold a sale (issue 14, part 3): ``held_by`` and "at risk" computed from the
``held`` vectors of the statuses a node receives (the vector itself: tests/test_heldvec.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.node.status_pub import held_of
from meshpos.site.sitedir import Site
from meshpos.status.board import StatusBoard
from meshpos.wire import envelope, heldvec
from tests.helpers import run_cli

VISA = "4111111111111111"


# -- held_by and at risk, from statuses --------------------------------------------------------

def sell_card(core: NodeCore, amount: int) -> dict[str, Any]:
    return core.sell(amount, card=core.seal_card(VISA, "1230"))


def status_of(core: NodeCore, at: int) -> bytes:
    body = {"status": {"at": at, "held": heldvec.encode(held_of(core))}}
    return envelope.seal("status", core.node_id, body, core.key)


def test_held_by_counts_the_nodes_whose_status_says_they_hold_the_sale(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock,
        site: Site) -> None:
    a, b, c = (open_node(make_node(n)) for n in ("A", "B", "C"))
    for x, y in ((a, b), (a, c), (b, a), (b, c), (c, a), (c, b)):
        x.ingest(y.ledger.raw(f"cert/{y.node_id}") or b"", "peer")
    board = StatusBoard(a.roster, clock)
    board.on_new.append(a.holders.update)
    first = sell_card(a, 1000)
    cash = a.sell(500)
    assert a.sale(first["id"])["held_by"] == 1  # itself only: nobody said anything yet
    assert a.status().to_json()["at_risk"] == {"count": 1, "amount_minor": 1000, "min_holders": 2}
    assert [s["id"] for s in a.at_risk()] == [first["id"]]  # cash is final when taken: never at risk
    board.publish(status_of(a, clock.now_ms()))  # its own status changes nothing: it counts itself once
    assert a.sale(first["id"])["held_by"] == 1
    for peer in (b, c):
        peer.ingest(a.ledger.raw(f"sale/{first['id']}") or b"", "peer")
    board.offer(status_of(b, clock.now_ms()), "b")
    assert a.sale(first["id"])["held_by"] == 2 and a.sale(cash["id"])["held_by"] == 1
    assert a.status().to_json()["at_risk"]["count"] == 0 and a.at_risk() == []
    board.offer(status_of(c, clock.now_ms()), "c")
    second = sell_card(a, 2000)  # made after the statuses: nobody else is known to hold it yet
    listed = {s["id"]: s["held_by"] for s in a.sales()}
    assert listed == {first["id"]: 3, cash["id"]: 1, second["id"]: 1}
    assert [s["id"] for s in a.at_risk()] == [second["id"]]
    # a stale status still counts (what C holds is on its disk); a revoked node does not
    clock.advance(3600)
    assert a.sale(first["id"])["held_by"] == 3
    a.ingest(site.revoke(site.find_node("C"), "lost"), "organizer")
    assert a.sale(first["id"])["held_by"] == 2
    # a status whose held is garbage counts for nothing, and breaks nothing
    board.offer(envelope.seal("status", b.node_id, {"status": {"at": clock.now_ms(), "held": "!!"}}, b.key), "b")
    assert a.sale(first["id"])["held_by"] == 1


def test_an_inspector_does_not_count_itself(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> None:
    seller, insp = open_node(make_node("S")), open_node(make_node("I", role="inspector"))
    sale = sell_card(seller, 700)
    insp.ingest(seller.ledger.raw(f"cert/{seller.node_id}") or b"", "peer")
    insp.ingest(seller.ledger.raw(f"sale/{sale['id']}") or b"", "peer")
    assert insp.sale(sale["id"])["held_by"] == 0
    assert [s["id"] for s in insp.at_risk()] == [sale["id"]]


def test_meshpos_status_shows_the_terminals_own_at_risk_count(make_node: Callable[..., Path]) -> None:
    path = make_node("T1")
    core = NodeCore.open(path)
    try:
        sell_card(core, 1250)
        sell_card(core, 250)
        core.sell(990)  # cash: not at risk, not pending
    finally:
        core.close()
    out = run_cli("status", str(path), check=True).stdout
    assert "pending 2" in out
    assert "at risk: 2 of this terminal's pending sale(s) (15.00 EUR) held by fewer than 2 devices" in out
    assert "paid 1" in out
