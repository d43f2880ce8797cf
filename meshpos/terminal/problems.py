"""Errors into HTTP answers, in one place: status code, a short code, a message a cashier can
read. No message ever carries a card number: one that holds something like it (an amount field
that held a card number, say) has its digit runs blanked."""

from __future__ import annotations

import logging
import re
from typing import Any

from meshpos.domain import rules
from meshpos.domain.errors import (
    ConfigError, CryptoError, DeviceError, DiskFullError, InputError, MeshposError, PolicyError, StoreError,
)
from meshpos.terminal.sales import Conflict, NotFound, Unprocessable

log = logging.getLogger(__name__)

_DIGITS = re.compile(r"\d[\d .\-_/]*\d")

# most specific first
_MAP: tuple[tuple[type[MeshposError], int, str], ...] = (
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (Unprocessable, 422, "unprocessable"),
    (PolicyError, 422, "unprocessable"),  # content rules, caps, no switch key, a role that does not sell
    (CryptoError, 422, "unprocessable"),
    (DeviceError, 422, "unprocessable"),  # no printer, a reader that failed
    (InputError, 400, "bad_request"),
    (DiskFullError, 507, "disk_full"),
    (StoreError, 503, "unavailable"),
    (ConfigError, 503, "unavailable"),
)


# a sale id (protocols/envelope.md): its node id's last hex digits and its number make a digit run
# that is no card number; one whose node id is all digits is not exempt (it could be a card number)
_SALE_ID = re.compile(r"\b(?=[0-9a-f]{0,15}[a-f])[0-9a-f]{16}-\d{8}\b")


def redact(text: str) -> str:
    parts = _SALE_ID.split(text)
    if len(parts) > 1:  # redact around the sale ids, keep them
        ids = _SALE_ID.findall(text)
        return "".join(redact(p) + (ids[i] if i < len(ids) else "") for i, p in enumerate(parts))
    if not rules.has_card_number(text):
        return text
    cleaned = _DIGITS.sub(lambda m: "[card number removed]" if rules.has_card_number(m.group()) else m.group(), text)
    return cleaned if not rules.has_card_number(cleaned) else "the request held a card number where none belongs"


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": redact(message)}}


def translate(exc: MeshposError) -> tuple[int, dict[str, Any]]:
    for kind, status, code in _MAP:
        if isinstance(exc, kind):
            return status, error_body(code, str(exc))
    log.warning("terminal API: %s: %s", type(exc).__name__, redact(str(exc)))
    return 500, error_body("internal", str(exc))
