"""Content attacks: validly signed, harmful entries (protocols/rules.md).

H is an enrolled terminal with hostile code: it signs sales with its OWN real key that break the
site's rules (over the per-sale cap, a foreign or unknown currency, an absurd amount, a card
number in the description, an unknown card brand, a time far ahead). Each must be refused alone
by every honest node (kept in the ledger so every node reaches the same verdict, shown as refused
with the reason, out of every total and cap) while honest selling, listing and reporting go on.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpos.node import report

from meshpos.domain import rules
from meshpos.wire import envelope
from meshpos.wire.cards import seal_card
from meshpos.domain.errors import ContentError, InputError, PolicyError
from meshpos.wire.link import SUPPORTED_VERSIONS
from test_hostile import Mesh

DAY_MS = 24 * 3600 * 1000
VISA = "4111111111111111"


@pytest.fixture
def mesh(make_node, site, switch_key):
    m = Mesh(make_node, site, switch_key, SUPPORTED_VERSIONS)
    yield m
    m.close()


def h_sale(mesh: Mesh, seq: int, **changes: Any) -> tuple[str, bytes]:
    """A sale of H's own, signed with H's real key: authentic, whatever its content."""
    h = mesh.h.core
    body: dict[str, Any] = {
        "sale_id": envelope.sale_id(h.node_id, seq), "site": h.policy.site_id, "terminal": h.node_id,
        "seq": seq, "created_at": mesh.clock.now_ms(), "amount_minor": 500, "currency": "EUR",
        "method": "cash", "description": None, "items": [], "card": None}
    body.update(changes)
    return body["sale_id"], envelope.seal("sale", h.node_id, body, h.key)


def card_of(mesh: Mesh, pan: str = VISA, brand: str = "visa") -> dict[str, Any]:
    key = mesh.h.core.policy.switch_key_bytes
    assert key is not None
    capture = seal_card(pan, "1230", "chip", key)
    return {"brand": brand, "last4": capture.last4, "entry_mode": "chip", "sealed": envelope.b64e(capture.sealed)}


def publish(mesh: Mesh, items: dict[str, bytes]) -> None:
    """H puts the entries into its own log and its links carry them to A and B (and B to C)."""
    mesh.hostile_write(mesh.shard_of("h"), {f"sale/{sale_id}": raw for sale_id, raw in items.items()})


def views(mesh: Mesh) -> list[dict[str, dict[str, Any]]]:
    return [{s["id"]: s for s in node.core.sales()} for node in mesh.honest]


def test_harmful_sales_are_refused_alone_on_every_node(mesh: Mesh) -> None:
    mesh.sell("a", 2)
    mesh.pump()
    harmful = {
        "over the per-sale cap": h_sale(mesh, 1, amount_minor=2_000_000, method="card", card=card_of(mesh)),
        "foreign currency": h_sale(mesh, 2, currency="JPY", amount_minor=3000),
        "unknown currency": h_sale(mesh, 3, currency="XXX", amount_minor=10**12),
        "unknown brand": h_sale(mesh, 5, method="card", card=card_of(mesh, brand="evil")),
    }
    # free text holding a card number: not taken at all, so the number never spreads in the clear
    leaking = {
        "card number in text": h_sale(mesh, 4, description="paid with 4111 1111 1111 1111 exp 12/30"),
        "card number in an item": h_sale(mesh, 6, items=[{"name": "4111-1111-1111-1111"}]),
    }
    future_id, future_raw = h_sale(mesh, 7, created_at=mesh.clock.now_ms() + 60 * DAY_MS, amount_minor=40_000)
    honest_id, honest_raw = h_sale(mesh, 8, amount_minor=700)
    publish(mesh, {**{sid: raw for sid, raw in harmful.values()}, **{sid: raw for sid, raw in leaking.values()},
                   future_id: future_raw, honest_id: honest_raw})
    mesh.acked.add(honest_id)

    for node, view in zip(mesh.honest, views(mesh)):
        for what, (sale_id, _) in harmful.items():
            sale = view[sale_id]  # kept: every node holds it and reaches the same verdict
            assert sale["status"] == "refused", (what, sale)
            assert sale["reason"] and "4111" not in sale["reason"], (what, sale["reason"])
        for what, (sale_id, raw) in leaking.items():
            assert sale_id not in view, what
            assert all(r != raw for _, r in node.entries()), f"{what}: the card number spread"
        assert view[future_id]["status"] == "deferred" and "ahead" in view[future_id]["reason"]
        assert view[honest_id]["status"] == "pending"  # H's honest sale beside them is unharmed
        status = node.core.status()
        assert status["pending"]["amount_minor"] == sum(
            s["amount_minor"] for s in view.values() if s["status"] == "pending")
        assert status["sales"]["by_status"]["refused"] == len(harmful)
        # listing and reporting go on: no unknown-currency crash
        rep = report.summarize(report.collect(node.core))
        assert rep["site"]["by_status"]["refused"]["count"] == len(harmful)
        assert rep["site"]["total"]["amount_minor"] == sum(  # refused and deferred are in no total
            s["amount_minor"] for s in view.values() if s["status"] not in ("refused", "deferred"))
        assert {r["sale_id"] for r in rep["refused"]} == {sid for sid, _ in harmful.values()} | {future_id}
        assert "refused" in report.render_text(rep).lower()
    first = mesh.honest[0].entries()
    assert all(n.entries() == first for n in mesh.honest), "honest ledgers differ"
    # honest terminals keep selling: nothing H signed counts against a cap
    for name in "abc":
        mesh.sell(name, 2)
    mesh.pump()
    for view in views(mesh):
        assert all(view[s]["status"] == "pending" for s in mesh.acked)


def test_refusals_are_logged_with_the_reason(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    sale_id, raw = h_sale(mesh, 1, currency="JPY")
    publish(mesh, {sale_id: raw})
    assert any(sale_id in r.getMessage() and "currency" in r.getMessage() for r in caplog.records)


def test_a_far_future_sale_is_judged_once_the_clock_gets_there(mesh: Mesh) -> None:
    ahead = rules.MAX_SKEW_MS + 3_600_000
    sale_id, raw = h_sale(mesh, 1, created_at=mesh.clock.now_ms() + ahead, amount_minor=900)
    publish(mesh, {sale_id: raw})
    a = mesh.nodes["a"].core
    assert a.sale(sale_id)["status"] == "deferred"
    assert a.status()["pending"]["count"] == 0
    mesh.clock.advance(ahead / 1000)
    assert a.sale(sale_id)["status"] == "pending"
    assert a.status()["pending"]["amount_minor"] == 900


def test_a_terminal_that_signs_past_its_cap_cannot_stop_the_site(mesh: Mesh) -> None:
    """The site's stored-total cap counts no terminal above its own cap: a hostile one that signs
    more than its cap (bypassing its own `sell`) still lets every other terminal sell."""
    policy = mesh.site.update_policy(max_terminal_pending_minor=1_000_00, max_site_pending_minor=1_500_00)
    for node in mesh.nodes.values():
        node.core.ingest(mesh.site.policy_envelope(), "organizer")
        assert node.core.policy.version == policy.version
    publish(mesh, dict(h_sale(mesh, seq, amount_minor=500_00) for seq in range(1, 6)))  # 2,500.00 pending
    a = mesh.nodes["a"].core
    assert a.sell(400_00)["status"] == "pending"
    with pytest.raises(PolicyError, match="site's pending offline total"):
        a.sell(200_00)  # the site's cap still holds: 1,000 (H at its cap) + 400 + 200 > 1,500


def test_sell_applies_the_same_rules(mesh: Mesh) -> None:
    a = mesh.nodes["a"].core
    with pytest.raises(InputError, match="12 to 19 digits"):
        a.seal_card("４１１１１１１１１１１１１１１１", "1230")
    with pytest.raises(InputError, match="MMYY"):
        a.seal_card(VISA, "١٢٣٠")
    with pytest.raises(InputError, match="expired"):
        a.seal_card(VISA, "0120")
    with pytest.raises(InputError, match="not an issued card number"):
        a.seal_card("0000000000000000", "1230")
    with pytest.raises(ContentError, match="card number"):
        a.sell(100, description="card 4111111111111111")
    with pytest.raises(PolicyError, match="per-sale offline cap"):
        a.sell(a.policy.max_sale_minor + 1)
    assert a.sales() == []


def test_a_policy_version_applies_from_its_effective_time(mesh: Mesh) -> None:
    """A sale is judged by the policy in force at its own time: a lower cap that takes effect
    later does not refuse what was sold before it, on any node, whichever order they learn it."""
    now = mesh.clock.now_ms()
    early_id, early = h_sale(mesh, 1, amount_minor=400_00, created_at=now)
    late_id, late = h_sale(mesh, 2, amount_minor=400_00, created_at=now + 120_000)
    publish(mesh, {early_id: early, late_id: late})
    mesh.site.update_policy(max_sale_minor=100_00, effective_at=now + 60_000)
    mesh.nodes["c"].core.ingest(mesh.site.policy_envelope(), "organizer")
    mesh.pump()
    for view in views(mesh):
        assert view[early_id]["status"] == "pending"
        assert view[late_id]["status"] in ("refused", "deferred") and view[late_id]["status"] != "pending"
    mesh.clock.advance(300)
    for view in views(mesh):
        assert view[late_id]["status"] == "refused" and "cap" in view[late_id]["reason"]


# -- a property: whatever H signs, the honest views follow the rules ----------------------------

harmful_changes = st.one_of(
    st.fixed_dictionaries({"amount_minor": st.integers(50_001, 10**12)}),
    st.fixed_dictionaries({"currency": st.sampled_from(["JPY", "USD", "XXX", "eur", "EU"])}),
    st.fixed_dictionaries({"description": st.from_regex(r"[a-z ]{0,8}[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}",
                                                        fullmatch=True)}),
    st.fixed_dictionaries({"description": st.text("٠١٢٣٤٥٦٧٨٩０１２３４５６７８９", min_size=12, max_size=19)}),
    st.fixed_dictionaries({"description": st.sampled_from(["a\x00b", "bell\x07", "\x9b[2J"])}),
    st.fixed_dictionaries({"created_at_ahead_ms": st.integers(rules.MAX_SKEW_MS + 1, 60 * DAY_MS)}),
)


def test_whatever_a_terminal_signs_honest_views_follow_the_rules(mesh: Mesh) -> None:
    seqs = itertools.count(1)
    honest_total = 0

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(changes=st.lists(harmful_changes, min_size=1, max_size=4))
    def attack(changes: list[dict[str, Any]]) -> None:
        nonlocal honest_total
        items = {}
        for change in changes:
            change = dict(change)
            ahead = change.pop("created_at_ahead_ms", None)
            if ahead is not None:
                change["created_at"] = mesh.clock.now_ms() + ahead
            sale_id, raw = h_sale(mesh, next(seqs), **change)
            items[sale_id] = raw
        honest = mesh.nodes["a"].core.sell(321)["id"]
        honest_total += 321
        publish(mesh, items)
        mesh.pump()
        for node in mesh.honest:
            view = {s["id"]: s for s in node.core.sales()}
            held = {k for k, _ in node.entries()}
            for sale_id, raw in items.items():
                # refused or deferred (kept, the same verdict everywhere), or, for free text that
                # breaks the text rule (or once H is cut off for sending such), not taken at all
                if sale_id in view:
                    assert view[sale_id]["status"] in ("refused", "deferred"), view[sale_id]
                    assert rules.free_text_problem("sale", envelope.decode(raw).body) is None
                else:
                    assert f"sale/{sale_id}" not in held
            assert view[honest]["status"] == "pending"
            assert node.core.status()["pending"]["amount_minor"] == honest_total
        first = mesh.honest[0].entries()
        assert all(n.entries() == first for n in mesh.honest)

    attack()


def test_one_refused_sale_breaks_no_listing_report_or_dashboard(make_node, switch_key) -> None:
    """Reproduction 4 of issue 12: after one sale in currency XXX, `meshpos sales`, `meshpos report`
    and the dashboard's /api/state failed on every node, for good."""
    import json
    import types

    from helpers import run_cli
    from meshpos.node.dashboard import Dashboard
    from meshpos.node.core import NodeCore

    a_dir, h_dir = make_node("a"), make_node("h")
    h = NodeCore.open(h_dir)
    a = NodeCore.open(a_dir)
    try:
        body = {"sale_id": envelope.sale_id(h.node_id, 1), "site": h.policy.site_id, "terminal": h.node_id,
                "seq": 1, "created_at": h.clock.now_ms(), "amount_minor": 10**12, "currency": "XXX",
                "method": "cash", "description": None, "items": [], "card": None}
        a.ingest(h.ledger.raw(f"cert/{h.node_id}") or b"", "peer")
        a.ingest(envelope.seal("sale", h.node_id, body, h.key), "peer")
        a.sell(1250)
        state = Dashboard(types.SimpleNamespace(core=a, clock=a.clock), "").state()  # type: ignore[arg-type]
        by_status = {s["status"]: s["count"] for s in state["settled"]}
        assert by_status["refused"] == 1 and by_status["pending"] == 1
        assert state["total"]["amount"] == "12.50"  # the refused 10^12 XXX counts in no total
    finally:
        a.close()
        h.close()
    listed = json.loads(run_cli("sales", str(a_dir), "--json", check=True).stdout)
    refused = [s for s in listed if s["status"] == "refused"]
    assert len(refused) == 1 and "XXX" in refused[0]["reason"]
    text = run_cli("report", str(a_dir), check=True).stdout
    assert "refused by the site's rules" in text and "XXX" in text
