"""The battery warning (issue 15, part 5) from who holds what: the inspector warns when a pending
sale is held only by nodes below 15 % (meshpos.status.fieldwarn), and who holds a sale comes from
the statuses' held vectors (meshpos.status.holders), not from ledger sizes."""

from __future__ import annotations

from typing import Any

from meshpos.status.fieldwarn import PendingSale
from meshpos.status.meshview import Known, analyze
from meshpos.wire import heldvec
from meshpos.wire.status import StatusBody

NOW = 10 * 86_400_000
T1, T2, T3 = "a1" * 8, "b2" * 8, "c3" * 8
KNOWN = {T1: Known(name="T1", role="terminal"), T2: Known(name="T2", role="terminal"),
         T3: Known(name="T3", role="terminal")}


def status(battery: int, held: dict[str, int], entries: int = 20, **extra: Any) -> StatusBody:
    return StatusBody.from_json({"at": NOW, "every_ms": 10_000, "links": [], "battery": battery,
                                 "battery_low": battery < 15, "ledger": {"entries": entries},
                                 "held": heldvec.encode(held), **extra})


def warnings(statuses: dict[str, StatusBody], pending: list[PendingSale], known: dict[str, Known] = KNOWN) -> list[str]:
    return list(analyze(statuses, known, now_ms=NOW, offline_window_ms=86_400_000, warn_before_ms=3_600_000,
                        pending_sales=pending).warnings)


# T1 sold sales 1..5; 4 and 5 are pending (3 settled)
PENDING = [PendingSale(f"{T1}-4", T1, 4, 400), PendingSale(f"{T1}-5", T1, 5, 550)]


def test_a_pending_sale_held_only_by_low_batteries_is_warned_about() -> None:
    # T1 (9 %) holds its five sales, T2 (12 %) holds up to 5, T3 (80 %) only up to 3: sales 4 and 5
    # are held by T1 and T2 alone, both low; every node holds as many entries (the old rule's test)
    got = warnings({T1: status(9, {T1: 5}), T2: status(12, {T1: 5}), T3: status(80, {T1: 3})}, PENDING)
    alone = ("2 pending sale(s) (9.50 EUR) held only by nodes on a low battery: T1 (9 %), T2 (12 %); "
             "charge one, or link a charged node to them before they die")
    assert alone in got
    assert "T1: battery 9 %" in got and "T2: battery 12 %" in got and not any(w.startswith("T3") for w in got)


def test_one_charged_holder_is_enough_and_only_the_uncovered_sales_count() -> None:
    # T3 on a good battery holds up to 4: sale 4 is safe, sale 5 is held by low batteries only
    got = warnings({T1: status(9, {T1: 5}), T2: status(12, {T1: 5}), T3: status(80, {T1: 4})}, PENDING)
    assert any(w.startswith("1 pending sale(s) (5.50 EUR) held only by nodes on a low battery: T1 (9 %), T2 (12 %)")
               for w in got), got
    # T3 holds everything: the batteries are worth a word each, the sales are safe
    got = warnings({T1: status(9, {T1: 5}), T2: status(12, {T1: 5}), T3: status(80, {T1: 5})}, PENDING)
    assert "T1: battery 9 %" in got and not any("held only by" in w for w in got)


def test_a_node_that_is_behind_in_entries_but_holds_the_sales_counts_as_a_holder() -> None:
    # the old rule compared ledger sizes: T3 holds fewer entries (other terminals' sales it lacks)
    # but does hold all of T1's, so nothing of T1 depends on low batteries alone
    got = warnings({T1: status(9, {T1: 5}, entries=40), T3: status(80, {T1: 5}, entries=12)}, PENDING)
    assert not any("held only by" in w for w in got), got


def test_a_revoked_node_holds_nothing_that_counts() -> None:
    known = {**KNOWN, T3: Known(name="T3", role="terminal", revoked=True)}
    got = warnings({T1: status(9, {T1: 5}), T3: status(80, {T1: 5})}, PENDING, known)
    assert any(w.startswith("2 pending sale(s) (9.50 EUR) held only by nodes on a low battery: T1 (9 %);")
               for w in got), got


def test_sales_held_by_a_charging_node_or_unknown_batteries_are_not_warned_about() -> None:
    got = warnings({T1: status(9, {T1: 5}, battery_low=False)}, PENDING)  # charging: not low
    assert not any("battery" in w for w in got), got
    got = warnings({T1: StatusBody.from_json({"at": NOW, "every_ms": 10_000, "links": [],
                                              "held": heldvec.encode({T1: 5})})}, PENDING)
    assert not any("battery" in w for w in got), got
