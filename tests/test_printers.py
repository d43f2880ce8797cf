"""Printer configs, transports, the durable spool and its worker.

Network tests use real TCP on 127.0.0.1 and trio's real clock with short
deadlines (a MockClock would jump over the deadlines while the kernel moves
bytes); they wait for state changes, never for a time. Back-off and hung
printers are tested against in-memory printers under MockClock(autojump).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from meshpos.wire import canonical
from meshpos.infra.clock import FakeClock
from meshpos.devices.printers import (
    STATUS_QUERY,
    PrinterConfig,
    PrinterTiming,
    PrinterUnreachableError,
    load_printer_config,
    open_printer,
    status_condition,
)
from meshpos.devices.receipts import ReceiptData, ReceiptOptions, render_bytes
from meshpos.devices.spool import PrinterStatus, PrinterWorker, Spool, run_printer_worker
from meshpos.domain.errors import PrinterError


FAST = PrinterTiming(connect_timeout=5.0, status_timeout=0.2, io_timeout=0.5, backoff_initial=0.01,
                     backoff_max=0.05)
GUARD = 60  # only against a hang; no test waits on it


SALE_ID = "S-01JH4K2Z9QX7"
PENDING = ReceiptData(
    sale_id=SALE_ID, site_name="Fiera di Primavera", terminal_name="Cassa 1", created_at_ms=1_767_225_600_000,
    amount_minor=990, currency="EUR", method="card", status="pending", card_brand="mastercard",
    card_last4="4444", entry_mode="chip", offline_deadline_ms=1_767_312_000_000,
)


def free_port() -> int:
    """A port on 127.0.0.1 that refuses connections: bound once, then closed."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def net_cfg(port: int, **extra: object) -> dict[str, object]:
    return {"kind": "network", "host": "127.0.0.1", "port": port, "profile": "generic-58mm", **extra}


def job_bytes() -> bytes:
    cfg = load_printer_config(net_cfg(9100))
    return render_bytes(PENDING, ReceiptOptions.for_printer(cfg, "en"))


class FakePrinterServer:
    """A port-9100 printer on 127.0.0.1: reads until EOF; optionally answers DLE EOT, or stalls."""

    def __init__(self, *, answers_status: bool = False, paper_out: bool = False, cover_open: bool = False,
                 stall: bool = False) -> None:
        self.answers_status = answers_status
        self.paper_out = paper_out
        self.cover_open = cover_open
        self.stall = stall
        self.received = bytearray()
        self.connections = 0
        self.stalled = trio.Event()

    def answer(self, n: int) -> bytes:
        if n == 2:
            return bytes([0x12 | (0x04 if self.cover_open else 0) | (0x20 if self.paper_out else 0)])
        return bytes([0x12 | (0x60 if self.paper_out else 0)])

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            if self.stall:
                self.stalled.set()
                await trio.sleep_forever()
            seen = len(self.received)
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not chunk:
                    return  # the client is done: close, as raw port-9100 servers do
                self.received += chunk
                if self.answers_status:
                    while (i := self.received.find(b"\x10\x04", max(seen - 2, 0))) >= 0 and i + 2 < len(self.received):
                        await stream.send_all(self.answer(self.received[i + 2]))
                        seen = i + 3

    async def serve(self, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started()


async def start_server(nursery: trio.Nursery, server: FakePrinterServer, port: int) -> trio.CancelScope:
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await server.serve(port, task_status=task_status)

    await nursery.start(run)
    return scope


async def wait(worker: PrinterWorker, predicate: Callable[[PrinterStatus], bool]) -> PrinterStatus:
    with trio.fail_after(GUARD):
        return await worker.wait_until(predicate)


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"kind": "network", "host": "10.0.0.5", "profile": "tm-9000"}, r"unknown printer profile 'tm-9000'"),
        ({"kind": "network", "host": "http://printer:9100"}, r"printer host 'http://printer:9100' is neither"),
        ({"kind": "network", "host": "bad host"}, "is neither an IP address nor a valid host name"),
        ({"kind": "network", "host": "a..b"}, "is neither"),
        ({"kind": "network", "host": "printer-1\n"}, "is neither"),
        ({"kind": "network"}, "needs 'host'"),
        ({"kind": "network", "host": "10.0.0.5", "port": 70000}, "port 70000"),
        ({"kind": "bluetooth"}, r"unknown printer kind 'bluetooth': use one of usb, network, serial, file, dummy"),
        ({}, "unknown printer kind None"),
        ({"kind": "serial", "device": "/dev/ttyNOPE9"}, "printer device file /dev/ttyNOPE9 does not exist"),
        ({"kind": "file", "path": "/dev/usb/lp-nope"}, "printer device file /dev/usb/lp-nope does not exist"),
        ({"kind": "file", "path": "/nonexistent-dir/out.bin"}, "folder of printer file"),
        ({"kind": "usb", "vendor_id": "0x04b8"}, "needs 'product_id'"),
        ({"kind": "usb", "vendor_id": "zz", "product_id": 1}, "needs 'vendor_id'"),
        ({"kind": "network", "host": "10.0.0.5", "hots": "x"}, r"unknown setting\(s\) for a network printer: hots"),
        ({"kind": "serial", "device": "/dev/null", "baudrate": 1234}, "baudrate 1234"),
    ],
)
def test_bad_printer_config_is_a_clear_printer_error(cfg: dict[str, object], message: str) -> None:
    with pytest.raises(PrinterError, match=message):
        load_printer_config(cfg)


def test_good_printer_configs(tmp_path: Path) -> None:
    net = load_printer_config({"kind": "network", "host": "printer-1.local", "profile": "epson-tm-t20-80mm",
                               "tz": "Europe/Rome"})
    assert (net.host, net.port, net.profile.chars_per_line, net.tz) == ("printer-1.local", 9100, 48, "Europe/Rome")
    usb = load_printer_config({"kind": "usb", "vendor_id": "0x04b8", "product_id": 3605})
    assert (usb.vendor_id, usb.product_id, usb.profile.name) == (0x04B8, 0x0E15, "generic-80mm")
    ser = load_printer_config({"kind": "serial", "device": "/dev/null", "baudrate": 19200, "profile": "generic-58mm"})
    assert (ser.device, ser.baudrate, ser.profile.chars_per_line) == ("/dev/null", 19200, 32)
    assert load_printer_config({"kind": "file", "path": str(tmp_path / "out.bin")}).device == str(tmp_path / "out.bin")
    assert load_printer_config({"kind": "dummy"}).kind == "dummy"
    assert load_printer_config({"kind": "network", "host": "::1"}).host == "::1"


def test_status_answers() -> None:
    assert status_condition(b"\x12\x12") == "ok"
    assert status_condition(b"\x16\x12") == "cover_open"
    assert status_condition(b"\x32\x12") == "paper_out"
    assert status_condition(b"\x12\x72") == "paper_out"
    assert status_condition(b"\x12\x1e") == "ok"  # near end is not out
    assert status_condition(b"") is None
    assert status_condition(b"\xff\xff") is None  # not a DLE EOT answer


# --- the spool -----------------------------------------------------------------------


def test_a_stray_file_named_with_other_digits_does_not_stop_the_spool(tmp_path: Path) -> None:
    """A job file whose name begins with digits of another script ("²".isdigit() is true, and
    int("²") raises) stopped the spool, and so the node, from opening."""
    spool = Spool(tmp_path)
    a = spool.enqueue(sale_id="S-1", copy="customer", data=b"one", created_at_ms=1)
    for name in ("\u00b2-stray.job", "\u0663-stray.job"):
        (tmp_path / "spool" / name).write_bytes(b"?")
    again = Spool(tmp_path)
    b = again.enqueue(sale_id="S-2", copy="customer", data=b"two", created_at_ms=2)
    assert b.job_id > a.job_id and b.job_id[:12].isdigit()


def test_spool_is_durable_and_ordered(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a = spool.enqueue(sale_id="S-1", copy="customer", data=b"one", created_at_ms=1, receipt=PENDING)
    b = spool.enqueue(sale_id="S/2 ../x", copy="merchant", data=b"two", created_at_ms=2)
    assert sorted(os.listdir(tmp_path / "spool")) == [a.job_id + ".job", b.job_id + ".job"]
    assert "/" not in b.job_id and ".." not in b.job_id
    (tmp_path / "spool" / ".000000000099-x-customer.job.4242.tmp").write_bytes(b"half a jo")
    (tmp_path / "spool" / ".tmp-000000000098-x-customer.job").write_bytes(b"half a jo")  # older versions'
    again = Spool(tmp_path)  # after a crash / restart
    assert again.job_ids() == [a.job_id, b.job_id]
    assert sorted(os.listdir(tmp_path / "spool")) == [a.job_id + ".job", b.job_id + ".job"]
    first = again.peek()
    assert first is not None and first.data == b"one" and first.receipt == PENDING
    again.remove(a.job_id)
    c = again.enqueue(sale_id="S-3", copy="customer", data=b"three", created_at_ms=3)
    assert again.job_ids() == [b.job_id, c.job_id]
    assert c.job_id > b.job_id


def test_corrupt_job_is_moved_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    bad = spool.enqueue(sale_id="S-1", copy="customer", data=b"one", created_at_ms=1)
    good = spool.enqueue(sale_id="S-2", copy="customer", data=b"two", created_at_ms=2)
    (tmp_path / "spool" / f"{bad.job_id}.job").write_bytes(b"{not json")
    job = spool.peek()
    assert job is not None and job.job_id == good.job_id
    assert (tmp_path / "spool" / "corrupt" / f"{bad.job_id}.job").exists()
    assert len(spool) == 1


def test_job_file_is_canonical_json(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    job = spool.enqueue(sale_id=SALE_ID, copy="customer", data=b"\x1b@x", created_at_ms=5, receipt=PENDING)
    obj = canonical.decode((tmp_path / "spool" / f"{job.job_id}.job").read_bytes())
    assert obj["sale_id"] == SALE_ID and obj["escpos"] == "G0B4" and obj["receipt"]["card_last4"] == "4444"


# --- network printers over real TCP --------------------------------------------------


async def test_unreachable_printer_keeps_the_job_then_prints_when_it_listens(tmp_path: Path) -> None:
    port = free_port()
    spool = Spool(tmp_path)
    data = job_bytes()
    async with trio.open_nursery() as nursery:
        worker: PrinterWorker = await nursery.start(
            lambda task_status: run_printer_worker(spool, net_cfg(port), FakeClock(), timing=FAST,
                                                   task_status=task_status))
        job = spool.enqueue(sale_id=SALE_ID, copy="customer", data=data, created_at_ms=1)
        # enqueue returned with the job on disk, before any print attempt could finish
        assert (tmp_path / "spool" / f"{job.job_id}.job").exists()
        status = await wait(worker, lambda s: s.state == "unreachable")
        assert status.queued == 1 and "cannot connect" in (status.last_error or "")
        assert spool.job_ids() == [job.job_id]

        server = FakePrinterServer()
        await start_server(nursery, server, port)
        status = await wait(worker, lambda s: s.queued == 0)
        assert status.state == "ok" and status.printed == 1
        assert data in bytes(server.received)
        assert not os.listdir(tmp_path / "spool")
        nursery.cancel_scope.cancel()


async def test_stalled_printer_times_out_keeps_the_job_and_prints_later(tmp_path: Path) -> None:
    port = free_port()
    spool = Spool(tmp_path)
    data = job_bytes()
    spool.enqueue(sale_id=SALE_ID, copy="customer", data=data, created_at_ms=1)
    async with trio.open_nursery() as nursery:
        staller = FakePrinterServer(stall=True)
        stall_scope = await start_server(nursery, staller, port)
        worker: PrinterWorker = await nursery.start(
            lambda task_status: run_printer_worker(spool, net_cfg(port), FakeClock(), timing=FAST,
                                                   task_status=task_status))
        status = await wait(worker, lambda s: s.state == "unreachable")
        assert "stalled" in (status.last_error or "")
        assert status.queued == 1 and staller.connections >= 1 and not staller.received

        stall_scope.cancel()
        good = FakePrinterServer()
        await start_server(nursery, good, port)
        status = await wait(worker, lambda s: s.queued == 0)
        assert status.state == "ok"
        assert data in bytes(good.received)
        nursery.cancel_scope.cancel()


async def test_paper_out_keeps_the_job_until_paper_is_back(tmp_path: Path) -> None:
    port = free_port()
    spool = Spool(tmp_path)
    data = job_bytes()
    # generous status deadline: this printer always answers, so it is never waited out
    timing = dataclasses.replace(FAST, status_timeout=30.0, io_timeout=30.0)
    async with trio.open_nursery() as nursery:
        printer = FakePrinterServer(answers_status=True, paper_out=True)
        await start_server(nursery, printer, port)
        worker: PrinterWorker = await nursery.start(
            lambda task_status: run_printer_worker(spool, net_cfg(port), FakeClock(), timing=timing,
                                                   task_status=task_status))
        spool.enqueue(sale_id=SALE_ID, copy="customer", data=data, created_at_ms=1)
        status = await wait(worker, lambda s: s.state == "paper_out")
        assert status.queued == 1 and "out of paper" in (status.last_error or "")
        assert data not in bytes(printer.received)  # nothing sent but the status query

        printer.paper_out, printer.cover_open = False, True
        status = await wait(worker, lambda s: s.state == "cover_open")
        assert status.queued == 1

        printer.cover_open = False
        status = await wait(worker, lambda s: s.queued == 0)
        assert status.state == "ok"
        received = bytes(printer.received)
        # the job, then the status query whose answer confirmed the printer read all of it
        assert data + STATUS_QUERY in received
        nursery.cancel_scope.cancel()


async def test_network_printer_direct_errors() -> None:
    cfg = load_printer_config(net_cfg(free_port()))
    with pytest.raises(PrinterUnreachableError, match="cannot connect to printer at 127.0.0.1"):
        await open_printer(cfg, FAST).print_job(b"x")


# --- escpos-backed printers -----------------------------------------------------------


async def test_file_printer_through_python_escpos(tmp_path: Path) -> None:
    out = tmp_path / "lp0"
    spool = Spool(tmp_path / "node")
    data = job_bytes()
    async with trio.open_nursery() as nursery:
        worker: PrinterWorker = await nursery.start(
            lambda task_status: run_printer_worker(spool, {"kind": "file", "path": str(out), "profile": "generic-58mm"},
                                                   FakeClock(), timing=FAST, task_status=task_status))
        spool.enqueue(sale_id=SALE_ID, copy="customer", data=data, created_at_ms=1)
        await wait(worker, lambda s: s.queued == 0)
        assert out.read_bytes() == data
        assert worker.status().printer == f"file printer {out} (generic-58mm)"
        nursery.cancel_scope.cancel()


async def test_dummy_printer_and_enqueue_receipt(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    cfg = load_printer_config({"kind": "dummy", "profile": "generic-58mm"})
    async with trio.open_nursery() as nursery:
        worker: PrinterWorker = await nursery.start(
            lambda task_status: run_printer_worker(spool, cfg, FakeClock(), timing=FAST, task_status=task_status))
        opts = ReceiptOptions.for_printer(cfg, "it")
        spool.enqueue_receipt(PENDING, opts, "customer", FakeClock())
        spool.enqueue_receipt(PENDING, opts, "merchant", FakeClock())
        await wait(worker, lambda s: s.printed == 2)
        printer = worker.printer
        assert printer is not None
        output: bytes = printer.output  # type: ignore[attr-defined]
        assert output == render_bytes(PENDING, opts, "customer") + render_bytes(PENDING, opts, "merchant")
        assert b"AUTORIZZAZIONE IN ATTESA" in output
        nursery.cancel_scope.cancel()


# --- the worker's back-off and deadlines, on a MockClock -------------------------------


class FlakyPrinter:
    def __init__(self, failures: int, hang: bool = False) -> None:
        self.failures = failures
        self.hang = hang
        self.attempts: list[float] = []
        self.printed: list[bytes] = []

    async def print_job(self, data: bytes) -> str:
        self.attempts.append(trio.current_time())
        if len(self.attempts) <= self.failures:
            if self.hang:
                await trio.sleep_forever()
            raise PrinterUnreachableError("no route to printer")
        self.printed.append(data)
        return "ok"


async def test_backoff_doubles_up_to_the_cap(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    timing = PrinterTiming(backoff_initial=1.0, backoff_max=8.0)
    fake = FlakyPrinter(failures=6)
    spool = Spool(tmp_path)
    cfg = load_printer_config({"kind": "dummy"})
    async with trio.open_nursery() as nursery:
        worker: PrinterWorker = await nursery.start(
            lambda task_status: run_printer_worker(spool, cfg, FakeClock(), timing=timing,
                                                   printer_factory=lambda c, t: fake, task_status=task_status))
        start = trio.current_time()
        spool.enqueue(sale_id="S-1", copy="customer", data=b"a", created_at_ms=1)
        spool.enqueue(sale_id="S-2", copy="customer", data=b"b", created_at_ms=2)
        await wait(worker, lambda s: s.queued == 0)
        gaps = [round(b - a, 6) for a, b in zip([start] + fake.attempts, fake.attempts)]
        assert gaps == [0, 1, 2, 4, 8, 8, 8, 0]  # and the next job goes at once
        assert fake.printed == [b"a", b"b"]
        nursery.cancel_scope.cancel()


async def test_hung_printer_never_blocks_a_sale(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    fake = FlakyPrinter(failures=1, hang=True)
    spool = Spool(tmp_path)
    async with trio.open_nursery() as nursery:
        worker: PrinterWorker = await nursery.start(
            lambda task_status: run_printer_worker(spool, load_printer_config({"kind": "dummy"}), FakeClock(),
                                                   timing=FAST, printer_factory=lambda c, t: fake,
                                                   task_status=task_status))
        spool.enqueue(sale_id="S-1", copy="customer", data=b"a", created_at_ms=1)
        status = await wait(worker, lambda s: s.state == "unreachable")
        assert "did not finish the job" in (status.last_error or "") and status.queued == 1
        # the sale path keeps going while the printer hangs
        spool.enqueue(sale_id="S-2", copy="customer", data=b"b", created_at_ms=2)
        await wait(worker, lambda s: s.queued == 0)
        assert fake.printed == [b"a", b"b"]
        nursery.cancel_scope.cancel()


async def test_misconfigured_printer_shows_in_status_and_keeps_jobs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spool = Spool(tmp_path)
    spool.enqueue(sale_id="S-1", copy="customer", data=b"a", created_at_ms=1)
    cfg = {"kind": "serial", "device": str(tmp_path / "ttyUSB0"), "profile": "generic-58mm"}
    fake = FlakyPrinter(failures=0)
    async with trio.open_nursery() as nursery:
        worker: PrinterWorker = await nursery.start(
            lambda task_status: run_printer_worker(spool, cfg, FakeClock(), timing=FAST,
                                                   printer_factory=lambda c, t: fake, task_status=task_status))
        status = worker.status()
        assert status.state.startswith("misconfigured: ") and "does not exist" in status.state
        assert status.queued == 1
        await trio.sleep(FAST.backoff_max * 3)
        assert worker.status().queued == 1
        (tmp_path / "ttyUSB0").touch()  # the adapter gets plugged in
        await wait(worker, lambda s: s.queued == 0)
        assert worker.status().state == "ok" and fake.printed == [b"a"]
        assert worker.status().to_json()["printed"] == 1
        nursery.cancel_scope.cancel()


def test_printer_config_describe() -> None:
    cfg: PrinterConfig = load_printer_config(net_cfg(9100))
    assert cfg.describe() == "network printer 127.0.0.1:9100 (generic-58mm)"


@pytest.mark.parametrize("name", ["terminal", "gateway", "inspector"])
def test_example_node_configs_are_valid(name: str) -> None:
    import json

    from meshpos.devices.profiles import devices_dir
    from meshpos.site.nodedir import NodeConfig

    path = devices_dir() / "examples" / f"{name}.json"
    data = json.loads(path.read_text())
    cfg = NodeConfig.from_json(data, str(path))
    assert cfg.role == name
    if cfg.printer is not None:
        printer = dict(cfg.printer)
        if printer["kind"] == "usb":
            assert load_printer_config(printer).vendor_id
        else:
            assert load_printer_config(printer).profile.name == printer["profile"]
        ReceiptOptions.for_printer(load_printer_config(printer), cfg.language)
