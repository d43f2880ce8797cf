"""Receipts: one layout, two outputs (ESC/POS through python-escpos, plain text).

:func:`layout` turns a :class:`ReceiptData` into a list of fully formatted
lines (already wrapped, centred and padded to the paper's characters per
line) plus a QR code and a cut. :func:`render` sends that list to any
python-escpos printer object (``Dummy`` in tests and in the spool, ``Network``,
``Usb``...), :func:`render_text` joins it into the preview shown by
``meshpos receipt ... --preview``. Both read the same list, so the preview is
the print.

Card data: the model holds the brand and the last 4 digits only. Free text
(site, terminal, description) is scrubbed of anything that looks like a card
number, and :func:`layout` refuses to emit any line with a run of 12 or more
digits, so no receipt can carry more than the last 4 digits of a card.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meshpos.domain.currency import check_currency, format_amount
from meshpos.devices import escpos_import
from meshpos.domain.errors import ConfigError, EncodingError, InputError, PrinterError
from meshpos.domain.rules import ENTRY_MODES
from meshpos.devices.messages import messages
from meshpos.devices.printers import PrinterConfig
from meshpos.devices.profiles import PaperProfile
from meshpos.wire.acquirer import AUTH_CODE  # an auth or response code on a receipt: as a result may carry it

METHODS = ("card", "cash")
STATUSES = ("pending", "approved", "declined", "expired", "voided")
COPIES = ("customer", "merchant", "outcome")

QR_SIZE_NATIVE = 6
QR_SIZE_IMAGE = 4

_LAST4_RE = re.compile(r"[0-9]{4}")
_BRAND_RE = re.compile(r"[a-z][a-z _-]{0,23}")
_SALE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# 12 to 19 digits, each optionally separated by one space or dash: a PAN as typed.
_PAN_LIKE_RE = re.compile(r"[0-9](?:[ -]?[0-9]){11,18}")


@dataclass(frozen=True, kw_only=True)
class ReceiptData:
    """Everything a receipt shows. Holds no card number: brand and last 4 only."""

    sale_id: str
    site_name: str
    terminal_name: str
    created_at_ms: int
    amount_minor: int
    currency: str
    method: str
    status: str
    card_brand: str | None = None
    card_last4: str | None = None
    entry_mode: str | None = None
    description: str | None = None
    auth_code: str | None = None
    response_code: str | None = None
    offline_deadline_ms: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sale_id, str) or not _SALE_ID_RE.fullmatch(self.sale_id):
            raise InputError(f"sale id {self.sale_id!r} is not a printable reference")
        for name in ("site_name", "terminal_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"receipt {name} must be a non-empty string")
        if self.description is not None and not isinstance(self.description, str):
            raise InputError("receipt description must be a string")
        for name in ("created_at_ms", "amount_minor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"receipt {name} must be a positive integer")
        if self.offline_deadline_ms is not None and (
            not isinstance(self.offline_deadline_ms, int) or isinstance(self.offline_deadline_ms, bool)
        ):
            raise InputError("receipt offline_deadline_ms must be an integer")
        check_currency(self.currency)
        if self.method not in METHODS:
            raise InputError(f"payment method must be one of {', '.join(METHODS)}")
        if self.status not in STATUSES:
            raise InputError(f"sale status must be one of {', '.join(STATUSES)}")
        if self.method == "card":
            if not isinstance(self.card_last4, str) or not _LAST4_RE.fullmatch(self.card_last4):
                raise InputError("a card receipt needs exactly the last 4 digits of the card")
            if not isinstance(self.card_brand, str) or not _BRAND_RE.fullmatch(self.card_brand):
                raise InputError(f"card brand {self.card_brand!r} is not a brand name")
            if self.entry_mode is not None and self.entry_mode not in ENTRY_MODES:
                raise InputError(f"entry mode must be one of {', '.join(ENTRY_MODES)}")
        elif self.card_brand is not None or self.card_last4 is not None or self.entry_mode is not None:
            raise InputError("a cash receipt carries no card data")
        for name in ("auth_code", "response_code"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not AUTH_CODE.fullmatch(value)):
                raise InputError(f"{name} must be 1 to 8 letters or digits")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> ReceiptData:
        if not isinstance(obj, dict):
            raise EncodingError("receipt data must be a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise EncodingError(f"receipt data has unknown fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise EncodingError(f"receipt data is incomplete: {exc}") from exc


@dataclass(frozen=True)
class ReceiptOptions:
    """Per-terminal choices: the paper profile, the language, the time zone shown."""

    profile: PaperProfile
    language: str = "en"
    tz: str = "UTC"

    def __post_init__(self) -> None:
        messages(self.language)
        _zone(self.tz)

    @property
    def width(self) -> int:
        return self.profile.chars_per_line

    @classmethod
    def for_printer(cls, config: PrinterConfig, language: str) -> ReceiptOptions:
        """The options of a terminal: its printer's profile and time zone, its language."""
        return cls(profile=config.profile, language=language, tz=config.tz)


@lru_cache(maxsize=32)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ConfigError(f"unknown time zone {name!r} for receipts (use e.g. UTC or Europe/Rome)") from exc


# --- the layout: a list of operations -------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One printed line, already padded/centred to the paper width."""

    text: str
    bold: bool = False
    tall: bool = False
    reference: bool = False  # carries the sale reference (exempt from the digit-run check)


@dataclass(frozen=True)
class QrCode:
    data: str


@dataclass(frozen=True)
class Cut:
    pass


Op = Line | QrCode | Cut


def receipt_title_key(data: ReceiptData, copy: str) -> str:
    if copy == "outcome":
        return "title_outcome"
    return "title_card" if data.method == "card" else "title_cash"


class _Builder:
    """Formats lines to the paper width; every helper appends finished :class:`Line` ops."""

    def __init__(self, width: int) -> None:
        self.w = width
        self.ops: list[Op] = []

    def center(self, text: str, *, bold: bool = False, tall: bool = False, reference: bool = False) -> None:
        for chunk in _wrap(text, self.w):
            self.ops.append(Line(chunk.center(self.w).rstrip(), bold=bold, tall=tall, reference=reference))

    def para(self, text: str) -> None:
        for chunk in _wrap(text, self.w):
            self.ops.append(Line(chunk))

    def pair(self, label: str, value: str, *, bold: bool = False, tall: bool = False,
             reference: bool = False) -> None:
        w = self.w
        if len(label) + 1 + len(value) <= w:
            self.ops.append(Line(label + value.rjust(w - len(label)), bold=bold, tall=tall, reference=reference))
            return
        self.ops.append(Line(label, bold=bold, tall=tall))
        for chunk in _wrap(value, w):
            self.ops.append(Line(chunk.rjust(w), bold=bold, tall=tall, reference=reference))

    def rule(self) -> None:
        self.ops.append(Line("-" * self.w))

    def blank(self) -> None:
        self.ops.append(Line(""))


def layout(data: ReceiptData, options: ReceiptOptions, copy: str = "customer") -> list[Op]:
    """The receipt for one sale and one copy (customer, merchant, or the final outcome slip)."""
    if copy not in COPIES:
        raise InputError(f"receipt copy must be one of {', '.join(COPIES)}")
    msg = messages(options.language)
    b = _Builder(options.width)
    b.center(_scrub(data.site_name), bold=True)
    b.center(f"{msg['terminal']}: {_scrub(data.terminal_name)}")
    b.rule()
    b.center(msg[receipt_title_key(data, copy)], bold=True)
    b.center(msg[f"copy_{copy}"])
    b.pair(msg["sale_date"] if copy == "outcome" else msg["date"], _when(data.created_at_ms, options))
    b.pair(msg["reference"], data.sale_id, reference=True)
    if data.description and copy != "outcome":
        b.para(_scrub(data.description))
    b.rule()
    b.pair(msg["total"], _amount(data.amount_minor, data.currency, msg), bold=True, tall=True)
    if data.method == "card":
        assert data.card_brand is not None and data.card_last4 is not None
        b.pair(msg["card"], f"{data.card_brand.upper()} **** {data.card_last4}")
        if data.entry_mode is not None and copy != "outcome":
            b.pair(msg["entry"], msg[f"entry_{data.entry_mode}"])
    else:
        b.para(msg["paid_cash"])
    b.rule()
    _status_block(b, data, options, copy, msg)
    b.ops.append(QrCode(data.sale_id))
    b.center(data.sale_id, reference=True)
    b.center(msg["keep_merchant"] if copy == "merchant" else msg["keep_customer"])
    b.ops.append(Cut())
    _check_no_card_number(b.ops)
    return b.ops


def _status_block(b: _Builder, data: ReceiptData, options: ReceiptOptions, copy: str,
                  msg: Mapping[str, str]) -> None:
    if data.method == "cash":
        if data.status == "voided":
            b.center(msg["voided_head"], bold=True, tall=True)
            b.para(msg["cash_voided_body"])
            b.blank()
        return
    status = data.status
    b.center(msg[f"{status}_head"], bold=True, tall=True)
    b.para(msg[f"{status}_body"])
    if status == "pending":
        if data.offline_deadline_ms is not None:
            b.pair(msg["pending_deadline"], _when(data.offline_deadline_ms, options))
        if copy == "merchant":
            b.para(msg["pending_merchant"])
    if data.auth_code and status == "approved":
        b.pair(msg["auth_code"], data.auth_code, bold=True)
    if data.response_code and (status == "declined" or copy == "merchant"):
        reason = msg.get(f"rc_{data.response_code}")
        b.pair(msg["response_code"], f"{data.response_code} {reason}" if reason else data.response_code)
    b.blank()


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def _amount(minor: int, currency: str, msg: Mapping[str, str]) -> str:
    return f"{format_amount(minor, currency).replace('.', msg['decimal_sep'])} {currency}"


def _when(ms: int, options: ReceiptOptions) -> str:
    moment = datetime.fromtimestamp(ms // 1000, tz=_zone(options.tz))
    return moment.strftime("%Y-%m-%d %H:%M %Z")


def _scrub(text: str) -> str:
    """Replace anything shaped like a card number in free text with its last 4 digits."""

    def masked(match: re.Match[str]) -> str:
        digits = re.sub(r"[^0-9]", "", match.group(0))
        return f"**** {digits[-4:]}"

    return _PAN_LIKE_RE.sub(masked, " ".join(text.split()))


def _check_no_card_number(ops: list[Op]) -> None:
    # The data model already holds only the last 4 digits; this is the last line of defence.
    for op in ops:
        if isinstance(op, Line) and not op.reference and _PAN_LIKE_RE.search(op.text):
            raise PrinterError("refusing to print a receipt line that looks like a card number")


# --- the two outputs ----------------------------------------------------------------


def render(printer: Any, data: ReceiptData, options: ReceiptOptions, copy: str = "customer") -> None:
    """Send the receipt to a python-escpos printer object (``escpos.escpos.Escpos``)."""
    ops = layout(data, options, copy)
    printer.hw("INIT")
    printer.charcode(options.profile.codepage)
    bold = tall = False  # ESC @ leaves both off
    for op in ops:
        if isinstance(op, Line):
            if op.bold != bold:
                printer.set(bold=op.bold)
                bold = op.bold
            if op.tall != tall:
                printer.set(double_height=True) if op.tall else printer.set(normal_textsize=True)
                tall = op.tall
            printer.textln(op.text)
        elif isinstance(op, QrCode):
            printer.set(align="center")
            if options.profile.qr == "native":
                printer.qr(op.data, native=True, size=QR_SIZE_NATIVE)
            else:
                printer.qr(op.data, native=False, size=QR_SIZE_IMAGE)
            printer.set(align="left")
        else:
            printer.cut()


def render_bytes(data: ReceiptData, options: ReceiptOptions, copy: str = "customer") -> bytes:
    """The ESC/POS bytes of one receipt, rendered with python-escpos's ``Dummy``."""
    escpos_import.load()
    from escpos.printer import Dummy  # type: ignore[import-untyped]

    dummy = Dummy(profile=options.profile.escpos_profile)
    render(dummy, data, options, copy)
    return bytes(dummy.output)


def render_text(data: ReceiptData, options: ReceiptOptions, copy: str = "customer") -> str:
    """The plain-text preview of exactly what :func:`render` prints."""
    w = options.width
    out: list[str] = []
    for op in layout(data, options, copy):
        if isinstance(op, Line):
            out.append(op.text)
        elif isinstance(op, QrCode):
            label = f"[QR {op.data}]"
            out.append((label if len(label) <= w else "[QR]").center(w).rstrip())
    return "\n".join(out) + "\n"
