"""acquirer.base.Window: a semaphore entered without a schedule point while a place is free."""

from __future__ import annotations

import trio
import trio.testing

from meshpos.acquirer.base import Window


async def test_at_most_size_holders_and_the_rest_wait_in_turn() -> None:
    window = Window(2)
    inside: list[int] = []
    most = 0
    order: list[int] = []

    async def hold(n: int) -> None:
        nonlocal most
        async with window:
            inside.append(n)
            most = max(most, len(inside))
            order.append(n)
            await trio.sleep(0.01)
            inside.remove(n)

    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(hold, n)
            await trio.testing.wait_all_tasks_blocked()
    assert most == 2 and sorted(order) == list(range(6)) and window.free == 2


async def test_a_free_place_is_taken_without_yielding_and_a_full_window_can_be_cancelled() -> None:
    window = Window(1)
    ran_meanwhile = False

    async def other() -> None:
        nonlocal ran_meanwhile
        ran_meanwhile = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        async with window:  # free: no schedule point, so the other task has not run yet
            assert not ran_meanwhile and window.free == 0
            with trio.move_on_after(0.05) as scope:
                async with window:
                    raise AssertionError("entered a full window")
            assert scope.cancelled_caught
        assert window.free == 1
