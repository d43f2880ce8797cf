"""Shard names of the ledger (protocols/ledger.md): ``<node_id>/<segment>``.

A node's log is cut into shards of SEGMENT entries; the link protocol, the
ledger and the shard park all check a peer's shard name with the one rule here.
"""

from __future__ import annotations

import re

SEGMENT = 256
MAX_SHARD_NAME = 48


def shard_name(node_id: str, position: int) -> str:
    return f"{node_id}/{position // SEGMENT:06d}"


_SHARD_NAME = re.compile(r"[0-9a-f]{16}/[0-9]{6}")  # one match instead of a generator per name (per frame)


def valid_shard_name(name: str) -> bool:
    return len(name) <= MAX_SHARD_NAME and _SHARD_NAME.fullmatch(name) is not None
