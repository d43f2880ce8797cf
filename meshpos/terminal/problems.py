"""Errors into HTTP answers, in one place: status code, a short code, a message a cashier can
read. No message ever carries a card number: one that holds something like it (an amount field
that held a card number, say) has its digit runs blanked."""

from __future__ import annotations

import logging
import re
from typing import Any

from meshpos.domain import errors, rules
from meshpos.domain.errors import (
    ConfigError, CryptoError, DeviceError, DiskFullError, EncodingError, InputError, MeshposError, PolicyError, StoreError,
)
from meshpos.terminal.sales import Conflict, NotFound, Unprocessable
from meshpos.wire.envelope import SALE_ID_IN_TEXT

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
    (EncodingError, 400, "bad_request"),  # bytes that are no envelope (POST /v1/node/ingest)
    (DiskFullError, 507, "disk_full"),
    (StoreError, 503, "unavailable"),
    (ConfigError, 503, "unavailable"),
)


def redact(text: str) -> str:
    parts = SALE_ID_IN_TEXT.split(text)  # a sale id is kept whole (wire/envelope.py)
    if len(parts) > 1:  # redact around the sale ids, keep them
        ids = SALE_ID_IN_TEXT.findall(text)
        return "".join(redact(p) + (ids[i] if i < len(ids) else "") for i, p in enumerate(parts))
    if not rules.has_card_number(text):
        return text
    cleaned = _DIGITS.sub(lambda m: "[card number removed]" if rules.has_card_number(m.group()) else m.group(), text)
    return cleaned if not rules.has_card_number(cleaned) else "the request held a card number where none belongs"


def error_body(code: str, message: str, kind: str | None = None) -> dict[str, Any]:
    error = {"code": code, "message": redact(message)}
    if kind is not None:
        error["type"] = kind
    return {"error": error}


def error_type(exc: MeshposError) -> str:
    """The class of meshpos.domain.errors that ``exc`` is (its nearest one): the CLI raises it
    again from an answer, so a command has the same exit code whether its node runs or not."""
    for cls in type(exc).__mro__:
        if getattr(errors, cls.__name__, None) is cls:
            return str(cls.__name__)
    return MeshposError.__name__


def translate(exc: MeshposError) -> tuple[int, dict[str, Any]]:
    for kind, status, code in _MAP:
        if isinstance(exc, kind):
            return status, error_body(code, str(exc), error_type(exc))
    log.warning("terminal API: %s: %s", type(exc).__name__, redact(str(exc)))
    return 500, error_body("internal", str(exc), error_type(exc))
