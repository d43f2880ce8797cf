"""Room on the node's disk for a sale.

A sale is refused (DiskFullError, before anything of it is written, in memory or on disk)
while less than ``SALE_RESERVE_BYTES`` are free on the disk of the node's store. The reserve
covers what one sale writes (a few pages) and the growth of the write-ahead log and of the
database file at the next checkpoint (about 1,000 pages, store.CHECKPOINT_ROWS), so a sale is
never the write that meets a full disk halfway; what the mesh brings in keeps being stored
until the disk is really full (store.DiskFullError there, the node stays up). Selling resumes
by itself once space is freed.
"""

from __future__ import annotations

from pathlib import Path

from meshpos.infra.sqlite import disk_full, free_bytes

SALE_RESERVE_BYTES = 8 * 2**20


def check_room_for_sale(db_path: Path, reserve: int = SALE_RESERVE_BYTES) -> None:
    free = free_bytes(db_path.parent)
    if free < reserve:
        raise disk_full(db_path, f"{free // 1024} KiB free; a sale needs {reserve // 2**20} MiB free")
