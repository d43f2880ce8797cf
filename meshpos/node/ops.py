"""The operations a node offers its cashier and tools, in one place.

The same dispatcher serves a command run against a stopped node (the CLI
opens the store itself) and a running node (through its control socket), so
both paths behave identically.
"""

from __future__ import annotations

import base64
from typing import Any, Callable

from meshpos.domain.errors import InputError
from meshpos.wire.cards import CardCapture
from meshpos.node.core import NodeCore

Op = Callable[[NodeCore, dict[str, Any]], Any]


def _sell(core: NodeCore, p: dict[str, Any]) -> Any:
    card = None
    if p.get("card") is not None:
        c = p["card"]
        try:
            card = CardCapture(brand=str(c["brand"]), last4=str(c["last4"]), entry_mode=str(c["entry_mode"]),
                               sealed=base64.b64decode(c["sealed"], validate=True))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed card capture: {exc}") from exc
    amount = p.get("amount_minor")
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InputError("amount_minor must be an integer")
    return core.sell(amount, card=card, description=p.get("description"))


def _policy(core: NodeCore, p: dict[str, Any]) -> Any:
    pol = core.policy
    return {"currency": pol.currency, "switch_key": pol.switch_key, "site_id": pol.site_id, "name": pol.name,
            "offline_window_s": pol.offline_window_s}


OPS: dict[str, Op] = {
    "sell": _sell,
    "sales": lambda core, p: core.sales(p.get("terminal")),
    "sale": lambda core, p: core.sale(str(p.get("sale_id"))),
    "status": lambda core, p: core.status(),
    "void": lambda core, p: core.void(str(p.get("sale_id")), p.get("reason")),
    "policy": _policy,
}


def dispatch(core: NodeCore, method: str, params: dict[str, Any], extra: dict[str, Op] | None = None) -> Any:
    table = {**OPS, **(extra or {})}
    if method not in table:
        raise InputError(f"unknown operation {method!r}")
    return table[method](core, params)


def _ingest(core: NodeCore, p: dict[str, Any]) -> Any:
    raw = p.get("raw")
    if not isinstance(raw, str):
        raise InputError("ingest needs the envelope as text")
    return {"key": core.ingest(raw.encode(), "organizer")}


OPS["ingest"] = _ingest


def _uplink(core: NodeCore, p: dict[str, Any]) -> Any:
    on = p.get("on")
    if not isinstance(on, bool):
        raise InputError("uplink needs on: true or false")
    if on and core.identity.role not in ("terminal", "gateway"):
        raise InputError(f"a {core.identity.role} node does not forward")
    core.config.uplink = on
    core.dir.save_config(core.config)
    return {"uplink": on}


OPS["uplink"] = _uplink
