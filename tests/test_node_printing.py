"""Receipts from a running node: printer failures never block a sale; the queue prints later."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from meshpos.node import client
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for

from helpers import run_cli


@pytest.fixture
def procs(tmp_path: Path):
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop_all()


def _set_printer(node: Path, printer: dict) -> None:
    cfg = json.loads((node / "config.json").read_text())
    cfg["printer"] = printer
    (node / "config.json").write_text(json.dumps(cfg))


class FakePrinter:
    """A real TCP 'printer' on loopback that keeps every byte it receives."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.received = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    with self.lock:
                        self.received += data

    def close(self) -> None:
        self.sock.close()


def test_unreachable_printer_never_blocks_a_sale_and_prints_when_back(make_node, procs) -> None:
    node = make_node("t1")
    port = free_ports(1)[0]  # nobody listens: connection refused
    _set_printer(node, {"kind": "network", "host": "127.0.0.1", "port": port, "profile": "generic-58mm",
                        "timeout": 2})
    procs.start_node("t1", node, "--no-mdns")
    sale = client.running(node, timeout=10).sell(450, description="polenta")
    assert sale["status"] == "paid"
    wait_for(lambda: client.running(node).status()["printer"]["state"] == "unreachable", 30,
             "printer state did not become unreachable")
    assert client.running(node).status()["printer"]["queued"] >= 1
    client.running(node, timeout=10).sell(120)  # still selling
    printer = FakePrinter(port)
    try:
        wait_for(lambda: sale["id"].encode() in bytes(printer.received)
                 and client.running(node).status()["printer"]["queued"] == 0, 90,
                 "queued receipts were not printed once the printer listened again")
    finally:
        printer.close()


@pytest.mark.parametrize("printer, named", [
    ({"kind": "network", "host": "127.0.0.1", "port": 9100, "profile": "no-such-profile"}, "no-such-profile"),
    ({"kind": "network", "host": "bad host!", "port": 9100}, "bad host!"),
    ({"kind": "serial", "device": "/dev/ttyMESHPOS-NONE0"}, "/dev/ttyMESHPOS-NONE0"),
], ids=["unknown profile", "bad host", "missing device"])
def test_bad_printer_configuration_is_reported_and_the_node_keeps_selling(make_node, procs, printer: dict,
                                                                         named: str) -> None:
    node = make_node("t1")
    _set_printer(node, printer)
    procs.start_node("t1", node, "--no-mdns")
    assert client.running(node, timeout=10).sell(300)["status"] == "paid"
    proc = run_cli("status", str(node))
    assert proc.returncode == 0
    assert "misconfigured" in proc.stdout and named in proc.stdout


def test_receipt_preview_shows_pending_wording_and_last4_only(tmp_path: Path, make_node) -> None:
    node = make_node("t1", language="it")
    run_cli("sell", str(node), "--amount", "7.20", "--card", "-", check=True,
            input="5555555555554444\n")
    sale_id = json.loads(run_cli("sales", str(node), "--json", check=True).stdout)[0]["id"]
    out = run_cli("receipt", str(node), sale_id, "--preview", check=True).stdout
    assert sale_id in out and "7,20 EUR" in out and "**** 4444" in out  # Italian decimal comma
    assert "5555555555554444" not in out
    assert "autorizzazione" in out.lower()
