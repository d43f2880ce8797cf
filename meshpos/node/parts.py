"""The replication parts of one node, built from its opened ``NodeCore``: each gets only what it
needs (the ledger, the identity, the roster, the certificates, the clock), never the core itself."""

from __future__ import annotations

from meshpos.node.core import NodeCore
from meshpos.replication.link_driver import LinkEndpoint
from meshpos.replication.sync import Replicator, SyncConfig


def replicator_for(core: NodeCore, config: SyncConfig = SyncConfig()) -> Replicator:
    rep = Replicator(core.ledger, core.identity.site_id, core.identity.node_id, core.identity.role, core.clock,
                     config)
    rep.recovery_flag = core.recovery_flag if core.recovery_flag.exists() else None
    return rep


def endpoint_for(core: NodeCore, replicator: Replicator) -> LinkEndpoint:
    nd = core.dir
    return LinkEndpoint.from_files(replicator, core.roster, core.ca_cert, nd.cert_path, nd.key_path,
                                   nd.ca_path.read_bytes(), core.clock)
