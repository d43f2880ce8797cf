"""A deterministic simulation of a whole site: many terminals selling at a fair's rate.

The real parts, a simulated world: every terminal is a real ``NodeCore`` (SQLite store, CRDT
ledger, signature checks) with a real ``Replicator``; links are real ``SyncSession`` pairs
(the link protocol's frames, byte for byte); the links a node keeps are the real planner's
(``ring_targets``); forwarding runs the real ``Forwarder`` (leases in the ledger) against the
real switch processor (its SQLite de-duplication table) in process, with an acquirer that counts
0220 advices per sale. What is simulated: the network (per-hop latency, loss, resets,
partitions), the clock (one ``SimClock`` moved by the event loop) and the terminals' lives
(sales as Poisson arrivals, restarts). Everything random comes from seeded ``random.Random``
streams: the same ``SiteSimConfig`` on the same template gives the same run, in any process
and under any hash seed. (The template's keys are not seeded: they decide the node ids, and so
which links the planner keeps; a new template is a different site.)

The network, per link direction: bytes written by a session arrive after a latency drawn from
``latency``, in order (a TCP stream). Loss is what TCP makes of it: a write whose segment is
lost arrives one retransmission timeout later (``rto``, doubling while lost again), never
missing. A connection reset (``resets_per_link_hour``) loses what was in flight and closes both
ends; the nodes dial again after the planner's back-off. A partition cuts every link between a
random share of the terminals and the rest for ``partition_s`` (dials across fail until it
heals); a restart closes a node's store and links and opens it again ``restart_down_s`` later.

The run: ``warmup_s`` for the mesh to form, ``duration_s`` of selling with faults, then the
heal (no more faults, every node up, every planned link dialled) and a settle phase until every
node holds every acknowledged sale and (with ``uplinks``) every card sale is settled. ``run``
returns a :class:`SiteSimReport` and raises :class:`GuaranteeBroken` if a guarantee fails: an
acknowledged sale missing on a node after the heal, ledgers that differ, a card sale advised
with more than one 0220, a sale not settled everywhere.
"""

from __future__ import annotations

import heapq
import logging
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import trio

from meshpos.domain.errors import MeshposError, UplinkError
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.node.memnode import SimNode, enroll
from meshpos.replication.planner import DIAL_BACKOFF, ring_targets
from meshpos.replication.sync import SyncSession
from meshpos.site.roster import Verified
from meshpos.site.sitedir import init_site
from meshpos.switch.processor import Switch
from meshpos.switch.store import SwitchStore
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch
from meshpos.uplink.client import NotSent
from meshpos.uplink.forwarder import Forwarder
from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.wire.forwarding import ForwardReply
from meshpos.wire.link_frames import FrameType

log = logging.getLogger(__name__)

CARDS = ("4111111111111111", "5555555555554444", "4000056655665556")
FRAME_HEADER = 5  # 4-byte length + 1-byte type (protocols/link.md)


class GuaranteeBroken(MeshposError):
    """The simulation ended with a guarantee of the mesh broken (the message says which)."""


@dataclass(frozen=True)
class SiteSimConfig:
    terminals: int = 200
    seed: int = 1
    warmup_s: float = 30.0
    duration_s: float = 300.0
    sale_interval_s: float = 60.0  # mean time between two sales of one terminal (a busy stand)
    card_share: float = 0.8
    latency_s: tuple[float, float] = (0.002, 0.040)
    loss: float = 0.05  # share of writes whose first segment is lost (arrive one RTO late)
    rto_s: float = 0.2
    resets_per_link_hour: float = 2.0
    partitions: int = 2
    partition_share: float = 0.2
    partition_s: float = 60.0
    restarts: int = 4
    restart_down_s: float = 20.0
    uplinks: int = 2  # terminals with an uplink (the first ones); 0: no settlement
    forward_interval_s: float = 15.0
    settle_limit_s: float = 900.0
    check_interval_s: float = 1.0


@dataclass
class SiteSimReport:
    config: dict[str, Any]
    sales: int = 0
    card_sales: int = 0
    refused_at_till: int = 0
    links: int = 0
    convergence_s: float = 0.0  # heal -> every node holds every acknowledged sale
    settled_s: float | None = None  # heal -> every card sale settled on every node
    propagation_p50_s: float = 0.0  # sale -> on every node, sales made while no fault touched them
    propagation_p99_s: float = 0.0
    propagation_all_p99_s: float = 0.0  # every sale, faults included
    frames_per_sale_per_node: float = 0.0
    push_copies_per_sale_per_node: float = 0.0  # changes carried in PUSH frames (results, leases too)
    bytes_per_sale_per_node: float = 0.0
    cpu_ms_per_sale_per_node: float = 0.0  # replication CPU: sessions' receive/send/tick
    cpu_total_ms_per_sale_per_node: float = 0.0  # everything of the run (sales, forwarding, switch)
    rss_mb_per_node: float = 0.0
    db_mb_per_node: float = 0.0
    resets: int = 0
    restarts: int = 0
    partitions: int = 0
    advices_0220: int = 0
    repeats_0221: int = 0
    forward_batches: int = 0
    wall_s: float = 0.0
    sim_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SimClock:
    """Every node's clock: the simulation's time (``now`` seconds after the start)."""

    def __init__(self, start_ms: int) -> None:
        self.start_ms = start_ms
        self.now = 0.0

    def now_ms(self) -> int:
        return self.start_ms + int(self.now * 1000)

    def monotonic(self) -> float:
        return 1000.0 + self.now


class CountingAcquirer:
    """Approves every advice; counts 0220 and 0221 per sale."""

    def __init__(self) -> None:
        self.count: dict[str, Counter[str]] = {}

    async def advise(self, req: AcquirerRequest, *, repeat: bool, before_send: Any = None) -> AcquirerResult:
        if before_send is not None:
            await before_send()
        self.count.setdefault(req.sale_id, Counter())["0221" if repeat else "0220"] += 1
        return AcquirerResult(approved=True, response_code="00", auth_code="SIM001")

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        return AcquirerResult(approved=True, response_code="00", auth_code=None)

    async def aclose(self) -> None:
        pass


async def _no_sleep(seconds: float) -> None:
    await trio.lowlevel.checkpoint()


class InProcessSwitch:
    """A node's uplink: straight into the real switch processor (no HTTP), up or down."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.up = True
        self.batches = 0

    async def forward(self, entries: list[bytes]) -> ForwardReply:
        if not self.up:
            raise NotSent("no route to the switch (simulated)")
        self.batches += 1
        site = next(iter(self.switch.sites.values()))
        return await self.switch.forward(site, entries)


EPOCH_FILE = "sim-epoch-ms"  # in a template: when its runs' simulated clocks start (ms)


def build_template(root: Path, terminals: int) -> Path:
    """A switch, a site and ``terminals`` enrolled node directories under ``root``."""
    sd = init_switch(root / "switch", "127.0.0.1:9", "127.0.0.1:9")
    site = init_site(root / "site", "Sim Fair", switch_key=sd.pub_path.read_text().strip(),
                     switch_url="https://127.0.0.1:9")
    for i in range(terminals):
        enroll(site, root / f"n{i:03d}", f"t{i:03d}")
    add_site(root / "switch", root / "site")
    # when its simulated clocks start: after every certificate and policy in it, and the same
    # for every run on it (a run that started at the wall clock moved the statuses' and sync
    # timers' phases, and its bytes by up to 12 %, from one run to the next)
    (root / EPOCH_FILE).write_text(str(SYSTEM_CLOCK.now_ms() + 1_000))
    return root


def template_epoch_ms(root: Path) -> int:
    """When the simulated clocks of a run on the template at ``root`` start (``build_template``);
    the wall clock for a template made before that file was."""
    try:
        return int((root / EPOCH_FILE).read_text())
    except (OSError, ValueError):
        return SYSTEM_CLOCK.now_ms()


@dataclass
class _Link:
    a: int
    b: int
    sa: SyncSession
    sb: SyncSession
    tail_ab: float = 0.0  # when the last write a->b arrives (in-order delivery)
    tail_ba: float = 0.0
    cut: bool = False


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    action: Callable[[], None] = field(compare=False)


class SiteSim:
    """One run. ``SiteSim(config, workdir).run()``; the workdir is removed by ``close``."""

    def __init__(self, config: SiteSimConfig, workdir: Path | None = None, template: Path | None = None) -> None:
        self.cfg = config
        # Separate streams: the world (sales, faults) stays the same whatever the bytes do. Each
        # ledger's Automerge actor ids (which move change hashes and so the bloom filters of sync
        # messages, and so the bytes) come from a stream of their own per terminal, seeded too, so
        # a seed gives the same bytes; the network stream (latency, loss) follows the bytes.
        self.rnd = random.Random(config.seed)
        self.net_rnd = random.Random(config.seed + 0x5EED)
        self.till_rnd = [random.Random(config.seed * 100_003 + i) for i in range(config.terminals)]
        self.actor_rnd = [random.Random(config.seed * 200_003 + i) for i in range(config.terminals)]
        self.seal_rnd = [random.Random(config.seed * 300_007 + i) for i in range(config.terminals)]
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="meshpos-sitesim-"))
        if template is None:
            build_template(self.dir, config.terminals)
        else:
            shutil.copytree(template, self.dir, dirs_exist_ok=True)
        self.clock = SimClock(template_epoch_ms(self.dir))
        self.n = config.terminals
        self.paths = [self.dir / f"n{i:03d}" for i in range(self.n)]
        self.nodes: list[SimNode | None] = [None] * self.n
        self.ids: list[str] = []
        self._events: list[_Event] = []
        self._seq = 0
        self.links: dict[tuple[int, int], _Link] = {}
        self.session_of: dict[int, tuple[_Link, bool]] = {}  # id(session) -> (link, is side a)
        self._tick_at: dict[int, float] = {}
        self._flush_pending: set[int] = set()
        self.blocked: Counter[frozenset[int]] = Counter()  # pairs partitions separate (partitions may overlap)
        self.down: set[int] = set()
        self._up: dict[int, Callable[[], None]] = {}  # how each node now down comes back
        self.fault_spans: list[tuple[float, float]] = []  # (start, end) of each partition and restart
        self.healed = False
        self.acked: dict[str, tuple[int, float]] = {}  # sale id -> (terminal, time)
        self.cards: set[str] = set()
        self.reached: dict[str, int] = {}  # sale id -> nodes holding it
        self.everywhere_at: dict[str, float] = {}
        self.frames = 0
        self.pushed = 0
        self.bytes = 0
        self.repl_cpu = 0.0
        self.report = SiteSimReport(config=asdict(config))
        # the switch side
        self.sd = SwitchDir(self.dir / "switch")
        self.switch_store: SwitchStore = self.sd.open_store()
        self.acquirer = CountingAcquirer()
        self.switch = Switch(self.switch_store, self.sd.key(), self.acquirer, self.clock, advice_attempts=2,
                             reversal_attempts=2, backoff=lambda attempt: 0.0, sleep=_no_sleep)
        self.transports = [InProcessSwitch(self.switch) for _ in range(min(config.uplinks, self.n))]
        self.forwarders: list[Forwarder | None] = [None] * len(self.transports)

    # -- the event loop ----------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, _Event(max(when, self.clock.now), self._seq, action))

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        while self._events and self._events[0].at <= until:
            ev = heapq.heappop(self._events)
            self.clock.now = ev.at
            ev.action()
            if stop is not None and stop():
                return True
        self.clock.now = max(self.clock.now, until)
        return stop is not None and stop()

    # -- nodes ----------------------------------------------------------------------------

    def _open(self, i: int) -> None:
        node = SimNode.open(self.paths[i], self.clock, entropy=self.actor_rnd[i].randbytes)
        self.nodes[i] = node
        node.core.ledger.on_accept.append(partial(self._accepted, i))
        if i < len(self.forwarders):
            self.forwarders[i] = Forwarder(node.core, self.clock, self.transports[i],
                                           sale_backoff=lambda n: 5.0)

    def _accepted(self, i: int, verified: Verified) -> None:
        if verified.env.type != "sale":
            return
        sale_id = verified.env.body["sale_id"]
        n = self.reached.get(sale_id, 0) + 1
        self.reached[sale_id] = n
        if n == self.n and sale_id not in self.everywhere_at:
            self.everywhere_at[sale_id] = self.clock.now

    def node(self, i: int) -> SimNode:
        node = self.nodes[i]
        assert node is not None, f"node {i} is down"
        return node

    def planned_pairs(self) -> set[tuple[int, int]]:
        index = {nid: i for i, nid in enumerate(self.ids)}
        members = set(self.ids)
        pairs: set[tuple[int, int]] = set()
        for i, nid in enumerate(self.ids):
            for peer in ring_targets(nid, members):
                j = index[peer]
                pairs.add((min(i, j), max(i, j)))
        return pairs

    # -- links ----------------------------------------------------------------------------

    def dial(self, a: int, b: int, attempt: int = 1) -> None:
        key = (min(a, b), max(a, b))
        if key in self.links:
            return
        if a in self.down or b in self.down:
            return  # the node dials again when it comes back
        if self.blocked[frozenset(key)] > 0:
            self.at(self.clock.now + DIAL_BACKOFF(attempt) * self.net_rnd.uniform(0.5, 1.0),
                    lambda: self.dial(a, b, attempt + 1))
            return
        na, nb = self.node(key[0]), self.node(key[1])
        sa = na.replicator.open_session(label=nb.core.node_id, expect_node=nb.core.node_id)
        sb = nb.replicator.open_session(label=na.core.node_id, expect_node=na.core.node_id)
        link = _Link(key[0], key[1], sa, sb, self.clock.now, self.clock.now)
        self.links[key] = link
        for s, is_a in ((sa, True), (sb, False)):
            self.session_of[id(s)] = (link, is_a)
            s.wakeup = lambda s=s: self._want_flush(s)
            self._flush(s)

    def _want_flush(self, s: SyncSession) -> None:
        if id(s) not in self._flush_pending:
            self._flush_pending.add(id(s))
            self.at(self.clock.now, lambda: self._flush(s))

    def _flush(self, s: SyncSession) -> None:
        self._flush_pending.discard(id(s))
        entry = self.session_of.get(id(s))
        if entry is None:
            return
        link, is_a = entry
        if link.cut:
            return
        t0 = time.process_time()
        chunks = []
        while True:
            data = s.data_to_send()
            if not data:
                break
            chunks.append(data)
        self.repl_cpu += time.process_time() - t0
        dst = link.sb if is_a else link.sa
        for data in chunks:
            self._count(data)
            delay = self.net_rnd.uniform(*self.cfg.latency_s)
            rto = self.cfg.rto_s
            while not self.healed and self.net_rnd.random() < self.cfg.loss:
                delay += rto
                rto *= 2
            tail = link.tail_ab if is_a else link.tail_ba
            arrive = max(self.clock.now + delay, tail)
            if is_a:
                link.tail_ab = arrive
            else:
                link.tail_ba = arrive
            self.at(arrive, partial(self._deliver, link, dst, data))
        self._arm(s)
        if s.closed and not link.cut:
            self._cut(link)

    def _count(self, data: bytes) -> None:
        self.bytes += len(data)
        pos = 0
        while pos + FRAME_HEADER <= len(data):
            end = pos + FRAME_HEADER + int.from_bytes(data[pos:pos + 4], "big")
            if data[pos + 4] == FrameType.PUSH:
                self.pushed += _push_changes(data[pos + FRAME_HEADER:end])
            pos = end
            self.frames += 1

    def _deliver(self, link: _Link, dst: SyncSession, data: bytes) -> None:
        if link.cut:
            return
        t0 = time.process_time()
        dst.receive_data(data)
        self.repl_cpu += time.process_time() - t0
        self._flush(dst)

    def _arm(self, s: SyncSession) -> None:
        if s.closed:
            return
        deadline = s.next_deadline() - 1000.0  # SimClock.monotonic is 1000 + now
        if deadline == float("inf"):
            return
        deadline = max(deadline, self.clock.now + 0.001)
        current = self._tick_at.get(id(s))
        if current is None or deadline < current:
            self._tick_at[id(s)] = deadline
            self.at(deadline, lambda: self._tick(s))

    def _tick(self, s: SyncSession) -> None:
        key = id(s)
        if key not in self.session_of:
            return
        if self._tick_at.get(key, 0.0) > self.clock.now:
            return  # a later deadline replaced this one... or an earlier one fired already
        self._tick_at.pop(key, None)
        t0 = time.process_time()
        s.tick()
        self.repl_cpu += time.process_time() - t0
        self._flush(s)

    def _cut(self, link: _Link, redial: bool = True) -> None:
        if link.cut:
            return
        link.cut = True
        self.links.pop((link.a, link.b), None)
        for s in (link.sa, link.sb):
            self.session_of.pop(id(s), None)
            self._tick_at.pop(id(s), None)
            s.wakeup = None
            if not s.closed:
                s.receive_data(b"")
                s.data_to_send()
        if redial:
            a, b = link.a, link.b
            self.at(self.clock.now + DIAL_BACKOFF(1) * self.net_rnd.uniform(0.5, 1.0), lambda: self.dial(a, b))

    # -- the world ------------------------------------------------------------------------

    def _sell(self, i: int) -> None:
        if self.clock.now >= self.cfg.warmup_s + self.cfg.duration_s:
            return
        rnd = self.till_rnd[i]
        self.at(self.clock.now + rnd.expovariate(1.0 / self.cfg.sale_interval_s), lambda: self._sell(i))
        amount = rnd.randint(100, 4000)
        card = rnd.random() < self.cfg.card_share
        if i in self.down:
            return
        core = self.node(i).core
        try:
            # sealed as a till seals it, the box's one-time key from the terminal's seeded stream: a
            # random one changed every card sale's bytes, so the change hashes, the sync messages'
            # filters and the course of the run, and a seed must give the same run
            capture = core.seal_card(CARDS[amount % len(CARDS)], "1230", "contactless",
                                     ephemeral=self.seal_rnd[i].randbytes(32)) if card else None
            sale = core.sell(amount, capture)
        except MeshposError as exc:  # a cap reached: the till refuses, nothing acknowledged
            log.info("terminal %d refused a sale: %s", i, exc)
            self.report.refused_at_till += 1
            return
        self.acked[sale["id"]] = (i, self.clock.now)
        if card:
            self.cards.add(sale["id"])

    def _reset(self, key: tuple[int, int]) -> None:
        link = self.links.get(key)
        if link is not None and not self.healed:
            self.report.resets += 1
            self._cut(link)

    def _partition(self) -> None:
        group = set(self.rnd.sample(range(self.n), max(1, int(self.n * self.cfg.partition_share))))
        pairs = {frozenset((a, b)) for a in group for b in range(self.n) if b not in group}
        self.blocked.update(pairs)
        self.report.partitions += 1
        self.fault_spans.append((self.clock.now, self.clock.now + self.cfg.partition_s))
        for key, link in list(self.links.items()):
            if frozenset(key) in pairs:
                self._cut(link)

        def heal() -> None:
            self.blocked.subtract(pairs)

        self.at(self.clock.now + self.cfg.partition_s, heal)

    def _restart(self, i: int) -> None:
        if i in self.down:
            return
        self.report.restarts += 1
        self.fault_spans.append((self.clock.now, self.clock.now + self.cfg.restart_down_s))
        for key, link in list(self.links.items()):
            if i in key:
                self._cut(link, redial=False)
        self.node(i).close()
        self.nodes[i] = None
        self.down.add(i)

        def up() -> None:
            if i not in self.down:
                return  # brought up already by the heal
            self.down.discard(i)
            self._open(i)
            for a, b in self.planned_pairs():
                if i in (a, b):
                    self.dial(a, b)

        self._up[i] = up
        self.at(self.clock.now + self.cfg.restart_down_s, up)

    def _forward(self, k: int) -> None:
        self.at(self.clock.now + self.cfg.forward_interval_s, lambda: self._forward(k))
        fwd = self.forwarders[k]
        if fwd is None or k in self.down:
            return

        async def drain() -> None:
            for _ in range(50):  # one round: as many batches as the queue needs
                try:
                    report = await fwd.step()
                except UplinkError as exc:
                    log.info("forwarder %d: %s", k, exc)
                    return
                if not report.forwarded:
                    return

        trio.run(drain)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> SiteSimReport:
        cfg = self.cfg
        wall0, cpu0 = time.perf_counter(), time.process_time()
        rss0 = _rss_mb()
        for i in range(self.n):
            self._open(i)
        self.ids = [self.node(i).core.node_id for i in range(self.n)]
        pairs = sorted(self.planned_pairs())
        self.report.links = len(pairs)
        for a, b in pairs:
            self.at(self.rnd.uniform(0.0, 2.0), partial(self.dial, a, b))
        selling_end = cfg.warmup_s + cfg.duration_s
        for i in range(self.n):
            self.at(cfg.warmup_s + self.till_rnd[i].expovariate(1.0 / cfg.sale_interval_s), partial(self._sell, i))
        per_s = cfg.resets_per_link_hour * len(pairs) / 3600.0
        t = cfg.warmup_s
        while per_s > 0 and (t := t + self.rnd.expovariate(per_s)) < selling_end:
            self.at(t, partial(self._reset, self.rnd.choice(pairs)))
        for k in range(cfg.partitions):  # the last one still holds at the heal: its side catches up then
            start = (selling_end - cfg.partition_s / 2 if k == cfg.partitions - 1
                     else self.rnd.uniform(cfg.warmup_s, selling_end - cfg.partition_s))
            self.at(start, self._partition)
        for _ in range(cfg.restarts):
            i = self.rnd.randrange(self.n)
            self.at(self.rnd.uniform(cfg.warmup_s, selling_end - cfg.restart_down_s), partial(self._restart, i))
        for k in range(len(self.forwarders)):
            self.at(cfg.warmup_s + cfg.forward_interval_s * (k + 1) / len(self.forwarders), partial(self._forward, k))
        self.run_until(selling_end)
        # the heal: every partition ends, every node comes up, every planned link is dialled
        heal_at = self.clock.now
        self.healed = True
        self.blocked.clear()
        for i in sorted(self.down):
            self._up.pop(i)()
        for a, b in pairs:
            self.dial(a, b)
        for link in list(self.links.values()):
            for s in (link.sa, link.sb):
                if not s.closed:
                    s.request_summary()
                    self._flush(s)
        acked = set(self.acked)

        def everywhere() -> bool:
            return len(self.everywhere_at) >= len(acked) and all(a in self.everywhere_at for a in acked)

        deadline = heal_at + cfg.settle_limit_s
        while not everywhere() and self.clock.now < deadline:
            self.run_until(self.clock.now + cfg.check_interval_s, everywhere)
        self.report.convergence_s = self.clock.now - heal_at if everywhere() else float("inf")
        if self.forwarders:
            while self.clock.now < deadline and not self._all_settled():
                self.run_until(self.clock.now + cfg.check_interval_s * 5)
            self.report.settled_s = self.clock.now - heal_at if self._all_settled() else None
        self.run_until(self.clock.now + 5.0)  # results in flight reach everyone
        # and every ledger holds what every other holds (the results' last copies, leases, voids
        # travel on after the last sale settled: with loss, a repair can take more than those 5 s);
        # a site that never converges is caught by ``check`` once the time allowed has passed
        while self.clock.now < deadline and not self._ledgers_agree():
            self.run_until(self.clock.now + cfg.check_interval_s)
        self.report.sim_s = self.clock.now
        self.report.wall_s = time.perf_counter() - wall0
        total_cpu = time.process_time() - cpu0
        self._measure(rss0, total_cpu)
        self.check()
        return self.report

    def _all_settled(self) -> bool:
        """No card sale pending on any node."""
        return all(s["status"] != "pending" for i in range(self.n) for s in self.node(i).core.sales())

    def _ledgers_agree(self) -> bool:
        """Every node's shards have the same heads as node 0's (what a link compares on set-up)."""
        reference = self.node(0).core.ledger.summary()
        return all(self.node(i).core.ledger.summary() == reference for i in range(1, self.n))

    def _measure(self, rss0: float, total_cpu: float) -> None:
        r = self.report
        r.sales = len(self.acked)
        r.card_sales = len(self.cards)
        denom = max(1, r.sales) * self.n
        r.frames_per_sale_per_node = self.frames / denom
        r.push_copies_per_sale_per_node = self.pushed / denom
        r.bytes_per_sale_per_node = self.bytes / denom
        r.cpu_ms_per_sale_per_node = self.repl_cpu * 1000 / denom
        r.cpu_total_ms_per_sale_per_node = total_cpu * 1000 / denom
        r.rss_mb_per_node = (_rss_mb() - rss0) / self.n
        r.db_mb_per_node = sum(f.stat().st_size for p in self.paths for f in p.glob("*.db*")) / self.n / 2**20
        lat_all = [self.everywhere_at[s] - t for s, (_, t) in self.acked.items() if s in self.everywhere_at]
        calm = [self.everywhere_at[s] - t for s, (_, t) in self.acked.items()
                if s in self.everywhere_at and not self._faulted(t, self.everywhere_at[s])]
        if lat_all:
            r.propagation_all_p99_s = _pct(lat_all, 0.99)
        if calm:
            r.propagation_p50_s = statistics.median(calm)
            r.propagation_p99_s = _pct(calm, 0.99)
        for counts in self.acquirer.count.values():
            r.advices_0220 += counts["0220"]
            r.repeats_0221 += counts["0221"]
        r.forward_batches = sum(t.batches for t in self.transports)

    def _faulted(self, start: float, end: float) -> bool:
        return any(a < end and start < b for a, b in self.fault_spans)

    def check(self) -> None:
        """The guarantees, once the network healed (raises GuaranteeBroken)."""
        acked = set(self.acked)
        first = self.node(0)
        reference = first.entries()
        for i in range(self.n):
            node = self.node(i)
            missing = acked - node.sale_ids()
            if missing:
                raise GuaranteeBroken(f"node {i} lacks {len(missing)} acknowledged sales, e.g. {sorted(missing)[:3]}")
            if i and node.entries() != reference:
                raise GuaranteeBroken(f"node {i}'s ledger differs from node 0's once the network healed")
        for sale_id, counts in self.acquirer.count.items():
            if counts["0220"] > 1:
                raise GuaranteeBroken(f"sale {sale_id} was advised with {counts['0220']} 0220s")
        if self.forwarders:
            for i in range(self.n):
                statuses = Counter(s["status"] for s in self.node(i).core.sales())
                if statuses.get("pending"):
                    raise GuaranteeBroken(f"node {i} still shows {statuses['pending']} pending sales")
            for sale_id in self.cards:
                if self.acquirer.count.get(sale_id, Counter())["0220"] != 1:
                    raise GuaranteeBroken(f"card sale {sale_id} settled without exactly one 0220")

    def close(self) -> None:
        for node in self.nodes:
            if node is not None:
                node.close()
        self.switch_store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _push_changes(payload: bytes) -> int:
    """How many changes one PUSH payload carries (protocols/link.md: shard, digest, then
    ``u32be m, change`` repeated)."""
    at, n = 1 + payload[0] + 8, 0
    while at + 4 <= len(payload):
        at += 4 + int.from_bytes(payload[at:at + 4], "big")
        n += 1
    return n

