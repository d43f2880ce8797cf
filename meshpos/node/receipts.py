"""From a sale of the ledger to a receipt: the node's side of the devices component."""

from __future__ import annotations

from typing import Any

from meshpos.devices.printers import PrinterConfig, load_printer_config
from meshpos.devices.profiles import load_printer_profile
from meshpos.devices.receipts import ReceiptData, ReceiptOptions
from meshpos.node.core import NodeCore

DEFAULT_PROFILE = "generic-80mm"


def receipt_data(core: NodeCore, sale: dict[str, Any]) -> ReceiptData:
    status = sale["status"] if sale["status"] != "rejected" else "declined"
    return ReceiptData(
        sale_id=sale["id"], site_name=core.policy.name, terminal_name=sale["terminal_name"],
        created_at_ms=sale["created_at_ms"], amount_minor=sale["amount_minor"], currency=sale["currency"],
        method=sale["method"], status=status, card_brand=sale["card_brand"], card_last4=sale["card_last4"],
        entry_mode=sale["entry_mode"], description=sale["description"], auth_code=sale["auth_code"],
        response_code=sale["response_code"],
        offline_deadline_ms=sale["created_at_ms"] + core.policy.offline_window_ms)


def printer_config(core: NodeCore) -> PrinterConfig | None:
    """The configured printer, or None; raises PrinterError for a bad configuration."""
    cfg = core.config.printer
    return None if cfg is None else load_printer_config(cfg)


def receipt_options(core: NodeCore) -> ReceiptOptions:
    try:
        cfg = printer_config(core)
    except Exception:
        cfg = None
    if cfg is not None:
        return ReceiptOptions.for_printer(cfg, core.config.language)
    return ReceiptOptions(profile=load_printer_profile(DEFAULT_PROFILE), language=core.config.language)


def copies_for(sale: dict[str, Any]) -> list[str]:
    """Which copies print when a sale is taken: card sales get both, cash one."""
    return ["customer", "merchant"] if sale["method"] == "card" else ["customer"]
