"""A node database damaged inside SQLite's pages (a bit flip on a worn SD card, a bad restore):
SQLite's own checks do not see a flipped byte inside a row or inside the schema's text, so the
node must. Every flip gives a node that opens, lists and sells, or a clear error naming the file
(the CLI prints it as ``meshpos: error: ...``); never an IndexError, a UnicodeDecodeError or an
sqlite3 error from deep inside (what a flip in a column name, in the schema's text or in a stored
certificate gave before). Real SQLite files, the real node core."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from meshpos.domain.errors import MeshposError
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore


def flip_positions(data: bytes) -> list[int]:
    """Where a flip hits what the node reads: every byte of the schema's text, and the punctuation
    of the stored JSON (certificates, policy, sales)."""
    schema = [m.start() + i for m in re.finditer(rb"CREATE (TABLE|INDEX)[^\x00]{0,400}", data)
              for i in range(0, len(m.group()), 3)]
    json_marks = [m.start() for m in re.finditer(rb'[{",:]', data)][::5]
    return sorted(set(schema + json_marks))


def test_a_flipped_byte_anywhere_the_node_reads_gives_a_working_node_or_a_clear_error(
        make_node: Callable[..., Path], clock: FakeClock) -> None:
    path = make_node("t1")
    core = NodeCore.open(path, clock)
    for amount in (250, 1250, 990):
        core.sell(amount)
    core.close()
    db = path / "meshpos.db"
    original = db.read_bytes()
    positions = flip_positions(original)
    assert len(positions) > 100
    refused: list[str] = []
    for pos in positions:
        damaged = bytearray(original)
        damaged[pos] ^= 0x80
        db.write_bytes(damaged)
        for extra in ("-wal", "-shm"):
            (path / f"meshpos.db{extra}").unlink(missing_ok=True)
        try:
            core = NodeCore.open(path, clock)
            try:
                core.sales()
                core.sell(100)
            finally:
                core.close()
        except MeshposError as exc:  # the clear error: it names the file
            assert "meshpos.db" in str(exc), (pos, str(exc))
            refused.append(str(exc))
    assert refused  # the sweep did reach what the node reads
