"""What a running node says of itself (``meshpos status``, ``GET /v1/status``'s ``node``), typed.

``NodeSummary`` is what the node's store and roster tell (``NodeCore.status``, also for a stopped
node); ``LocalStatus`` adds the running parts: the process, the printer, the links, the uplink and
the dashboard. One encoder (``meshpos.domain.jsonable``) turns either into the JSON that scripts
read. Adding a field: add it to the dataclass here, fill it where the part is built (core, runner,
dashboard) and show it where it is shown (cli/commands.py ``status``).

The status a node signs for its peers is another value: ``meshpos.wire.status.StatusBody``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshpos.devices.spool import PrinterStatus
from meshpos.domain.clockskew import Estimate
from meshpos.domain.jsonable import OMIT_IF_NONE, json_object
from meshpos.uplink.instances import InstanceState
from meshpos.wire.status import LedgerSize


@dataclass(frozen=True)
class SalesCount:
    total: int
    by_status: Mapping[str, int]
    own: int


@dataclass(frozen=True)
class PendingSummary:
    count: int
    amount_minor: int
    oldest_created_at: str | None  # ISO 8601


@dataclass(frozen=True)
class AtRisk:
    """This terminal's pending sales that fewer than ``min_holders`` nodes are known to hold."""

    count: int
    amount_minor: int
    min_holders: int


@dataclass(frozen=True)
class Running:
    since: int  # ms
    pid: int


@dataclass(frozen=True)
class PeersStatus:
    listen_port: int | None
    mdns: bool
    discovered: list[str]
    static: list[str]
    links: list[dict[str, Any]]  # replication.sync.LinkHealth fields plus peer_name
    peer_exchange: bool  # dialling the addresses peers' statuses name (protocols/peer-exchange.md)
    hinted: list[str]  # nodes known by such an address
    shards_parked: int  # shards no known node can have written yet (replication.shardpark)
    shard_frames_dropped: int


@dataclass(frozen=True)
class UplinkStatus:
    state: str  # off | no switch configured | checking | up | down
    allowed: bool
    last_forward_ms: int | None
    results_received: int
    last_error: str | None
    last_error_ms: int | None
    set_aside: int
    switch_url: str | None = None  # the switch instance this node last reached
    instances: tuple[InstanceState, ...] = ()  # every instance of the policy, in its order


@dataclass(frozen=True)
class DashboardStatus:
    url: str
    port: int
    tls_fingerprint_sha256: str | None


@dataclass(frozen=True)
class ClockStatus:
    """This node's clock and its estimate of its own offset (protocols/clocks.md)."""

    now_ms: int
    estimate: Estimate | None


@dataclass(frozen=True)
class ApiStatus:
    """Where the terminal API serves (meshpos/terminal): its socket, its TCP URL, why not."""

    socket: str
    url: str | None
    error: str | None


@dataclass(frozen=True)
class NodeSummary:
    node_id: str
    name: str
    role: str
    site_id: str
    site_name: str
    version: str
    certificate_expires: str | None  # ISO 8601
    certificate_valid: bool
    uplink_allowed: bool
    switch_configured: bool
    ledger: LedgerSize
    sales: SalesCount
    pending: PendingSummary
    at_risk: AtRisk
    revoked_nodes: list[str]
    policy: Mapping[str, Any]  # the policy in force, without the dashboard password hash

    def to_json(self) -> dict[str, Any]:
        return json_object(self)


@dataclass(frozen=True)
class LocalStatus(NodeSummary):
    running: Running | None = field(default=None, metadata=OMIT_IF_NONE)
    clock: ClockStatus | None = field(default=None, metadata=OMIT_IF_NONE)
    printer: PrinterStatus | None = field(default=None, metadata=OMIT_IF_NONE)
    peers: PeersStatus | None = field(default=None, metadata=OMIT_IF_NONE)
    uplink: UplinkStatus | None = field(default=None, metadata=OMIT_IF_NONE)
    dashboard: DashboardStatus | None = field(default=None, metadata=OMIT_IF_NONE)
    api: ApiStatus | None = field(default=None, metadata=OMIT_IF_NONE)
