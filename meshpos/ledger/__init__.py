"""A node's storage: the SQLite store (the only node module that speaks SQL) and the CRDT ledger of signed entries with its verification and the sales view.

May import: `site`, `wire`, `identity`, `infra`, `domain`.
"""
