"""Deterministic simulation: the whole site in memory, driven by a Hypothesis stateful test.

Three terminals on the in-memory network (meshpos.replication.memnet), each with its OWN FakeClock
(skews of hours between terminals), the real switch processor (meshpos.switch.processor.Switch,
its SQLite de-duplication table) behind a fake transport whose uplink flaps and sometimes loses
the reply after the switch acted, and a fake acquirer that counts advices. Rules: card and cash
sales, partitions and heals, delayed links (not pumped), dropped / duplicated / reordered frames,
node restarts, time passing (up to hours), forwarding rounds from any node. Seeded: Hypothesis
derandomizes; every source of time is a FakeClock.

Invariants after every step: every acknowledged sale is on its terminal; no sale was advised
with a second 0220 (repeats are 0221); the switch never advised a sale past its offline window
by the switch's own clock, and never expired one inside it; a node reports a sale "expired"
only past created_at + window by that node's own clock. At the end (mesh healed, uplink up):
identical ledgers, every acknowledged sale on every node, every card sale advised exactly once
(one 0220) or expired, every sale settled everywhere. Clock rules: protocols/offline-window.md.
"""

from __future__ import annotations

import atexit
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.infra.clock import SYSTEM_CLOCK, FakeClock
from meshpos.domain.errors import AcquirerError, UplinkError
from meshpos.wire.link_frames import FrameDecoder
from meshpos.replication.memnet import MemLink, MemNetwork
from meshpos.node.memnode import SimNode, enroll
from meshpos.site.sitedir import init_site
from meshpos.wire.forwarding import ForwardReply
from meshpos.switch.processor import Switch
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch
from meshpos.uplink.client import NotSent
from meshpos.uplink.forwarder import Forwarder

N = 3
HOUR = 3600.0
WINDOW_MS = 24 * 3600 * 1000  # the site's default offline window
CARDS = ("4111111111111111", "5555555555554444")
_TEMPLATE: Path | None = None
START_MS = SYSTEM_CLOCK.now_ms() + 7 * 24 * 3600 * 1000  # "true" time of the fair: certificates valid well around it


def _template() -> Path:
    global _TEMPLATE
    if _TEMPLATE is None:
        root = Path(tempfile.mkdtemp(prefix="meshpos-simulation-"))
        atexit.register(shutil.rmtree, root, True)  # kept for the whole run, removed at its end
        sd = init_switch(root / "switch", "127.0.0.1:9", "127.0.0.1:9")
        site = init_site(root / "site", "Sim Fair", switch_key=keys_hex(sd), switch_url="https://127.0.0.1:9")
        for i in range(N):
            enroll(site, root / f"n{i}", f"t{i}")
        add_site(root / "switch", root / "site")
        _TEMPLATE = root
    return _TEMPLATE


def keys_hex(sd: SwitchDir) -> str:
    return sd.pub_path.read_text().strip()


class FakeAcquirer:
    """Approves everything; counts 0220 / 0221 per sale and when (by the switch's clock) they came."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.count: dict[str, Counter[str]] = {}
        self.first_at: dict[str, int] = {}
        self.down = False

    async def advise(self, req: AcquirerRequest, *, repeat: bool, before_send: Any = None) -> AcquirerResult:
        if before_send is not None:  # encoded: the switch records "sent" now
            await before_send()
        self.count.setdefault(req.sale_id, Counter())["0221" if repeat else "0220"] += 1
        self.first_at.setdefault(req.sale_id, self.clock._now_ms)  # the switch's true time, whatever it believes
        if self.down:
            raise AcquirerError("acquirer host unreachable (simulated)")
        return AcquirerResult(approved=True, response_code="00", auth_code="SIM001")

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        return AcquirerResult(approved=True, response_code="00", auth_code=None)

    async def aclose(self) -> None:
        pass


class FakeSwitchTransport:
    """The uplink of one node: in-process to the real switch logic; it can be down, or lose the
    reply after the switch acted (the node then forwards again and the switch de-duplicates)."""

    def __init__(self, sim: "Simulation") -> None:
        self.sim = sim
        self.up = True
        self.lose_next_reply = False

    async def forward(self, entries: list[bytes]) -> ForwardReply:
        if not self.up:
            raise NotSent("no route to the switch (simulated)")
        switch = self.sim.switch()  # a fresh processor over the same database: restarts included
        site = next(iter(switch.sites.values()))
        reply = await switch.forward(site, entries)
        if self.lose_next_reply:
            self.lose_next_reply = False
            raise UplinkError("connection lost before the reply (simulated)")
        return reply


def _mangle(data: bytes, kind: str, rnd: random.Random) -> bytes:
    dec = FrameDecoder()
    dec.receive_data(data)
    frames = []
    while (frame := dec.next_frame()) is not None:
        frames.append(len(frame.payload).to_bytes(4, "big") + bytes([frame.type]) + frame.payload)
    if not frames:
        return data
    i = rnd.randrange(len(frames))
    if kind == "drop":
        del frames[i]
    elif kind == "dup":
        frames.insert(i, frames[i])
    elif kind == "reorder" and len(frames) > 1:
        j = rnd.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    return b"".join(frames)


class Simulation(RuleBasedStateMachine):
    @initialize(skews=st.lists(st.integers(-6, 6), min_size=N, max_size=N), seed=st.integers(0, 2**16))
    def setup(self, skews: list[int], seed: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meshpos-simrun-"))
        shutil.copytree(_template(), self.dir, dirs_exist_ok=True)
        self.rnd = random.Random(seed)
        self.switch_clock = FakeClock(now_ms=START_MS, monotonic=1000.0)
        self.clocks = [FakeClock(now_ms=START_MS + h * 3_600_000, monotonic=1000.0) for h in skews]
        self.nodes = [SimNode.open(self.dir / f"n{i}", self.clocks[i]) for i in range(N)]
        self.acquirer = FakeAcquirer(self.switch_clock)
        self.sd = SwitchDir(self.dir / "switch")
        self.store = self.sd.open_store()
        self.key = self.sd.key()
        self.transports = [FakeSwitchTransport(self) for _ in range(N)]
        self.forwarders = [self._forwarder(i) for i in range(N)]
        self.net = MemNetwork()
        self.links: dict[tuple[int, int], MemLink] = {}
        self.faults: dict[tuple[int, int], str] = {}
        self.acked: dict[str, int] = {}  # sale id -> terminal index
        self.cards: set[str] = set()

    def switch(self) -> Switch:
        return Switch(self.store, self.key, self.acquirer, self.switch_clock, advice_attempts=2,
                      reversal_attempts=2, backoff=lambda attempt: 0.0, sleep=_no_sleep)

    def _forwarder(self, i: int) -> Forwarder:
        return Forwarder(self.nodes[i].core, self.clocks[i], self.transports[i], sale_backoff=lambda n: 0.0)

    def teardown(self) -> None:
        if hasattr(self, "nodes"):
            for node in self.nodes:
                node.close()
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _live(self) -> dict[tuple[int, int], MemLink]:
        for key, link in list(self.links.items()):
            if link.closed or link.a.closed or link.b.closed:
                link.cut()
                del self.links[key]
        return self.links

    # -- rules ---------------------------------------------------------------------------

    @rule(i=st.integers(0, N - 1), amount=st.integers(1, 900), card=st.booleans())
    def sell(self, i: int, amount: int, card: bool) -> None:
        core = self.nodes[i].core
        capture = core.seal_card(CARDS[amount % 2], "1230", "contactless") if card else None
        sale = core.sell(amount, capture)
        self.acked[sale["id"]] = i
        if card:
            self.cards.add(sale["id"])

    @rule(i=st.integers(0, N - 1), j=st.integers(0, N - 1))
    def link(self, i: int, j: int) -> None:
        i, j = min(i, j), max(i, j)
        if i != j and (i, j) not in self._live():
            self.links[(i, j)] = self.net.connect(self.nodes[i].replicator, self.nodes[j].replicator)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.links))
    def partition(self, data: st.DataObject) -> None:
        self.links.pop(data.draw(st.sampled_from(sorted(self.links)))).cut()

    @rule(data=st.data(), kind=st.sampled_from(["drop", "dup", "reorder"]))
    @precondition(lambda self: bool(self.links))
    def fault(self, data: st.DataObject, kind: str) -> None:
        self.faults[data.draw(st.sampled_from(sorted(self.links)))] = kind

    @rule(rounds=st.integers(1, 6), skip=st.sets(st.integers(0, N - 1), max_size=1))
    def deliver(self, rounds: int, skip: set[int]) -> None:
        """Move bytes; links touching a node in ``skip`` are delayed (their bytes wait)."""
        for _ in range(rounds):
            for key, link in list(self._live().items()):
                if skip & set(key):
                    continue
                kind = self.faults.pop(key, None)
                link.deliver(mangle=(lambda d, k=kind: _mangle(d, k, self.rnd)) if kind else None)

    @rule(i=st.integers(0, N - 1))
    def restart(self, i: int) -> None:
        for key in [k for k in self._live() if i in k]:
            self.links.pop(key).cut()
        self.nodes[i] = self.nodes[i].reopen(self.clocks[i])
        self.forwarders[i] = self._forwarder(i)

    @rule(hours=st.sampled_from([0.01, 0.5, 3.0, 9.0, 30.0]))
    def time_passes(self, hours: float) -> None:
        for clock in self.clocks + [self.switch_clock]:
            clock.advance(hours * HOUR)
        for link in self._live().values():
            link.a.tick()
            link.b.tick()

    @rule(i=st.integers(0, N - 1), up=st.booleans(), lose=st.booleans())
    def uplink(self, i: int, up: bool, lose: bool) -> None:
        self.transports[i].up = up
        self.transports[i].lose_next_reply = lose

    @rule(down=st.booleans())
    def acquirer_state(self, down: bool) -> None:
        self.acquirer.down = down

    @rule(i=st.integers(0, N - 1))
    def forward(self, i: int) -> None:
        async def go() -> None:
            try:
                await self.forwarders[i].step()
            except UplinkError:
                pass
        trio.run(go)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def own_sales_kept(self) -> None:
        if not hasattr(self, "nodes"):
            return
        for sale_id, i in self.acked.items():
            assert self.nodes[i].core.store.sale(sale_id) is not None, f"{sale_id} lost on its terminal"

    @invariant()
    def advised_once_inside_the_window(self) -> None:
        if not hasattr(self, "nodes"):
            return
        for sale_id, counts in self.acquirer.count.items():
            assert counts["0220"] <= 1, f"{sale_id}: second 0220 {dict(counts)}"
            created = self._created_at(sale_id)
            assert self.acquirer.first_at[sale_id] <= created + WINDOW_MS, \
                f"{sale_id} advised past its window by the switch's clock"
        for sale_id, status in self.store.statuses().items():
            if status == "expired":
                assert self.acquirer.count.get(sale_id, Counter())["0220"] == 0

    @invariant()
    def expiry_by_each_nodes_own_clock(self) -> None:
        if not hasattr(self, "nodes"):
            return
        for i, node in enumerate(self.nodes):
            now = self.clocks[i].now_ms()
            for sale in node.core.sales():
                if sale["status"] == "expired":
                    assert sale["method"] == "card", "a cash sale never expires (the money is in the till)"
                    assert sale["created_at_ms"] + WINDOW_MS < now or sale["settled_at"] is not None
                elif sale["status"] == "pending" and sale["method"] == "card":
                    assert sale["created_at_ms"] + WINDOW_MS >= now, "a card sale past its window shows pending"

    def _created_at(self, sale_id: str) -> int:
        i = self.acked[sale_id]
        row = self.nodes[i].core.store.sale(sale_id)
        return int(row["created_at"])

    # -- the end -------------------------------------------------------------------------

    def _heal(self) -> None:
        """Every pair of nodes linked (links idle through a jump of the clocks have closed), no
        faults, every byte delivered and every summary exchanged."""
        for i in range(N):
            for j in range(i + 1, N):
                self.link(i, j)
        self.faults.clear()
        self.net.links = list(self._live().values())
        self.net.pump()
        for link in self._live().values():
            link.a.request_summary()
            link.b.request_summary()
        self.net.pump()

    def _awaiting_switch(self) -> list[tuple[int, str, str]]:
        """(node, sale, status) of every sale some node still holds as awaiting the switch: card
        sales pending, cash sales paid but not recorded yet."""
        return [(i, s["id"], s["status"]) for i, node in enumerate(self.nodes) for s in node.core.sales()
                if s["status"] in ("pending", "paid")]

    def heal_and_settle(self) -> None:
        self._heal()
        first = self.nodes[0]
        for node in self.nodes:
            assert set(self.acked) <= node.sale_ids(), "an acknowledged sale is missing once the mesh is whole"
            assert node.entries() == first.entries(), "ledgers differ once the mesh is whole"
        # Sales of a terminal whose clock runs ahead are deferred by every slower clock until it
        # gets there (protocols/rules.md, "Clocks: the skew"): let the slowest clock catch up with
        # the fastest, so that every sale is judged before the queue is forwarded. Links idle
        # through that jump close (nothing received for 45 s); they are made again.
        lag_ms = max(c.now_ms() for c in self.clocks) - min(c.now_ms() for c in self.clocks + [self.switch_clock])
        if lag_ms > 0:
            self.time_passes(lag_ms / 1000 / HOUR)
            self._heal()
        # uplink back on every node, acquirer up: every node forwards what it holds, the results
        # spread; a few rounds, as a sale that failed alone is sent after the others
        self.acquirer.down = False
        for t in self.transports:
            t.up, t.lose_next_reply = True, False
        for _ in range(10):
            for i in range(N):
                self.forward(i)
                self._heal()
            if not self._awaiting_switch():
                break
        for node in self.nodes:
            statuses = {s["id"]: s["status"] for s in node.core.sales()}
            assert all(st in ("approved", "expired") for st in statuses.values()), Counter(statuses.values())
        for sale_id in self.cards:
            status = {s["id"]: s["status"] for s in self.nodes[0].core.sales()}[sale_id]
            zero220 = self.acquirer.count.get(sale_id, Counter())["0220"]
            assert zero220 == (1 if status == "approved" else 0), (sale_id, status, zero220)


async def _no_sleep(seconds: float) -> None:
    await trio.lowlevel.checkpoint()


class WholeRun(Simulation):
    def teardown(self) -> None:
        try:
            if hasattr(self, "nodes"):
                self.heal_and_settle()
        finally:
            super().teardown()


WholeRun.TestCase.settings = settings(max_examples=30, stateful_step_count=50, deadline=None, derandomize=True,
                                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestSimulation = WholeRun.TestCase


# -- tests of the tests: a broken build makes the invariants fail ---------------------------


def _scripted(monkeypatch_target: object = None) -> Simulation:
    sim = Simulation()
    sim.setup(skews=[0, 2, -3], seed=1)
    return sim


def test_exactly_once_check_catches_a_switch_that_sends_0220_on_retry(monkeypatch) -> None:
    """A switch that does not record "advice sent" before the 0220 leaves retries with a second
    0220 after a lost answer."""
    from meshpos.switch import store as switch_store
    monkeypatch.setattr(switch_store.SwitchStore, "mark_advice_sent_many", lambda self, sales: [True] * len(sales))
    sim = _scripted()
    try:
        sim.sell(0, 120, True)
        sim.acquirer.down = True
        sim.forward(0)  # 0220 (+ a repeat) unanswered
        sim.acquirer.down = False
        sim.forward(0)
        with pytest.raises(AssertionError, match="second 0220"):
            sim.advised_once_inside_the_window()
    finally:
        sim.teardown()


def test_window_check_catches_a_switch_that_ignores_the_offline_window(monkeypatch) -> None:
    from meshpos.switch import processor
    real = processor.Switch._first_time

    async def no_expiry(self, site, row, work, void):  # type: ignore[no-untyped-def]
        with monkeypatch.context() as m:
            m.setattr(self.clock, "now_ms", lambda: work.env.body["created_at"])  # "now" never past the window
            return await real(self, site, row, work, void)

    monkeypatch.setattr(processor.Switch, "_first_time", no_expiry)
    sim = _scripted()
    try:
        sim.sell(1, 130, True)
        sim.time_passes(30.0)
        sim.forward(1)
        with pytest.raises(AssertionError, match="past its window"):
            sim.advised_once_inside_the_window()
    finally:
        sim.teardown()


def test_loss_check_catches_a_store_that_drops_a_sale_on_restart(monkeypatch) -> None:
    sim = _scripted()
    try:
        sim.sell(2, 140, False)
        sale_id = next(iter(sim.acked))
        sim.nodes[2].core.store.conn.execute("DELETE FROM sales WHERE sale_id=?", (sale_id,))
        sim.restart(2)
        with pytest.raises(AssertionError, match="lost on its terminal"):
            sim.own_sales_kept()
    finally:
        sim.teardown()
