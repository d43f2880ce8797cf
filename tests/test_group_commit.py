"""The running node's group commit (protocols/storage.md, "Group commit"): entries that links
bring in become durable together, GROUP_COMMIT_S after the first of them. Trio's MockClock moves
the time; the store is a real SQLite file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import trio
import trio.testing

from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.node.service import GROUP_COMMIT_S, NodeService


async def test_writes_within_a_fifth_of_a_second_share_one_commit(
        make_node: Callable[..., Path], clock: FakeClock, autojump_clock: trio.testing.MockClock) -> None:
    """Writes 40 ms apart for 160 ms (what a busy site's links bring): one COMMIT (and one
    fdatasync) for all of them, and all of them on disk once the window has passed."""
    core = NodeCore.open(make_node("T1"), clock)
    service = NodeService(core, clock)
    store = core.store
    commits = 0
    commit = store.commit

    def counting() -> bool:
        nonlocal commits
        done = commit()
        commits += done
        return done

    store.commit = counting  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service._group_commit)
            for i in range(5):
                with store.transaction():
                    store.set_meta(f"k{i}", str(i))
                await trio.sleep(0.04)
            await trio.sleep(GROUP_COMMIT_S)
            assert commits == 1
            assert not store.commit()  # nothing left uncommitted
            nursery.cancel_scope.cancel()
    finally:
        core.close()
