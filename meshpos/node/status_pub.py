"""The running node's status publisher: a small signed status, gossiped over the mesh.

Every status period, and soon after a change (a link up or down at once, new ledger entries
within COUNTS_GAP, the printer or uplink state within the check period), the node signs a ``status`` envelope,
puts it on its own StatusBoard and floods it on every link (meshpos.status.board). The periods
follow meshpos.domain.pace: fast while sales flow, slow when idle or on a low battery; the same
pace sets the links' keep-alive. It also registers the control operations ``statuses`` (the
board) and ``report`` (end-of-day reconciliation data).
"""

from __future__ import annotations

from meshpos.domain.rules import MAX_SKEW_MS

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshpos import __version__
from meshpos.domain import pace as pace_mod
from meshpos.domain.pace import Battery, Pace, Periods
from meshpos.replication.discovery import local_addresses
from meshpos.domain.clockskew import Estimate
from meshpos.status.board import StatusBoard
from meshpos.wire import envelope
from meshpos.node.core import NodeCore

if TYPE_CHECKING:
    from meshpos.node.runner import Mesh
    from meshpos.node.service import NodeService

log = logging.getLogger(__name__)

# A fixed period between two statuses of a node, instead of the paced one (meshpos.domain.pace);
# the lab sets it low to see a cut host quickly.
_FIXED = os.environ.get("MESHPOS_STATUS_INTERVAL")
STATUS_INTERVAL: float | None = float(_FIXED) if _FIXED else None
# Where the OS tells of batteries; TEST ONLY override, so a test can give a node a low battery.
POWER_SUPPLY = Path(os.environ.get("MESHPOS_POWER_SUPPLY_DIR") or "/sys/class/power_supply")
RTT_EVERY = 60.0  # a link's RTT (in the status) is measured at most this often: a PING per link
MIN_GAP = 1.0  # never two statuses closer than this
# A change of counts only (new entries, pending sales) waits this long: during a busy day every
# node's counts change all the time, and 20 nodes flooding a status a second cost more CPU than
# the sales themselves. Links, printer and uplink changes still go out within MIN_GAP.
COUNTS_GAP = 5.0
ACTIVITY_TYPES = frozenset({"sale", "void", "result"})  # entries that make a node "active" (pace)
MAX_LINKS = 48  # keeps the envelope well under 8 KiB


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


def pending_of(core: NodeCore, terminal: str | None) -> dict[str, Any]:
    """Count and amount of the pending sales (of one terminal, or all), and the ``created_at`` of the
    oldest pending card sale: the offline window bounds card authorization only (cash never expires)."""
    now = core.clock.now_ms()
    window_start = now - core.policy.offline_window_ms
    count, amount, oldest = core.store.pending_summary(window_start, now + MAX_SKEW_MS, terminal)
    return {"count": int(count), "amount_minor": int(amount), "oldest_created_at": oldest}


MAX_REFUSED_TERMINALS = 16


def refused_of(core: NodeCore) -> dict[str, Any]:
    """How many sales of the site this node holds as refused by the content rules, per terminal
    (the inspector warns about a terminal whose sales the site refuses)."""
    rows = core.store.refused_by_terminal(MAX_REFUSED_TERMINALS)
    return {"count": sum(n for _, n in rows), "by_terminal": dict(rows)}


def printer_state(service: "NodeService") -> dict[str, Any]:
    if service.printer is not None:
        st = service.printer.status()
        return {"state": st.state, "queued": st.queued}
    if service.printer_problem:
        return {"state": "misconfigured", "queued": len(service.spool)}
    return {"state": "none", "queued": len(service.spool)}


def uplink_state(service: "NodeService") -> dict[str, Any]:
    for extra in service.extra_status:
        part = extra()
        if "uplink" in part:
            up = part["uplink"]
            return {"state": up.get("state"), "last_forward_at": up.get("last_forward_ms")}
    return {"state": "off" if not service.core.config.uplink else "unknown", "last_forward_at": None}


class StatusPublisher:
    """``interval``: a fixed status period in seconds; None (the default, unless the environment
    sets MESHPOS_STATUS_INTERVAL) paces it by activity and battery (meshpos.domain.pace)."""

    def __init__(self, service: "NodeService", mesh: "Mesh | None", interval: float | None = STATUS_INTERVAL,
                 power_root: Path = POWER_SUPPLY) -> None:
        self.service = service
        self.core = service.core
        self.mesh = mesh
        self.fixed = interval
        self.power_root = power_root
        self.pace = Pace()
        self.battery: Battery | None = battery_state(power_root)
        self.interval = interval if interval is not None else pace_mod.ACTIVE_STATUS_S  # announced
        self.board = StatusBoard(self.core.roster, self.core.clock)
        self.published = 0
        self._poke = trio.Event()
        self._last_key: tuple[Any, ...] | None = None
        self._last_counts: tuple[Any, ...] | None = None
        self._last_pub = -math.inf
        self._pinged: dict[int, float] = {}  # id(session) -> when we last pinged it for its RTT
        if mesh is not None:
            self.board.attach(mesh.replicator)
            mesh.replicator.on_links_changed.append(self.poke)
        self.core.ledger.on_accept.append(self.board.on_accept)
        self.core.ledger.on_accept.append(self._on_accept)
        self.skew = service.clock_skew
        self.board.on_clock.append(self._clock_sample)
        service.extra_ops["statuses"] = lambda core, params: self.statuses_json()
        service.extra_ops["report"] = lambda core, params: _report_data(core)

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

    def links(self) -> list[dict[str, Any]]:
        if self.mesh is None:
            return []
        out = []
        for s in list(self.mesh.replicator.sessions):
            if s.closed or not s.peer_node or s.conn.peer is None:
                continue
            rtt = s.conn.rtt
            out.append({"node": s.peer_node, "role": s.conn.peer.role,
                        "rtt_ms": None if rtt is None else int(math.ceil(rtt * 1000))})
        return sorted(out, key=lambda link: str(link["node"]))[:MAX_LINKS]

    def addresses(self) -> list[str]:
        """Where peers can reach us: the listen host if it names one, else our IPv4 addresses."""
        host = (self.core.config.listen or "").rpartition(":")[0].strip("[]")
        if host and host not in ("0.0.0.0", "::", "*"):
            return [host]
        return local_addresses()[:8]

    def body(self) -> dict[str, Any]:
        core = self.core
        cfg = core.config
        battery = self.battery
        return {
            "role": core.identity.role, "name": cfg.name, "version": __version__,
            "addresses": self.addresses(), "port": self.mesh.listen_port if self.mesh else None,
            "links": self.links(),
            "ledger": {"entries": core.store.entry_count(), "shards": len(core.ledger.shards())},
            "pending": pending_of(core, core.node_id), "site_pending": pending_of(core, None),
            "refused": refused_of(core),
            "uplink": uplink_state(self.service), "printer": printer_state(self.service),
            "battery": None if battery is None else battery.percent,
            "battery_low": battery is not None and battery.low,
            "every_ms": int(self.interval * 1000),
            "clock": _estimate_json(self.skew.estimate(core.clock.monotonic())),
            "started_at": self.service.started_at, "at": core.clock.now_ms(),
        }

    def publish(self) -> None:
        raw = envelope.seal("status", self.core.node_id, {"status": self.body()}, self.core.key)
        self.board.publish(raw)
        self.published += 1

    def _change_key(self) -> tuple[Any, ...]:
        """What makes a status worth sending at once (see COUNTS_GAP for the counts)."""
        links = frozenset(link["node"] for link in self.links())
        return (links, printer_state(self.service)["state"], uplink_state(self.service)["state"])

    def _counts_key(self) -> tuple[Any, ...]:
        return (self.core.store.entry_count(), pending_of(self.core, self.core.node_id)["count"])

    def statuses_json(self) -> list[dict[str, Any]]:
        return [{"node_id": s.node_id, "status": s.body, "received_at": s.received_at_ms}
                for s in self.board.current().values()]

    def _ping_links(self, now: float) -> None:
        """One PING per link at most every RTT_EVERY, sent with a status: the next one carries
        the RTT. (A PING every check, as before, woke every link every second.)"""
        if self.mesh is None:
            return
        live = set()
        for session in list(self.mesh.replicator.sessions):
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
        if self.mesh is not None:
            self.mesh.replicator.set_keepalive(periods.keepalive_s)
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


def _estimate_json(estimate: Estimate | None) -> dict[str, object] | None:
    return None if estimate is None else estimate.to_json()


def _report_data(core: NodeCore) -> Any:
    from meshpos.node.report import collect
    return collect(core)


async def status_component(service: "NodeService", *, task_status: trio.TaskStatus[None]) -> None:
    """The run_node component: needs the mesh component started before it."""
    publisher = StatusPublisher(service, getattr(service, "mesh", None))
    service.statusboard = publisher.board  # type: ignore[attr-defined]
    await publisher.run(task_status=task_status)
