"""A small pool of acquirer links (each one ISO 8583 connection) behind the one link interface.

Each call goes to the member with the fewest calls outstanding (ties: the next in turn), so a
connection that got slow, or is reconnecting, gathers fewer new requests and does not hold the
rest back. A member's failure is that call's failure (an AcquirerError, retried by the caller as
a 0221 like any other): the pool adds no retry of its own, so the 0220/0221 rule stays in one
place (:func:`~.base.advise_until_answered`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meshpos.domain.errors import AcquirerError, InputError
from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.acquirer.base import AcquirerLink, BeforeSend


class CheckableLink(AcquirerLink, Protocol):
    async def check(self) -> None:
        """Raise AcquirerError unless the link can reach its host now."""


class AcquirerPool:
    def __init__(self, links: Sequence[CheckableLink]) -> None:
        if not links:
            raise InputError("an acquirer pool needs at least one link")
        self.links = list(links)
        self.outstanding = [0] * len(links)
        self.calls = [0] * len(links)
        self._turn = 0

    def _pick(self) -> int:
        n = len(self.links)
        order = [(self._turn + k) % n for k in range(n)]
        best = min(order, key=lambda i: self.outstanding[i])
        self._turn = (best + 1) % n
        return best

    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        i = self._pick()
        self.outstanding[i] += 1
        self.calls[i] += 1
        try:
            return await self.links[i].advise(req, repeat=repeat, before_send=before_send)
        finally:
            self.outstanding[i] -= 1

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        i = self._pick()
        self.outstanding[i] += 1
        self.calls[i] += 1
        try:
            return await self.links[i].reverse(req)
        finally:
            self.outstanding[i] -= 1

    async def check(self) -> None:
        """Usable when at least one member reaches the host."""
        errors: list[str] = []
        for link in self.links:
            try:
                await link.check()
                return
            except AcquirerError as exc:
                errors.append(str(exc))
        raise AcquirerError(f"no acquirer connection usable: {errors[-1]}")

    async def aclose(self) -> None:
        for link in self.links:
            await link.aclose()


__all__ = ["AcquirerPool", "CheckableLink"]
