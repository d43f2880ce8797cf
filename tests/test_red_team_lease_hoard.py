"""Red team: one enrolled node that claims every forwarding lease and never forwards.

Its leases are validly signed, it renews them and it stays reachable, so by lease rules 1-5 alone
every other uplink node of the site leaves its scopes to it, and no sale of the site is ever
settled: one terminal stops the site (issue 12's rule: none may). Rule 6 (protocols/forwarding.md,
"Leases"): when none of the sales pending in another node's scopes was settled for ``STALL_S``,
this node forwards them too (the switch de-duplicates, so it costs at most a repeated sale, never
a second charge); a holder whose sales keep settling keeps its scopes, however long its backlog.
Real ledgers and a real switch over TLS on loopback; the clock is a FakeClock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.switch.connlimit import ConnectionLimits
from meshpos.uplink import leases as L
from meshpos.uplink.forwarder import OVERDUE_S, STALL_S, Forwarder
from switch_harness import merge, switch_dir, transport  # noqa: F401 -- switch_dir: fixture
from test_switch_hardening import switch_with

pytestmark = pytest.mark.usefixtures("switch_backend_env")


def hoard(hoarder: NodeCore, clock: FakeClock) -> None:
    """The hoarder's move: a fresh 60 s lease on every bucket (what a renewing holder writes)."""
    now = clock.now_ms()
    Forwarder(hoarder, clock)._write_leases([L.LeaseWrite(f"bucket/{n}", now, now + L.LEASE_MS)
                                             for n in range(L.BUCKETS)])


async def test_a_node_that_holds_every_lease_and_never_forwards_does_not_stop_the_site(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],  # noqa: F811
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    gateway = open_node(make_node("gw", "gateway"))
    hoarder = open_node(make_node("hoarder", uplink=True))
    seller = open_node(make_node("seller"))
    sales = sorted(str(seller.sell(700 + n)["id"]) for n in range(8))
    merge(gateway, seller)
    async with switch_with(switch_dir, clock, ConnectionLimits()) as (_, port):
        fwd = Forwarder(gateway, clock, transport(gateway, f"https://127.0.0.1:{port}"),
                        reachable=lambda node_id: True)  # the hoarder keeps publishing its statuses
        hoard(hoarder, clock)
        merge(gateway, hoarder)
        first = await fwd.step()
        assert first.forwarded == [] and set(first.held_by_others.values()) == {hoarder.node_id}
        waited = 0.0
        while waited < STALL_S:  # the hoarder renews in time, again and again
            clock.advance(25)
            waited += 25
            hoard(hoarder, clock)
            merge(gateway, hoarder)
            if waited < STALL_S:
                assert (await fwd.step()).forwarded == []  # rules 1-5: its scopes, not ours
        sent: list[str] = []
        while True:
            report = await fwd.step()
            sent += report.forwarded
            if not report.more:
                break
        assert sorted(sent) == sales
        assert fwd.pending(clock.now_ms()) == []  # every sale has its result
        assert [r.getMessage() for r in caplog.records if hoarder.node_id in r.getMessage()]


async def test_an_honest_holder_keeps_its_scopes(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],  # noqa: F811
        clock: FakeClock) -> None:
    """A holder that settles what it holds: nobody forwards its scopes besides it."""
    gateway = open_node(make_node("gw", "gateway"))
    other = open_node(make_node("other", uplink=True))
    seller = open_node(make_node("seller"))
    async with switch_with(switch_dir, clock, ConnectionLimits()) as (_, port):
        url = f"https://127.0.0.1:{port}"
        fwd = Forwarder(gateway, clock, transport(gateway, url), reachable=lambda node_id: True)
        honest = Forwarder(other, clock, transport(other, url), reachable=lambda node_id: True)
        for _ in range(8):  # a sale every 25 s for longer than STALL_S, each settled by the holder
            seller.sell(900)
            merge(gateway, seller)
            merge(other, seller)
            await honest.step()  # claims (or renews) and forwards
            merge(gateway, other)
            assert (await fwd.step()).forwarded == []
            clock.advance(25)
        assert fwd.pending(clock.now_ms()) == []


@asynccontextmanager
async def one_sale_a_step(switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
                          clock: FakeClock, sales: int) -> AsyncIterator[tuple[list[str], Forwarder, Forwarder,
                                                                                 Callable[[], None]]]:
    """A seller's backlog of ``sales`` sales held by a gateway and by an uplink node whose forwarder
    sends one sale per step (it claims the scopes at its first step): the backlog, the gateway's
    forwarder, the holder's, and what brings the holder's news to the gateway."""
    gateway = open_node(make_node("gw", "gateway"))
    holder = open_node(make_node("holder", uplink=True))
    seller = open_node(make_node("seller"))
    backlog = [str(seller.sell(900 + n)["id"]) for n in range(sales)]
    merge(gateway, seller)
    merge(holder, seller)
    async with switch_with(switch_dir, clock, ConnectionLimits()) as (_, port):
        url = f"https://127.0.0.1:{port}"
        yield (backlog, Forwarder(gateway, clock, transport(gateway, url), reachable=lambda node_id: True),
               Forwarder(holder, clock, transport(holder, url), reachable=lambda node_id: True, batch_sales=1),
               lambda: merge(gateway, holder))


async def test_a_holder_working_through_a_long_backlog_keeps_its_scopes(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],  # noqa: F811
        clock: FakeClock) -> None:
    """A holder that settles a sale of its backlog every 25 s, on a backlog that lasts longer than
    STALL_S: its sales keep leaving, so nobody else forwards them (rule 6 counts the time since the
    holder last settled one, not how long a sale has waited), and nothing is sent twice."""
    async with one_sale_a_step(switch_dir, make_node, open_node, clock, 8) as (backlog, fwd, slow, news):
        settled: list[str] = []
        while len(settled) < len(backlog):  # 8 x 25 s: longer than STALL_S, one sale at a time
            settled += (await slow.step()).forwarded
            news()
            assert (await fwd.step()).forwarded == []
            clock.advance(25)
        assert 25 * len(backlog) > STALL_S and sorted(settled) == sorted(backlog)
        assert fwd.pending(clock.now_ms()) == []


async def test_a_holder_that_settles_a_sale_now_and_then_holds_none_past_overdue(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],  # noqa: F811
        clock: FakeClock) -> None:
    """The hoarder's drip: it settles one sale every 100 s (just often enough never to count as
    stalled) while the site's sales pile up in its scopes. No sale waits there past OVERDUE_S:
    this node forwards the overdue ones, and nothing before."""
    async with one_sale_a_step(switch_dir, make_node, open_node, clock, 12) as (backlog, fwd, drip, news):
        waited, ours = 0.0, []
        while fwd.pending(clock.now_ms()):
            await drip.step()
            news()
            report = await fwd.step()
            if waited < OVERDUE_S:
                assert report.forwarded == []  # rules 1-5 and the drip: its scopes
            ours += report.forwarded
            clock.advance(100)
            waited += 100
        assert ours and waited <= OVERDUE_S + 200  # the rest went as soon as it was overdue
        assert set(ours) < set(backlog)
