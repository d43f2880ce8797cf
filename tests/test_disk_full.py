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

from meshpos.domain.errors import CorruptStoreError, DiskFullError
from meshpos.node import client
from meshpos.node.diskspace import SALE_RESERVE_BYTES
from meshpos.apps.procs import ProcessGroup
from meshpos.infra.sqlite import free_bytes
from meshpos.ledger.store import Store

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
        acknowledged = [client.running(node).sell(100)["id"]]
        ballast = _ballast(small_disk, SALE_RESERVE_BYTES + 256 * 1024)
        refused = None
        for i in range(2000):  # sell until the disk is full
            try:
                sale = client.running(node).sell(100 + i, description="x" * 190)
            except DiskFullError as exc:
                refused = exc
                break
            acknowledged.append(sale["id"])
        assert refused is not None, "the disk never filled"
        _is_disk_full_message(str(refused))

        proc = run_cli("sell", str(node), "--amount", "2.50", "--cash")  # what the cashier sees
        assert proc.returncode == DiskFullError.exit_code and "Traceback" not in proc.stderr
        _is_disk_full_message(proc.stderr)
        assert child.alive and client.running(node).status()["running"]  # still up

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


def _sale_ids(node: Path) -> set[str]:
    return {s["id"] for s in client.running(node).sales()}


def _until(cond: object, timeout: float, what: str) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.2)


def test_a_node_whose_disk_fills_with_what_its_links_bring_stays_up(tmp_path: Path, small_disk: Path) -> None:
    """The disk fills with entries replicated from a peer (no sale of its own to refuse first):
    SQLite meets the full disk inside the node's held transaction. The node stays up; once
    space is back and it re-syncs, it holds everything."""
    from meshpos.apps.procs import free_ports
    run_cli("site", "init", str(tmp_path / "site"), "--name", "Sagra", check=True)
    pa, pb = free_ports(2)
    a, b = small_disk / "a", tmp_path / "b"
    run_cli("enroll", str(tmp_path / "site"), str(a), "--role", "terminal", "--name", "A",
            "--listen", f"127.0.0.1:{pa}", check=True)
    run_cli("enroll", str(tmp_path / "site"), str(b), "--role", "terminal", "--name", "B",
            "--listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}", check=True)
    procs = ProcessGroup(tmp_path / "logs")
    try:
        node_a = procs.start_node("a", a, "--no-mdns")
        procs.start_node("b", b, "--no-mdns")
        own = client.running(a).sell(500)["id"]
        _until(lambda: own in _sale_ids(b), 60, "B has A's sale")
        ballast = small_disk / "ballast"
        fill_disk(ballast)
        made = {own}
        for i in range(60):
            made.add(client.running(b).sell(100 + i, description="y" * 190)["id"])
        _until(lambda: "the disk is full" in node_a.log_tail(200) or "rolled back" in node_a.log_tail(200), 60,
               "A met the full disk")
        assert node_a.alive
        with pytest.raises(DiskFullError):
            client.running(a).sell(700)
        assert client.running(a).status()["running"]

        ballast.unlink()
        extra = client.running(a).sell(800)["id"]  # sells again at once
        made.add(extra)
        assert node_a.alive
        procs.stop("a")  # what SQLite rolled back comes back from B at the next sync
        node_a = procs.start_node("a", a, "--no-mdns")
        _until(lambda: made <= _sale_ids(a), 120, "A holds every sale again")
        _until(lambda: made <= _sale_ids(b), 60, "B holds every sale")
    finally:
        procs.stop_all()


def test_tools_on_a_stopped_node_with_a_full_disk_say_so(tmp_path: Path, small_disk: Path) -> None:
    """Opening an existing store on a full disk fails in SQLite as "disk I/O error" (its -shm file
    cannot grow): `sales` and `doctor` must still say the disk is full, not that it is damaged."""
    run_cli("site", "init", str(tmp_path / "site"), "--name", "Sagra", check=True)
    node = small_disk / "t1"
    run_cli("enroll", str(tmp_path / "site"), str(node), "--role", "terminal", "--name", "T1", check=True)
    sale = json.loads(run_cli("sell", str(node), "--amount", "1", "--cash", "--json", check=True).stdout)
    for leftover in ("meshpos.db-shm", "meshpos.db-wal"):
        (node / leftover).unlink(missing_ok=True)
    fill_disk(small_disk / "ballast")
    proc = run_cli("sales", str(node))
    assert proc.returncode == DiskFullError.exit_code and "Traceback" not in proc.stderr, proc.stderr
    _is_disk_full_message(proc.stderr)
    doctor = run_cli("doctor", str(node))
    assert "the disk is full" in doctor.stdout and "do not move it aside" in doctor.stdout
    assert "is damaged" not in doctor.stdout and "move meshpos.db" not in doctor.stdout
    (small_disk / "ballast").unlink()
    listed = json.loads(run_cli("sales", str(node), "--json", check=True).stdout)
    assert [s["id"] for s in listed] == [sale["id"]]
