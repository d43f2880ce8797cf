"""No single lease, sale or outage stops a node with uplink from forwarding (issue 12).

In memory: real node directories and ledgers, the forwarder against a switch in memory
(tests/forwarder_helpers.py), an injected wall clock (FakeClock) and trio's MockClock for
the loop's waits. Every lease here is signed with an enrolled terminal's real key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import pytest
import trio
import trio.testing

from meshpos.domain import rules
from meshpos.wire import envelope
from meshpos.infra.clock import FakeClock
from meshpos.domain.errors import UplinkError
from meshpos.node.core import NodeCore
from meshpos.site.sitedir import Site
from meshpos.wire.forwarding import ForwardReply
from meshpos.uplink import leases as L
from meshpos.uplink.client import NotSent, SwitchRefused
from meshpos.uplink.forwarder import SET_ASIDE_AFTER, Forwarder, run_forwarder

from forwarder_helpers import VISA, FakeSwitch, merge

DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def fair(make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> tuple[NodeCore, NodeCore, NodeCore]:
    """A node with uplink, a hostile enrolled terminal and a selling terminal whose 12 sales the
    node with uplink holds."""
    uplink = open_node(make_node("up", uplink=True))
    hostile = open_node(make_node("hostile"))
    seller = open_node(make_node("seller"))
    for n in range(12):
        seller.sell(1000 + n, card=seller.seal_card(VISA, "1228", "chip"))
    merge(uplink, seller)
    return uplink, hostile, seller


def hoard(node: NodeCore, granted_at: int, life_ms: int = L.MAX_LEASE_MS) -> None:
    """``node`` signs a lease on every bucket (what a hostile terminal does to stop the site)."""
    for n in range(L.BUCKETS):
        body = {"site": node.policy.site_id, "holder": node.node_id, "scope": f"bucket/{n}",
                "granted_at": granted_at, "until": granted_at + life_ms}
        node.ledger.write_local(envelope.seal("lease", node.node_id, body, node.key))
    node.store.flush()


def pending_ids(core: NodeCore) -> list[str]:
    return sorted(s["id"] for s in core.sales() if s["status"] == "pending")


# -- 1. leases cannot be hoarded ---------------------------------------------------------


async def test_leases_dated_sixty_days_ahead_do_not_stop_forwarding(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    uplink, hostile, seller = fair
    hoard(hostile, clock.now_ms() + 60 * DAY_MS)  # they verify: its certificate is valid then
    merge(uplink, hostile)
    assert len(uplink.store.entries_of_type("lease")) == L.BUCKETS
    todo = pending_ids(uplink)
    report = await Forwarder(uplink, clock, FakeSwitch(switch_key, clock)).step()
    assert report.held_by_others == {}
    assert sorted(report.forwarded) == todo and pending_ids(uplink) == []


async def test_leases_of_a_revoked_terminal_stop_counting_when_the_revocation_arrives(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        site: Site) -> None:
    uplink, hostile, _ = fair
    hoard(hostile, clock.now_ms())  # live for the longest life a lease may have
    merge(uplink, hostile)
    fwd = Forwarder(uplink, clock, FakeSwitch(switch_key, clock))
    blocked = await fwd.step()
    assert blocked.forwarded == [] and set(blocked.held_by_others.values()) == {hostile.node_id}
    uplink.ingest(site.revoke(hostile.node_id, "stolen", clock), "organizer")
    clock.advance(0.001)
    report = await fwd.step()
    assert report.held_by_others == {} and len(report.forwarded) == 12
    assert pending_ids(uplink) == []


async def test_a_node_with_uplink_takes_over_the_leases_of_a_holder_it_cannot_reach(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    uplink, hostile, _ = fair
    hoard(hostile, clock.now_ms())
    merge(uplink, hostile)
    reachable = {hostile.node_id}
    fwd = Forwarder(uplink, clock, FakeSwitch(switch_key, clock), reachable=lambda node_id: node_id in reachable)
    assert (await fwd.step()).forwarded == []  # a reachable holder keeps its scopes
    reachable.clear()  # its links are gone and its status went stale
    report = await fwd.step()
    assert len(report.forwarded) == 12 and report.leases_written == len({L.scope_of(s) for s in report.forwarded})


async def test_a_lease_counts_for_its_life_from_when_this_node_received_it(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    """A lease dated just inside the skew (a clock running 4 min ahead, or an attacker who knows
    the skew) holds for its life counted from its arrival, not up to its ``until``."""
    uplink, hostile, _ = fair
    hoard(hostile, clock.now_ms() + rules.MAX_SKEW_MS - 60_000)
    merge(uplink, hostile)
    # rule 3 alone: rule 6 (a stalled holder's sales, and overdue ones, forwarded anyway) is off here
    fwd = Forwarder(uplink, clock, FakeSwitch(switch_key, clock), stall_s=math.inf, overdue_s=math.inf)
    assert (await fwd.step()).forwarded == []
    clock.advance(L.MAX_LEASE_MS / 1000 - 0.001)
    assert (await fwd.step()).forwarded == []
    clock.advance(0.001)  # its life is over here; its ``until`` is 4 minutes away still
    assert len((await fwd.step()).forwarded) == 12


def test_lease_counting_rules() -> None:
    me, other, now = "a" * 16, "b" * 16, 10_000_000

    def rank(node_id: str) -> int:
        return 1

    skew = rules.MAX_SKEW_MS
    # rule 1a: granted beyond the skew ahead counts for nothing, at the skew it counts
    assert not L.Lease(other, "bucket/0", now + skew + 1, now + skew + 60_001, received_at=now).live(now)
    assert L.Lease(other, "bucket/0", now + skew, now + skew + 60_000, received_at=now).live(now)
    # ... and a far-future lease does not shadow the holder's own newest (rule 2 after rule 1)
    leases = [L.Lease(other, "bucket/0", now + 60 * DAY_MS, now + 60 * DAY_MS + 1, received_at=now),
              L.Lease(other, "bucket/0", now - 10, now - 10, received_at=now)]  # a release
    assert L.holder_of("bucket/0", L.newest(L.counting(leases, now)), now, rank) is None
    # rule 3: the life counts from reception; a lease received late ends at its until
    late = L.Lease(other, "bucket/0", now - 50_000, now + 10_000, received_at=now)
    assert late.end == now + 10_000
    early = L.Lease(other, "bucket/0", now + 200_000, now + 260_000, received_at=now)
    assert early.end == now + 60_000
    # rule 1b/1c: ignored holders' leases do not count; this node then claims
    held = [L.Lease(other, "bucket/0", now, now + 60_000, received_at=now)]
    assert L.plan(me, ["bucket/0"], held, now + 1, rank).held_by_others == {"bucket/0": other}
    taken = L.plan(me, ["bucket/0"], held, now + 1, rank, ignore={other})
    assert taken.forward == {"bucket/0"} and [w.scope for w in taken.write] == ["bucket/0"]


# -- 2. one back-off per worker, leases kept through failed batches --------------------


class Outage(FakeSwitch):
    """The switch unreachable for the first ``fail_next`` batches; every backoff asked for is recorded."""

    def __init__(self, key: nacl.signing.SigningKey, clock: FakeClock, failures: int) -> None:
        super().__init__(key, clock)
        self.fail_next = failures
        self.backoffs: list[int] = []

    def backoff(self, failures: int) -> float:
        self.backoffs.append(failures)
        return 10.0


def released(fwd: Forwarder) -> bool:
    return any(lease.until == lease.granted_at for lease in fwd.leases())


async def test_each_worker_backs_off_on_its_own_failures_and_keeps_the_leases(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        autojump_clock: trio.testing.MockClock) -> None:
    uplink, _, _ = fair
    switch = Outage(switch_key, clock, failures=2)  # one short outage: each worker's first batch fails
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_forwarder(
            uplink, clock, lambda: True, transport=switch, batch_sales=6, backoff=switch.backoff, poll_s=1.0,
            task_status=task_status))
        while pending_ids(uplink):
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert switch.backoffs == [1, 1]  # a shared counter asked for 1, then 2
    assert sorted(switch.sent()) == sorted(s["id"] for s in uplink.sales())


async def test_new_sales_do_not_cut_a_back_off_short(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        autojump_clock: trio.testing.MockClock) -> None:
    """During an outage a busy site sells all the time: each new sale must not cost an attempt."""
    uplink, _, seller = fair
    switch = Outage(switch_key, clock, failures=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_forwarder(
            uplink, clock, lambda: True, transport=switch, parallel=1, backoff=switch.backoff, poll_s=1.0,
            task_status=task_status))
        while not switch.backoffs:
            await trio.sleep(0.1)
        for n in range(5):  # within the 10 s back-off
            seller.sell(900 + n, card=seller.seal_card(VISA, "1228", "chip"))
            merge(uplink, seller)
            await trio.sleep(1)
        assert switch.backoffs == [1]
        await trio.sleep(5)
        assert switch.backoffs == [1, 2]
        nursery.cancel_scope.cancel()


async def test_failed_batches_do_not_release_the_leases_a_lost_uplink_does(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        autojump_clock: trio.testing.MockClock) -> None:
    uplink, _, _ = fair
    switch = Outage(switch_key, clock, failures=10)
    up = True
    async with trio.open_nursery() as nursery:
        fwd: Forwarder = await nursery.start(lambda task_status: run_forwarder(
            uplink, clock, lambda: up, transport=switch, batch_sales=6, backoff=switch.backoff, poll_s=1.0,
            task_status=task_status))
        while len(switch.backoffs) < 6:  # three failures in a row on each worker
            await trio.sleep(1)
        assert not released(fwd) and fwd.leases()
        up = False  # the uplink is lost for real (no longer allowed, or the probe finds no switch)
        while not released(fwd):
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert sorted(switch.backoffs) == [1, 1, 2, 2, 3, 3]


# -- 3. a sale that keeps failing is set aside ---------------------------------------------


class Poisoned(FakeSwitch):
    """The switch fails every batch that holds ``poison`` (an HTTP 500 or a connection lost after
    sending), and settles every other batch; ``broken`` fails every batch; ``fail_next`` batches
    never reach it. Every batch tried is recorded."""

    def __init__(self, key: nacl.signing.SigningKey, clock: FakeClock, poison: str | None,
                 error: Callable[[], UplinkError]) -> None:
        super().__init__(key, clock)
        self.poison = poison
        self.error = error
        self.broken = False
        self.tried: list[list[str]] = []

    async def forward(self, entries: list[bytes]) -> ForwardReply:
        ids = [envelope.decode(raw).body["sale_id"] for raw in entries if envelope.decode(raw).type == "sale"]
        self.tried.append(ids)
        if self.fail_next:
            self.fail_next -= 1
            raise NotSent("no route to the switch")
        if self.broken or self.poison in ids:
            await trio.lowlevel.checkpoint()
            raise self.error()
        return await super().forward(entries)


async def run_steps(fwd: Forwarder, clock: FakeClock, steps: int, idle_s: float) -> None:
    """Step the forwarder as its loop would, the wall clock moving ``idle_s`` when there is nothing to do."""
    for _ in range(steps):
        report = await fwd.step()
        if not report.forwarded:
            clock.advance(idle_s)


@pytest.mark.parametrize("error", [lambda: SwitchRefused(500, "switch refused the batch (HTTP 500): internal error"),
                                   lambda: UplinkError("switch at https://s:1: connection lost")],
                         ids=["http-500", "lost-after-sending"])
async def test_a_sale_that_fails_every_batch_is_set_aside_and_the_others_are_forwarded(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        error: Callable[[], UplinkError], caplog: pytest.LogCaptureFixture) -> None:
    uplink, _, seller = fair
    ids = sorted(s["id"] for s in seller.sales())
    poison = ids[5]
    switch = Poisoned(switch_key, clock, poison, error)
    fwd = Forwarder(uplink, clock, switch, sale_backoff=lambda n: 60.0, set_aside_s=1800.0)
    caplog.set_level(logging.INFO, logger="meshpos.uplink.forwarder")
    reports = []
    for _ in range(40):
        if fwd.status()["set_aside"]:
            break
        reports.append(await fwd.step())
        if not reports[-1].forwarded:
            clock.advance(60.0)
    set_aside_at = clock.now_ms()
    assert reports[-1].set_aside == [poison] and reports[-1].forwarded == [poison]

    by_id = {s["id"]: s for s in uplink.sales()}
    assert all(by_id[s]["status"] == "approved" for s in ids if s != poison)
    assert by_id[poison]["status"] == "pending"
    assert fwd.status() == {"set_aside": 1, "set_aside_sales": [poison]}
    assert sorted(switch.sent()) == sorted(set(ids) - {poison})  # each honest sale settled once
    lone = [batch for batch in switch.tried if batch == [poison]]
    assert len(lone) == SET_ASIDE_AFTER
    set_aside_logs = [r for r in caplog.records if "set aside" in r.getMessage()]
    assert len(set_aside_logs) == 1 and poison in set_aside_logs[0].getMessage()

    # retried rarely: not within the long back-off, once after it; still logged only once
    clock.advance(1800 - 0.001)
    assert (await fwd.step()).forwarded == []
    assert [b for b in switch.tried if b == [poison]] == lone
    clock.advance(0.001)
    assert clock.now_ms() == set_aside_at + 1_800_000
    assert (await fwd.step()).forwarded == [poison]
    assert len([b for b in switch.tried if b == [poison]]) == SET_ASIDE_AFTER + 1
    assert len([r for r in caplog.records if "set aside" in r.getMessage()]) == 1
    # a new sale is forwarded at once, never in a batch with the set-aside one
    new_id = seller.sell(555, card=seller.seal_card(VISA, "1228", "chip"))["id"]
    merge(uplink, seller)
    report = await fwd.step()
    assert report.forwarded == [new_id] and uplink.sale(new_id)["status"] == "approved"


async def test_the_search_for_the_failing_sale_resumes_where_an_outage_stopped_it(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    uplink, _, seller = fair
    ids = sorted(s["id"] for s in seller.sales())
    switch = Poisoned(switch_key, clock, ids[0], lambda: SwitchRefused(500, "internal error"))
    fwd = Forwarder(uplink, clock, switch)
    assert (await fwd.step()).error  # the whole batch failed: split in halves
    switch.fail_next = 1
    with pytest.raises(NotSent):
        await fwd.step()  # the uplink went while the first half was being sent
    await fwd.step()
    assert [len(b) for b in switch.tried] == [12, 6, 6] and switch.tried[1] == switch.tried[2] == ids[:6]


async def test_a_switch_that_fails_every_batch_sets_nothing_aside(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    """A broken switch (every batch 500) is not a poison sale: nothing is set aside, and once it
    works again everything settles."""
    uplink, _, seller = fair
    switch = Poisoned(switch_key, clock, None, lambda: SwitchRefused(500, "internal error"))
    switch.broken = True
    fwd = Forwarder(uplink, clock, switch, sale_backoff=lambda n: 60.0)
    await run_steps(fwd, clock, steps=60, idle_s=60.0)
    assert len(switch.tried) > 12 and fwd.status()["set_aside"] == 0
    switch.broken = False
    await run_steps(fwd, clock, steps=30, idle_s=60.0)
    assert pending_ids(uplink) == [] and fwd.status()["set_aside"] == 0


async def test_a_switch_that_refuses_this_node_is_an_outage_not_a_batch_to_split(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock) -> None:
    uplink, _, _ = fair
    switch = Poisoned(switch_key, clock, None, lambda: SwitchRefused(403, "node not enrolled at this switch"))
    switch.broken = True
    fwd = Forwarder(uplink, clock, switch)
    with pytest.raises(SwitchRefused):
        await fwd.step()
    switch.error = lambda: NotSent("no route")
    with pytest.raises(NotSent):
        await fwd.step()
    assert [len(b) for b in switch.tried] == [12, 12]  # the same whole batch: nothing split, nothing deferred


# -- 4. what is not forwarded --------------------------------------------------------------


async def test_refused_future_dated_and_reversed_sales_are_not_forwarded(
        fair: tuple[NodeCore, NodeCore, NodeCore], switch_key: nacl.signing.SigningKey, clock: FakeClock,
        make_node: Callable[..., Path]) -> None:
    uplink, _, seller = fair
    ids = sorted(s["id"] for s in seller.sales())
    refused = ids[0]
    # the node's view refuses it (the ledger fills sales.refused; set here as the view would)
    uplink.store.conn.execute("UPDATE sales SET refused='currency XXX is not the site''s (EUR)' WHERE sale_id=?",
                              (refused,))
    # a terminal whose clock runs an hour ahead
    ahead_clock = FakeClock(clock.now_ms() + 3600 * 1000)
    ahead = NodeCore.open(make_node("ahead"), ahead_clock)
    try:
        future = ahead.sell(700, card=ahead.seal_card(VISA, "1228", "chip"))["id"]
        merge(uplink, ahead)
    finally:
        ahead.close()
    switch = FakeSwitch(switch_key, clock)
    fwd = Forwarder(uplink, clock, switch)
    first = await fwd.step()
    assert sorted(first.forwarded) == sorted(set(ids) - {refused})
    assert (await fwd.step()).forwarded == []
    # within the skew of this node's clock it is valid, and forwarded
    clock.advance(3600 - rules.MAX_SKEW_MS / 1000)
    assert (await fwd.step()).forwarded == [future]
    assert refused not in switch.sent()

    # voided after approval: the void goes to the switch until a reversal is known
    voided = ids[1]
    seller.ingest(uplink.ledger.raw(f"result/{voided}") or b"", "peer")
    seller.void(voided, "customer changed their mind")
    merge(uplink, seller)
    clock.advance(600)
    assert voided in fwd.pending(clock.now_ms())
    # the reversal entry is known (the ledger sets sales.reversed_at from reversal/<sale_id>)
    uplink.store.conn.execute("UPDATE sales SET reversed_at=? WHERE sale_id=?", (clock.now_ms(), voided))
    assert voided not in fwd.pending(clock.now_ms())
    assert (await fwd.step()).forwarded == []


def test_reachable_means_a_link_or_a_fresh_status() -> None:
    from meshpos.status.board import NodeStatus
    from meshpos.uplink.reach import is_reachable
    from meshpos.wire.status import StatusBody

    now, peer = 50_000_000, "p" * 16

    def status(at: int, received: int) -> NodeStatus:
        return NodeStatus(peer, StatusBody(at=at, every_ms=10_000), b"", received)

    assert is_reachable(peer, now, {peer}, None)  # linked, status or not
    assert not is_reachable(peer, now, set(), None)
    assert is_reachable(peer, now, set(), status(now - 30_000, now - 30_000))  # three periods
    assert not is_reachable(peer, now, set(), status(now - 30_001, now - 30_001))
    # an old status handed over again by a peer that linked up just now is not fresh
    assert not is_reachable(peer, now, set(), status(now - 30_001 - rules.MAX_SKEW_MS, now))
    # a status dated far ahead is fresh only while it is recent here (its own time cannot keep it so)
    assert not is_reachable(peer, now, set(), status(now + 60 * DAY_MS, now - 30_001))
