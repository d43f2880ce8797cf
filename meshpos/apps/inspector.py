"""The field-test inspector: join the mesh read-only, gather statuses, probe one node.

An inspector enrollment (role ``inspector``) dials the site's nodes found by
mDNS (it browses but does not advertise: nodes never dial inspectors) and the
static addresses, over real TLS links (meshpos.replication.link_driver.connect_link). The
nodes serve it read-only: they never ingest what it sends, and ignore its
STATUS frames. It receives the ledger (so it knows every certificate) and the
statuses the mesh gossips, and turns them into one view (meshpos.status.meshview).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from meshpos.domain.jsonable import json_object
from meshpos.domain.roles import READ_ONLY_ROLES
from meshpos.node.parts import endpoint_for, replicator_for
from meshpos.infra.clock import Clock
from meshpos.replication.discovery import PeerGone, PeerSeen, ZeroconfBackend, run_discovery
from meshpos.domain.errors import ConfigError, MeshposError, ProtocolError
from meshpos.domain.hostport import parse_hostport
from meshpos.ledger.ledger import Ledger
from meshpos.replication.link_driver import LinkEndpoint, connect_link
from meshpos.status.fieldwarn import PendingSale
from meshpos.status.meshview import Known, MeshView, analyze
from meshpos.node.core import NodeCore
from meshpos.site.nodedir import NodeDir
from meshpos.site.roster import Roster
from meshpos.status.board import StatusBoard
from meshpos.ledger.store import Store
from meshpos.replication.sync import Replicator, SyncSession
from meshpos.wire.dnssd import LocalService

log = logging.getLogger(__name__)

REDIAL_MIN = 1.0
REDIAL_MAX = 10.0
PING_EVERY = 1.0
MAX_LINKS = 64
MDNS_TTL = 120


class BrowseOnlyBackend(ZeroconfBackend):
    """Browse the site's nodes without advertising ourselves (the inspector listens for no link)."""

    def register(self, local: LocalService, ttl: int) -> None:
        return None

    def update(self, local: LocalService, ttl: int) -> None:
        return None


@dataclass(frozen=True)
class SiteRef:
    site_id: str
    name: str


@dataclass(frozen=True)
class InspectorSelf:
    """The inspector itself: how it finds nodes and how many it links to."""

    name: str
    mdns: bool
    mdns_problem: str | None
    static: list[str]
    links: int


@dataclass
class InspectorView:
    """What `meshpos inspect` shows: the mesh view, the site, the sales at risk, and the inspector."""

    mesh: MeshView
    site: SiteRef
    at_risk: list[dict[str, Any]]  # sale objects (as `sales --json`) with held_by and terminal_name
    inspector: InspectorSelf

    def to_json(self) -> dict[str, Any]:
        """The JSON of `meshpos inspect --json`: the mesh view's members, then these three."""
        return {**self.mesh.to_json(), "site": json_object(self.site), "at_risk": self.at_risk,
                "inspector": json_object(self.inspector)}


class Inspector:
    def __init__(self, core: NodeCore, peers: list[str], mdns: bool = True) -> None:
        if core.identity.role not in READ_ONLY_ROLES:
            raise ConfigError(f"{core.dir.path} is a {core.identity.role} enrollment: `meshpos inspect` needs an "
                              "inspector (meshpos enroll SITE DIR --role inspector --name ...)")
        self.core = core
        self.clock: Clock = core.clock
        self.static = list(dict.fromkeys([*core.config.peers, *peers]))
        for address in self.static:
            parse_hostport(address, "peer")
        self.mdns = mdns and core.config.mdns
        self.replicator = replicator_for(core)
        self.board = StatusBoard(core.roster, core.clock, relay=False)
        self.board.attach(self.replicator)
        core.ledger.on_accept.append(self.board.on_accept)
        self.board.on_new.append(core.holders.update)
        self.endpoint = endpoint_for(core, self.replicator)
        self.discovered: dict[str, PeerSeen] = {}
        self.address_of: dict[str, str] = {}  # node id -> the address our link to it goes to
        self.dialling: set[str] = set()
        self.nursery: trio.Nursery | None = None
        self.mdns_problem: str | None = None

    def open_links(self) -> dict[str, SyncSession]:
        return {s.peer_node: s for s in self.replicator.sessions if s.peer_node and not s.closed}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for address in self.static:
                    nursery.start_soon(self._keep, address, None)
                if self.mdns:
                    nursery.start_soon(self._discover)
                nursery.start_soon(self._pinger)
                task_status.started()
        finally:
            self.replicator.detach("inspector leaving")

    async def _discover(self) -> None:
        cfg = self.core.config
        local = LocalService(site_id=cfg.site_id, node_id=cfg.node_id, role="inspector", name=cfg.name, port=9)
        try:
            await run_discovery(local, self._on_discovery, ttl=MDNS_TTL, backend=BrowseOnlyBackend())
        except (MeshposError, OSError) as exc:
            self.mdns_problem = str(exc)
            log.warning("mDNS unavailable (%s): static addresses only", exc)

    def _on_discovery(self, event: PeerSeen | PeerGone) -> None:
        if isinstance(event, PeerGone):
            self.discovered.pop(event.node_id, None)
            return
        if event.role in READ_ONLY_ROLES or not event.addresses:
            return
        self.discovered[event.node_id] = event
        address = f"{event.addresses[0]}:{event.port}"
        if self.nursery is not None and event.node_id not in self.dialling and len(self.dialling) < MAX_LINKS:
            self.nursery.start_soon(self._keep, address, event.node_id)

    async def _keep(self, address: str, node_id: str | None) -> None:
        """Hold a link to ``address`` (re-dial with back-off) while it stays worth having."""
        key = node_id or address
        if key in self.dialling:
            return
        self.dialling.add(key)
        host, port = parse_hostport(address, "peer")
        delay = REDIAL_MIN
        try:
            while True:
                if node_id is not None and node_id not in self.discovered:
                    return  # gone from mDNS: its status (if any) goes stale by itself
                linked = self.open_links()
                if node_id is not None and node_id in linked:
                    await trio.sleep(REDIAL_MIN)
                    continue
                async with trio.open_nursery() as nursery:
                    session: SyncSession | None = await nursery.start(connect_link, self.endpoint, host, port)
                    if session is not None and session.conn.expect_node:
                        self.address_of[session.conn.expect_node] = address
                        delay = REDIAL_MIN
                await trio.sleep(delay)
                delay = min(REDIAL_MAX, delay * 2)
        finally:
            self.dialling.discard(key)

    async def _pinger(self) -> None:
        while True:
            for session in self.open_links().values():
                session.ping()
            await trio.sleep(PING_EVERY)

    def known(self) -> dict[str, Known]:
        roster = self.core.roster
        linked = self.open_links()
        out: dict[str, Known] = {}
        ids = set(roster.identities) | set(self.discovered) | set(linked) | set(self.address_of)
        for node_id in ids:
            ident = roster.identities.get(node_id)
            seen = self.discovered.get(node_id)
            address = self.address_of.get(node_id) or (f"{seen.addresses[0]}:{seen.port}" if seen else None)
            session = linked.get(node_id)
            rtt = session.conn.rtt if session is not None else None
            # name and role from the certificate only: an mDNS announcement is signed by nobody
            out[node_id] = Known(name=ident.name if ident else None, role=ident.role if ident else None,
                                 address=address,
                                 linked=session is not None,
                                 rtt_ms=None if rtt is None else int(math.ceil(rtt * 1000)),
                                 revoked=node_id in roster.revoked)
        return out

    def view(self) -> InspectorView:
        policy = self.core.policy
        statuses = {s.node_id: s.body for s in self.board.current().values()}
        # the pending sales of the ledger the inspector received: who holds each (the battery warning)
        pending = [PendingSale.of(s) for s in self.core.sales() if s["status"] == "pending"]
        mesh = analyze(statuses, self.known(), now_ms=self.clock.now_ms(),
                       offline_window_ms=policy.offline_window_ms, warn_before_ms=policy.warn_before_s * 1000,
                       currency=policy.currency, me=self.core.node_id, pending_sales=pending)
        return InspectorView(
            mesh=mesh, site=SiteRef(policy.site_id, policy.name),
            at_risk=self.core.at_risk(),  # the ledger the inspector received, against the statuses
            inspector=InspectorSelf(self.core.config.name, self.mdns, self.mdns_problem, list(self.static),
                                    len(self.open_links())))


# -- probe ---------------------------------------------------------------------------------

@dataclass
class ProbeResult:
    address: str
    node_id: str | None
    name: str | None
    role: str | None
    connect_ms: float
    rtts_ms: list[float]
    bytes_in: int
    transfer_s: float
    entries: int

    def to_json(self) -> dict[str, Any]:
        r = sorted(self.rtts_ms)
        return {
            "address": self.address, "node_id": self.node_id, "name": self.name, "role": self.role,
            "connect_ms": round(self.connect_ms, 2), "pings": len(r),
            "rtt_ms": None if not r else {"min": round(r[0], 3), "avg": round(sum(r) / len(r), 3),
                                          "max": round(r[-1], 3)},
            "ledger_bytes": self.bytes_in, "transfer_s": round(self.transfer_s, 4),
            "throughput_kib_s": round(self.bytes_in / 1024 / self.transfer_s, 1) if self.transfer_s > 0 else None,
            "entries": self.entries,
        }


async def probe_node(inspector_dir: Path, address: str, clock: Clock, pings: int = 10,
                     timeout: float = 60.0) -> ProbeResult:
    """Link to one node read-only with an empty ledger: time the whole ledger's transfer (snapshots),
    then ``pings`` PING/PONG round trips."""
    host, port = parse_hostport(address, "node address")
    nd = NodeDir(inspector_dir)
    cfg = nd.config()
    ca = nd.ca_cert()
    policy = nd.policy(ca)
    with tempfile.TemporaryDirectory(prefix="meshpos-probe-") as tmp:
        store = Store.open(Path(tmp) / "probe.db", create=True,
                           identity={"site_id": cfg.site_id, "node_id": cfg.node_id})
        try:
            ledger = Ledger.open(store, Roster(ca, policy), cfg.node_id, clock)
            replicator = Replicator(ledger, cfg.site_id, cfg.node_id, cfg.role, clock)
            endpoint = LinkEndpoint.from_files(replicator, ledger.roster, ca, nd.cert_path, nd.key_path,
                                               nd.ca_path.read_bytes(), clock)
            with trio.fail_after(timeout):
                async with trio.open_nursery() as nursery:
                    t0 = clock.monotonic()
                    session: SyncSession | None = await nursery.start(connect_link, endpoint, host, port)
                    if session is None:
                        raise ProtocolError(f"no link to {address}: unreachable or refused (see -v)")
                    connect_ms = (clock.monotonic() - t0) * 1000
                    start = clock.monotonic()
                    while session.conn.peer is None and not session.closed:
                        await trio.sleep(0.005)
                    # Done when we hold every shard the node announced in its HELLO, as it had it.
                    wanted = dict(session.conn.peer.summary) if session.conn.peer is not None else {}
                    while not session.closed:
                        mine = ledger.summary()
                        if all(mine.get(shard) == digest for shard, digest in wanted.items()):
                            break
                        await trio.sleep(0.002)
                    transfer_s = clock.monotonic() - start
                    last_bytes = session.conn.bytes_in
                    rtts: list[float] = []
                    for _ in range(pings):
                        if session.closed:
                            break
                        session.conn.rtt = None
                        if not session.ping():
                            await trio.sleep(0.05)
                            continue
                        while session.conn.rtt is None and not session.closed:
                            await trio.sleep(0.001)
                        if session.conn.rtt is not None:
                            rtts.append(session.conn.rtt * 1000)
                    peer = session.peer_node
                    ident = ledger.roster.identities.get(peer) if peer else None
                    result = ProbeResult(address, peer, ident.name if ident else None,
                                         ident.role if ident else None, connect_ms, rtts,
                                         last_bytes, transfer_s, store.entry_count())
                    session.close("probe done")
                    replicator.detach("probe done")
                    nursery.cancel_scope.cancel()
        finally:
            store.close()
    return result
