#!/usr/bin/env python3
"""Write protocols/vectors/rules.json: entries and input text with the verdict protocols/rules.md
gives each. Every expected verdict below is written by hand; the script refuses to write the file
if the implementation disagrees with one. Run it only when the rules change on purpose."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.signing

from meshpos.domain import rules
from meshpos.wire import envelope
from meshpos.domain.currency import parse_amount
from meshpos.domain.errors import InputError
from meshpos.identity import keys
from meshpos.domain.policy import SitePolicy

OUT = Path(__file__).resolve().parents[1] / "protocols" / "vectors" / "rules.json"
T0 = 1767225600000  # 2026-01-01T00:00:00Z
SITE = "5173e5a1d00dfeed"


def main() -> None:
    key = nacl.signing.SigningKey(bytes(range(32)))
    terminal = keys.node_id_of(bytes(key.verify_key))
    v1 = SitePolicy(site_id=SITE, name="Vectors", currency="EUR", version=1, max_sale_minor=500_00)
    v2 = SitePolicy(site_id=SITE, name="Vectors", currency="EUR", version=2, max_sale_minor=100_00,
                    effective_at=T0 + 3_600_000)
    policies = [v1, v2]
    sealed = envelope.b64e(bytes(range(90)))
    card = {"brand": "visa", "last4": "1111", "entry_mode": "chip", "sealed": sealed}
    seq = iter(range(1, 1000))

    def sale(**changes: Any) -> dict[str, Any]:
        n = next(seq)
        body = {"sale_id": envelope.sale_id(terminal, n), "site": SITE, "terminal": terminal, "seq": n,
                "created_at": T0, "amount_minor": 1250, "currency": "EUR", "method": "cash",
                "description": None, "items": [], "card": None}
        body.update(changes)
        return body

    sale_cases: list[tuple[str, dict[str, Any], int, str, str | None]] = [
        ("cash sale", sale(), T0, "valid", None),
        ("card sale at the cap", sale(method="card", card=card, amount_minor=500_00), T0, "valid", None),
        ("over the per-sale cap", sale(amount_minor=500_01), T0, "refused", "per-sale offline cap"),
        ("foreign currency", sale(currency="JPY", amount_minor=3000), T0, "refused", "currency"),
        ("unknown currency", sale(currency="XXX", amount_minor=10**12), T0, "refused", "currency"),
        ("lower-case currency", sale(currency="eur"), T0, "refused", "currency"),
        ("card number in the description", sale(description="4111 1111 1111 1111"), T0, "not_taken", "12 or more digits"),
        ("full-width digits in the description", sale(description="ref ４１１１１１１１１１１１"), T0, "not_taken",
         "12 or more digits"),
        ("eleven digits are fine", sale(description="tel 12345678901"), T0, "valid", None),
        ("control character in the description", sale(description="a\u009bb"), T0, "not_taken", "control"),
        ("card number in an item", sale(items=[{"name": "4111-1111-1111-1111"}]), T0, "not_taken", "item"),
        ("unknown brand", sale(method="card", card={**card, "brand": "evil"}), T0, "refused", "brand"),
        ("policy in force: before v2 takes effect, the v1 cap", sale(amount_minor=400_00, created_at=T0 + 3_599_999),
         T0 + 3_600_000, "valid", None),
        ("policy in force: once v2 takes effect, the v2 cap", sale(amount_minor=400_00, created_at=T0 + 3_600_000),
         T0 + 3_600_000, "refused", "per-sale offline cap"),
        ("within the skew ahead", sale(created_at=T0 + rules.MAX_SKEW_MS), T0, "valid", None),
        ("beyond the skew ahead", sale(created_at=T0 + rules.MAX_SKEW_MS + 1), T0, "deferred", "ahead"),
        ("60 days ahead", sale(created_at=T0 + 60 * 86_400_000), T0, "deferred", "ahead"),
        # disguised card numbers and display tricks (red-team findings, issue 12)
        ("zero-width spaces between the digits of a card number",
         sale(description="ref 4111\u200b1111\u200b1111\u200b1111"), T0, "not_taken", "12 or more digits"),
        ("superscript digits in the description", sale(description="\u2074\u00b9\u00b9\u00b9" * 4), T0, "not_taken",
         "12 or more digits"),
        ("card number split by ' - '", sale(description="4111 - 1111 - 1111 - 1111"), T0, "not_taken", "12 or more digits"),
        ("right-to-left override in the description", sale(description="\u202e00.005"), T0, "not_taken",
         "bidirectional"),
        ("card number nested in an item", sale(items=[{"opts": {"note": ["4111111111111111"]}}]), T0, "not_taken", "item"),
        ("card number as a JSON number in an item", sale(items=[{"qty": 4111111111111111}]), T0, "not_taken", "item"),
        ("card number as an item's key", sale(items=[{"4111111111111111": 1}]), T0, "not_taken", "item"),
        ("a joined emoji is fine", sale(description="\U0001f468\u200d\U0001f373 menu 12"), T0, "valid", None),
    ]
    out_sales = []
    for name, body, now, verdict, reason in sale_cases:
        policy = rules.policy_at(policies, body["created_at"])
        problem = rules.sale_problem(body, policy)
        text = rules.free_text_problem("sale", body)  # not taken at all: never stored nor relayed
        got = "not_taken" if text else "refused" if problem else (
            "deferred" if rules.future_problem(body["created_at"], now, "sale") else "valid")
        assert got == verdict, (name, got, problem)
        if reason is not None:
            text = problem or rules.future_problem(body["created_at"], now, "sale") or ""
            assert reason in text, (name, text)
        raw = envelope.seal("sale", terminal, body, key)
        out_sales.append({"name": name, "envelope": raw.decode("utf-8"), "receiver_now_ms": now,
                          "policy_version_in_force": policy.version, "verdict": verdict,
                          "reason_contains": reason})

    pans = [("4111111111111111", True), ("4111 1111 1111 1111", True), ("4111-1111-1111-1111", True),
            ("４１１１１１１１１１１１１１１１", False), ("٤١١١١١١١١١١١١١١١", False), ("4111111111111112", False),
            ("0000000000000000", False), ("41111", False), ("41111111111111111111", False),
            ("5555555555554444", True), ("378282246310005", True)]
    out_pans = []
    for text, ok in pans:
        problem = rules.pan_problem(text.replace(" ", "").replace("-", ""))
        assert (problem is None) == ok, (text, problem)
        out_pans.append({"text": text, "valid": ok})

    expiries = [("1230", T0, True), ("0126", T0, True), ("1225", T0, False), ("1399", T0, False),
                ("١٢٣٠", T0, False), ("12/30", T0, False), ("123", T0, False)]
    out_exp = []
    for text, at, ok in expiries:
        problem = rules.expiry_problem(text, at)
        assert (problem is None) == ok, (text, problem)
        out_exp.append({"text": text, "sale_created_at_ms": at, "valid": ok})

    amounts = [("12.50", "EUR", 1250), ("5", "EUR", 500), (" 7.5 ", "EUR", 750), ("1e2", "EUR", None),
               ("12_50", "EUR", None), ("1_0", "EUR", None), ("+5", "EUR", None), (".5", "EUR", None),
               ("-5", "EUR", None), ("0", "EUR", None), ("٥", "EUR", None), ("５", "EUR", None),
               ("12.505", "EUR", None), ("100", "JPY", 100), ("1.5", "JPY", None), ("1.234", "BHD", 1234),
               ("1,50", "EUR", None), ("NaN", "EUR", None), ("10000000000.00", "EUR", 10**12),
               ("10000000000.01", "EUR", None)]
    out_amounts = []
    for text, currency, minor in amounts:
        try:
            got_minor: int | None = parse_amount(text, currency)
        except InputError:
            got_minor = None
        assert got_minor == minor, (text, got_minor)
        out_amounts.append({"text": text, "currency": currency, "minor": minor})

    revocations = [({"at": T0, "cut_seq": 7}, 7, T0 + 999, False), ({"at": T0, "cut_seq": 7}, 8, T0 - 999, True),
                   ({"at": T0, "cut_seq": None}, 8, T0, False), ({"at": T0, "cut_seq": None}, 1, T0 + 1, True),
                   ({"at": T0}, None, T0 + 1, True)]
    out_rev = []
    for rev, seq_, at, beyond in revocations:
        assert rules.beyond_cut(rev, seq_, at) == beyond
        out_rev.append({"revocation": rev, "entry_seq": seq_, "entry_at_ms": at, "beyond_cut": beyond})

    doc = {
        "description": "Content rules (protocols/rules.md). sales: signed envelopes with the receiver's clock and "
                       "the verdict (valid / not_taken / refused / deferred) under the policies given; inputs: text as typed.",
        "signer_seed_hex": bytes(range(32)).hex(),
        "max_skew_ms": rules.MAX_SKEW_MS,
        "policies": [p.to_json() for p in policies],
        "sales": out_sales, "pans": out_pans, "expiries": out_exp, "amounts": out_amounts,
        "revocation_cuts": out_rev,
    }
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(out_sales)} sales, {len(out_pans)} card numbers, {len(out_exp)} expiries, "
          f"{len(out_amounts)} amounts, {len(out_rev)} revocation cuts")


if __name__ == "__main__":
    main()
