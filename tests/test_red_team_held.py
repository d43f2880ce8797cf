"""Red team: a validly signed ``held`` vector that lies (protocols/link.md, "What a node holds").

Before, one status of a hostile enrolled node claiming every terminal's sales up to 2^53 counted it
as a holder of every sale, those made later included: a terminal cut off from the whole mesh showed
its cashier each new card sale "held on 2", and the inspector's at-risk list stayed empty. Now a
claim about a terminal's own sales covers, on that terminal, only those made when it arrived."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.status.board import StatusBoard
from meshpos.wire import envelope, heldvec

VISA = "4111111111111111"


def test_a_lying_held_vector_never_covers_sales_made_after_it(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    a, liar = open_node(make_node("A")), open_node(make_node("L"))
    for x, y in ((a, liar), (liar, a)):
        x.ingest(y.ledger.raw(f"cert/{y.node_id}") or b"", "peer")
    board = StatusBoard(a.roster, clock)
    board.on_new.append(a.holders.update)
    first = a.sell(1000, card=a.seal_card(VISA, "1230"))

    def lie(at: int) -> bytes:  # validly signed: every sale of A, and of a terminal nobody knows
        held = heldvec.encode({a.node_id: 2 ** 53, "00000000000000f1": 2 ** 53})
        return envelope.seal("status", liar.node_id, {"status": {"at": at, "held": held}}, liar.key)

    board.offer(lie(clock.now_ms()), "liar")
    assert a.sale(first["id"])["held_by"] == 2  # it could have received that one: no vector proves otherwise
    later = a.sell(2000, card=a.seal_card(VISA, "1230"))  # made after the lie: only A holds it
    assert a.sale(later["id"])["held_by"] == 1
    assert [s["id"] for s in a.at_risk()] == [later["id"]]
    assert a.status().to_json()["at_risk"]["count"] == 1  # what the cashier's screen counts
    assert a.holders.index().others_holding("00000000000000f1", 1) == 1  # other terminals: taken whole
    clock.advance(1)  # the liar must keep sending: its next status covers what existed by then
    board.offer(lie(clock.now_ms()), "liar")
    assert a.sale(later["id"])["held_by"] == 2
