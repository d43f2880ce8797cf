#!/usr/bin/env python3
"""Write protocols/vectors/envelope.json from fixed keys and bodies.

Run it only when the envelope format changes on purpose; the tests check the
code against the committed file, so an accidental change of the encoding fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import nacl.signing

from meshpos.wire import envelope
from meshpos.identity import keys

OUT = Path(__file__).resolve().parents[1] / "protocols" / "vectors" / "envelope.json"


def main() -> None:
    terminal_key = nacl.signing.SigningKey(bytes(range(32)))
    switch_key = nacl.signing.SigningKey(bytes(range(32, 64)))
    terminal = keys.node_id_of(bytes(terminal_key.verify_key))
    site = "5173e5a1d00dfeed"
    sealed = envelope.b64e(bytes(range(90)))  # stands in for a SealedBox ciphertext
    cases = [
        ("cash sale", "sale", terminal, terminal_key, {
            "sale_id": envelope.sale_id(terminal, 1), "site": site, "terminal": terminal, "seq": 1,
            "created_at": 1767225600000, "amount_minor": 1250, "currency": "EUR", "method": "cash",
            "description": "Caffè e brioche", "items": [], "card": None}),
        ("card sale", "sale", terminal, terminal_key, {
            "sale_id": envelope.sale_id(terminal, 2), "site": site, "terminal": terminal, "seq": 2,
            "created_at": 1767225660000, "amount_minor": 4200, "currency": "EUR", "method": "card",
            "description": None, "items": [{"name": "T-shirt", "qty": 1, "amount_minor": 4200}],
            "card": {"brand": "visa", "last4": "1111", "entry_mode": "chip", "sealed": sealed}}),
        ("void", "void", terminal, terminal_key, {
            "sale_id": envelope.sale_id(terminal, 2), "site": site, "at": 1767225700000, "reason": "wrong item"}),
        ("settlement result", "result", "switch", switch_key, {
            "sale_id": envelope.sale_id(terminal, 1), "site": site, "status": "approved", "auth_code": "A1B2C3",
            "response_code": "00", "reason": None, "settled_at": 1767229200000, "reversed": False}),
    ]
    vectors = []
    for name, type_, signer, key, body in cases:
        raw = envelope.seal(type_, signer, body, key)
        env = envelope.decode(raw)
        vectors.append({
            "name": name, "signer_seed_hex": bytes(key).hex(), "signer_public_hex": bytes(key.verify_key).hex(),
            "type": type_, "signer": signer, "body": body,
            "signed_bytes_hex": env.signed_bytes().hex(), "signature_hex": env.sig.hex(),
            "envelope": raw.decode("utf-8"),
        })
    doc = {
        "description": "Signed envelope test vectors (protocols/envelope.md). Each envelope is the exact "
                       "UTF-8 bytes; signed_bytes = DOMAIN + canonical JSON without sig.",
        "switch_x25519_public_hex": keys.x25519_public_of(switch_key).hex(),
        "vectors": vectors,
    }
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(vectors)} vectors to {OUT}")


if __name__ == "__main__":
    main()
