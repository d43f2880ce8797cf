"""Sales through the terminal API, without HTTP: idempotent create, listing, void.

Idempotency (protocols/terminal-api.yaml, "Idempotency"): the key and a keyed hash of the request
body are stored in the sale's own SQLite transaction (NodeCore.sell), so they are durable exactly
when the sale is. A request with a known key answers the stored sale if the body hash matches and
is refused (Conflict) if not. A request whose key is being processed right now waits
for that request to finish, then answers as above; it never starts a second sale. A request that
failed left nothing behind, so its retry is processed anew.

The body hash is BLAKE2b keyed with a key derived from the node's private key: a card number in
the body cannot be recovered from the stored hash by trying every number (a plain hash of a card
number can be reversed by enumeration).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import trio

from meshpos.devices.reader import CardReader
from meshpos.domain.currency import parse_amount
from meshpos.domain.rules import PAN_MAX, PAN_MIN, luhn_ok
from meshpos.domain.errors import ContentError, InputError, PolicyError
from meshpos.node.core import STATUSES, NodeCore
from meshpos.wire.cards import CardCapture

MAX_KEY_LEN = 255
MAX_PAGE = 500
DEFAULT_PAGE = 100
SALE_FIELDS = frozenset({"amount", "method", "card", "reader", "description"})


class NotFound(InputError):
    """No sale of that id on this node."""


class Conflict(InputError):
    """The request conflicts with the state: an idempotency key reused with another body, a void
    of a sale that is not pending (or of another terminal)."""


class Unprocessable(PolicyError):
    """A well-formed request that this node cannot carry out (a content or policy rule)."""


@dataclass(frozen=True)
class Created:
    sale: dict[str, Any]
    replayed: bool  # True: answered from an earlier request with the same key and body


def check_key(key: str | None) -> str:
    if key is None or key == "":
        raise InputError("the Idempotency-Key header is required: one fresh value (a UUID) per sale attempt, "
                         "the same value when the attempt is retried")
    if len(key) > MAX_KEY_LEN or not key.isascii() or not key.isprintable():
        raise InputError(f"Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters")
    if holds_card_number(key):
        raise InputError("Idempotency-Key holds what looks like a card number: the key is stored and shown "
                         "with the sale, so use a UUID")
    return key


_DIGIT_RUN = re.compile(r"\d(?: ?\d)*")  # digits, in groups split by single spaces (4111 1111 ...)


def holds_card_number(key: str) -> bool:
    """True if ``key`` holds a run of 13 to 19 digits (possibly grouped by spaces) that could be
    an issued card number: first digit 2-6 (the card brands), Luhn valid. Narrower than the free
    text rule (rules.has_card_number, any 12 digits): a UUID or a millisecond time is not refused."""
    for match in _DIGIT_RUN.finditer(key):
        digits = match.group().replace(" ", "")
        if PAN_MIN < len(digits) <= PAN_MAX and digits[0] in "23456" and luhn_ok(digits):
            return True
    return False


def body_hasher(core: NodeCore) -> "BodyHasher":
    seed = bytes(core.key)  # the Ed25519 seed; the derived key never leaves this process
    return BodyHasher(hashlib.blake2b(b"meshpos terminal-api idempotency", key=seed, digest_size=32).digest())


class BodyHasher:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, body: dict[str, Any]) -> str:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.blake2b(canonical.encode(), key=self._key, digest_size=32).hexdigest()


@dataclass(frozen=True)
class SaleRequest:
    amount_minor: int
    method: str
    pan: str | None
    expiry: str | None
    reader: bool
    description: str | None


def parse_sale_request(body: Any, currency: str) -> SaleRequest:
    """The checks that need no node state: InputError (400) for a malformed request."""
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    unknown = set(body) - SALE_FIELDS
    if unknown:
        raise InputError(f"unknown fields {sorted(unknown)}")
    amount = body.get("amount")
    if not isinstance(amount, str):
        raise InputError("amount must be a string with a plain decimal amount, such as \"12.50\"")
    method = body.get("method")
    if method not in ("card", "cash"):
        raise InputError("method must be \"card\" or \"cash\"")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise InputError("description must be a string")
    card, reader = body.get("card"), body.get("reader", False)
    if not isinstance(reader, bool):
        raise InputError("reader must be true or false")
    pan = expiry = None
    if method == "cash":
        if card is not None or reader:
            raise InputError("a cash sale takes no card and no reader")
    else:
        if (card is None) == (not reader):
            raise InputError("a card sale takes either \"card\": {\"pan\": ..., \"expiry\": \"MMYY\"} "
                             "or \"reader\": true")
        if card is not None:
            if not isinstance(card, dict) or set(card) - {"pan", "expiry"} or not isinstance(card.get("pan"), str):
                raise InputError("card must be {\"pan\": \"<digits>\", \"expiry\": \"MMYY\"}")
            pan, expiry = card["pan"], card.get("expiry")
            if expiry is not None and not isinstance(expiry, str):
                raise InputError("card expiry must be a string MMYY")
    amount_minor = parse_amount(amount, currency)
    return SaleRequest(amount_minor, method, pan, expiry, reader, description)


class TerminalSales:
    """The API's view of one node's sales. ``reader``: the node's card reader, if it has one."""

    def __init__(self, core: NodeCore, reader: CardReader | None = None) -> None:
        self.core = core
        self.reader = reader
        self.hash_body = body_hasher(core)
        self._inflight: dict[str, trio.Event] = {}

    async def create(self, key: str | None, body: Any, defer: bool = False) -> Created:
        """``defer``: a new sale's ``on_sold`` hooks are left on ``core.after_answer`` for the
        caller to run once it has answered (NodeCore.sell)."""
        key = check_key(key)
        digest = self.hash_body(body if isinstance(body, dict) else {"_": body})
        while key in self._inflight:  # the same key is being processed: wait for its outcome
            await self._inflight[key].wait()
        stored = self.core.store.idempotency(key)
        if stored is not None:
            if stored[0] != digest:
                raise Conflict(
                    f"Idempotency-Key {key!r} was used for another request (sale {stored[1]}): "
                    "use a new key for a new sale")
            return Created(self.core.sale(stored[1]), replayed=True)
        done = self._inflight[key] = trio.Event()
        try:
            return Created(await self._sell(key, digest, body, defer), replayed=False)
        finally:
            del self._inflight[key]
            done.set()

    async def _sell(self, key: str, digest: str, body: Any, defer: bool) -> dict[str, Any]:
        core = self.core
        req = parse_sale_request(body, core.policy.currency)
        try:
            card: CardCapture | None = None
            if req.pan is not None:
                card = core.seal_card(req.pan, req.expiry, "manual")
            elif req.reader:
                if self.reader is None:
                    raise Unprocessable("this node has no card reader: send the card as \"card\" (keyed entry)")
                card = await self.reader.read(req.amount_minor, core.policy.currency)
            return core.sell(req.amount_minor, card=card, description=req.description, idempotency=(key, digest),
                             defer=defer)
        except ContentError as exc:
            raise Unprocessable(str(exc)) from exc
        except InputError as exc:  # a card number or expiry the rules refuse: well-formed, not acceptable
            if req.pan is not None or req.reader:
                raise Unprocessable(str(exc)) from exc
            raise

    # -- reading ----------------------------------------------------------------------

    def get(self, sale_id: str) -> dict[str, Any]:
        row = self.core.store.sale(sale_id)
        if row is None:
            raise NotFound(f"no sale {sale_id[:80]!r} on this node")
        return self.core.sale_json(row)

    def page(self, *, status: str | None, method: str | None, since_ms: int | None, cursor: str | None,
             limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """One page of sales in time order and the cursor of the next page (None: the last page)."""
        if status is not None and status not in STATUSES:
            raise InputError(f"status must be one of {', '.join(STATUSES)}")
        if method is not None and method not in ("card", "cash"):
            raise InputError("method must be card or cash")
        if not 1 <= limit <= MAX_PAGE:
            raise InputError(f"limit must be 1 to {MAX_PAGE}")
        after = decode_cursor(cursor)
        out: list[dict[str, Any]] = []
        # a status is no column: filtering reads rows in the largest batches, not ``limit`` at a time
        batch = limit if status is None else MAX_PAGE
        while len(out) < limit:
            rows = self.core.store.sales_page(after, batch, method=method, since_ms=since_ms)
            used = 0
            for row in rows:
                used += 1
                after = (int(row["created_at"]), str(row["sale_id"]))
                sale = self.core.sale_json(row)
                if status is None or sale["status"] == status:
                    out.append(sale)
                    if len(out) == limit:
                        break
            if len(rows) < batch and used == len(rows):  # the last rows, every one looked at
                return out, None
        return out, encode_cursor(after)

    # -- void -------------------------------------------------------------------------

    def void(self, sale_id: str, reason: Any) -> tuple[dict[str, Any], bool]:
        """(the sale, True if this call voided it). Voiding a sale voided already answers it."""
        sale = self.get(sale_id)
        if reason is not None and not isinstance(reason, str):
            raise InputError("reason must be a string")
        if self.core.ledger.has(f"void/{sale_id}"):
            return sale, False
        try:
            return self.core.void(sale_id, reason), True
        except ContentError as exc:
            raise Unprocessable(str(exc).replace("description", "reason")) from exc
        except InputError as exc:  # another terminal's sale, or not pending any more
            raise Conflict(str(exc)) from exc


def encode_cursor(after: tuple[int, str] | None) -> str | None:
    return None if after is None else f"{after[0]}.{after[1]}"


def decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    ms, _, sale_id = cursor.partition(".")
    if not ms.isascii() or not ms.isdigit() or len(ms) > 15 or not sale_id or len(sale_id) > 80:
        raise InputError("cursor is not one this API gave")
    return int(ms), sale_id


def parse_since(text: str | None) -> int | None:
    """``since``: an ISO 8601 time with zone (as in sale objects) or milliseconds since the epoch."""
    if text is None:
        return None
    if text.isascii() and text.isdigit() and len(text) <= 15:
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError("since must be an ISO 8601 time with zone, such as 2026-07-01T10:00:00Z") from exc
    if when.tzinfo is None:
        raise InputError("since must name its time zone (Z or +02:00)")
    return int(when.timestamp() * 1000)

