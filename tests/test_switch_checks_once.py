"""Each check of a forwarded sale runs once at the switch (issue 16, CPU per sale).

A sale's body schema used to be checked twice (the batch's check, then the roster's) and its
card number's Luhn check three times (opening the sealed card data, ``rules.card_problem``, the
acquirer request's ``check_pan``). The verdicts are unchanged (tests/test_switch_content.py
keeps the poison sales' reasons); here, counted over a real batch at the switch's HTTPS API: one
schema check and one Luhn check per sale, and one policy lookup per sale.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshpos.domain import rules
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.site.roster import Roster
from meshpos.uplink.client import forward, make_client_context
from meshpos.uplink.forwarder import Forwarder
from meshpos.wire import envelope

from switch_harness import card_sale, running_switch, switch_dir

assert switch_dir  # a fixture, used by name

SALES = 12


async def test_a_forwarded_card_sale_is_schema_checked_and_luhn_checked_once(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    core = open_node(make_node("t"))
    sale_ids = [card_sale(core, 1000 + n) for n in range(SALES)]
    entries = Forwarder(core, clock).entries_for(sale_ids)
    counted: Counter[str] = Counter()
    check_schema, luhn_ok, policy_at = envelope.check_schema, rules.luhn_ok, Roster.policy_at

    def counting_schema(env: envelope.Envelope) -> None:
        counted[f"schema {env.type}"] += 1
        check_schema(env)

    def counting_luhn(pan: str) -> bool:
        counted["luhn"] += 1
        return luhn_ok(pan)

    def counting_policy_at(self: Roster, at_ms: int) -> Any:
        counted["policy_at"] += 1
        return policy_at(self, at_ms)

    async with running_switch(switch_dir, clock) as h:
        monkeypatch.setattr(envelope, "check_schema", counting_schema)
        monkeypatch.setattr(rules, "luhn_ok", counting_luhn)
        monkeypatch.setattr(Roster, "policy_at", counting_policy_at)
        reply = await forward(h.url, make_client_context(core), entries)
        monkeypatch.undo()
        assert sorted(envelope.decode(r).body["sale_id"] for r in reply.results) == sorted(sale_ids)
        assert all(envelope.decode(r).body["status"] == "approved" for r in reply.results)
        for sale_id in sale_ids:
            assert h.at_acquirer(sale_id) == {"0220": 1}
    assert counted["schema sale"] == SALES
    assert counted["luhn"] == SALES
    assert counted["policy_at"] == SALES
