"""The one small interface every acquirer link implements, and the retry rule on top of it.

A link makes ONE attempt per call: :meth:`AcquirerLink.advise` with ``repeat=False``
sends a financial advice (ISO 8583 MTI 0220), with ``repeat=True`` a repeat
advice (0221) carrying the same fields; :meth:`AcquirerLink.reverse` sends a
reversal advice (0420). Timeouts, lost connections and unusable answers raise
:class:`meshpos.domain.errors.AcquirerError` (worth another attempt), whose message never
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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from meshpos.domain.backoff import exponential_backoff
from meshpos.domain.errors import AcquirerError, InputError
from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult


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


class Window:
    """``async with window:`` -- at most ``size`` holders at once, as a ``trio.Semaphore``
    (which it wraps), but taken without a trip through trio's scheduler while a place is free.
    Every advice passes two of these (the switch's in-flight window, the link's outstanding
    limit), and a schedule point costs more than what it guards; a full window waits (and can
    be cancelled) as a semaphore does."""

    __slots__ = ("_sem",)

    def __init__(self, size: int) -> None:
        self._sem = trio.Semaphore(size)

    @property
    def free(self) -> int:
        return self._sem.value

    async def __aenter__(self) -> None:
        if self._sem.value:
            self._sem.acquire_nowait()
        else:
            await self._sem.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._sem.release()


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
