"""Card data audit: after a whole demo fair, no file the run produced holds a full card number.

Every file under the demo folder is scanned (node databases with their WAL and shm files, logs,
receipts, spools, the switch database, the acquirer simulator's rules and stats), for each test
PAN as ASCII, UTF-16 (LE and BE) and hex (both cases). The test of the test plants a PAN in each
form into a copy of a file and shows the scanner finds it.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from helpers import TEST_PANS, run_cli

PANS = [p.encode() for p in TEST_PANS]
# The acquirer host's own configuration, written by the demo harness to tell the simulated issuer
# which card to decline: input of the card network's side, not a file meshpos produced.
ACQUIRER_SIDE_INPUT = {"acquirer-rules.json"}


def forms(pan: bytes) -> list[bytes]:
    text = pan.decode()
    return [pan, text.encode("utf-16-le"), text.encode("utf-16-be"), pan.hex().encode(), pan.hex().upper().encode()]


def scan(root: Path, skip: frozenset[str] = frozenset()) -> tuple[int, list[str]]:
    """(files scanned, hits) over every regular file under ``root`` (but the ``skip`` names)."""
    needles = [(pan, form) for pan in PANS for form in forms(pan)]
    files, hits = 0, []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink() or str(path.relative_to(root)) in skip:
            continue
        files += 1
        data = path.read_bytes()
        for pan, form in needles:
            if form in data:
                hits.append(f"{path.relative_to(root)}: PAN ending {pan[-4:].decode()} as {form[:10]!r}...")
    return files, hits


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "demo"
    proc = run_cli("demo", "--out", str(out), "--terminals", "3", "--sales", "12")
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def test_no_full_card_number_anywhere_after_a_demo(demo_run: Path) -> None:
    out = demo_run
    # what the run must have produced, so the scan is not vacuous
    dbs = sorted(out.rglob("meshpos.db"))
    assert len(dbs) == 4, dbs
    assert (out / "switch" / "switch.db").exists()
    assert (out / "acquirer-stats.json").exists()
    assert list((out / "logs").glob("*.log")) and list((out / "receipts").glob("*"))
    # the card sales really went through: the switch holds their (sealed) envelopes
    conn = sqlite3.connect(out / "switch" / "switch.db")
    try:
        card_sales = sum(1 for (raw,) in conn.execute("SELECT sale_raw FROM sales") if b'"card":{' in bytes(raw))
    finally:
        conn.close()
    assert card_sales >= 4
    files, hits = scan(out, frozenset(ACQUIRER_SIDE_INPUT))
    assert files >= 30
    assert hits == [], "full card numbers found:\n" + "\n".join(hits)


def test_the_scanner_finds_a_planted_card_number(demo_run: Path, tmp_path: Path) -> None:
    """Test of the test: each form of each PAN, planted in a copy of a real file, is found."""
    copy = tmp_path / "copy"
    shutil.copytree(demo_run / "logs", copy)
    victim = sorted(copy.glob("*.log"))[0]
    original = victim.read_bytes()
    for pan in PANS:
        for form in forms(pan):
            victim.write_bytes(original[: len(original) // 2] + form + original[len(original) // 2:])
            _, hits = scan(copy)
            assert len(hits) >= 1 and victim.name in hits[0], (pan, form)
    victim.write_bytes(original)
    assert scan(copy)[1] == []
