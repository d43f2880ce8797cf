"""Getting every entry to every node: sync sessions, the trio link driver and its TLS, peer planning, DNS-SD discovery, parked shards.

May import: `ledger`, `site`, `wire`, `identity`, `infra`, `domain`.
"""
