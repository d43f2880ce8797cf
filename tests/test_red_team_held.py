"""Red team: a validly signed ``held`` vector that lies (protocols/link.md, "What a node holds").

Before, one status of a hostile enrolled node claiming every terminal's sales up to 2^53 counted it
as a holder of every sale, those made later included: a terminal cut off from the whole mesh showed
its cashier each new card sale "held on 2", and the inspector's at-risk list stayed empty. Now a
claim covers only the sales the receiver knew to exist when it arrived."""

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
    a, liar, insp = open_node(make_node("A")), open_node(make_node("L")), open_node(make_node("I", role="inspector"))
    for x, y in ((a, liar), (liar, a), (insp, a), (insp, liar)):
        x.ingest(y.ledger.raw(f"cert/{y.node_id}") or b"", "peer")
    boards = []
    for core in (a, insp):
        board = StatusBoard(core.roster, clock)
        board.on_new.append(core.holders.update)
        boards.append(board)
    first = a.sell(1000, card=a.seal_card(VISA, "1230"))
    insp.ingest(a.ledger.raw(f"sale/{first['id']}") or b"", "peer")

    def lie(at: int) -> bytes:  # validly signed: every sale of A, and of a terminal nobody knows
        held = heldvec.encode({a.node_id: 2 ** 53, "00000000000000f1": 2 ** 53})
        return envelope.seal("status", liar.node_id, {"status": {"at": at, "held": held}}, liar.key)

    for board in boards:
        board.offer(lie(clock.now_ms()), "liar")
    assert a.sale(first["id"])["held_by"] == 2  # it could have received that one: no vector proves otherwise
    later = a.sell(2000, card=a.seal_card(VISA, "1230"))  # made after the lie: only A holds it
    insp.ingest(a.ledger.raw(f"sale/{later['id']}") or b"", "peer")
    assert a.sale(later["id"])["held_by"] == 1
    assert [s["id"] for s in a.at_risk()] == [later["id"]]
    assert insp.sale(later["id"])["held_by"] == 0 and later["id"] in {s["id"] for s in insp.at_risk()}
    assert a.holders.index().others_holding("00000000000000f1", 1) == 0
    clock.advance(1)  # the liar must keep sending: its next status covers what existed by then
    for board in boards:
        board.offer(lie(clock.now_ms()), "liar")
    assert a.sale(later["id"])["held_by"] == 2
