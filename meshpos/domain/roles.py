"""The roles a node's certificate gives it, defined once.

* ``terminal`` and ``gateway`` sell, write ledger entries, and may forward to the switch;
* ``inspector`` (the technician's field-test tool) only reads: it holds links, publishes no
  status, writes nothing, and nodes never dial it.
"""

from __future__ import annotations

ROLES = ("terminal", "gateway", "inspector")
SELLING_ROLES = frozenset({"terminal", "gateway"})  # also the roles trusted to send entries and to uplink
READ_ONLY_ROLES = frozenset({"inspector"})
