"""Red-team attacks with wrong clocks (protocols/clocks.md, protocols/rules.md "Caps"): a real node
core on its own SQLite file, its wall clock injected and moved as a device's clock moves."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from meshpos.domain.errors import PolicyError
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.site.sitedir import Site

VISA = "4111111111111111"


@pytest.mark.parametrize("back_s", [600, 3600, 6 * 3600])
def test_a_clock_set_back_does_not_free_the_terminals_cap(
        site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock,
        back_s: int) -> None:
    """Attack (a cashier at the cap, or a device whose clock resets): the terminal holds its whole
    stored-total cap in pending card sales and refuses the next one. Its clock is set back by
    more than the 5 min skew: its own pending sales are then dated "ahead" of it, and the caps
    counted only sales dated up to now + 5 min, so the terminal took a second full cap of card
    sales, all of them live at the switch (whose clock decides the window). A terminal's own
    pending sales now count against its caps whatever their date ahead of its clock."""
    site.update_policy(max_sale_minor=500_00, max_terminal_pending_minor=1_000_00,
                       max_site_pending_minor=10_000_00)
    node = open_node(make_node("t1"))
    assert node.policy.max_terminal_pending_minor == 1_000_00
    clock.advance(back_s + 60)  # the sales are made well after enrollment (the certificate's start)
    card = node.seal_card(VISA, "1230")
    node.sell(500_00, card=card)
    node.sell(500_00, card=card)
    with pytest.raises(PolicyError, match="cap"):
        node.sell(1_00, card=card)
    clock.advance(-back_s)
    with pytest.raises(PolicyError, match="cap"):
        node.sell(1_00, card=card)
    assert node.sell(1_00)["status"] == "paid"  # cash is final when taken: the cap is not about it
    assert sum(1 for s in node.sales() if s["method"] == "card") == 2
