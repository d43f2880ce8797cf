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


async def test_a_write_during_the_checkpoint_is_not_committed_by_finish_checkpoint(
        make_node: Callable[..., Path], clock: FakeClock, autojump_clock: trio.testing.MockClock) -> None:
    """Red team (issue 15): the checkpoint runs in a worker thread and the node goes on; a link's
    write that lands meanwhile must not be committed by the finish_checkpoint after it (COMMIT), only by
    the next group commit, and it is on disk after that."""
    import sqlite3
    import threading
    core = NodeCore.open(make_node("T1"), clock)
    service = NodeService(core, clock)
    store = core.store
    go_on = threading.Event()
    in_checkpoint = trio.Event()
    checkpoint, finish_checkpoint, checkpoint_due = store.checkpoint, store.finish_checkpoint, store.checkpoint_due
    due = False
    afresh: list[tuple[bool, int]] = []
    afresh_ran = trio.Event()

    def spying_checkpoint_due() -> bool:
        nonlocal due
        now_due = checkpoint_due()
        due = due or now_due
        return now_due

    def slow_checkpoint() -> None:
        trio.from_thread.run_sync(in_checkpoint.set)
        go_on.wait(10)
        checkpoint()

    def others_see() -> int:
        other = sqlite3.connect(store.path)
        try:
            return int(other.execute("SELECT count(*) FROM meta WHERE key = 'during'").fetchone()[0])
        finally:
            other.close()

    def spying_finish_checkpoint() -> bool:
        done = finish_checkpoint()
        afresh.append((done, others_see()))
        afresh_ran.set()
        return done

    store.checkpoint = slow_checkpoint  # type: ignore[method-assign]
    store.checkpoint_due = spying_checkpoint_due  # type: ignore[method-assign]
    store.finish_checkpoint = spying_finish_checkpoint  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service._group_commit)
            i = 0
            while not due:  # commits until a checkpoint is due (no bound in virtual time: the
                with store.transaction():  # clock jumps while a sync or checkpoint thread runs)
                    store.set_meta(f"k{i}", str(i))
                i += 1
                await trio.sleep(2 * GROUP_COMMIT_S)
            await in_checkpoint.wait()
            with store.transaction():  # a link's write while the checkpoint thread runs
                store.set_meta("during", "1")
            go_on.set()
            await afresh_ran.wait()  # not a bounded poll: the clock jumps while the thread runs
            assert afresh[0] == (False, 0)  # a write pending: no COMMIT, nothing of it on disk
            await trio.sleep(2 * GROUP_COMMIT_S)
            assert others_see() == 1  # the next group commit took it
            nursery.cancel_scope.cancel()
    finally:
        go_on.set()
        core.close()
