"""Receipts rendered through python-escpos's Dummy, checked from the ESC/POS bytes."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from escpos.printer import Dummy  # type: ignore[import-untyped]

from meshpos.devices import receipts
from meshpos.devices.messages import CATALOGUE
from meshpos.devices.profiles import (
    ENV_DEVICES_DIR,
    list_printer_profiles,
    load_printer_profile,
)
from meshpos.devices.receipts import ReceiptData, ReceiptOptions, layout, render, render_bytes, render_text
from meshpos.domain.errors import ConfigError, InputError, PrinterError

FULL_PANS = ("4111111111111111", "5555555555554444", "4000000000000002", "4000000000009995")
QR_STORE = b"\x1d(k"  # GS ( k: the native 2D-code command
SALE_ID = "S-01JH4K2Z9QX7"

PENDING = ReceiptData(
    sale_id=SALE_ID,
    site_name="Sagra del Porcino",
    terminal_name="Cassa 2",
    created_at_ms=1_767_225_600_000,  # 2026-01-01 00:00 UTC
    amount_minor=1250,
    currency="EUR",
    method="card",
    status="pending",
    card_brand="visa",
    card_last4="1111",
    entry_mode="contactless",
    description="2 birre, 1 panino",
    offline_deadline_ms=1_767_225_600_000 + 86_400_000,
)
CASH = dataclasses.replace(PENDING, method="cash", card_brand=None, card_last4=None, entry_mode=None,
                           status="approved", offline_deadline_ms=None)


def options(profile: str = "generic-80mm", language: str = "en", tz: str = "UTC") -> ReceiptOptions:
    return ReceiptOptions(load_printer_profile(profile), language, tz)


def printed(data: ReceiptData, opts: ReceiptOptions, copy: str = "customer") -> bytes:
    dummy = Dummy(profile=opts.profile.escpos_profile)
    render(dummy, data, opts, copy)
    return bytes(dummy.output)


def text_of(raw: bytes) -> str:
    return raw.decode("cp858", errors="replace")


def qr_payloads(raw: bytes) -> list[bytes]:
    """Data stored by GS ( k cn=49 fn=80 (store QR data) commands."""
    out = []
    for m in re.finditer(re.escape(QR_STORE), raw):
        i = m.end()
        length = raw[i] + 256 * raw[i + 1]
        body = raw[i + 2 : i + 2 + length]
        if body[:3] == b"1P0":
            out.append(body[3:])
    return out


ALL_VARIANTS = [
    (data, copy)
    for status in receipts.STATUSES
    for data in (
        dataclasses.replace(PENDING, status=status,
                            auth_code="A1B2C3" if status == "approved" else None,
                            response_code={"approved": "00", "declined": "05"}.get(status)),
        dataclasses.replace(CASH, status=status),
    )
    for copy in receipts.COPIES
]


def test_pending_card_receipt_english_from_escpos_bytes() -> None:
    raw = printed(PENDING, options())
    text = text_of(raw)
    assert "AUTHORIZATION PENDING" in text
    assert "Payment not yet confirmed" in text
    assert SALE_ID in text
    assert "12.50 EUR" in text
    assert "VISA **** 1111" in text
    assert "Terminal: Cassa 2" in text
    assert "Sagra del Porcino" in text
    assert "2026-01-01 00:00 UTC" in text
    assert "2026-01-02 00:00 UTC" in text  # the decision deadline
    assert "Customer copy" in text
    assert QR_STORE in raw
    assert qr_payloads(raw) == [SALE_ID.encode()]
    assert raw.endswith(b"\x1dV\x00")  # cut


def test_pending_card_receipt_italian_from_escpos_bytes() -> None:
    raw = printed(PENDING, options(language="it"), "merchant")
    text = text_of(raw)
    assert "AUTORIZZAZIONE IN ATTESA" in text
    assert "Pagamento non ancora confermato" in text
    assert "sarà inviato" in text  # accented letters survive the code page (CP858)
    assert "12,50 EUR" in text
    assert "Terminale: Cassa 2" in text
    assert "Copia esercente" in text
    assert "VISA **** 1111" in text
    assert qr_payloads(raw) == [SALE_ID.encode()]


@pytest.mark.parametrize("language", sorted(CATALOGUE))
@pytest.mark.parametrize("profile", ["generic-58mm", "generic-80mm"])
@pytest.mark.parametrize(("data", "copy"), ALL_VARIANTS)
def test_every_receipt_kind_shows_at_most_last4(data: ReceiptData, copy: str, profile: str, language: str) -> None:
    raw = printed(data, options(profile, language), copy)
    text = text_of(raw)
    for pan in FULL_PANS:
        assert pan not in text
        assert pan[:6] not in text  # not even the BIN
    assert not re.search(r"[0-9](?:[ -]?[0-9]){11,}", text)
    if data.method == "card":
        assert re.findall(r"\*\*\*\* ([0-9]+)", text) == ["1111"]
    else:
        assert "****" not in text
    assert SALE_ID in text and qr_payloads(raw) == [SALE_ID.encode()]


@pytest.mark.parametrize(("profile", "width"), [("generic-58mm", 32), ("generic-80mm", 48),
                                                ("epson-tm-t20-80mm", 48), ("epson-tm-m30-58mm", 32)])
def test_line_width_follows_the_paper(profile: str, width: int) -> None:
    opts = options(profile)
    raw = printed(PENDING, opts)
    assert b"\n" + b"-" * width + b"\n" in raw
    assert b"-" * (width + 1) not in raw
    preview = render_text(PENDING, opts)
    assert max(len(line) for line in preview.splitlines()) == width
    # The total is right-aligned to the last column in the printed bytes too.
    assert re.search(rb"TOTAL {%d}12\.50 EUR\n" % (width - len("TOTAL") - len("12.50 EUR")), raw)


def test_preview_and_print_come_from_one_layout() -> None:
    opts = options("generic-58mm", "it")
    raw_text = text_of(printed(PENDING, opts, "merchant"))
    lines = [op.text for op in layout(PENDING, opts, "merchant") if isinstance(op, receipts.Line)]
    preview = render_text(PENDING, opts, "merchant").splitlines()
    pos = 0
    for line in lines:
        assert line in preview
        found = raw_text.find(line + "\n", pos)
        assert found >= 0, line
        pos = found + len(line)
    assert f"[QR {SALE_ID}]" in render_text(PENDING, opts)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"status": "approved", "auth_code": "A1B2C3"}, ["APPROVED", "Auth code", "A1B2C3"]),
        ({"status": "declined", "response_code": "05"}, ["DECLINED", "05 do not honour", "not charged"]),
        ({"status": "declined", "response_code": "51"}, ["DECLINED", "51 insufficient funds"]),
        ({"status": "expired"}, ["EXPIRED", "offline window", "not charged"]),
        ({"status": "voided"}, ["VOIDED", "cancelled"]),
    ],
)
def test_final_outcome_slip(changes: dict[str, Any], expected: list[str]) -> None:
    data = dataclasses.replace(PENDING, **changes)
    raw = printed(data, options(), "outcome")
    text = text_of(raw)
    assert "PAYMENT RESULT" in text
    assert "PENDING" not in text and "not yet confirmed" not in text
    for word in expected:
        assert word in text
    assert "VISA **** 1111" in text and "12.50 EUR" in text
    assert qr_payloads(raw) == [SALE_ID.encode()]


def test_final_outcome_slip_italian() -> None:
    data = dataclasses.replace(PENDING, status="approved", auth_code="123456")
    text = text_of(printed(data, options(language="it"), "outcome"))
    assert "ESITO PAGAMENTO" in text and "APPROVATO" in text and "123456" in text


def test_cash_receipt() -> None:
    text = text_of(printed(CASH, options()))
    assert "CASH PAYMENT" in text and "Paid in cash" in text and "12.50 EUR" in text
    assert "Card" not in text and "PENDING" not in text
    voided = text_of(printed(dataclasses.replace(CASH, status="voided"), options(language="it")))
    assert "ANNULLATO" in voided and "PAGAMENTO IN CONTANTI" in voided


def test_configured_time_zone() -> None:
    text = text_of(printed(PENDING, options(tz="Europe/Rome")))
    assert "2026-01-01 01:00 CET" in text


def test_image_qr_for_printers_without_native_qr() -> None:
    raw = printed(PENDING, options("pos-5890-58mm"))
    assert QR_STORE not in raw
    assert b"\x1dv0" in raw  # GS v 0: raster image
    assert "AUTHORIZATION PENDING" in text_of(raw)


def test_render_bytes_equals_dummy_render() -> None:
    opts = options()
    assert render_bytes(PENDING, opts, "merchant") == printed(PENDING, opts, "merchant")


def test_unknown_language_and_time_zone_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown receipt language 'de'.*en, it"):
        options(language="de")
    with pytest.raises(ConfigError, match="time zone"):
        options(tz="Mars/Olympus")


def test_catalogues_have_the_same_keys() -> None:
    for language, catalogue in CATALOGUE.items():
        assert set(catalogue) == set(CATALOGUE["en"]), language


def test_card_number_in_free_text_is_masked() -> None:
    data = dataclasses.replace(PENDING, description="paid with 4111 1111 1111 1111 thanks",
                               terminal_name="T 5555-5555-5555-4444")
    text = text_of(printed(data, options()))
    digits = re.sub(r"[^0-9]", "", text)
    assert "4111111111111111" not in digits and "5555555555554444" not in digits
    assert "paid with **** 1111 thanks" in text
    assert "T **** 4444" in text


def test_last_line_of_defence_refuses_a_pan() -> None:
    with pytest.raises(PrinterError, match="card number"):
        receipts._check_no_card_number([receipts.Line("Card 4111111111111111")])


@pytest.mark.parametrize(
    "changes",
    [
        {"card_last4": "41111"},
        {"card_last4": "411"},
        {"card_last4": "1111\n"},  # each field whole: a trailing newline is no part of a pattern
        {"card_brand": "visa\n"},
        {"sale_id": "5626ef1b4a2e9815-00000003\n"},
        {"auth_code": "A1B2C3\n"},
        {"card_last4": None},
        {"card_brand": "4111111111111111"},
        {"method": "cash"},  # cash with card data
        {"status": "paid"},
        {"currency": "XXX"},
        {"amount_minor": 0},
        {"sale_id": "two words"},
        {"entry_mode": "telepathy"},
    ],
)
def test_receipt_data_is_validated(changes: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        dataclasses.replace(PENDING, **changes)


def test_receipt_data_json_round_trip() -> None:
    assert ReceiptData.from_json(json.loads(json.dumps(PENDING.to_json()))) == PENDING


def test_shipped_profiles_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    names = list_printer_profiles()
    assert {"generic-58mm", "generic-80mm", "epson-tm-t20-80mm", "epson-tm-m30-80mm"} <= set(names)
    for name in names:
        profile = load_printer_profile(name)
        assert profile.chars_per_line == {58: 32, 80: 48}[profile.paper_mm]
    with pytest.raises(PrinterError, match=r"unknown printer profile 'tm-9000'.*generic-58mm"):
        load_printer_profile("tm-9000")
    with pytest.raises(PrinterError, match="not a valid profile name"):
        load_printer_profile("generic-58mm\n")
    # MESHPOS_DEVICES_DIR points to another devices folder.
    (tmp_path / "printers").mkdir()
    (tmp_path / "printers" / "mine.json").write_text(json.dumps({
        "name": "mine", "paper_mm": 58, "chars_per_line": 30, "codepage": "CP858",
        "escpos_profile": "default", "qr": "native"}))
    monkeypatch.setenv(ENV_DEVICES_DIR, str(tmp_path))
    assert list_printer_profiles() == ["mine"]
    assert load_printer_profile("mine").chars_per_line == 30
    (tmp_path / "printers" / "bad.json").write_text(json.dumps({
        "name": "bad", "paper_mm": 58, "chars_per_line": 32, "codepage": "CP858", "escpos_profile": "TM-9000"}))
    with pytest.raises(PrinterError, match="python-escpos has no profile 'TM-9000'"):
        load_printer_profile("bad")
