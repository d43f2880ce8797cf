"""The operations a node offers its cashier's CLI and its technician, typed.

Each request and answer is a dataclass, written by the one encoder (meshpos.domain.jsonable) and
read back by ``from_jsonable``: the same types travel over the terminal API on the node's UNIX
socket (meshpos.terminal.admin, ``/v1/node/...``) and are used directly when no node runs and the
CLI opens the node directory itself (meshpos.node.client.StoppedNode), so both paths behave
identically. The functions here act on a NodeCore; the running node adds what needs its parts
(the uplink's probe, the printer, the peers' statuses).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from meshpos.domain.errors import InputError
from meshpos.domain.roles import SELLING_ROLES
from meshpos.node.core import NodeCore
from meshpos.wire.cards import CardCapture

RECEIPT_COPIES = ("customer", "merchant", "outcome")


@dataclass(frozen=True)
class SealedCard:
    """A card the caller sealed to the switch's key (protocols/envelope.md, "card"): the full number
    never reaches the node, only its brand and last four digits in clear."""
    brand: str
    last4: str
    entry_mode: str
    sealed: str  # base64 of the sealed box

    @classmethod
    def of(cls, capture: CardCapture) -> "SealedCard":
        return cls(capture.brand, capture.last4, capture.entry_mode, base64.b64encode(capture.sealed).decode())

    def capture(self) -> CardCapture:
        try:
            return CardCapture(brand=self.brand, last4=self.last4, entry_mode=self.entry_mode,
                               sealed=base64.b64decode(self.sealed, validate=True))
        except (TypeError, ValueError) as exc:
            raise InputError(f"malformed card capture: {exc}") from exc


@dataclass(frozen=True)
class SellRequest:
    """``POST /v1/node/sales``: a sale in minor units, cash when ``card`` is None."""
    amount_minor: int
    card: SealedCard | None = None
    description: str | None = None


@dataclass(frozen=True)
class SaleList:
    """``GET /v1/node/sales``: every sale this node holds (the whole site's), in the order of
    ``meshpos sales``; each is the sale object of protocols/terminal-api.yaml."""
    sales: list[Any]


@dataclass(frozen=True)
class PolicyView:
    """``GET /v1/node/policy``: what a caller needs of the site policy to prepare a sale."""
    currency: str
    switch_key: str | None
    site_id: str
    name: str
    offline_window_s: int


@dataclass(frozen=True)
class IngestRequest:
    """``POST /v1/node/ingest``: one signed envelope (a policy, a revocation) as text."""
    raw: str


@dataclass(frozen=True)
class Ingested:
    key: str  # the ledger key the envelope is stored under


@dataclass(frozen=True)
class UplinkRequest:
    """``PUT /v1/node/uplink``."""
    on: bool


@dataclass(frozen=True)
class UplinkState:
    uplink: bool  # forwarding is allowed now (persisted in config.json)


@dataclass(frozen=True)
class Reprinted:
    """``POST /v1/sales/{id}/receipt``'s answer: the copy queued on the printer."""
    sale_id: str
    queued: str


@dataclass(frozen=True)
class PeerStatuses:
    """``GET /v1/node/statuses``: the newest signed status of every node this one has heard."""
    statuses: list[Any]


def sell(core: NodeCore, req: SellRequest) -> dict[str, Any]:
    card = req.card.capture() if req.card is not None else None
    return core.sell(req.amount_minor, card=card, description=req.description)


def policy(core: NodeCore) -> PolicyView:
    pol = core.policy
    return PolicyView(currency=pol.currency, switch_key=pol.switch_key, site_id=pol.site_id, name=pol.name,
                      offline_window_s=pol.offline_window_s)


def ingest(core: NodeCore, req: IngestRequest) -> Ingested:
    return Ingested(key=core.ingest(req.raw.encode(), "organizer"))


def set_uplink(core: NodeCore, req: UplinkRequest) -> UplinkState:
    if req.on and core.identity.role not in SELLING_ROLES:
        raise InputError(f"a {core.identity.role} node does not forward")
    core.config.uplink = req.on
    core.dir.save_config(core.config)
    return UplinkState(uplink=req.on)


def check_copy(copy: str) -> str:
    if copy not in RECEIPT_COPIES:
        raise InputError("copy must be customer, merchant or outcome")
    return copy
