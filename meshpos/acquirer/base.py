"""The one small interface every acquirer link implements, and the retry rule on top of it.

A link makes ONE attempt per call: :meth:`AcquirerLink.advise` with ``repeat=False``
sends a financial advice (ISO 8583 MTI 0220), with ``repeat=True`` a repeat
advice (0221) carrying the same fields; :meth:`AcquirerLink.reverse` sends a
reversal advice (0420). Timeouts, lost connections and unusable answers raise
:class:`meshpos.errors.AcquirerError` (worth another attempt), whose message never
holds a full PAN. A request that can never go out -- it does not encode, or the host
refuses it as malformed -- raises :class:`UnsendableRequest` (no retry helps).

Every link encodes a request first, then awaits ``before_send`` (if given), then
sends: a caller that records "sent" in ``before_send`` never records a message that
could not be encoded, and never sends one it did not record.

:func:`advise_until_answered` is the only place that decides between 0220 and
0221: at most one 0220 ever leaves for a sale, and the caller hears about it
(``on_sent``) after it is encoded and before its first byte leaves, so it can
record that durably.

An ISO 8583 answer that arrives when its request is no longer waiting (it timed
out, the caller moved on) is not dropped: the link hands it over as a
:class:`LateAnswer` to whoever listens (the switch settles the sale from it).
"""

from __future__ import annotations

import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ..cards import check_expiry, check_pan, mask
from ..rules import ENTRY_MODES
from ..currency import numeric_code
from ..errors import AcquirerError, InputError

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
    entry_mode: str  # one of meshpos.rules.ENTRY_MODES
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


class UnsendableRequest(InputError):
    """This one request can never be sent as it is (it does not encode for the host, or the
    host refused it as malformed): settle the sale, do not retry. Never holds a full PAN."""


@dataclass(frozen=True)
class LateAnswer:
    """An answer that arrived after its request stopped waiting (ISO 8583 fields 11, 37, 41)."""

    reversal: bool
    stan: str
    rrn: str
    terminal_id: str
    result: AcquirerResult


BeforeSend = Callable[[], Awaitable[None]]


class AcquirerLink(Protocol):
    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        """One attempt: 0220 (``repeat=False``) or 0221 (``repeat=True``). The message is
        encoded first (UnsendableRequest if it cannot be), then ``before_send`` is awaited
        (if it raises, nothing is sent), then it is sent."""

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        """One attempt at a reversal advice (0420) for ``req``."""

    async def aclose(self) -> None:
        """Close connections; outstanding calls fail with AcquirerError."""


def exponential_backoff(base: float = 0.5, cap: float = 30.0) -> Callable[[int], float]:
    """Delay before retry number ``attempt`` (1, 2, ...): base, 2*base, 4*base ... up to cap."""

    def delay(attempt: int) -> float:
        return float(min(cap, base * 2 ** (attempt - 1)))

    return delay


async def advise_until_answered(
    link: AcquirerLink,
    req: AcquirerRequest,
    *,
    already_sent: bool,
    on_sent: Callable[[], Awaitable[None]],
    max_attempts: int = 5,
    backoff: Callable[[int], float] = exponential_backoff(),
    sleep: Callable[[float], Awaitable[None]] = trio.sleep,
) -> AcquirerResult:
    """Advise until the host answers (approved or declined) or attempts run out.

    The first attempt is a 0220 unless ``already_sent``; ``await on_sent()`` runs
    once it is encoded and before it is sent, and if it raises nothing is sent.
    Every later attempt, and every attempt when ``already_sent``, is a 0221: even
    if a 0220 failed before its bytes left, a repeat is always safe while a second
    original is not. UnsendableRequest is not retried: it propagates at once.
    """
    if max_attempts < 1:
        raise InputError("max_attempts must be at least 1")
    sent = already_sent
    last: AcquirerError | None = None

    async def record() -> None:
        nonlocal sent
        await on_sent()
        sent = True

    for attempt in range(max_attempts):
        if attempt:
            await sleep(backoff(attempt))
        try:
            if sent:
                return await link.advise(req, repeat=True)
            return await link.advise(req, repeat=False, before_send=record)
        except AcquirerError as exc:
            last = exc
    raise AcquirerError(f"no answer for {req.describe()} after {max_attempts} attempts: {last}") from last
