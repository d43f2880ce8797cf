"""Red team: a node database that lost its content but not its file.

A missing ``meshpos.db`` of a node that had one (``meshpos.db.created``) makes the node wait for a
peer to give its own sales back before it sells (tests/test_power_loss.py). A file that is still
there but empty -- truncated to 0 bytes by a crash or a careless restore, or an SQLite file
without meshpos's tables -- opened as a new store, and the next ``sell`` used sale id
``...-00000001`` again, with other content: the mesh and the switch already hold that id (for a
card sale the switch answers the old sale's result, so the new card is never charged). The real
CLI in a subprocess, on a real node directory.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import run_cli


def truncate(db: Path) -> None:
    db.write_bytes(b"")


def empty_sqlite(db: Path) -> None:
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("DROP TABLE t")


@pytest.mark.parametrize("damage", [truncate, empty_sqlite], ids=["zero-bytes", "no-tables"])
def test_an_emptied_store_does_not_sell_under_a_sale_id_used_before(
        make_node: Callable[..., Path], damage: Callable[[Path], None]) -> None:
    node = make_node("t1")
    first = run_cli("sell", str(node), "--amount", "5.00", "--cash", check=True).stdout
    assert "-00000001" in first
    for suffix in ("-wal", "-shm"):
        (node / f"meshpos.db{suffix}").unlink(missing_ok=True)
    damage(node / "meshpos.db")
    again = run_cli("sell", str(node), "--amount", "7.00", "--cash")
    assert "-00000001" not in again.stdout, "a sale id the mesh holds was used again"
    assert again.returncode != 0 and "waits for a peer" in again.stderr
    assert "Traceback" not in again.stderr
    assert (node / "RECOVERING").exists()
