"""The content rules (meshpos/domain/rules.py) against the vectors in protocols/vectors/rules.json, and
properties of the character-set rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpos.domain import rules
from meshpos.wire import envelope
from meshpos.wire.cards import check_expiry, check_pan
from meshpos.domain.currency import parse_amount
from meshpos.domain.errors import InputError
from meshpos.domain.policy import SitePolicy

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "protocols/vectors/rules.json").read_text("utf-8"))
POLICIES = [SitePolicy.from_json(p, "vector") for p in VECTORS["policies"]]


def test_the_documented_skew_is_the_one_applied() -> None:
    assert VECTORS["max_skew_ms"] == rules.MAX_SKEW_MS


@pytest.mark.parametrize("vec", VECTORS["sales"], ids=lambda v: v["name"])
def test_sale_vectors(vec: dict) -> None:
    env = envelope.decode(vec["envelope"].encode("utf-8"))
    envelope.check_schema(env)
    body = env.body
    policy = rules.policy_at(POLICIES, body["created_at"])
    assert policy.version == vec["policy_version_in_force"]
    problem = rules.sale_problem(body, policy)
    ahead = rules.future_problem(body["created_at"], vec["receiver_now_ms"], "sale")
    text = rules.free_text_problem("sale", body)
    verdict = "not_taken" if text else "refused" if problem else ("deferred" if ahead else "valid")
    assert verdict == vec["verdict"], (problem, ahead)
    if vec["reason_contains"]:
        assert vec["reason_contains"] in (problem or ahead or "")
    with pytest.raises(Exception) if verdict != "valid" else _nothing():
        rules.check_sale(body, policy, vec["receiver_now_ms"])


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


@pytest.mark.parametrize("vec", VECTORS["pans"], ids=lambda v: v["text"])
def test_pan_vectors(vec: dict) -> None:
    if vec["valid"]:
        assert check_pan(vec["text"]) == vec["text"].replace(" ", "").replace("-", "")
    else:
        with pytest.raises(InputError) as err:
            check_pan(vec["text"])
        assert vec["text"] not in str(err.value) or len(vec["text"]) < 12  # never echoes a number


@pytest.mark.parametrize("vec", VECTORS["expiries"], ids=lambda v: v["text"])
def test_expiry_vectors(vec: dict) -> None:
    if vec["valid"]:
        assert check_expiry(vec["text"], vec["sale_created_at_ms"]) == vec["text"]
    else:
        with pytest.raises(InputError):
            check_expiry(vec["text"], vec["sale_created_at_ms"])


@pytest.mark.parametrize("vec", VECTORS["amounts"], ids=lambda v: f"{v['text']}-{v['currency']}")
def test_amount_vectors(vec: dict) -> None:
    if vec["minor"] is None:
        with pytest.raises(InputError):
            parse_amount(vec["text"], vec["currency"])
    else:
        assert parse_amount(vec["text"], vec["currency"]) == vec["minor"]


@pytest.mark.parametrize("vec", VECTORS["revocation_cuts"], ids=lambda v: json.dumps(v)[:60])
def test_revocation_cut_vectors(vec: dict) -> None:
    assert rules.beyond_cut(vec["revocation"], vec["entry_seq"], vec["entry_at_ms"]) == vec["beyond_cut"]


# -- properties -------------------------------------------------------------------------------

NON_ASCII_DIGITS = [chr(c) for c in range(0x80, 0x30000) if chr(c).isdigit()]  # '²' too
NON_ASCII_DECIMALS = [ch for ch in NON_ASCII_DIGITS if ch.isdecimal()]  # Unicode category Nd


@given(st.text(st.sampled_from(NON_ASCII_DIGITS + list("0123456789")), min_size=12, max_size=19))
def test_no_digit_but_ascii_passes_as_a_card_number(text: str) -> None:
    ok = rules.pan_problem(text) is None
    if any(ch not in "0123456789" for ch in text):
        assert not ok
    with pytest.raises(InputError) if not ok else _nothing():
        check_pan(text)


@given(st.text(st.sampled_from(NON_ASCII_DIGITS), min_size=1, max_size=6))
def test_no_amount_or_expiry_of_other_digits(digits: str) -> None:
    with pytest.raises(InputError):
        parse_amount(digits, "EUR")
    with pytest.raises(InputError):
        check_expiry((digits * 4)[:4])


@given(st.lists(st.sampled_from(NON_ASCII_DECIMALS + list("0123456789")), min_size=12, max_size=19),
       st.sampled_from(["", " ", "-", "."]), st.text(max_size=10))
def test_a_card_number_in_free_text_is_found_in_any_script(digits: list[str], sep: str, around: str) -> None:
    text = around + sep.join(digits) + around
    assert rules.has_card_number(text)
    assert rules.description_problem(text[:200]) is not None or len(text) > 200


def test_policy_in_force() -> None:
    v1 = SitePolicy(site_id="s", name="n", version=1)
    v2 = SitePolicy(site_id="s", name="n", version=2, effective_at=1000)
    v3 = SitePolicy(site_id="s", name="n", version=3, effective_at=500)
    assert rules.policy_at([v1, v2, v3], 0).version == 1
    assert rules.policy_at([v3, v2, v1], 600).version == 3
    assert rules.policy_at([v1, v2, v3], 1000).version == 3  # the highest version that took effect
    only_later = SitePolicy(site_id="s", name="n", version=4, effective_at=10**9)
    assert rules.policy_at([only_later], 0).version == 4  # before every version: the lowest


def test_the_character_rules_hold_for_every_code_point() -> None:
    """Control characters (C0, DEL, C1), bidirectional formatting characters and lone surrogates
    are refused in free text, every other single character is not (the rules are compiled
    searches; this checks them against their definition, one code point at a time)."""
    for cp in range(0x110000):
        ch = chr(cp)
        refused = cp < 32 or 0x7F <= cp < 0xA0 or ch in rules.BIDI_CONTROLS or 0xD800 <= cp <= 0xDFFF
        assert (rules.description_problem(f"a{ch}b") is not None) is refused, hex(cp)
