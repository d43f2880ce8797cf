"""`meshpos report`: totals equal the sum of the sales, in every status; mismatches are named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nacl.signing

from meshpos.wire import envelope
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.node.enroll import create_request, install_answer
from meshpos.node.report import collect, summarize
from meshpos.site.sitedir import Site
from tests.helpers import run_cli

HOUR_MS = 3_600_000


def result(core: NodeCore, key: nacl.signing.SigningKey, sale_id: str, status: str, reversed_: bool = False) -> None:
    body = {"sale_id": sale_id, "site": core.policy.site_id, "status": status,
            "auth_code": "A1B2C3" if status == "approved" else None,
            "response_code": "00" if status == "approved" else "05", "reason": None,
            "settled_at": core.clock.now_ms(), "reversed": reversed_}
    core.ingest(envelope.seal("result", "switch", body, key), "switch")


def test_report_totals_equal_the_sum_of_the_sales_in_every_status(
        tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey) -> None:
    # The story starts 26 h ago, so the CLI below (real clock) sees the same statuses.
    clock = FakeClock(FakeClock().now_ms() - 26 * HOUR_MS)
    def enroll(name: str) -> Path:  # certificates valid since before the story starts
        path = tmp_path / name
        answer = site.sign_request(create_request(path, "terminal", name), clock=FakeClock(clock.now_ms() - HOUR_MS))
        install_answer(path, answer)
        return path
    t1_path, t2_path = enroll("T1"), enroll("T2")
    t1 = NodeCore.open(t1_path, clock)
    t2 = NodeCore.open(t2_path, clock)
    try:
        card = t1.seal_card("4111111111111111", "1230")
        old = t1.sell(1_100, card=card)["id"]  # a card sale that passes its offline window unsettled: expired
        clock.advance(25 * 3600)
        amounts = {"T1": [1_000, 2_000, 3_000, 4_000, 5_000, 6_000, 7_000], "T2": [250, 350, 450, 550]}
        ids1 = [t1.sell(a)["id"] for a in amounts["T1"]]
        ids2 = [t2.sell(a)["id"] for a in amounts["T2"]]
        # T2's entries reach T1 (as the mesh would bring them)
        for key in (f"cert/{t2.node_id}", *[f"sale/{i}" for i in ids2]):
            t1.ingest(t2.ledger.raw(key), "peer")
        result(t1, switch_key, ids1[0], "approved")
        result(t1, switch_key, ids1[1], "declined")
        result(t1, switch_key, ids1[2], "rejected")
        result(t1, switch_key, ids2[0], "approved")
        result(t1, switch_key, ids2[1], "expired")
        t1.void(ids1[3], "customer changed mind")  # voided while pending
        result(t1, switch_key, ids1[4], "approved")
        t1.void(ids1[4], "refund")  # approved, then voided: a reversal is due
        result(t1, switch_key, f"{t1.node_id}-00000099", "approved")  # a result for no recorded sale
        data = collect(t1)
    finally:
        t1.close()
        t2.close()

    sales = data["sales"]
    assert {s["status"] for s in sales} == {"pending", "approved", "declined", "voided", "expired", "rejected"}
    rep = summarize(data)
    site = rep["site"]
    assert site["total"] == {"count": len(sales), "amount_minor": sum(s["amount_minor"] for s in sales)}
    assert site["total"]["amount_minor"] == 1_100 + sum(amounts["T1"]) + sum(amounts["T2"])
    for status, bucket in site["by_status"].items():
        mine = [s for s in sales if s["status"] == status]
        assert bucket == {"count": len(mine), "amount_minor": sum(s["amount_minor"] for s in mine)}, status
    assert sum(b["amount_minor"] for b in site["by_status"].values()) == site["total"]["amount_minor"]
    assert sum(b["amount_minor"] for b in site["by_method"].values()) == site["total"]["amount_minor"]
    assert site["by_status"]["expired"]["count"] == 2  # the unsettled one and the switch's "expired"
    assert site["by_status"]["approved"] == {"count": 3, "amount_minor": 1_000 + 5_000 + 250}
    per = {t["name"]: t for t in rep["terminals"]}
    assert per["T1"]["total"]["amount_minor"] == 1_100 + sum(amounts["T1"])
    assert per["T2"]["total"]["amount_minor"] == sum(amounts["T2"])
    assert per["T2"]["by_status"]["pending"] == {"count": 2, "amount_minor": 450 + 550}
    assert sum(t["total"]["amount_minor"] for t in rep["terminals"]) == site["total"]["amount_minor"]
    assert sorted(p["sale_id"] for p in rep["pending"]) == sorted([ids1[5], ids1[6], ids2[2], ids2[3]])
    assert all(p["deadline"] for p in rep["pending"])
    kinds = {(m["kind"], m["sale_id"]) for m in rep["mismatches"]}
    assert kinds == {("unknown_sale", f"{data['node']}-00000099"), ("voided_after_approval", ids1[4]),
                     ("expired_unsettled", old)}

    # the CLI on the (stopped) node: the same numbers, and a CSV whose site rows add up
    out = run_cli("report", str(t1_path), "--json", "--csv", str(tmp_path / "r.csv"), check=True).stdout
    cli_rep = json.loads(out)
    assert cli_rep["site"]["by_method"]["card"] == {"count": 1, "amount_minor": 1_100}
    assert cli_rep["site"]["by_method"]["cash"]["amount_minor"] == site["total"]["amount_minor"] - 1_100
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    site_status = [r for r in rows if r["kind"] == "total" and r["scope"] == "site" and r["group"] == "status"]
    assert sum(int(r["amount_minor"]) for r in site_status) == site["total"]["amount_minor"]
    assert len([r for r in rows if r["kind"] == "mismatch"]) == 3
    text = run_cli("report", str(t1_path), check=True).stdout
    assert "3 mismatch(es)" in text and "4 sale(s) still pending" in text
