"""Assemble a running node: service + mesh (links, dialler, discovery) + forwarder.

The mesh part follows meshpos/replication/planner.py's rules: static peers are always
dialled; peers found by mDNS, or named by their own signed statuses (peer exchange,
meshpos/replication/peerx.py), are dialled when the ring planner picks them; one
link per pair (simultaneous dials are resolved by ``keep_link``); a link we dialled that
neither end needs any more is drained, then closed (``PeerPlanner.to_prune``, ``SyncSession.drain``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from meshpos.domain.roles import READ_ONLY_ROLES, SELLING_ROLES
from meshpos.node.parts import endpoint_for, replicator_for
from meshpos import PROTOCOL_VERSION
from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.replication.discovery import DiscoveryHandle, PeerGone, PeerSeen, run_discovery
from meshpos.domain.errors import ConfigError, MeshposError
from meshpos.domain.hostport import parse_hostport
from meshpos.replication.link_driver import connect_link, serve_links
from meshpos.replication.peerx import DialBudget, PeerHints, address_for, hint_from_status, judge_answer, on_loopback
from meshpos.replication.planner import DIAL_BACKOFF, PeerInfo, PeerPlanner, keep_link
from meshpos.infra.netguard import install_log_limits
from meshpos.replication.sync import SyncSession
from meshpos.status.board import NodeStatus
from meshpos.status.meshview import stale_after_ms
from meshpos.uplink.instances import instance_address
from meshpos.wire.forwarding import health_time_ms
from meshpos.uplink.forwarder import Forwarder, HttpsTransport, run_forwarder
from meshpos.uplink.reach import is_reachable
from meshpos.wire.dnssd import LocalService
from meshpos.node.core import NodeCore
from meshpos.node.dashboard import DashboardServer
from meshpos.domain.clockskew import ClockSkew
from meshpos.node.ops import UplinkRequest, UplinkState, set_uplink
from meshpos.node.service import NodeService, run_until_signal
from meshpos.node.status import ApiStatus, LocalStatus, PeersStatus, UplinkStatus
from meshpos.node.status_pub import POWER_SUPPLY, StatusPublisher
from meshpos.status.board import StatusBoard
from meshpos.wire.status import PrinterSeen, UplinkSeen

log = logging.getLogger(__name__)

MESH_TICK = 1.0
# With no dial due, the mesh manager and the static-peer keepers wait for a link to open or close
# (Replicator.on_links_changed) and look again at least this often anyway.
MESH_IDLE_TICK = 30.0
UPLINK_POLL = 2.0  # forwarder: look for work at least this often
UPLINK_IDLE_POLL = 60.0  # the same while the node has no uplink (the probe wakes it when it gets one)
PROBE_EVERY = 5.0  # how often an uplink node checks that the switch answers
UPLINK_OFF_CHECK = 10.0  # how often a node not allowed to forward looks whether it was allowed
MDNS_TTL = 120  # discovery TTL for real nodes (NodeTuning may change it)


@dataclass(frozen=True)
class NodeTuning:
    """What a lab or a test changes about a running node, read from the environment once, by
    ``run_node``, never at import: the mDNS TTL (a host that left is noticed within about it;
    MESHPOS_MDNS_TTL), a fixed status period instead of the paced one (MESHPOS_STATUS_INTERVAL,
    seconds) and, TEST ONLY, where the battery is read (MESHPOS_POWER_SUPPLY_DIR)."""

    mdns_ttl: int = MDNS_TTL
    status_interval: float | None = None  # None: paced by activity and battery (domain/pace.py)
    power_root: Path = POWER_SUPPLY

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "NodeTuning":
        try:
            fixed = env.get("MESHPOS_STATUS_INTERVAL")
            return cls(mdns_ttl=int(env.get("MESHPOS_MDNS_TTL", MDNS_TTL)),
                       status_interval=float(fixed) if fixed else None,
                       power_root=Path(env.get("MESHPOS_POWER_SUPPLY_DIR") or POWER_SUPPLY))
        except ValueError as exc:
            raise ConfigError(f"MESHPOS_MDNS_TTL / MESHPOS_STATUS_INTERVAL must be numbers: {exc}") from exc


class Mesh:
    """The node's links: listener, dialler, discovery, dedupe, health for the status."""

    def __init__(self, core: NodeCore, mdns: bool, mdns_ttl: int = MDNS_TTL, peer_exchange: bool = True) -> None:
        self.core = core
        self.clock: Clock = core.clock
        self.mdns = mdns and self.core.config.mdns
        self.mdns_ttl = mdns_ttl
        self.replicator = replicator_for(self.core)
        self.endpoint = endpoint_for(self.core, self.replicator)
        self.planner = PeerPlanner(self.core.node_id)
        self.outbound: weakref.WeakSet[SyncSession] = weakref.WeakSet()  # the sessions we dialled (not id(): ids are reused)
        self.dialling: set[str] = set()  # node ids or addresses being dialled now
        self.static_ids: dict[str, str] = {}  # static address -> node id learnt on first link
        self.listen_port: int | None = None
        self.discovery: DiscoveryHandle | None = None
        self.discovered: dict[str, PeerSeen] = {}
        self.peer_exchange = peer_exchange
        self.hints = PeerHints(self.core.node_id)  # peer exchange: addresses from signed statuses
        cfg = self.core.config  # loopback hints only where our own configuration is on loopback
        self.loopback_hints = on_loopback(([cfg.listen] if cfg.listen else []) + list(cfg.peers))
        self.hint_budget = DialBudget()
        self.wake = trio.Event()
        self.links_event = trio.Event()  # set (and replaced) whenever a link opens or closes
        self.replicator.on_links_changed.append(self._links_changed)

    def _links_changed(self) -> None:
        self.wake.set()
        self.links_event.set()
        self.links_event = trio.Event()

    # -- status ----------------------------------------------------------------------

    def status(self) -> PeersStatus:
        links = []
        for h in self.replicator.health():
            d = dataclasses.asdict(h)
            d["peer_name"] = self.core.roster.name_of(h.peer_node) if h.peer_node else None
            links.append(d)
        park = self.replicator.park
        return PeersStatus(listen_port=self.listen_port, mdns=self.mdns, discovered=sorted(self.discovered),
                           static=list(self.core.config.peers), links=links, peer_exchange=self.peer_exchange,
                           hinted=self.hints.nodes(), shards_parked=len(park.shards),
                           shard_frames_dropped=park.stats.dropped)

    def linked_peers(self) -> set[str]:
        return {s.peer_node for s in self.replicator.sessions if s.peer_node and not s.closed}

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.core.config
        try:
            async with trio.open_nursery() as nursery:
                if cfg.listen:
                    host, port = parse_hostport(cfg.listen, "listen")
                    listeners = await nursery.start(serve_links, self.endpoint, host, port)
                    self.listen_port = listeners[0].socket.getsockname()[1]
                    log.info("accepting mesh links on %s:%d", host, self.listen_port)
                for address in cfg.peers:
                    nursery.start_soon(self._static_peer, address)
                if self.mdns and self.listen_port is not None:
                    nursery.start_soon(self._run_discovery)
                nursery.start_soon(self._manage, nursery)
                task_status.started()
        finally:
            self.replicator.detach()

    async def _run_discovery(self) -> None:
        cfg = self.core.config
        local = LocalService(site_id=cfg.site_id, node_id=cfg.node_id, role=self.core.identity.role,
                             name=cfg.name, port=self.listen_port or 0, proto=PROTOCOL_VERSION, uplink=cfg.uplink)
        try:
            async with trio.open_nursery() as nursery:
                self.discovery = await nursery.start(
                    lambda task_status: run_discovery(local, self._on_discovery, ttl=self.mdns_ttl,
                                                      task_status=task_status))
        except MeshposError as exc:
            log.warning("mDNS discovery unavailable (%s): static peers only", exc)
        except OSError as exc:
            log.warning("mDNS discovery failed (%s): static peers only", exc)

    def _on_discovery(self, event: PeerSeen | PeerGone) -> None:
        if isinstance(event, PeerSeen):
            if event.node_id not in self.discovered:
                log.info("peer found by mDNS: %s (%s, %s) at %s:%d", event.name, event.node_id, event.role,
                         ",".join(event.addresses), event.port)
            self.discovered[event.node_id] = event
            if event.role not in READ_ONLY_ROLES:  # inspectors dial us; we never dial them
                self.planner.seen(PeerInfo(event.node_id, event.addresses, event.port, event.role, event.uplink,
                                           event.name))
        else:
            if self.discovered.pop(event.node_id, None) is not None:
                log.info("peer left: %s (%s)", self.core.roster.name_of(event.node_id), event.node_id)
            self._refresh(event.node_id)
        self.wake.set()

    def on_status(self, status: NodeStatus) -> None:
        """A newer verified status (StatusBoard hook): its signer's own addresses are a dial hint."""
        node = status.node_id
        if not self.peer_exchange or node == self.core.node_id or node in self.core.roster.revoked:
            return
        try:
            role = self.core.roster.identity(node).role  # who it is: the certificate, never the status
        except MeshposError:
            return
        info = hint_from_status(node, role, status.body, loopback_ok=self.loopback_hints)
        if info is not None and node not in self.hints.hints and node not in self.discovered:
            log.info("peer exchange: %s (%s) listens at %s port %d", self.core.roster.name_of(node), node,
                     ",".join(info.addresses), info.port)
        ttl = stale_after_ms(status.body) / 1000
        if self.hints.offer(info, node, self.clock.monotonic(), ttl, status.at):
            self._refresh(node)
            self.wake.set()

    def _refresh(self, node_id: str) -> None:
        """What the planner knows of a node: mDNS first (it is on our network now), else its hint."""
        seen = self.discovered.get(node_id)
        hint = self.hints.get(node_id)
        if seen is not None:
            if seen.role != "inspector":
                self.planner.seen(PeerInfo(seen.node_id, seen.addresses, seen.port, seen.role, seen.uplink,
                                           seen.name))
        elif hint is not None:
            self.planner.seen(hint)
        else:
            self.planner.gone(node_id)

    async def set_uplink(self, uplink: bool) -> None:
        if self.discovery is not None:
            await self.discovery.set_uplink(uplink)

    async def _dial(self, host: str, port: int, key: str,
                    nursery: trio.Nursery) -> SyncSession | None:
        self.dialling.add(key)
        try:
            session: SyncSession | None = await nursery.start(connect_link, self.endpoint, host, port)
        finally:
            self.dialling.discard(key)
        if session is not None:
            self.outbound.add(session)
        return session

    async def _static_peer(self, address: str) -> None:
        """Keep a link to a configured address, with back-off; skip while a link to that node exists."""
        host, port = parse_hostport(address, "peer")
        failures = 0
        while True:
            known = self.static_ids.get(address)
            if known is not None and known in self.linked_peers():
                changed = self.links_event
                with trio.move_on_after(MESH_IDLE_TICK):
                    await changed.wait()
                continue
            up_since = self.clock.monotonic()
            async with trio.open_nursery() as nursery:
                session = await self._dial(host, port, address, nursery)
                if session is not None and session.conn.expect_node:  # from the certificate: HELLO may not be in yet
                    self.static_ids[address] = session.conn.expect_node
            lasted = self.clock.monotonic() - up_since
            failures = 0 if (session is not None and lasted > 10) else failures + 1
            await trio.sleep(DIAL_BACKOFF(failures + 1))

    async def _manage(self, nursery: trio.Nursery) -> None:
        while True:
            self._dedupe()
            now = self.clock.monotonic()
            for node in self.hints.expire(now):
                self._refresh(node)
            linked = self.linked_peers()
            for peer in list(self.planner.connected):
                if peer not in linked:
                    self.planner.link_down(peer, now)
            for peer in linked:
                if peer not in self.planner.connected:
                    self.planner.link_up(peer, now)
            dialled = {s.peer_node for s in self.replicator.sessions
                       if s.peer_node and not s.closed and s in self.outbound}
            for peer in self.planner.to_prune(now, dialled, set(self.static_ids.values())):
                for s in self.replicator.sessions:
                    if s.peer_node == peer and s in self.outbound and not s.closed:
                        s.drain("surplus link: neither end's ring target")  # closes in a second or two
            for info in self.planner.to_dial(now):
                if info.node_id in self.dialling or info.node_id in linked or not info.addresses:
                    continue
                if info.node_id not in self.discovered and not self.hint_budget.take(now):
                    break  # dials to hinted nodes are rate-limited (peerx.DialBudget)
                nursery.start_soon(self._dial_discovered, info, nursery)
            self.wake = trio.Event()
            # the next dial due (back-off of a discovered peer), else a link change or mDNS news
            due = self.planner.next_wakeup(now) - now if self.planner.targets() else MESH_IDLE_TICK
            with trio.move_on_after(min(MESH_IDLE_TICK, max(MESH_TICK, due))):
                await self.wake.wait()

    async def _dial_discovered(self, info: PeerInfo, nursery: trio.Nursery) -> None:
        backoff = self.planner.backoff.get(info.node_id)
        address = address_for(info, backoff.failures if backoff is not None else 0)
        session = await self._dial(address, info.port, info.node_id, nursery)
        if session is None:
            self.planner.dial_failed(info.node_id, self.clock.monotonic())
            self.wake.set()  # the manager sleeps until the back-off of this failure runs out
            return
        answered = session.conn.expect_node  # from the certificate: the address was only a hint
        others = {s.peer_node for s in self.replicator.sessions if s is not session and not s.closed and s.peer_node}
        verdict = judge_answer(info.node_id, answered, others)
        if verdict != "wanted":
            log.info("%s:%d, given for %s, answered as %s: a stale address", address, info.port,
                     self.core.roster.name_of(info.node_id), self.core.roster.name_of(answered or "?"))
            self.planner.dial_failed(info.node_id, self.clock.monotonic())
            self.wake.set()
        if verdict == "close":  # never replace a working link
            session.close("already linked: a stale address answered")

    def _dedupe(self) -> None:
        by_peer: dict[str, list[SyncSession]] = {}
        for s in self.replicator.sessions:
            if s.peer_node and not s.closed:
                by_peer.setdefault(s.peer_node, []).append(s)
        for peer, sessions in by_peer.items():
            if len(sessions) < 2:
                continue
            keep = [s for s in sessions if keep_link(self.core.node_id, peer, s in self.outbound)]
            chosen = keep[0] if keep else sessions[0]
            for s in sessions:
                if s is not chosen:
                    s.close("duplicate link: keeping the one the smaller node id dialled")


class RecordingTransport(HttpsTransport):
    """The real HTTPS transport, remembering how the last exchanges went (for the status)."""

    def __init__(self, core: NodeCore) -> None:
        super().__init__(core, clock=core.clock.monotonic)
        self.clock = core.clock
        self.last_ok_ms: int | None = None
        self.last_error: str | None = None
        self.last_error_ms: int | None = None
        self.forwarded = 0

    async def forward(self, entries: list[bytes]) -> Any:
        try:
            reply = await super().forward(entries)
        except MeshposError as exc:
            self.last_error, self.last_error_ms = str(exc), self.clock.now_ms()
            raise
        self.last_ok_ms = self.clock.now_ms()
        self.forwarded += len(reply.results)
        return reply


class Uplink:
    """Forwarding on this node: the forwarder loop, a reachability probe, the advertised state."""

    def __init__(self, core: NodeCore, mesh: Mesh | None, board: StatusBoard | None, skew: ClockSkew) -> None:
        self.core = core
        self.mesh = mesh
        self.board = board  # peers' statuses: lease rule 1c (reachable)
        self.skew = skew  # the switch's clock, read from its health answer, corrects ours
        self.transport = RecordingTransport(self.core)
        self.reachable: bool | None = None
        self.forwarder: Forwarder | None = None
        self.recheck = trio.Event()  # set when `meshpos uplink on|off` changed the config

    def set_uplink(self, req: UplinkRequest) -> UplinkState:
        """`meshpos uplink on|off`, then at once what it changes: the probe looks again and the
        forwarder's workers (which poll slowly while there is no uplink) look for work."""
        result = set_uplink(self.core, req)
        self.recheck.set()
        if self.forwarder is not None:
            self.forwarder.wake()
        return result

    def allowed(self) -> bool:
        return bool(self.core.config.uplink) and self.core.identity.role in SELLING_ROLES

    def has_uplink(self) -> bool:
        """May forward, and the probe has not found the switch unreachable: the forwarder
        releases its leases when this turns false (a real loss of uplink), not on failed batches."""
        return self.allowed() and self.reachable is not False

    def node_reachable(self, node_id: str) -> bool:
        """Lease rule 1c (meshpos/uplink/reach.py): an open link, or a fresh gossiped status."""
        if self.mesh is None:
            return True
        status = self.board.statuses.get(node_id) if self.board is not None else None
        return is_reachable(node_id, self.core.clock.now_ms(), self.mesh.linked_peers(), status)

    def state(self) -> str:
        if not self.allowed():
            return "off"
        if self.core.policy.switch_url is None:
            return "no switch configured"
        return {None: "checking", True: "up", False: "down"}[self.reachable]

    def status(self) -> UplinkStatus:
        t = self.transport
        set_aside = self.forwarder.set_aside_count() if self.forwarder is not None else 0
        return UplinkStatus(state=self.state(), allowed=self.allowed(), last_forward_ms=t.last_ok_ms,
                            results_received=t.forwarded, last_error=t.last_error, last_error_ms=t.last_error_ms,
                            set_aside=set_aside, switch_url=t.instances.current,
                            instances=tuple(t.instances.states(t.urls(), t.now())))

    def seen(self) -> UplinkSeen:
        """What the signed status says of the uplink."""
        return UplinkSeen(state=self.state(), last_forward_at=self.transport.last_ok_ms,
                          switch=instance_address(self.transport.instances.current))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.forwarder = await nursery.start(
                lambda task_status: run_forwarder(self.core, self.core.clock, self.has_uplink,
                                                  transport=self.transport, reachable=self.node_reachable,
                                                  poll_s=UPLINK_POLL, idle_poll_s=UPLINK_IDLE_POLL,
                                                  recheck=self.probe_now, switch_offset=self.switch_offset,
                                                  task_status=task_status))
            nursery.start_soon(self._probe_loop)
            task_status.started()

    def switch_offset(self) -> int | None:
        """How far this node's clock is ahead of the switch's (ms), as last measured; or None."""
        estimate = self.skew.switch_estimate(self.core.clock.monotonic())
        return None if estimate is None else estimate.offset_ms

    async def probe_now(self) -> None:
        """Probe the switch once and set ``reachable`` (the forwarder calls it when a batch found
        no connection, so a lost uplink releases the leases at once). Whoever probes, an uplink that
        comes back wakes the forwarder's workers (they wait UPLINK_IDLE_POLL while there is none)."""
        could = self.has_uplink()
        if self.allowed() and self.core.policy.switch_url:
            answer: tuple[str, dict[str, Any]] | None = None
            try:
                sent = self.core.clock.now_ms()
                answer = await self.transport.health()  # the instances in failover order (uplink/instances.py)
                up = answer is not None
                switch_ms = health_time_ms(answer[1]) if answer is not None else None
                if switch_ms is not None:  # the switch's clock corrects ours (protocols/clocks.md)
                    self.skew.switch_sample(sent, self.core.clock.now_ms(), switch_ms, self.core.clock.monotonic())
            except MeshposError as exc:
                log.warning("uplink probe impossible: %s", exc)
                up = False
            if up != self.reachable:
                log.info("switch %s is %s", answer[0] if answer else self.core.policy.switch_url,
                         "reachable" if up else "unreachable")
            self.reachable = up
        else:
            self.reachable = None
        if self.has_uplink() and not could and self.forwarder is not None:
            self.forwarder.wake()

    async def _probe_loop(self) -> None:
        advertised: bool | None = None
        while True:
            await self.probe_now()
            advertise = bool(self.allowed() and self.reachable)
            if advertise != advertised and self.mesh is not None:
                await self.mesh.set_uplink(advertise)
                advertised = advertise
            with trio.move_on_after(PROBE_EVERY if self.allowed() else UPLINK_OFF_CHECK):
                await self.recheck.wait()
            self.recheck = trio.Event()


class RunningNode:
    """One running node. It owns every part and hands each only what it needs: the service
    (printer, group commit), the mesh, the status board and publisher, the
    uplink and the dashboard. Nothing is attached to a part after it is built."""

    def __init__(self, core: NodeCore, *, mdns: bool, tuning: NodeTuning, clock: Clock,
                 peer_exchange: bool = True, more: Sequence[Callable[..., Awaitable[None]]] = ()) -> None:
        self.core = core
        # components of the layers above (the terminal API): called as component(node, task_status=...)
        self.more = list(more)
        self.api: ApiStatus | None = None  # what the terminal API reports of itself (report_api)
        self.service = NodeService(core, clock)
        self.mesh = Mesh(core, mdns, tuning.mdns_ttl, peer_exchange)
        self.board = StatusBoard(core.roster, core.clock)
        self.board.attach(self.mesh.replicator)
        self.board.on_new.append(self.mesh.on_status)  # peer exchange: statuses name their signers' addresses
        self.board.on_new.append(core.holders.update)  # held_by: what each node says it holds
        core.ledger.on_accept.append(self.board.on_accept)
        self.uplink = Uplink(core, self.mesh, self.board, self.service.clock_skew)
        self.publisher = StatusPublisher(
            core, self.board, self.mesh.replicator, listen_port=lambda: self.mesh.listen_port,
            printer=self.printer_seen, uplink=self.uplink.seen, started_at=self.service.started_at,
            skew=self.service.clock_skew, interval=tuning.status_interval, power_root=tuning.power_root)
        self.dashboard = DashboardServer(core, self.mesh, self.board)

    def report_api(self, status: ApiStatus) -> None:
        """The terminal API (a layer above) tells where it serves, for the node's status."""
        self.api = status

    def printer_seen(self) -> PrinterSeen:
        st = self.service.printer_status()
        return PrinterSeen(state=st.state, queued=st.queued)

    def status(self) -> LocalStatus:
        return dataclasses.replace(self.service.local_status(), peers=self.mesh.status(),
                                   uplink=self.uplink.status(), dashboard=self.dashboard.status, api=self.api)

    async def run(self, *, task_status: trio.TaskStatus[NodeService] = trio.TASK_STATUS_IGNORED) -> None:
        # the mesh first: the uplink advertises through its discovery, the publisher lists its links
        above = [functools.partial(component, self) for component in self.more]
        await self.service.run(components=[self.mesh.run, self.uplink.run, self.publisher.run, self.dashboard.run,
                                           *above], task_status=task_status)


async def run_node(path: Path, mdns: bool = True, peer_exchange: bool = True, clock: Clock = SYSTEM_CLOCK,
                   more: Sequence[Callable[..., Awaitable[None]]] = ()) -> None:
    """``more``: components of the layers above (the terminal API), started after the node's own
    and handed the RunningNode."""
    install_log_limits()  # a peer must not fill the disk through what we log about it
    tuning = NodeTuning.from_env(os.environ)
    core = NodeCore.open(path, clock)
    try:
        node = RunningNode(core, mdns=mdns, tuning=tuning, clock=clock, peer_exchange=peer_exchange, more=more)
    except BaseException:
        core.close()
        raise
    await run_until_signal(core, node.run)
