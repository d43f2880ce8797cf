"""The node's forwarder: lease rules, two uplink nodes sharing a site, back-off, restart, the loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nacl.signing
import pytest
import trio
import trio.testing

from meshpos.infra.clock import FakeClock
from meshpos.domain.errors import UplinkError
from meshpos.domain.rules import MAX_SKEW_MS
from meshpos.node.core import NodeCore
from meshpos.uplink import leases as L
from meshpos.uplink import forwarder as forwarder_module
from meshpos.uplink.forwarder import Forwarder, run_forwarder

from forwarder_helpers import VISA, FakeSwitch, merge


# -- the rules, pure ---------------------------------------------------------------------

def terminal_rank(node_id: str) -> int:
    return 0 if node_id.startswith("g") else 1


def test_lease_rules() -> None:
    a, b, g = "a" * 16, "b" * 16, "g" * 16
    p = L.plan(b, ["bucket/0"], [], 1000, terminal_rank, lease_ms=100, renew_left_ms=50)
    assert p.forward == {"bucket/0"} and p.write == (L.LeaseWrite("bucket/0", 1000, 1100),)
    held = [L.Lease(b, "bucket/0", 1000, 1100)]
    # another node does not claim while the lease is live, and takes over once it lapsed
    assert L.plan(a, ["bucket/0"], held, 1099, terminal_rank, 100, 50).held_by_others == {"bucket/0": b}
    assert L.plan(a, ["bucket/0"], held, 1100, terminal_rank, 100, 50).forward == {"bucket/0"}
    # the holder renews when less than renew_left is left
    assert L.plan(b, ["bucket/0"], held, 1040, terminal_rank, 100, 50).write == ()
    assert L.plan(b, ["bucket/0"], held, 1060, terminal_rank, 100, 50).write == (L.LeaseWrite("bucket/0", 1060, 1160),)
    # concurrent claims: the lowest node id wins on every node, a gateway before any terminal
    both = held + [L.Lease(a, "bucket/0", 1001, 1101)]
    for me in (a, b):
        assert L.holder_of("bucket/0", L.newest(both), 1050, terminal_rank) == a
    assert L.holder_of("bucket/0", L.newest(both + [L.Lease(g, "bucket/0", 1002, 1102)]), 1050, terminal_rank) == g
    # a release (newest lease with until == granted_at) frees the scope at once
    released = held + [L.Lease(b, "bucket/0", 1050, 1050)]
    assert L.holder_of("bucket/0", L.newest(released), 1051, terminal_rank) is None
    assert L.releases(b, held, 1050) == [L.LeaseWrite("bucket/0", 1050, 1050)]
    # an endless lease counts for nothing
    assert not L.Lease(a, "bucket/0", 0, 10**12).live(5)
    assert {L.scope_of(f"t-{i:08d}", 4) for i in range(100)} == {f"bucket/{i}" for i in range(4)}


# -- two uplink nodes --------------------------------------------------------------------


@pytest.fixture
def nodes(make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> tuple[NodeCore, NodeCore, NodeCore]:
    """Two uplink terminals (ids sorted: low, high) and a selling terminal, sales replicated to both."""
    u1, u2 = open_node(make_node("u1", uplink=True)), open_node(make_node("u2", uplink=True))
    low, high = sorted((u1, u2), key=lambda c: c.node_id)
    seller = open_node(make_node("seller"))
    for n in range(12):
        seller.sell(1000 + n, card=seller.seal_card(VISA, "1228", "chip"))
    merge(low, seller)
    merge(high, seller)
    return low, high, seller


async def test_only_the_lease_holder_forwards_and_another_takes_over_after_expiry(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    low, high, seller = nodes
    all_ids = sorted(s["id"] for s in seller.sales())
    to_low, to_high = FakeSwitch(switch_key, clock, settle=False), FakeSwitch(switch_key, clock, settle=False)
    f_low = Forwarder(low, clock, to_low, lease_ms=60_000, renew_left_ms=30_000)
    f_high = Forwarder(high, clock, to_high, lease_ms=60_000, renew_left_ms=30_000)

    scopes = len({L.scope_of(s) for s in all_ids})  # buckets with work (node ids are random)
    first = await f_high.step()  # high claims every scope with work and forwards
    assert sorted(first.forwarded) == all_ids and first.leases_written == scopes
    merge(low, high)  # its leases reach the other uplink node
    blocked = await f_low.step()
    assert blocked.forwarded == [] and set(blocked.held_by_others.values()) == {high.node_id}
    assert to_low.batches == []
    clock.advance(50)  # still live (60 s), and high does not forward again while the switch said "pending"
    assert (await f_low.step()).forwarded == []
    # high dies mid-batch (it never renews): once its lease lapses, low takes the scopes over
    clock.advance(11)
    takeover = await f_low.step()
    assert sorted(takeover.forwarded) == all_ids and takeover.leases_written == scopes
    assert to_high.sent() == all_ids


async def test_concurrent_claims_resolve_to_the_lowest_node_id(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    low, high, _ = nodes
    to_low, to_high = FakeSwitch(switch_key, clock, settle=False), FakeSwitch(switch_key, clock, settle=False)
    f_low = Forwarder(low, clock, to_low, sale_backoff=lambda n: 0.0)
    f_high = Forwarder(high, clock, to_high, sale_backoff=lambda n: 0.0)
    await f_low.step()
    await f_high.step()  # both claimed before they saw each other: one batch went twice (the switch de-duplicates)
    merge(low, high)
    merge(high, low)
    clock.advance(1)
    assert len((await f_low.step()).forwarded) == 12
    yielded = await f_high.step()
    assert yielded.forwarded == [] and set(yielded.held_by_others.values()) == {low.node_id}


async def test_release_lets_another_node_take_over_at_once(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    low, high, _ = nodes
    to_low = FakeSwitch(switch_key, clock, settle=False)
    f_low, f_high = Forwarder(low, clock, to_low), Forwarder(high, clock, FakeSwitch(switch_key, clock))
    await f_low.step()
    merge(high, low)
    assert (await f_high.step()).forwarded == []
    assert f_low.release() == len({L.scope_of(s["id"]) for s in low.sales()})  # low lost its uplink
    merge(high, low)
    clock.advance(0.001)
    assert len((await f_high.step()).forwarded) == 12
    assert all(s["status"] == "approved" and s["auth_code"] == "A1B2C3" for s in high.sales())


async def test_results_enter_the_ledger_and_nothing_is_forwarded_twice(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    low, _, seller = nodes
    fake = FakeSwitch(switch_key, clock)
    fwd = Forwarder(low, clock, fake, batch_sales=5)
    assert await fwd.drain(parallel=2) == 12
    assert sorted(len(b) for b in fake.batches) == [2, 5, 5]
    assert sorted(fake.sent()) == sorted(s["id"] for s in seller.sales())  # each sale once
    assert (await fwd.step()).forwarded == []
    merge(seller, low)  # the selling terminal learns its outcomes by replication
    assert {s["status"] for s in seller.sales()} == {"approved"}


async def test_a_large_reply_is_taken_in_slices_others_see_the_first_results_early(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply's results are committed a slice at a time with a checkpoint between: the node's other
    tasks (the sellers' event streams) see the first approvals before the whole reply is taken in,
    and a second worker does not send the sales still being taken in."""
    low, _, seller = nodes
    monkeypatch.setattr(forwarder_module, "INGEST_SLICE", 5)
    fake = FakeSwitch(switch_key, clock)
    fwd = Forwarder(low, clock, fake, batch_sales=12)
    seen: list[int] = []
    second: list[list[str]] = []

    async def second_worker() -> None:
        second.append((await fwd.step()).forwarded)

    async with trio.open_nursery() as nursery:
        async def observe() -> None:
            while not second or len(seen) < 2 or seen[-1] < 12:
                seen.append(sum(1 for s in low.sales() if s["status"] == "approved"))
                if seen[-1] and not second:  # the first slice is in: a second worker plans now
                    second.append([])
                    nursery.start_soon(second_worker)
                await trio.lowlevel.checkpoint()

        nursery.start_soon(observe)
        report = await fwd.step()
    assert len(report.forwarded) == 12 and report.settled == 12
    assert second[-1] == []  # the sales being taken in were not sent again by the second worker
    # committed slice by slice (5, 10, 12), visible between slices: trio runs the observer once per
    # scheduling round in a random order beside the forwarder, so it sees 5 or 10, maybe both
    assert any(0 < n < 12 for n in seen), seen
    assert sorted(fake.sent()) == sorted(s["id"] for s in seller.sales())  # each sale sent once


class SlowCores(FakeClock):
    """A clock on which every look at the time finds 3 ms gone: ingesting a result is slow."""

    def monotonic(self) -> float:
        self._mono += 0.003
        return self._mono


async def test_a_slice_ends_after_its_time_on_slow_cores_not_only_after_25_results(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    """A reply of 12 results, fewer than INGEST_SLICE: on cores where each result takes a few ms
    (a terminal's ARM core) the first approvals still reach the node's other tasks before the
    whole reply is in, because a slice also ends once INGEST_SLICE_S has passed."""
    low, _, seller = nodes
    assert forwarder_module.INGEST_SLICE > 12
    fake = FakeSwitch(switch_key, clock)
    fwd = Forwarder(low, SlowCores(clock.now_ms()), fake, batch_sales=12)
    seen: list[int] = []
    done = False

    async def observe() -> None:
        while not done:
            seen.append(sum(1 for s in low.sales() if s["status"] == "approved"))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(observe)
        report = await fwd.step()
        done = True
    assert report.settled == 12
    assert any(0 < n < 12 for n in seen), seen  # a part of the reply was in while the rest was not
    assert sorted(fake.sent()) == sorted(s["id"] for s in seller.sales())


async def test_a_forwarder_whose_clock_is_behind_the_switch_still_forwards_the_sales_of_that_time(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    """A gateway 2 h behind takes the sales of the last 2 h for dated ahead. Once it has measured
    the switch's clock, it forwards them (card sales held back past their window would expire);
    without a measurement it keeps to its own clock plus the skew."""
    low, _, seller = nodes
    behind = FakeClock(now_ms=clock.now_ms() - 2 * 3_600_000, monotonic=clock.monotonic())
    offset: list[int | None] = [None]
    fwd = Forwarder(low, behind, FakeSwitch(switch_key, clock), batch_sales=50, switch_offset=lambda: offset[0])
    assert fwd.pending(behind.now_ms()) == []  # by its own clock every sale is 2 h ahead
    offset[0] = -2 * 3_600_000  # the switch's health answer said: 2 h behind
    assert sorted(fwd.pending(behind.now_ms())) == sorted(s["id"] for s in seller.sales())
    assert (await fwd.step()).settled == 12
    offset[0] = 3_600_000  # a clock ahead of the switch never narrows what is forwarded
    assert fwd.not_after(behind.now_ms()) == behind.now_ms() + MAX_SKEW_MS


async def test_resume_after_restart_from_the_ledger(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        open_node: Callable[[Path], NodeCore]) -> None:
    low, _, _ = nodes
    broken = FakeSwitch(switch_key, clock)
    broken.fail_next = 1
    with pytest.raises(UplinkError):
        await Forwarder(low, clock, broken).step()  # leases claimed, then the uplink failed
    path = low.dir.path
    low.close()
    again = open_node(path)
    fake = FakeSwitch(switch_key, clock)
    report = await Forwarder(again, clock, fake).step()
    assert len(report.forwarded) == 12 and report.leases_written == 0  # still the holder, from the ledger
    assert {s["status"] for s in again.sales()} == {"approved"}


async def test_run_forwarder_backs_off_and_releases_when_the_uplink_goes(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        autojump_clock: trio.testing.MockClock) -> None:
    low, high, seller = nodes
    fake = FakeSwitch(switch_key, clock)
    fake.fail_next = 2
    allowed = True
    async with trio.open_nursery() as nursery:
        fwd: Forwarder = await nursery.start(lambda task_status: run_forwarder(
            low, clock, lambda: allowed, transport=fake, backoff=lambda n: 10.0, poll_s=1.0,
            task_status=task_status))
        while any(s["status"] == "pending" for s in low.sales()):
            await trio.sleep(1)
        assert sorted(fake.sent()) == sorted(s["id"] for s in seller.sales())
        # a new sale wakes the loop; then the uplink goes and the leases are released
        new_id = seller.sell(777, card=seller.seal_card(VISA, "1228", "chip"))["id"]
        merge(low, seller)
        while low.sale(new_id)["status"] == "pending":
            await trio.sleep(1)
        allowed = False
        while not any(lease.until == lease.granted_at for lease in fwd.leases()):
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    merge(high, low)
    f_high = Forwarder(high, clock, FakeSwitch(switch_key, clock))
    assert f_high.plan(clock.now_ms())[1].held_by_others == {}


async def test_sales_do_not_wake_the_workers_of_a_node_without_an_uplink(
        nodes: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        autojump_clock: trio.testing.MockClock) -> None:
    """Every node of a site takes in every sale; only the ones with an uplink forward. Without
    one, the workers sleep through the sales (each wake-up of each worker cost CPU on every node
    for every sale) and look again only at their idle poll."""
    low, high, seller = nodes
    looks = 0

    def has_uplink() -> bool:
        nonlocal looks
        looks += 1
        return False

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_forwarder(
            low, clock, has_uplink, transport=FakeSwitch(switch_key, clock), poll_s=1.0, idle_poll_s=3600.0,
            parallel=2, task_status=task_status))
        await trio.sleep(1)
        before = looks
        for i in range(10):
            seller.sell(500 + i, card=seller.seal_card(VISA, "1228", "chip"))
            merge(low, seller)
            await trio.sleep(1)
        assert looks - before <= 10  # one look per sale (is there an uplink now?), no worker woken
        nursery.cancel_scope.cancel()
