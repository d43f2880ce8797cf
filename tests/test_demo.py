"""`meshpos demo`: runs to a zero exit twice in the same folder, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import is_scrypt_hash_of
from meshpos.site.cashierpin import pin_matches, read_pin_hash

pytestmark = pytest.mark.slow


def _demo(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "meshpos.cli.main", "demo", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def test_demo_runs_twice_in_a_row_with_every_sale_final(tmp_path: Path) -> None:
    out = tmp_path / "fair"
    for _ in range(2):
        proc = _demo(out, "--terminals", "3", "--sales", "12")
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        assert "every sale is final on every node" in output
        # 17 sales, 6 of them cash (one voided): cash is final when taken, never counted pending
        assert "sales (card pending 11, cash paid 5, voided 1)" in output, output
        assert "0 advised twice" in output
        # the cashier app of terminal 1: its address and the PIN that opens it (only its hash is kept)
        line = next(x for x in output.splitlines() if x.startswith("cashier app of terminal-1: http://127.0.0.1:"))
        pin = line.rsplit("PIN ", 1)[1]
        stored = read_pin_hash(out / "terminal-1" / "cashier-pin")
        assert stored is not None and pin_matches(stored, pin) and is_scrypt_hash_of(stored, pin)
        # every node's terminal API on an address of its own (none competes for the default port)
        apis = [json.loads((out / name / "config.json").read_text()).get("api")
                for name in ("gateway", "terminal-1", "terminal-2", "terminal-3")]
        assert all(apis) and len(set(apis)) == len(apis), apis
        receipts = sorted(p.name for p in (out / "receipts").iterdir())
        assert "terminal-1.escpos" in receipts and "terminal-1.txt" in receipts
        text = (out / "receipts" / "terminal-1.txt").read_text()
        assert "Ref " in text and "****" in text
    assert _processes_mentioning(str(out)) == []


def test_ctrl_c_stops_the_demo_and_every_process_it_started(tmp_path: Path) -> None:
    out = tmp_path / "fair"
    proc = _demo(out)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        seen.append(line)
        if "started" in line and "nodes" in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    assert _processes_mentioning(str(out)), "the demo should have started its processes"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in rest, rest
    deadline = time.monotonic() + 15
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(out)) == []
