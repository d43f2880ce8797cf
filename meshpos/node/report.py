"""End-of-day reconciliation: what the terminals recorded against what the switch settled.

``collect(core)`` gathers the facts from one node's view of the site ledger
(every node holds the whole site's): the sales with their derived status, the
settlement results and the voids. ``summarize(data)`` is pure: per terminal and
for the site, counts and totals by status and by method, the sales still
pending with their deadline, and the mismatches:

* a settlement result for a sale no terminal recorded;
* a result of another site;
* a sale approved by the switch and voided by its terminal, with no reversal
  confirmed (``reversed`` false);
* a result ``voided`` for a sale its terminal never voided;
* a sale past its offline window with no result (expired unsettled).

Sales that break a content rule (meshpos.domain.rules) are listed apart, each with its reason: every
node holds them and reaches the same verdict, and no total but their own "refused" one counts them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpos.domain.currency import format_amount
from meshpos.node.core import STATUSES, iso
from meshpos.wire import envelope as env_mod

if TYPE_CHECKING:
    from meshpos.node.core import NodeCore

METHODS = ("card", "cash")
OUT_OF_TOTALS = ("refused", "deferred")  # counted in their own status only, never in a total


def collect(core: "NodeCore") -> dict[str, Any]:
    results = [env_mod.decode(raw).body for raw in core.store.entries_of_type("result")]
    reversals = {env_mod.decode(raw).body["sale_id"] for raw in core.store.entries_of_type("reversal")}
    voids = [env_mod.decode(raw).body for raw in core.store.entries_of_type("void")]
    policy = core.policy
    return {
        "site_id": policy.site_id, "site_name": policy.name, "currency": policy.currency,
        "offline_window_s": policy.offline_window_s, "generated_at": core.clock.now_ms(),
        "node": core.node_id, "node_name": core.config.name,
        "names": {node_id: ident.name for node_id, ident in core.roster.identities.items()},
        "sales": core.sales(), "results": results, "voids": voids, "reversals": sorted(reversals),
    }


def _bucket() -> dict[str, int]:
    return {"count": 0, "amount_minor": 0}


def _totals(sales: Iterable[dict[str, Any]]) -> dict[str, Any]:
    by_status = {s: _bucket() for s in STATUSES}
    by_method = {m: _bucket() for m in METHODS}
    total = _bucket()
    for sale in sales:
        counted = [by_status.setdefault(sale["status"], _bucket())]
        if sale["status"] not in OUT_OF_TOTALS:
            counted += [by_method.setdefault(sale["method"], _bucket()), total]
        for b in counted:
            b["count"] += 1
            b["amount_minor"] += sale["amount_minor"]
    return {"by_status": by_status, "by_method": by_method, "total": total}


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    sales: list[dict[str, Any]] = data["sales"]
    by_id = {s["id"]: s for s in sales}
    results = {r["sale_id"]: r for r in data["results"]}
    voided = {v["sale_id"] for v in data["voids"]}
    terminals: dict[str, list[dict[str, Any]]] = {}
    for sale in sales:
        terminals.setdefault(sale["terminal"], []).append(sale)
    per_terminal = [{"terminal": t, "name": data["names"].get(t, t), **_totals(ts)}
                    for t, ts in sorted(terminals.items(), key=lambda kv: data["names"].get(kv[0], kv[0]))]
    pending = [{"sale_id": s["id"], "terminal": s["terminal"], "name": s["terminal_name"],
                "amount_minor": s["amount_minor"], "method": s["method"], "created_at": s["created_at"],
                "deadline": s["deadline"]} for s in sales if s["status"] == "pending"]
    refused = [{"sale_id": s["id"], "terminal": s["terminal"], "name": s["terminal_name"],
                "amount_minor": s["amount_minor"], "currency": s["currency"], "status": s["status"],
                "reason": s["reason"]} for s in sales if s["status"] in ("refused", "deferred")]
    reversals = set(data.get("reversals", ()))
    mismatches: list[dict[str, Any]] = []

    def mismatch(kind: str, sale_id: str, detail: str) -> None:
        sale = by_id.get(sale_id)
        mismatches.append({"kind": kind, "sale_id": sale_id, "terminal": sale["terminal"] if sale else None,
                           "amount_minor": sale["amount_minor"] if sale else None, "detail": detail})

    for sale_id, result in sorted(results.items()):
        if by_id.get(sale_id) is None:
            mismatch("unknown_sale", sale_id, f"the switch settled {sale_id} ({result['status']}) "
                                              "but no terminal recorded that sale")
            continue
        if result["site"] != data["site_id"]:
            mismatch("other_site", sale_id, f"result names site {result['site']}, the sale is of {data['site_id']}")
        if (result["status"] == "approved" and sale_id in voided and not result["reversed"]
                and sale_id not in reversals):
            mismatch("voided_after_approval", sale_id,
                     "approved by the switch but voided by its terminal; no reversal confirmed yet")
        if result["status"] == "voided" and sale_id not in voided:
            mismatch("void_not_recorded", sale_id, "the switch says voided; the terminal recorded no void")
    for sale in sales:
        if sale["status"] == "expired" and sale["id"] not in results:
            mismatch("expired_unsettled", sale["id"],
                     f"past its deadline {sale['deadline']} with no settlement result: the merchant carries it")
    return {
        "site_id": data["site_id"], "site_name": data["site_name"], "currency": data["currency"],
        "generated_at": iso(data["generated_at"]), "node": data["node_name"],
        "site": _totals(sales), "terminals": per_terminal, "pending": pending, "refused": refused,
        "mismatches": mismatches,
    }


def render_text(rep: dict[str, Any]) -> str:
    from meshpos.cli.output import table
    cur = rep["currency"]

    def money(minor: int) -> str:
        return format_amount(minor, cur)

    def rows_of(name: str, totals: dict[str, Any]) -> list[list[Any]]:
        row: list[Any] = [name]
        for s in STATUSES:
            b = totals["by_status"][s]
            row.append(f"{b['count']} / {money(b['amount_minor'])}")
        for m in METHODS:
            b = totals["by_method"][m]
            row.append(f"{b['count']} / {money(b['amount_minor'])}")
        row.append(f"{totals['total']['count']} / {money(totals['total']['amount_minor'])}")
        return [row]

    out = [f"Reconciliation of {rep['site_name']!r} ({rep['site_id']}) as seen by {rep['node']}, "
           f"{rep['generated_at']}; amounts in {cur} (count / amount)"]
    rows: list[list[Any]] = []
    for t in rep["terminals"]:
        rows += rows_of(t["name"], t)
    rows += rows_of("SITE", rep["site"])
    out.append(table(rows, ["TERMINAL", *[s.upper() for s in STATUSES], "CARD", "CASH", "TOTAL"]))
    if rep["pending"]:
        out.append(f"\n{len(rep['pending'])} sale(s) still pending:")
        out.append(table([[p["sale_id"], p["name"], money(p["amount_minor"]), p["method"], p["deadline"]]
                          for p in rep["pending"]], ["SALE", "TERMINAL", "AMOUNT", "METHOD", "DEADLINE"]))
    if rep.get("refused"):
        out.append(f"\n{len(rep['refused'])} sale(s) refused by the site's rules (kept out of every other total):")
        out.append(table([[r["sale_id"], r["name"], f"{r['amount_minor']} {r['currency']}"[:24], r["status"],
                           r["reason"]] for r in rep["refused"]],
                         ["SALE", "TERMINAL", "AMOUNT (MINOR)", "STATUS", "REASON"]))
    if rep["mismatches"]:
        out.append(f"\n{len(rep['mismatches'])} mismatch(es) between terminals and switch:")
        out.append(table([[m["kind"], m["sale_id"], m["detail"]] for m in rep["mismatches"]],
                         ["KIND", "SALE", "DETAIL"]))
    else:
        out.append("\nno mismatch between what the terminals recorded and what the switch settled")
    return "\n".join(out)


CSV_FIELDS = ("kind", "scope", "terminal", "name", "group", "key", "count", "amount_minor", "amount",
              "sale_id", "deadline", "detail")


def write_csv(rep: dict[str, Any], path: Path) -> int:
    """One row per total (site and terminals, by status and method), pending sale and mismatch."""
    cur = rep["currency"]
    rows: list[dict[str, Any]] = []
    scopes = [("site", "", "SITE", rep["site"])] + [("terminal", t["terminal"], t["name"], t) for t in rep["terminals"]]
    for scope, terminal, name, totals in scopes:
        for group in ("by_status", "by_method"):
            for key, b in totals[group].items():
                rows.append({"kind": "total", "scope": scope, "terminal": terminal, "name": name,
                             "group": group[3:], "key": key, "count": b["count"],
                             "amount_minor": b["amount_minor"], "amount": format_amount(b["amount_minor"], cur)})
        b = totals["total"]
        rows.append({"kind": "total", "scope": scope, "terminal": terminal, "name": name, "group": "all",
                     "key": "all", "count": b["count"], "amount_minor": b["amount_minor"],
                     "amount": format_amount(b["amount_minor"], cur)})
    for p in rep["pending"]:
        rows.append({"kind": "pending", "scope": "terminal", "terminal": p["terminal"], "name": p["name"],
                     "key": p["method"], "count": 1, "amount_minor": p["amount_minor"],
                     "amount": format_amount(p["amount_minor"], cur), "sale_id": p["sale_id"],
                     "deadline": p["deadline"]})
    for r in rep.get("refused", ()):
        rows.append({"kind": r["status"], "scope": "terminal", "terminal": r["terminal"], "name": r["name"],
                     "key": r["currency"], "count": 1, "amount_minor": r["amount_minor"], "sale_id": r["sale_id"],
                     "detail": r["reason"]})
    for m in rep["mismatches"]:
        rows.append({"kind": "mismatch", "scope": "terminal", "terminal": m["terminal"] or "", "key": m["kind"],
                     "amount_minor": m["amount_minor"] if m["amount_minor"] is not None else "",
                     "sale_id": m["sale_id"], "detail": m["detail"]})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    return len(rows)
