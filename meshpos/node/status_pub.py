"""The running node's status publisher: a small signed status, gossiped over the mesh.

Every status period, and soon after a change (a link up or down at once, new ledger entries
within COUNTS_GAP, the printer or uplink state within the check period), the node signs a
``status`` envelope (``meshpos.wire.status.StatusBody``), puts it on its own StatusBoard and
floods it on every link (meshpos.status.board). The periods follow meshpos.domain.pace: fast
while sales flow, slow when idle or on a low battery; the same pace sets the links' keep-alive.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from meshpos import __version__
from meshpos.domain import pace as pace_mod
from meshpos.domain.clockskew import ClockSkew
from meshpos.domain.hostport import parse_hostport
from meshpos.domain.pace import Battery, Pace, Periods
from meshpos.domain.rules import MAX_SKEW_MS
from meshpos.node.core import NodeCore
from meshpos.replication.discovery import local_addresses
from meshpos.replication.sync import Replicator
from meshpos.status.board import StatusBoard
from meshpos.wire import envelope
from meshpos.wire.shortids import rtt_value
from meshpos.wire.status import (ClockSeen, LedgerSize, LinkSeen, PendingCount, PrinterSeen, RefusedCount,
                                 StatusBody, UplinkSeen)

log = logging.getLogger(__name__)

POWER_SUPPLY = Path("/sys/class/power_supply")  # where Linux tells of batteries (NodeTuning may change it)
RTT_EVERY = 60.0  # a link's RTT (in the status) is measured at most this often: a PING per link
MIN_GAP = 1.0  # never two statuses closer than this
# A change of counts only (new entries, pending sales) waits this long: during a busy day every
# node's counts change all the time, and 20 nodes flooding a status a second cost more CPU than
# the sales themselves. Links, printer and uplink changes still go out within MIN_GAP. As long as
# the active status period: while selling, a node's status goes out every 10 s, not every 5 s
# (each one is verified, decoded and relayed by every node of the site).
COUNTS_GAP = pace_mod.ACTIVE_STATUS_S
ACTIVITY_TYPES = frozenset({"sale", "void", "result"})  # entries that make a node "active" (pace)


def battery_state(root: Path = POWER_SUPPLY) -> Battery | None:
    """The first battery's charge in % and whether it charges (its ``status`` says Charging or
    Full, or a mains supply is online), where the OS tells it (Linux power_supply class)."""
    battery: Battery | None = None
    mains = False
    try:
        for supply in sorted(root.iterdir()):
            kind = _read(supply / "type")
            if kind == "Battery" and battery is None:
                cap = _read(supply / "capacity")
                if cap is None:
                    continue
                state = _read(supply / "status") or ""
                battery = Battery(max(0, min(100, int(cap))), state in ("Charging", "Full"))
            elif kind == "Mains" and _read(supply / "online") == "1":
                mains = True
    except (OSError, ValueError):
        return None
    if battery is not None and mains and not battery.charging:
        battery = Battery(battery.percent, True)
    return battery


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def pending_of(core: NodeCore, terminal: str | None) -> PendingCount:
    """Count, amount and oldest ``created_at`` of the card sales (of one terminal, or all) awaiting
    their authorization; cash sales are final when taken, never pending."""
    now = core.clock.now_ms()
    window_start = now - core.policy.offline_window_ms
    count, amount, oldest = core.store.pending_summary(window_start, now + MAX_SKEW_MS, terminal)
    return PendingCount(count=count, amount_minor=amount, oldest_created_at=oldest)


MAX_REFUSED_TERMINALS = 16


def held_of(core: NodeCore) -> dict[str, int]:
    """What this node holds of each terminal's sales (protocols/link.md, "What a node holds")."""
    revoked = core.roster.revoked
    return {t: n for t, n in core.ledger.holdings.vector().items() if t not in revoked}


def refused_of(core: NodeCore) -> RefusedCount:
    """How many sales of the site this node holds as refused by the content rules, per terminal
    (the inspector warns about a terminal whose sales the site refuses)."""
    rows = core.store.refused_by_terminal(MAX_REFUSED_TERMINALS)
    return RefusedCount(count=sum(n for _, n in rows), by_terminal=dict(rows))


class StatusPublisher:
    """Signs and floods this node's status. It is handed what it shows: the board to publish on,
    the replicator whose links it lists (None without a mesh), functions that tell the listening
    port, the printer's and the uplink's state, and the clock-offset estimate it feeds and shows.
    ``interval``: a fixed status period in seconds; None paces it by activity and battery
    (meshpos.domain.pace)."""

    def __init__(self, core: NodeCore, board: StatusBoard, replicator: Replicator | None, *,
                 listen_port: Callable[[], int | None], printer: Callable[[], PrinterSeen],
                 uplink: Callable[[], UplinkSeen], started_at: int, skew: ClockSkew,
                 interval: float | None = None, power_root: Path = POWER_SUPPLY) -> None:
        self.core = core
        self.board = board
        self.replicator = replicator
        self.listen_port = listen_port
        self.printer = printer
        self.uplink = uplink
        self.started_at = started_at
        self.skew = skew
        self.fixed = interval
        self.power_root = power_root
        self.pace = Pace()
        self.battery: Battery | None = battery_state(power_root)
        self.interval = interval if interval is not None else pace_mod.ACTIVE_STATUS_S  # announced
        self.published = 0
        self._poke = trio.Event()
        self._last_key: tuple[Any, ...] | None = None
        self._last_counts: tuple[Any, ...] | None = None
        self._last_pub = -math.inf
        self._pinged: dict[int, float] = {}  # id(session) -> when we last pinged it for its RTT
        if replicator is not None:
            replicator.on_links_changed.append(self.poke)
        core.ledger.on_accept.append(self._on_accept)
        board.on_clock.append(self._clock_sample)

    def battery_percent(self) -> int | None:
        """The battery's charge as last read (with the last status), where the OS tells it."""
        return None if self.battery is None else self.battery.percent

    def poke(self) -> None:
        """Something may be worth a status: look now rather than at the next check."""
        self._poke.set()

    def _on_accept(self, verified: Any) -> None:
        if verified.env.type in ACTIVITY_TYPES:
            now = self.core.clock.monotonic()
            was_active = self.pace.active(now)
            self.pace.touch(now)
            if not was_active:  # wake up to the fast pace at once; no work per sale after that
                self.poke()

    def _clock_sample(self, signer: str, received_at_ms: int, at: int) -> None:
        if signer != self.core.node_id:
            self.skew.peer_sample(signer, received_at_ms, at, self.core.clock.monotonic())

    def periods(self, now: float) -> Periods:
        periods = self.pace.periods(now, self.battery)
        if self.fixed is not None:
            return Periods(self.fixed, periods.keepalive_s, min(periods.check_s, self.fixed))
        return periods

    def links(self) -> tuple[LinkSeen, ...]:
        if self.replicator is None:
            return ()
        out = []
        for s in list(self.replicator.sessions):
            if s.closed or not s.peer_node or s.conn.peer is None:
                continue
            rtt = s.conn.rtt
            out.append(LinkSeen(node=s.peer_node, role=s.conn.peer.role,
                                rtt_ms=None if rtt is None else int(math.ceil(rtt * 1000))))
        return tuple(sorted(out, key=lambda link: link.node))

    def addresses(self) -> tuple[str, ...]:
        """Where peers can reach us: the listen host if it names one, else our IPv4 addresses."""
        host = parse_hostport(self.core.config.listen, "listen")[0] if self.core.config.listen else ""
        if host and host not in ("0.0.0.0", "::", "*"):
            return (host,)
        return tuple(local_addresses()[:8])

    def body(self) -> StatusBody:
        core = self.core
        battery = self.battery
        estimate = self.skew.estimate(core.clock.monotonic())
        return StatusBody(
            at=core.clock.now_ms(), role=core.identity.role, name=core.config.name, version=__version__,
            addresses=self.addresses(), port=self.listen_port(),
            ledger=LedgerSize(entries=core.store.entry_count(), shards=len(core.ledger.shards())),
            pending=pending_of(core, core.node_id), site_pending=pending_of(core, None),
            refused=refused_of(core), uplink=self.uplink(), printer=self.printer(),
            # links and held by short ids (protocols/link.md, "Short ids"): a gateway's 256 links fit
            links_short=self.board.short_ids.table({link.node: rtt_value(link.rtt_ms) for link in self.links()}),
            held_short=self.board.short_ids.table(held_of(core)),
            battery=None if battery is None else battery.percent,
            battery_low=battery is not None and battery.low,
            clock=None if estimate is None else ClockSeen(offset_ms=estimate.offset_ms, source=estimate.source,
                                                          peers=estimate.peers),
            every_ms=int(self.interval * 1000), started_at=self.started_at,
        )

    def publish(self) -> None:
        raw = envelope.seal("status", self.core.node_id, {"status": self.body().to_json()}, self.core.key)
        self.board.publish(raw)
        self.published += 1

    def _change_key(self) -> tuple[Any, ...]:
        """What makes a status worth sending at once (see COUNTS_GAP for the counts)."""
        links = frozenset(link.node for link in self.links())
        return (links, self.printer().state, self.uplink().state)

    def _counts_key(self) -> tuple[Any, ...]:
        return (self.core.store.entry_count(), pending_of(self.core, self.core.node_id).count)

    def statuses_json(self) -> list[dict[str, Any]]:
        return [{"node_id": s.node_id, "status": s.body.to_json(), "received_at": s.received_at_ms}
                for s in self.board.current().values()]

    def _ping_links(self, now: float) -> None:
        """One PING per link at most every RTT_EVERY, sent with a status: the next one carries
        the RTT. (A PING every check, as before, woke every link every second.)"""
        if self.replicator is None:
            return
        live = set()
        for session in list(self.replicator.sessions):
            if session.closed or not session.peer_node:
                continue
            live.add(id(session))
            if now - self._pinged.get(id(session), -math.inf) >= RTT_EVERY:
                if session.ping():
                    self._pinged[id(session)] = now
        self._pinged = {k: v for k, v in self._pinged.items() if k in live}

    def step(self, now: float) -> float:
        """Publish if a status is due at ``now`` (monotonic s); how long until the next look."""
        periods = self.periods(now)
        if self.replicator is not None:
            self.replicator.set_keepalive(periods.keepalive_s)
        since = now - self._last_pub
        # Slowing down: the status that announces the longer period goes out on the old one, so
        # a viewer never sees the last status go stale before the next arrives.
        due = min(periods.status_s, self.interval)
        key = self._change_key()
        counts = self._counts_key() if since >= COUNTS_GAP else self._last_counts
        if ((key != self._last_key and since >= MIN_GAP) or (counts != self._last_counts and since >= COUNTS_GAP)
                or since >= due):
            self.battery = battery_state(self.power_root)
            periods = self.periods(now)
            self.interval = periods.status_s
            try:
                self._ping_links(now)
                self.publish()
                self._last_key, self._last_counts = key, self._counts_key()
            except Exception:  # a status must never take the node down
                log.exception("status not published")
            self._last_pub = now
            return min(periods.check_s, self.interval)
        wait = min(periods.check_s, due - since)
        if key != self._last_key:
            wait = min(wait, MIN_GAP - since)
        return max(0.0, wait)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        clock = self.core.clock
        while True:
            self._poke = trio.Event()
            wait = self.step(clock.monotonic())
            with trio.move_on_after(wait):
                await self._poke.wait()
