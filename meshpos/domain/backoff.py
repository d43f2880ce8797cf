"""The one back-off rule: retry number ``attempt`` (1, 2, ...) waits base, 2*base, 4*base ...
up to ``cap``. Callers add their own jitter where many peers might retry in step."""

from __future__ import annotations

from collections.abc import Callable

MAX_DOUBLINGS = 62  # past this the cap has long been reached; keeps 2**n a small integer


def exponential_backoff(base: float = 0.5, cap: float = 30.0) -> Callable[[int], float]:
    """Delay before retry number ``attempt`` (1, 2, ...): base, 2*base, 4*base ... up to cap."""

    def delay(attempt: int) -> float:
        return float(min(cap, base * 2 ** min(max(attempt - 1, 0), MAX_DOUBLINGS)))

    return delay
