"""Which instance of the switch a node sends to, and when it moves on (protocols/forwarding.md,
"Switch instances and failover"). Sans-IO: every decision takes ``now`` (monotonic seconds).

The site policy lists the switch's instances (``SitePolicy.switch_urls``: ``switch_url`` first,
then ``switch_more_urls``). They share one database, so any of them can take any request.

* **Which first.** The *current* instance: at start the first listed; afterwards the one that
  last answered. A node sticks to a working instance: it never moves while that one answers.
* **Moving on** (:func:`verdict`): a request that never left this node (``NotSent``: no route,
  TLS, pin) or that the instance answered with a 5xx goes at once to the next instance, in list
  order after the one that failed, wrapping around, skipping the instances backing off and those
  this request already tried; when none is left the request fails with the last error. An
  exchange that broke once the request was sent (connection lost, no answer in time) is not
  re-sent to another instance by the transport: it fails, the instance counts a failure, and the
  forwarder's next request (first a results lookup, "Resuming a batch") goes to the next one.
  A 4xx answer is the same on every instance (one database, one configuration): never a reason
  to move, and no failure of the instance.
* **Back-off per instance.** An instance's ``n``-th failure in a row makes it *back off* for
  ``backoff(n)`` seconds (2, 4, 8 ... 120 s): while it does, requests start elsewhere. An answer
  (any HTTP status but 5xx) resets its count. When every instance backs off, a request starts at
  the one whose back-off ends first (the forwarder's own retry pacing decides how often that is).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshpos.domain.backoff import exponential_backoff
from meshpos.domain.errors import UplinkError
from meshpos.uplink.client import NotSent, SwitchRefused

INSTANCE_BACKOFF = exponential_backoff(2.0, 120.0)


class Verdict(enum.Enum):
    NEXT = "next"  # the instance failed and nothing was taken: send this request to the next one now
    FAILED = "failed"  # the instance failed after the request left: count it, do not re-send here
    ANSWERED = "answered"  # the instance answered (a 4xx too): it works


def verdict(exc: UplinkError) -> Verdict:
    """What a failed exchange says of the instance (see the module's rules)."""
    if isinstance(exc, NotSent):
        return Verdict.NEXT
    if isinstance(exc, SwitchRefused):
        return Verdict.NEXT if exc.status >= 500 else Verdict.ANSWERED
    return Verdict.FAILED


@dataclass(frozen=True)
class InstanceState:
    """One instance as the node sees it, for ``meshpos status``."""

    url: str
    current: bool
    failures: int  # in a row
    retry_in_s: float  # 0: not backing off


@dataclass
class _Health:
    failures: int = 0
    retry_at: float = 0.0


@dataclass
class InstanceChooser:
    backoff: Callable[[int], float] = INSTANCE_BACKOFF
    current: str | None = None  # the instance that last answered (None: none yet, the first listed)
    _health: dict[str, _Health] = field(default_factory=dict)

    def _start(self, urls: Sequence[str]) -> int:
        return urls.index(self.current) if self.current in urls else 0

    def _backing_off(self, url: str, now: float) -> bool:
        h = self._health.get(url)
        return h is not None and now < h.retry_at

    def first(self, urls: Sequence[str], now: float) -> str:
        """Where a request starts: the current instance, else the next not backing off, else the
        one whose back-off ends first (ties: list order from the current one)."""
        if not urls:
            raise ValueError("no switch instance")
        start = self._start(urls)
        ring = [urls[(start + k) % len(urls)] for k in range(len(urls))]
        for url in ring:
            if not self._backing_off(url, now):
                return url
        return min(ring, key=lambda u: self._health[u].retry_at)

    def next(self, urls: Sequence[str], failed: str, tried: set[str], now: float) -> str | None:
        """After ``failed`` failed a request with Verdict.NEXT: the next instance in list order
        that neither backs off nor was tried by this request, or None."""
        start = urls.index(failed) if failed in urls else -1
        for k in range(1, len(urls) + 1):
            url = urls[(start + k) % len(urls)]
            if url not in tried and not self._backing_off(url, now):
                return url
        return None

    def answered(self, url: str) -> None:
        self._health.pop(url, None)
        self.current = url

    def failed(self, url: str, now: float) -> None:
        h = self._health.setdefault(url, _Health())
        h.failures += 1
        h.retry_at = now + self.backoff(h.failures)

    def states(self, urls: Sequence[str], now: float) -> list[InstanceState]:
        current = urls[self._start(urls)] if urls else None
        out = []
        for url in urls:
            h = self._health.get(url, _Health())
            out.append(InstanceState(url, url == current, h.failures, round(max(0.0, h.retry_at - now), 1)))
        return out


def instance_address(url: str | None) -> str | None:
    """HOST:PORT of an instance's URL, for the signed status (shorter than the URL)."""
    if url is None:
        return None
    return url.split("://", 1)[-1].split("/", 1)[0]
