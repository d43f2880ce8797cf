"""Shard names of the ledger (protocols/ledger.md): ``<node_id>/<segment>``.

A node's log is cut into shards of SEGMENT entries; the link protocol, the
ledger and the shard park all check a peer's shard name with the one rule here.
"""

from __future__ import annotations

SEGMENT = 256
MAX_SHARD_NAME = 48


def shard_name(node_id: str, position: int) -> str:
    return f"{node_id}/{position // SEGMENT:06d}"


def valid_shard_name(name: str) -> bool:
    node, _, seg = name.partition("/")
    return (len(name) <= MAX_SHARD_NAME and len(node) == 16 and all(c in "0123456789abcdef" for c in node)
            and len(seg) == 6 and seg.isdigit())
