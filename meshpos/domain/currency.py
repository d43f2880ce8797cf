"""ISO 4217 currencies meshpos accepts: alpha code -> (numeric code, minor units).

Only currencies with a fixed number of minor units; amounts are always carried
as integers in minor units.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from meshpos.domain.errors import InputError

CURRENCIES: dict[str, tuple[str, int]] = {
    "EUR": ("978", 2), "CHF": ("756", 2), "GBP": ("826", 2), "USD": ("840", 2),
    "SEK": ("752", 2), "NOK": ("578", 2), "DKK": ("208", 2), "PLN": ("985", 2),
    "CZK": ("203", 2), "HUF": ("348", 2), "RON": ("946", 2), "BGN": ("975", 2),
    "CAD": ("124", 2), "AUD": ("036", 2), "NZD": ("554", 2), "JPY": ("392", 0),
    "ISK": ("352", 0), "KRW": ("410", 0), "BHD": ("048", 3), "KWD": ("414", 3),
    "TND": ("788", 3), "MXN": ("484", 2), "BRL": ("986", 2), "ZAR": ("710", 2),
}


def check_currency(code: str) -> str:
    if code not in CURRENCIES:
        raise InputError(f"unknown currency {code!r}: use an ISO 4217 code such as EUR, CHF, GBP")
    return code


def numeric_code(code: str) -> str:
    return CURRENCIES[check_currency(code)][0]


def minor_units(code: str) -> int:
    return CURRENCIES[check_currency(code)][1]


_AMOUNT = re.compile(r"[0-9]{1,13}(?:\.[0-9]{1,3})?", re.ASCII)


def parse_amount(text: str, currency: str) -> int:
    """'12.50' in EUR -> 1250. Rejects zero, negative and over-precise amounts."""
    digits = minor_units(currency)
    if isinstance(text, str) and text.strip().startswith("-"):
        raise InputError(f"amount must be greater than zero, got {text.strip()[:32]}")
    if not isinstance(text, str) or not _AMOUNT.fullmatch(text.strip()):
        raise InputError(f"amount {str(text)[:32]!r} is not a number: write a plain decimal amount such as "
                         "12.50 (ASCII digits, one optional '.', no sign, exponent or '_')")
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, AttributeError) as exc:
        raise InputError(f"amount {text!r} is not a number") from exc
    if not value.is_finite():
        raise InputError(f"amount {text!r} is not a number")
    if value <= 0:
        raise InputError(f"amount must be greater than zero, got {text}")
    scaled = value.scaleb(digits)
    if scaled != scaled.to_integral_value():
        raise InputError(f"amount {text} has more than {digits} decimal places for {currency}")
    minor = int(scaled)
    if minor > 10**12:
        raise InputError(f"amount {text} is implausibly large")
    return minor


def format_amount(minor: int, currency: str) -> str:
    """1250 in EUR -> '12.50'. A currency meshpos does not know (only a refused sale can carry
    one) is shown in minor units as they are, so one bad entry never breaks a listing."""
    digits = CURRENCIES[currency][1] if currency in CURRENCIES else 0
    sign = "-" if minor < 0 else ""
    minor = abs(minor)
    if digits == 0:
        return f"{sign}{minor}"
    return f"{sign}{minor // 10**digits}.{minor % 10**digits:0{digits}d}"
