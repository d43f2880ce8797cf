"""A joiner takes a whole shard in at once (its sales' rows written a shard at a time): the views it
ends with are those of the node that wrote the entries one by one, and every rule still refuses."""

from __future__ import annotations

from typing import Any

import automerge.core as am
import nacl.signing

from meshpos.node.core import NodeCore
from meshpos.wire import envelope

VISA = "4111111111111111"


def switch_signed(type_: str, body: dict[str, Any], key: nacl.signing.SigningKey) -> bytes:
    return envelope.seal(type_, "switch", body, key)


def view(core: NodeCore) -> list[dict[str, Any]]:
    rows = [dict(row) for row in core.store.sales()]
    for row in rows:
        row.pop("idempotency_key")
    return rows


def test_a_whole_shard_taken_in_at_once_gives_the_views_its_writer_has(
        make_node: Any, open_node: Any, switch_key: nacl.signing.SigningKey) -> None:
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    site, now = t1.policy.site_id, t1.clock.now_ms()
    card = [t1.sell(1000 + i, card=t1.seal_card(VISA, "1230"))["id"] for i in range(20)]
    cash = [t1.sell(500 + i, description=f"item {i}")["id"] for i in range(20)]
    for i, sale_id in enumerate(card[:12]):
        status = "approved" if i % 3 else "declined"
        t1.ingest(switch_signed("result", {
            "sale_id": sale_id, "site": site, "status": status, "auth_code": "A1" if status == "approved" else None,
            "response_code": "00" if status == "approved" else "05", "reason": None, "settled_at": now,
            "reversed": False}, switch_key), "switch")
    t1.void(card[1], "wrong amount")  # approved, then voided: a reversal follows
    t1.void(card[13], None)  # voided before any result
    t1.void(cash[0], "customer left")
    # "reversal/<id>" sorts before "sale/<id>": in the shard the reversal is met before its sale
    t1.ingest(switch_signed("reversal", {"sale_id": card[1], "site": site, "reversed_at": now,
                                         "response_code": "00", "reason": None}, switch_key), "switch")
    # validly signed, but over the per-sale cap: kept, refused in the views on every node
    over = t1.store.last_seq(t1.node_id) + 1
    t1.ledger.write_local(envelope.seal("sale", t1.node_id, {
        "sale_id": envelope.sale_id(t1.node_id, over), "site": site, "terminal": t1.node_id, "seq": over,
        "created_at": now, "amount_minor": t1.policy.max_sale_minor + 1, "currency": t1.policy.currency,
        "method": "cash", "description": None, "items": [], "card": None}, t1.key))

    shards = t1.ledger.shards()
    assert sum(t1.ledger.docs[s].length(am.ROOT) for s in shards) > 50
    for shard in shards:
        report = t2.ledger.receive_snapshot(shard, t1.ledger.snapshot(shard), "t1")
        assert report.rejected == [] and report.parked == 0 and len(report.accepted) > 50
    assert {e[:2] for e in t1.store.all_entries()} <= {e[:2] for e in t2.store.all_entries()}
    assert view(t2) == view(t1)
    statuses = {row["sale_id"]: t2.status_of(row) for row in t2.store.sales()}
    assert statuses[card[1]] == "reversed" and statuses[card[13]] == "voided" and statuses[cash[0]] == "voided"
    assert [row["refused"] is not None for row in t2.store.sales()].count(True) == 1


def test_a_whole_shard_with_bad_entries_among_good_ones_keeps_only_the_good(
        make_node: Any, open_node: Any) -> None:
    """Forgeries, a non-canonical copy, an entry under the wrong key and a card number in free text,
    spread through one big shard: each is refused, the rest taken, the shard stripped of them."""
    t1, t2, t3 = (open_node(make_node(n)) for n in ("t1", "t2", "t3"))
    sales = [t1.sell(100 + i)["id"] for i in range(60)]
    shard = t1.ledger.shards()[0]
    doc = am.Document.load(t1.ledger.snapshot(shard))
    body = envelope.decode(t1.ledger.raw(f"sale/{sales[0]}")).body

    def sale(seq: int, key: nacl.signing.SigningKey = t1.key, **changes: Any) -> tuple[str, bytes]:
        new = {**body, "seq": seq, "sale_id": envelope.sale_id(t1.node_id, seq), **changes}
        return f"sale/{new['sale_id']}", envelope.seal("sale", t1.node_id, new, key)

    forged_key, forged = sale(61, t3.key)
    spaced_key, good = sale(62)
    spaced = good.replace(b'"seq":62', b'"seq": 62')
    wrong_key, moved = sale(63)
    text_key, card_text = sale(64, description="card 4111 1111 1111 1111")
    float_key, floating = sale(65)
    floating = floating.replace(b'"amount_minor":100', b'"amount_minor":100.0')
    bad = {forged_key: forged, spaced_key: spaced, "sale/elsewhere": moved, text_key: card_text,
           float_key: floating}
    with doc.transaction() as tx:
        for key, raw in bad.items():
            tx.put(am.ROOT, key, am.ScalarType.Bytes, raw)
    report = t2.ledger.receive_snapshot(shard, doc.save(), "hostile")
    assert sorted(k for k, _ in report.rejected) == sorted(bad)
    assert sorted(s["id"] for s in t2.sales()) == sorted(sales)
    assert not any(t2.ledger.has(key) for key in (*bad, wrong_key))
    relayed = t3.ledger.receive_snapshot(shard, t2.ledger.snapshot(shard), "t2")
    assert relayed.rejected == [] and sorted(s["id"] for s in t3.sales()) == sorted(sales)
