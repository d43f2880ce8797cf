"""A new key's id always holds a hex letter (meshpos.identity.keys.generate): a node whose id was
16 decimal digits had its own sale ids blanked as card numbers in its error messages (the
terminal API's 409 named "[card number removed]" instead of the sale; seen once in CI)."""

from __future__ import annotations

import itertools

import nacl.signing
import pytest

from meshpos.identity import keys
from meshpos.terminal.problems import redact


def _all_digit_key() -> nacl.signing.SigningKey:
    for n in itertools.count():
        key = nacl.signing.SigningKey(n.to_bytes(32, "big"))
        if keys.node_id_of(bytes(key.verify_key)).isdigit():
            return key
    raise AssertionError


def test_a_key_whose_id_is_all_digits_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _all_digit_key()
    bad_id = keys.node_id_of(bytes(bad.verify_key))
    assert "[card number removed]" in redact(f"sale {bad_id}-00000003")  # why such an id is refused
    drawn = iter([bad, nacl.signing.SigningKey(bytes(32))])
    monkeypatch.setattr(nacl.signing.SigningKey, "generate", classmethod(lambda cls: next(drawn)))
    key = keys.generate()
    node_id = keys.node_id_of(bytes(key.verify_key))
    assert key is not bad and not node_id.isdigit()
    assert redact(f"sale {node_id}-00000003") == f"sale {node_id}-00000003"
