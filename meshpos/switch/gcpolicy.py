"""The garbage collector of a running switch process (issue 16: CPU per sale).

A forwarded sale allocates a few hundred objects that live while its advice is at the acquirer
(tens of milliseconds: its task, coroutine frames, events, the request and its answer), and
trio's cancellation leaves small reference cycles behind. With Python's default thresholds
(a young collection every 700 net allocations) the young generation was scanned once every 7
sales and the middle one every 70 (measured), each time finding the sales in flight alive and
promoting them, and every full collection scanned the whole process again: the modules, the site rosters, the
metrics registry (about 45,000 objects after start), which never become garbage.

:func:`settle_gc`, once the switch has started: one full collection, then ``gc.freeze()`` (the node's
``infra.heap.freeze_startup_heap``) (what
exists now is left out of every later collection), and a young threshold large enough that
the objects of the sales in flight are mostly freed by reference counting before the collector
ever looks at them. Cycles are still collected, only less often. Figures: BENCHMARKS.md,
"Switch backends and instances (issue 16)".
"""

from __future__ import annotations

import gc
import logging

from meshpos.infra.heap import freeze_startup_heap

log = logging.getLogger(__name__)

#: net allocations of tracked objects between two young collections (Python's default: 700).
#: A forwarded sale leaves about 40 objects in reference cycles: a young collection every
#: ~1,250 sales, scanning what is in flight then (a pause of a few milliseconds)
YOUNG_THRESHOLD = 50_000
#: young collections per middle one, middle ones per full one (Python's defaults: 10, 10)
OLDER_THRESHOLDS = (10, 10)


def settle_gc() -> None:
    """Freeze what the started process holds and collect young objects less often."""
    frozen = freeze_startup_heap()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    log.info("garbage collector settled: young threshold %d, %d objects frozen", YOUNG_THRESHOLD, frozen)


__all__ = ["settle_gc", "YOUNG_THRESHOLD", "OLDER_THRESHOLDS"]
