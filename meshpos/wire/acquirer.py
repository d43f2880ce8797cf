"""A sale as any acquirer sees it, and the answer: the messages every acquirer link
(ISO 8583, JSON over HTTPS) encodes from and decodes to. Pure data with its checks.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from meshpos.domain.currency import numeric_code
from meshpos.domain.errors import InputError
from meshpos.domain.rules import ENTRY_MODES
from meshpos.wire.cards import check_expiry, check_pan, mask

_PRINTABLE = frozenset(string.ascii_letters + string.digits + " -_./")


def _check_text(name: str, value: str, length: int) -> None:
    if not isinstance(value, str) or len(value) != length or not set(value) <= _PRINTABLE:
        raise InputError(f"{name} must be {length} characters of letters, digits, space or -_./")


@dataclass(frozen=True)
class AcquirerRequest:
    """One sale as the acquirer sees it. ``pan`` and ``expiry`` are kept out of ``repr``."""

    sale_id: str
    pan: str = field(repr=False)
    expiry: str | None = field(repr=False)  # MMYY
    amount_minor: int
    currency: str  # ISO 4217 alpha, e.g. "EUR"
    created_at_ms: int  # UTC ms of the sale
    entry_mode: str  # one of meshpos.wire.cards.ENTRY_MODES
    terminal_id: str  # field 41, 8 characters
    merchant_id: str  # field 42, 15 characters
    stan: int  # field 11, 1..999999
    rrn: str  # field 37, 12 characters

    def __post_init__(self) -> None:
        if not isinstance(self.sale_id, str) or not 1 <= len(self.sale_id) <= 128:
            raise InputError("sale_id must be 1 to 128 characters")
        if not isinstance(self.pan, str) or check_pan(self.pan) != self.pan:
            raise InputError("card number must be given as digits only")
        check_expiry(self.expiry)
        if (
            not isinstance(self.amount_minor, int)
            or isinstance(self.amount_minor, bool)
            or not 1 <= self.amount_minor <= 999_999_999_999
        ):
            raise InputError("amount_minor must be an integer from 1 to 999999999999")
        numeric_code(self.currency)
        if not isinstance(self.created_at_ms, int) or self.created_at_ms < 0:
            raise InputError("created_at_ms must be a non-negative integer")
        if self.entry_mode not in ENTRY_MODES:
            raise InputError(f"entry mode must be one of {', '.join(ENTRY_MODES)}")
        _check_text("terminal_id", self.terminal_id, 8)
        _check_text("merchant_id", self.merchant_id, 15)
        if not isinstance(self.stan, int) or isinstance(self.stan, bool) or not 1 <= self.stan <= 999_999:
            raise InputError("stan must be an integer from 1 to 999999")
        _check_text("rrn", self.rrn, 12)

    @property
    def masked_pan(self) -> str:
        return mask(self.pan)

    def describe(self) -> str:
        """A log-safe one-liner naming the sale (never the full PAN)."""
        return f"sale {self.sale_id} (rrn {self.rrn}, card {self.masked_pan})"


@dataclass(frozen=True)
class AcquirerResult:
    approved: bool
    response_code: str
    auth_code: str | None


RESPONSE_CODE = re.compile(r"[A-Za-z0-9]{2}")  # field 39: two ASCII letters or digits, "00" approves
AUTH_CODE = re.compile(r"[A-Za-z0-9]{1,8}")  # field 38 is 6 (an); the signed result and the receipt take 1 to 8


def fit_auth_code(auth_code: str | None) -> str | None:
    """The approval's auth code if it is one a result may carry and a receipt print (1 to 8 ASCII
    letters or digits), else None: an acquirer's odd code (empty, too long, control characters)
    must not cost the approval that it booked."""
    return auth_code if auth_code is not None and AUTH_CODE.fullmatch(auth_code) else None
