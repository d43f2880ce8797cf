"""Work that follows a durable sale but does not decide its answer: run after the answer.

A sale through the terminal API is answered once it is durable (NodeCore.sell). What its taking
sets off beside that (the ``sale.created`` event of ``NodeCore.on_sold``, the receipt copies
queued for the printer) changes nothing in the answer, so the API sends the answer first and
runs this queue right after the answer's bytes were written (meshpos.terminal.app).

The rules of the queue:
- in order: the work runs first in, first out, each item once;
- never dropped: the API drains it in a ``finally`` after the send, so it runs when the client
  went away too; a drain that did not happen (a task cancelled before its answer was sent) is
  done by the next ``run()``;
- before anything that must come after it: whoever is about to act on a later fact about the
  node's own sales (the event feed, before it appends any event) calls ``run()`` first, so no
  event of a sale precedes its ``sale.created``;
- a failing item is logged and the rest still run (the sale is durable; its answer is sent).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)


class AfterAnswer:
    def __init__(self) -> None:
        self._queue: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def defer(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.append((fn, args))

    def run(self) -> None:
        """Run everything queued, in order (what an item queues runs too)."""
        queue = self._queue
        while queue:
            fn, args = queue.popleft()
            try:
                fn(*args)
            except Exception:  # the sale is durable and answered: one failing follower stops no other
                log.exception("work after a sale's answer failed: %s", getattr(fn, "__qualname__", fn))
