"""Node statuses: the board of signed peer statuses and the analysis of the mesh they describe,
and its picture (``meshsvg``).

May import: `replication`, `ledger`, `site`, `wire`, `identity`, `infra`, `domain`.
"""
