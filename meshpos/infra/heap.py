"""A long-running process's start-up heap, kept out of the garbage collector's full passes.

A full (generation 2) collection walks every object the process holds. In a running node that
is ~50,000 objects, nearly all made at start-up (modules, classes, the web stack, the ledger's
caches) and alive as long as the process. Measured in ``meshpos run`` during the terminal API's
benchmarks (tools/bench_api_events.py): 33-36 ms of CPU per full pass (126-166 ms of wall time at
a load average of 11), about once per few hundred sales or settlement results, and nothing else
in the node runs meanwhile: a full pass that fell while results came in held their events back
by that long (the ~115 ms stall seen once in eight runs of that benchmark). ``gc.freeze()`` moves
what exists at the end of start-up into the permanent generation: later full passes walk only
what was made since. What start-up left as cyclic garbage is collected first, or it would never
be freed.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze what is left; how many objects are frozen (all of them so far)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
