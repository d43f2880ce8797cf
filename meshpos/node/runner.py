"""Assemble a running node: service + mesh (links, dialler, discovery) + forwarder.

The mesh part follows meshpos/replication/planner.py's rules: static peers are always
dialled; peers found by mDNS are dialled when the ring planner picks them; one
link per pair (simultaneous dials are resolved by ``keep_link``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import trio

from meshpos.node.parts import endpoint_for, replicator_for
from meshpos import PROTOCOL_VERSION
from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.replication.discovery import DiscoveryHandle, PeerGone, PeerSeen, run_discovery
from meshpos.domain.errors import MeshposError
from meshpos.domain.hostport import parse_hostport
from meshpos.replication.link_driver import LinkEndpoint, connect_link, serve_links
from meshpos.replication.planner import DIAL_BACKOFF, PeerInfo, PeerPlanner, keep_link
from meshpos.infra.netguard import install_log_limits
from meshpos.replication.sync import Replicator, SyncSession
from meshpos.uplink.client import make_client_context, probe
from meshpos.uplink.forwarder import Forwarder, HttpsTransport, run_forwarder
from meshpos.uplink.reach import is_reachable
from meshpos.wire.dnssd import LocalService
from meshpos.node.core import NodeCore
from meshpos.node.service import NodeService, run_until_signal

log = logging.getLogger(__name__)

MESH_TICK = 1.0
UPLINK_POLL = 2.0  # forwarder: look for work at least this often
PROBE_EVERY = 5.0  # how often an uplink node checks that the switch answers
# Discovery TTL for real nodes; overridable for the lab (a cut host is noticed within ~TTL).
MDNS_TTL = int(os.environ.get("MESHPOS_MDNS_TTL", "120"))


class Mesh:
    """The node's links: listener, dialler, discovery, dedupe, health for the status."""

    def __init__(self, service: NodeService, mdns: bool) -> None:
        self.service = service
        self.core = service.core
        self.clock: Clock = service.clock
        self.mdns = mdns and self.core.config.mdns
        self.replicator = replicator_for(self.core)
        self.endpoint = endpoint_for(self.core, self.replicator)
        self.planner = PeerPlanner(self.core.node_id)
        self.outbound: set[int] = set()  # id() of sessions we dialled
        self.dialling: set[str] = set()  # node ids or addresses being dialled now
        self.static_ids: dict[str, str] = {}  # static address -> node id learnt on first link
        self.listen_port: int | None = None
        self.discovery: DiscoveryHandle | None = None
        self.discovered: dict[str, PeerSeen] = {}
        self.wake = trio.Event()
        service.extra_status.append(self.status)

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        links = []
        for h in self.replicator.health():
            d = dataclasses.asdict(h)
            d["peer_name"] = self.core.roster.name_of(h.peer_node) if h.peer_node else None
            links.append(d)
        park = self.replicator.park
        return {"peers": {
            "listen_port": self.listen_port, "mdns": self.mdns,
            "discovered": sorted(self.discovered), "static": list(self.core.config.peers), "links": links,
            # shards no known node can have written yet (meshpos.replication.shardpark): held apart, and frames dropped
            "shards_parked": len(park.shards), "shard_frames_dropped": park.stats.dropped}}

    def linked_peers(self) -> set[str]:
        return {s.peer_node for s in self.replicator.sessions if s.peer_node and not s.closed}

    # -- running ---------------------------------------------------------------------

    async def run(self, service: NodeService, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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
                    lambda task_status: run_discovery(local, self._on_discovery, ttl=MDNS_TTL,
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
            if event.role != "inspector":  # inspectors dial us; we never dial them
                self.planner.seen(PeerInfo(event.node_id, event.addresses, event.port, event.role, event.uplink,
                                           event.name))
        else:
            if self.discovered.pop(event.node_id, None) is not None:
                log.info("peer left: %s (%s)", self.core.roster.name_of(event.node_id), event.node_id)
            self.planner.gone(event.node_id)
        self.wake.set()

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
            self.outbound.add(id(session))
        return session

    async def _static_peer(self, address: str) -> None:
        """Keep a link to a configured address, with back-off; skip while a link to that node exists."""
        host, port = parse_hostport(address, "peer")
        failures = 0
        while True:
            known = self.static_ids.get(address)
            if known is not None and known in self.linked_peers():
                await trio.sleep(MESH_TICK)
                continue
            up_since = self.clock.monotonic()
            async with trio.open_nursery() as nursery:
                session = await self._dial(host, port, address, nursery)
                if session is not None and session.peer_node:
                    self.static_ids[address] = session.peer_node
            lasted = self.clock.monotonic() - up_since
            failures = 0 if (session is not None and lasted > 10) else failures + 1
            await trio.sleep(DIAL_BACKOFF(failures + 1))

    async def _manage(self, nursery: trio.Nursery) -> None:
        while True:
            self._dedupe()
            now = self.clock.monotonic()
            linked = self.linked_peers()
            for peer in list(self.planner.connected):
                if peer not in linked:
                    self.planner.link_down(peer, now)
            for peer in linked:
                if peer not in self.planner.connected:
                    self.planner.link_up(peer, now)
            for info in self.planner.to_dial(now):
                if info.node_id in self.dialling or info.node_id in linked or not info.addresses:
                    continue
                nursery.start_soon(self._dial_discovered, info, nursery)
            self.wake = trio.Event()
            with trio.move_on_after(MESH_TICK):
                await self.wake.wait()

    async def _dial_discovered(self, info: PeerInfo, nursery: trio.Nursery) -> None:
        session = await self._dial(info.addresses[0], info.port, info.node_id, nursery)
        if session is None:
            self.planner.dial_failed(info.node_id, self.clock.monotonic())

    def _dedupe(self) -> None:
        by_peer: dict[str, list[SyncSession]] = {}
        for s in self.replicator.sessions:
            if s.peer_node and not s.closed:
                by_peer.setdefault(s.peer_node, []).append(s)
        for peer, sessions in by_peer.items():
            if len(sessions) < 2:
                continue
            keep = [s for s in sessions if keep_link(self.core.node_id, peer, id(s) in self.outbound)]
            chosen = keep[0] if keep else sessions[0]
            for s in sessions:
                if s is not chosen:
                    s.close("duplicate link: keeping the one the smaller node id dialled")


class RecordingTransport(HttpsTransport):
    """The real HTTPS transport, remembering how the last exchanges went (for the status)."""

    def __init__(self, core: NodeCore) -> None:
        super().__init__(core)
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

    def __init__(self, service: NodeService, mesh: Mesh | None) -> None:
        self.service = service
        self.core = service.core
        self.mesh = mesh
        self.transport = RecordingTransport(self.core)
        self.reachable: bool | None = None
        self.forwarder: Forwarder | None = None
        service.extra_status.append(self.status)

    def allowed(self) -> bool:
        return bool(self.core.config.uplink) and self.core.identity.role in ("terminal", "gateway")

    def has_uplink(self) -> bool:
        """May forward, and the probe has not found the switch unreachable: the forwarder
        releases its leases when this turns false (a real loss of uplink), not on failed batches."""
        return self.allowed() and self.reachable is not False

    def node_reachable(self, node_id: str) -> bool:
        """Lease rule 1c (meshpos/uplink/reach.py): an open link, or a fresh gossiped status."""
        if self.mesh is None:
            return True
        board = getattr(self.service, "statusboard", None)  # the status component starts after this one
        status = board.statuses.get(node_id) if board is not None else None
        return is_reachable(node_id, self.core.clock.now_ms(), self.mesh.linked_peers(), status)

    def state(self) -> str:
        if not self.allowed():
            return "off"
        if self.core.policy.switch_url is None:
            return "no switch configured"
        return {None: "checking", True: "up", False: "down"}[self.reachable]

    def status(self) -> dict[str, Any]:
        t = self.transport
        set_aside = self.forwarder.status()["set_aside"] if self.forwarder is not None else 0
        return {"uplink": {"state": self.state(), "allowed": self.allowed(), "last_forward_ms": t.last_ok_ms,
                           "results_received": t.forwarded, "last_error": t.last_error,
                           "last_error_ms": t.last_error_ms, "set_aside": set_aside}}

    async def run(self, service: NodeService, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.forwarder = await nursery.start(
                lambda task_status: run_forwarder(self.core, self.core.clock, self.has_uplink,
                                                  transport=self.transport, reachable=self.node_reachable,
                                                  poll_s=UPLINK_POLL, recheck=self.probe_now,
                                                  task_status=task_status))
            nursery.start_soon(self._probe_loop)
            task_status.started()

    async def probe_now(self) -> None:
        """Probe the switch once and set ``reachable`` (the forwarder calls it when a batch found
        no connection, so a lost uplink releases the leases at once)."""
        if self.allowed() and self.core.policy.switch_url:
            try:
                ctx = make_client_context(self.core)
                up = await probe(self.core.policy.switch_url, ctx)
            except MeshposError as exc:
                log.warning("uplink probe impossible: %s", exc)
                up = False
            if up != self.reachable:
                log.info("switch %s is %s", self.core.policy.switch_url, "reachable" if up else "unreachable")
            self.reachable = up
        else:
            self.reachable = None

    async def _probe_loop(self) -> None:
        advertised: bool | None = None
        while True:
            await self.probe_now()
            advertise = bool(self.allowed() and self.reachable)
            if advertise != advertised and self.mesh is not None:
                await self.mesh.set_uplink(advertise)
                advertised = advertise
            await trio.sleep(PROBE_EVERY)


async def run_node(path: Path, mdns: bool = True, clock: Clock = SYSTEM_CLOCK) -> None:
    install_log_limits()  # a peer must not fill the disk through what we log about it
    async def mesh_component(service: NodeService, *, task_status: trio.TaskStatus[None]) -> None:
        mesh = Mesh(service, mdns)
        service.mesh = mesh  # type: ignore[attr-defined]
        await mesh.run(service, task_status=task_status)

    async def uplink_component(service: NodeService, *, task_status: trio.TaskStatus[None]) -> None:
        uplink = Uplink(service, getattr(service, "mesh", None))
        await uplink.run(service, task_status=task_status)

    from meshpos.node.dashboard import dashboard_component  # issue 6: status gossip, organizer dashboard
    from meshpos.node.status_pub import status_component
    await run_until_signal(path, [mesh_component, uplink_component, status_component, dashboard_component], clock)
