"""The running node freezes its start-up heap (meshpos.infra.heap): the garbage collector's full
passes, which stop everything the node does, walk only what was made after start-up. Measured
before: a full pass walked ~50,000 objects for 33-36 ms of CPU, and held back the events of the
settlement results that came in meanwhile (BENCHMARKS.md, terminal API)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

CHILD = """
import gc, sys, trio
from pathlib import Path
from meshpos.node.core import NodeCore
from meshpos.node.service import NodeService

async def main() -> None:
    core = NodeCore.open(Path(sys.argv[1]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(NodeService(core).run)
            print(gc.get_freeze_count(), len(gc.get_objects(generation=2)))
            nursery.cancel_scope.cancel()
    finally:
        core.close()

trio.run(main)
"""


def test_a_running_node_keeps_its_start_up_heap_out_of_full_collections(make_node: Callable[..., Path]) -> None:
    node = make_node("T1")
    # a process of its own: freezing the test runner's heap would keep its garbage for good
    out = subprocess.run([sys.executable, "-c", CHILD, str(node)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    frozen, walked = map(int, out.stdout.split())
    assert frozen > 10_000  # modules, classes, the store and ledger opened at start-up
    assert walked < frozen // 10  # what a full collection still walks once the node runs
