"""A full disk (issue 12, reproduction 9) on a real small file system (a tmpfs mounted for the
test): reported as such, never as a damaged database; the running node stays up, refuses new
sales until space returns, and loses nothing it acknowledged."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from meshpos.errors import CorruptStoreError, DiskFullError
from meshpos.node import client
from meshpos.node.diskspace import SALE_RESERVE_BYTES
from meshpos.procs import ProcessGroup
from meshpos.store import Store, free_bytes

from helpers import fill_disk, run_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(dir=tmp_path))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _ballast(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes with one file."""
    path = disk / "ballast"
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, free_bytes(disk) - leave))
    return path


def _is_disk_full_message(text: str) -> None:
    assert "the disk is full" in text and "nothing acknowledged was lost" in text
    assert "damaged" not in text.replace("not damaged", "") and "move it aside and" not in text


# -- the store ---------------------------------------------------------------------------------

def test_opening_a_store_on_a_full_disk_is_disk_full_not_damage(small_disk: Path) -> None:
    fill_disk(small_disk / "ballast")
    with pytest.raises(DiskFullError) as info:
        Store.open(small_disk / "meshpos.db", create=True)
    assert not isinstance(info.value, CorruptStoreError)
    _is_disk_full_message(str(info.value))


def _rows(store: Store) -> int:
    return int(store.conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0])


@pytest.mark.parametrize("held", [False, True], ids=["plain", "held (the running node)"])
def test_a_write_that_meets_a_full_disk_loses_nothing_committed(small_disk: Path, held: bool) -> None:
    store = Store.open(small_disk / "meshpos.db", create=True)
    if held:
        store.hold()
    try:
        fill_disk(small_disk / "ballast")
        committed = 0
        with pytest.raises(DiskFullError) as info:
            for i in range(100_000):
                with store.transaction():
                    store.set_meta(f"k{i:06d}", "x" * 3000)
                store.flush()
                committed = i + 1  # acknowledged: flush() returned
        _is_disk_full_message(str(info.value))
        (small_disk / "ballast").unlink()
        with store.transaction():  # the store goes on once space is back
            store.set_meta("after", "1")
        store.flush()
        assert _rows(store) == committed
    finally:
        store.close()
    reopened = Store.open(small_disk / "meshpos.db")
    try:
        assert _rows(reopened) == committed and reopened.get_meta("after") == "1"
    finally:
        reopened.close()


# -- the running node --------------------------------------------------------------------------

def test_running_node_on_a_full_disk_refuses_sales_stays_up_and_loses_nothing(tmp_path: Path,
                                                                               small_disk: Path) -> None:
    run_cli("site", "init", str(tmp_path / "site"), "--name", "Sagra", check=True)
    node = small_disk / "t1"
    run_cli("enroll", str(tmp_path / "site"), str(node), "--role", "terminal", "--name", "T1", check=True)
    procs = ProcessGroup(tmp_path / "logs")
    try:
        child = procs.start_node("t1", node, "--no-mdns")
        acknowledged = [client.call_running(node, "sell", {"amount_minor": 100})["id"]]
        ballast = _ballast(small_disk, SALE_RESERVE_BYTES + 256 * 1024)
        refused = None
        for i in range(2000):  # sell until the disk is full
            try:
                sale = client.call_running(node, "sell", {"amount_minor": 100 + i, "description": "x" * 190})
            except DiskFullError as exc:
                refused = exc
                break
            acknowledged.append(sale["id"])
        assert refused is not None, "the disk never filled"
        _is_disk_full_message(str(refused))

        proc = run_cli("sell", str(node), "--amount", "2.50", "--cash")  # what the cashier sees
        assert proc.returncode == DiskFullError.exit_code and "Traceback" not in proc.stderr
        _is_disk_full_message(proc.stderr)
        assert child.alive and client.call_running(node, "status", {})["running"]  # still up

        ballast.unlink()  # space returns
        again = json.loads(run_cli("sell", str(node), "--amount", "2.50", "--cash", "--json", check=True).stdout)
        acknowledged.append(again["id"])
        assert child.alive
        procs.stop("t1")
        assert "Traceback" not in child.log_tail()
    finally:
        procs.stop_all()
    held = {s["id"] for s in json.loads(run_cli("sales", str(node), "--json", check=True).stdout)}
    assert set(acknowledged) <= held
    assert len(acknowledged) > 2
