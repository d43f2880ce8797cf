"""How many sales the next forwarding batch carries: sized to what gets through. Pure.

Rules (protocols/forwarding.md, "Batch size"):

* The first batch carries ``start`` sales (a weak uplink must not begin with a batch it cannot
  carry before its signal goes).
* A batch answered in at most ``fast_s`` seconds that was full (it carried the whole size)
  doubles the size, up to ``maximum``: the uplink carried it easily, try more.
* A batch answered in more than ``slow_s`` seconds halves the size: the next one should be
  answered sooner, within the time the signal lasts.
* A batch whose exchange failed once it was under way (connection lost, no answer in time, the
  switch failing it) halves the size, down to ``minimum``. A batch that never left the node (no
  route) says nothing about the size and leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass

START = 50
MINIMUM = 1
FAST_S = 5.0
SLOW_S = 20.0


@dataclass
class BatchSizer:
    maximum: int
    start: int = START
    minimum: int = MINIMUM
    fast_s: float = FAST_S
    slow_s: float = SLOW_S

    def __post_init__(self) -> None:
        self.size = max(self.minimum, min(self.start, self.maximum))

    def answered(self, carried: int, seconds: float) -> None:
        if seconds > self.slow_s:
            self.size = max(self.minimum, self.size // 2)
        elif carried >= self.size and seconds <= self.fast_s:
            self.size = min(self.maximum, self.size * 2)

    def failed(self) -> None:
        self.size = max(self.minimum, self.size // 2)
