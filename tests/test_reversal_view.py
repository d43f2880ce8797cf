"""A void after approval ends `reversed` on every node once the switch's reversal entry arrives."""

from __future__ import annotations

from meshpos.node import report
from meshpos.wire import envelope

VISA = "4111111111111111"


def signed(type_: str, body: dict, switch_key) -> bytes:  # type: ignore[no-untyped-def]
    return envelope.seal(type_, "switch", body, switch_key)


def test_void_after_approval_ends_reversed_with_the_reversal_entry(make_node, open_node, switch_key, clock) -> None:
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    sale = t1.sell(1250, card=t1.seal_card(VISA, "1230"))
    site = t1.policy.site_id
    result = signed("result", {"sale_id": sale["id"], "site": site, "status": "approved", "auth_code": "A1",
                               "response_code": "00", "reason": None, "settled_at": clock.now_ms(),
                               "reversed": False}, switch_key)
    t1.ingest(result, "switch")
    assert t1.sale(sale["id"])["status"] == "approved"
    t1.void(sale["id"], "wrong amount")
    rep = report.summarize(report.collect(t1))
    assert [m["kind"] for m in rep["mismatches"]] == ["voided_after_approval"]  # until the reversal is in

    reversal = signed("reversal", {"sale_id": sale["id"], "site": site, "reversed_at": clock.now_ms(),
                                   "response_code": "00", "reason": None}, switch_key)
    for core in (t1, t2):
        for raw in (t1.ledger.raw(f"cert/{t1.node_id}"), t1.ledger.raw(f"sale/{sale['id']}"),
                    t1.ledger.raw(f"void/{sale['id']}"), result, reversal):
            assert raw is not None
            core.ingest(raw, "peer")
        assert core.sale(sale["id"])["status"] == "reversed"
        rep = report.summarize(report.collect(core))
        assert rep["mismatches"] == []
        assert rep["site"]["by_status"]["reversed"] == {"count": 1, "amount_minor": 1250}


def test_a_reversal_signed_by_anyone_but_the_switch_is_refused(make_node, open_node, clock) -> None:
    import nacl.signing
    import pytest
    from meshpos.domain.errors import VerificationError

    t1 = open_node(make_node("t1"))
    sale = t1.sell(500)
    forged = envelope.seal("reversal", "switch", {"sale_id": sale["id"], "site": t1.policy.site_id,
                                                  "reversed_at": clock.now_ms(), "response_code": "00",
                                                  "reason": None}, nacl.signing.SigningKey.generate())
    with pytest.raises(VerificationError):
        t1.ingest(forged, "peer")
    assert t1.sale(sale["id"])["status"] == "pending"
