"""Rules on the *content* of entries: one validation, written once, applied everywhere.

A signature says who wrote an entry, not that it is harmless. Every rule here is
applied by ``sell`` before a sale is signed, by every node when it merges an entry
(an entry that breaks one is kept out of views, totals and caps, and shown as
refused with the reason), and by the switch before anything reaches the acquirer.
Normative text: protocols/rules.md. Pure functions: time comes in as ``now_ms``.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from typing import Any, Iterable, Iterator

from meshpos.domain.currency import CURRENCIES
from meshpos.domain.errors import ContentError
from meshpos.domain.policy import SitePolicy

# How far ahead of the receiver's clock a signed time may be (sale created_at, lease
# granted_at, status time). A sale dated further ahead is *deferred*: refused until the
# receiver's clock is within the skew, then judged as any other.
MAX_SKEW_MS = 5 * 60 * 1000

PAN_MIN, PAN_MAX = 12, 19
BRANDS = ("visa", "mastercard", "amex", "maestro", "other")
ENTRY_MODES = ("chip", "contactless", "magstripe", "manual")
MAX_DESCRIPTION = 200

# A run of 12 or more digits (any script), consecutive digits split by at most three spaces,
# dots, dashes, underscores or slashes: what a card number typed into free text looks like.
# It is searched in the text as a reader sees it (``digits_view``).
_DIGIT_RUN = re.compile(r"(?:\d[ .\-_/]{0,3}){11,}\d")
# Bidirectional formatting characters reorder what a listing shows (a description could make
# the amount beside it read differently): refused in free text like control characters.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# The same two character rules as one search each (every node runs them on every entry it takes
# in: a compiled class instead of a generator per character).
_CONTROL_OR_BIDI = re.compile("[\x00-\x1f\x7f-\x9f" + "".join(sorted(BIDI_CONTROLS)) + "]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def is_ascii_digits(text: object, min_len: int = 1, max_len: int = 64) -> bool:
    """True for a str of ASCII digits 0-9 only (``str.isdigit`` also takes '４' and '٤')."""
    return (isinstance(text, str) and min_len <= len(text) <= max_len
            and text.isascii() and text.isdigit())  # the ASCII characters isdigit takes are 0-9


def luhn_ok(pan: str) -> bool:
    if not is_ascii_digits(pan, 1, 64):
        return False
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def pan_problem(pan: object) -> str | None:
    """Why ``pan`` is not a card number, or None. Never echoes the number."""
    if not is_ascii_digits(pan, PAN_MIN, PAN_MAX):
        return f"card number must be {PAN_MIN} to {PAN_MAX} digits, ASCII 0-9 only"
    assert isinstance(pan, str)
    if not luhn_ok(pan):
        return f"card number ending {pan[-4:]} fails the Luhn check (mistyped?)"
    if pan[0] == "0" or len(set(pan)) == 1:
        return f"card number ending {pan[-4:]} is not an issued card number"
    return None


def expiry_problem(expiry: object, at_ms: int | None) -> str | None:
    """Why ``expiry`` (MMYY) is not acceptable for a sale at ``at_ms``, or None.

    A card is valid through the last day of its expiry month (UTC)."""
    if expiry is None:
        return None
    if not is_ascii_digits(expiry, 4, 4):
        return "expiry must be MMYY in ASCII digits"
    assert isinstance(expiry, str)
    month, year = int(expiry[:2]), 2000 + int(expiry[2:])
    if not 1 <= month <= 12:
        return f"expiry must be MMYY: month {expiry[:2]} is not 01-12"
    if at_ms is not None:
        at_year, at_month = _year_month(at_ms)
        if (year, month) < (at_year, at_month):
            return f"card expired at the end of {expiry[:2]}/{expiry[2:]}"
    return None


def _year_month(ms: int) -> tuple[int, int]:
    when = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
    return when.year, when.month


def digits_view(text: str) -> str:
    """``text`` as a reader sees its digits: invisible format characters (category Cf: zero-width
    space and joiners, bidirectional marks, soft hyphen, word joiner) removed, then compatibility
    forms folded by NFKC (superscript, subscript, circled and full-width digits become ASCII,
    no-break and thin spaces become spaces). Unicode data of Python 3.11 (Unicode 14.0)."""
    if text.isascii():  # no format character, and NFKC leaves ASCII as it is
        return text
    visible = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return unicodedata.normalize("NFKC", visible)


def has_card_number(text: str | None) -> bool:
    """True if free text holds something that looks like a card number (12+ digits in a run),
    however it is disguised: '4111\u200b1111...', '⁴¹¹¹...', '4111 - 1111 - ...'."""
    return bool(text) and _DIGIT_RUN.search(digits_view(text or "")) is not None


def strings_in(value: object) -> Iterator[str]:
    """Every string inside a JSON value, keys included, and every integer as its decimal text
    (a card number carried as a JSON number is still one); canonical JSON bounds the nesting."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, int):
        yield str(value)
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from strings_in(key)
            yield from strings_in(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from strings_in(inner)


def description_problem(text: object, what: str = "description") -> str | None:
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION:
        return f"{what} must be text of at most {MAX_DESCRIPTION} characters"
    if _CONTROL_OR_BIDI.search(text) is not None:
        return f"{what} holds control or bidirectional formatting characters"
    if _SURROGATE.search(text) is not None:  # a lone surrogate (JSON "\ud800"): no UTF-8 for it
        return f"{what} holds a lone surrogate (U+D800-U+DFFF), which is not a character"
    if has_card_number(text):
        return f"{what} holds a run of 12 or more digits (a card number?)"
    return None


def free_text_problem(entry_type: str, body: dict[str, Any]) -> str | None:
    """Why the free text of an entry (a sale's description and items, a void's reason) breaks the
    text rule, or None. Policy-free and clock-free, so every node reaches the same verdict from
    the entry alone: such an entry is not taken at all (never stored, never relayed), so that a
    card number typed into free text never spreads (protocols/rules.md, "Free text")."""
    if entry_type == "sale":
        problem = description_problem(body.get("description"))
        if problem is None and any(has_card_number(text) for text in strings_in(body.get("items") or [])):
            problem = "an item holds a run of 12 or more digits (a card number?)"
        return problem
    if entry_type == "void":
        return description_problem(body.get("reason"), "reason")
    return None


def policy_at(policies: Iterable[SitePolicy], at_ms: int) -> SitePolicy:
    """The policy in force at ``at_ms``: the highest version whose ``effective_at`` is not
    later than ``at_ms``; before every policy took effect, the lowest version."""
    ordered = sorted(policies, key=lambda p: p.version)
    if not ordered:
        raise ValueError("no policy")
    chosen = ordered[0]
    for policy in ordered:
        if policy.effective_at <= at_ms:
            chosen = policy
    return chosen


def future_problem(at_ms: int, now_ms: int, what: str) -> str | None:
    ahead = at_ms - now_ms
    if ahead > MAX_SKEW_MS:
        return f"{what} is {ahead // 1000} s ahead of this node's clock (more than the {MAX_SKEW_MS // 1000} s allowed)"
    return None


def sale_problem(body: dict[str, Any], policy: SitePolicy) -> str | None:
    """Why a sale body (schema-checked already) breaks a content rule of ``policy`` (the
    policy in force at its ``created_at``), or None. Independent of the receiver's clock:
    every node and the switch reach the same verdict. The clock rule is ``future_problem``."""
    currency = body.get("currency")
    if currency != policy.currency:
        return f"currency {str(currency)[:8]!r} is not the site's ({policy.currency})"
    if currency not in CURRENCIES:
        return f"currency {str(currency)[:8]!r} is not supported"
    amount = body.get("amount_minor")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        return "amount must be a positive integer of minor units"
    if amount > policy.max_sale_minor:
        return f"amount {amount} is over the per-sale offline cap of {policy.max_sale_minor} (minor units)"
    problem = free_text_problem("sale", body)
    if problem:
        return problem
    card = body.get("card")
    if body.get("method") == "card":
        if not isinstance(card, dict):
            return "card sale without card data"
        if not is_ascii_digits(card.get("last4"), 4, 4):
            return "card last4 must be 4 ASCII digits"
        if card.get("brand") not in BRANDS:
            return f"card brand {str(card.get('brand'))[:16]!r} is not one of {', '.join(BRANDS)}"
        if card.get("entry_mode") not in ENTRY_MODES:
            return "unknown card entry mode"
    elif card is not None:
        return "cash sale with card data"
    return None


def check_sale(body: dict[str, Any], policy: SitePolicy, now_ms: int | None) -> None:
    """Raise ContentError unless the sale obeys every content rule (and, when ``now_ms`` is
    given, is not dated beyond the skew ahead of it)."""
    problem = sale_problem(body, policy)
    if problem is None and now_ms is not None:
        problem = future_problem(int(body.get("created_at", 0)), now_ms, "the sale's time")
    if problem is not None:
        raise ContentError(problem)


def seq_of(sale_id: str, terminal: str) -> int | None:
    """The sequence number in ``<terminal>-<seq>``, or None if ``sale_id`` is not of that terminal."""
    if not sale_id.startswith(terminal + "-"):
        return None
    text = sale_id[len(terminal) + 1:]
    return int(text) if is_ascii_digits(text, 1, 16) else None


def beyond_cut(revocation: dict[str, Any], seq: int | None, at_ms: int) -> bool:
    """Whether an entry of a revoked node falls after its revocation's cut (and is refused).

    A revocation with a ``cut_seq`` keeps the node's sales with ``seq <= cut_seq`` (and
    their voids); without one, entries dated up to ``at``. Entries with no sequence number
    (voids are judged by their sale, leases and statuses by time) use ``at``."""
    cut_seq = revocation.get("cut_seq")
    if isinstance(cut_seq, int) and seq is not None:
        return seq > cut_seq
    return at_ms > int(revocation["at"])


def card_problem(pan: str, expiry: str | None, body: dict[str, Any]) -> str | None:
    """What the switch checks once it has opened the sealed card data: the card number is
    valid, matches the envelope's last 4 and brand, and the card was not expired at the
    sale's time."""
    return pan_problem(pan) or card_match_problem(pan, expiry, body)


def card_match_problem(pan: str, expiry: str | None, body: dict[str, Any]) -> str | None:
    """:func:`card_problem` but for the number itself: for a caller that ran ``pan_problem``
    on it already (the switch, through the acquirer request it builds), so it runs once."""
    card = body.get("card") or {}
    if pan[-4:] != card.get("last4"):
        return "sealed card number does not match the envelope's last 4 digits"
    return expiry_problem(expiry, body.get("created_at"))
