"""What the uplink needs from the node it runs in, and nothing more: its directory (certificate and
key for TLS to the switch), its key (to sign leases), the store and ledger (what to forward, where
results go), the roster (revocations, identities) and the policy in force. The running node's
``NodeCore`` is one; the uplink never imports the node package."""

from __future__ import annotations

from typing import Protocol

from nacl.signing import SigningKey

from meshpos.domain.policy import SitePolicy
from meshpos.ledger.ledger import Ledger
from meshpos.ledger.store import Store
from meshpos.site.nodedir import NodeDir
from meshpos.site.roster import Roster


class UplinkHost(Protocol):
    dir: NodeDir
    key: SigningKey
    store: Store
    ledger: Ledger
    roster: Roster

    @property
    def node_id(self) -> str: ...

    @property
    def policy(self) -> SitePolicy: ...
