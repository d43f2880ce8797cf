"""Hardware profiles shipped in the top-level ``devices/`` folder.

The folder sits next to the package in a checkout (``<repo>/devices``); an
installed node points ``MESHPOS_DEVICES_DIR`` at its copy. A printer profile is
one JSON file ``devices/printers/<name>.json``:

``name``            the file's stem, used in node configs (``"profile": ...``)
``paper_mm``        paper width in millimetres (informative; 58 or 80 in practice)
``chars_per_line``  font-A columns the layout fills (58 mm: 32, 80 mm: 48)
``codepage``        the ESC/POS code page receipts are encoded in (e.g. CP858: Latin-1 + euro)
``escpos_profile``  the python-escpos capability profile (cut, code pages, QR support)
``qr``              ``native`` (GS ( k, the printer draws it) or ``image`` (raster)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshpos.devices import escpos_import
from meshpos.domain.errors import PrinterError

ENV_DEVICES_DIR = "MESHPOS_DEVICES_DIR"
QR_MODES = ("native", "image")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PaperProfile:
    name: str
    description: str
    paper_mm: int
    chars_per_line: int
    codepage: str
    escpos_profile: str
    qr: str


def devices_dir() -> Path:
    override = os.environ.get(ENV_DEVICES_DIR)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "devices"


def printer_profiles_dir() -> Path:
    return devices_dir() / "printers"


def list_printer_profiles() -> list[str]:
    folder = printer_profiles_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json"))


def load_printer_profile(name: str) -> PaperProfile:
    """Load ``devices/printers/<name>.json``; PrinterError names what is wrong."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PrinterError(f"printer profile name {name!r} is not a valid profile name")
    path = printer_profiles_dir() / f"{name}.json"
    if not path.is_file():
        known = ", ".join(list_printer_profiles()) or f"none found in {printer_profiles_dir()}"
        raise PrinterError(f"unknown printer profile {name!r} (known profiles: {known})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrinterError(f"printer profile {path} cannot be read: {exc}") from exc
    return _profile_from_json(raw, path)


def _profile_from_json(raw: Any, path: Path) -> PaperProfile:
    def fail(why: str) -> PrinterError:
        return PrinterError(f"printer profile {path}: {why}")

    if not isinstance(raw, dict):
        raise fail("must be a JSON object")
    if raw.get("name") != path.stem:
        raise fail(f"'name' must be {path.stem!r}, the file's name")
    paper_mm, cpl = raw.get("paper_mm"), raw.get("chars_per_line")
    if not isinstance(paper_mm, int) or isinstance(paper_mm, bool) or not 40 <= paper_mm <= 120:
        raise fail("'paper_mm' must be an integer between 40 and 120")
    if not isinstance(cpl, int) or isinstance(cpl, bool) or not 24 <= cpl <= 80:
        raise fail("'chars_per_line' must be an integer between 24 and 80")
    qr = raw.get("qr", "native")
    if qr not in QR_MODES:
        raise fail(f"'qr' must be one of {', '.join(QR_MODES)}")
    escpos_name = raw.get("escpos_profile")
    codepage = raw.get("codepage")
    if not isinstance(escpos_name, str) or not isinstance(codepage, str):
        raise fail("'escpos_profile' and 'codepage' must be strings")
    _check_escpos(escpos_name, codepage, fail)
    description = raw.get("description", "")
    return PaperProfile(
        name=path.stem,
        description=description if isinstance(description, str) else "",
        paper_mm=paper_mm,
        chars_per_line=cpl,
        codepage=codepage,
        escpos_profile=escpos_name,
        qr=qr,
    )


def _check_escpos(escpos_name: str, codepage: str, fail: Any) -> None:
    escpos_import.load()
    from escpos.capabilities import CAPABILITIES, get_profile  # type: ignore[import-untyped]

    if escpos_name not in CAPABILITIES["profiles"]:
        raise fail(f"python-escpos has no profile {escpos_name!r}")
    pages = get_profile(escpos_name).get_code_pages()
    if codepage not in pages:
        raise fail(f"code page {codepage!r} is not available on python-escpos profile {escpos_name!r}")
