"""A process that checks a printer profile and renders a receipt leaves nothing in its temporary
directory. python-escpos alone leaves a directory with a ~76 kB pickle per process
(meshpos.devices.escpos_import says why). A pickle directory the operator names is used as it
is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RENDER = """
import os
from meshpos.devices.escpos_import import PICKLE_DIR_VAR
from meshpos.devices.profiles import load_printer_profile
from meshpos.devices.receipts import ReceiptData, ReceiptOptions, render_bytes

profile = load_printer_profile("generic-80mm")  # checks the profile against python-escpos's database
data = ReceiptData(sale_id="S-1", site_name="Fair", terminal_name="Till 1", created_at_ms=1_767_225_600_000,
                   amount_minor=250, currency="EUR", method="cash", status="approved")
raw = render_bytes(data, ReceiptOptions(profile, "en", "UTC"))
assert b"2.50" in raw, raw
print(os.environ.get(PICKLE_DIR_VAR, "unset"))
"""


def _run(tmp_dir: Path, pickle_dir: Path | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ESCPOS_CAPABILITIES_PICKLE_DIR"}
    env["TMPDIR"] = str(tmp_dir)
    if pickle_dir is not None:
        env["ESCPOS_CAPABILITIES_PICKLE_DIR"] = str(pickle_dir)
    done = subprocess.run([sys.executable, "-c", RENDER], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_rendering_a_receipt_leaves_nothing_in_the_temporary_directory(tmp_path: Path) -> None:
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    for _ in range(2):
        assert _run(tmp_dir, None) == "unset"
    assert list(tmp_dir.iterdir()) == []


def test_a_pickle_directory_the_operator_set_is_used_as_it_is(tmp_path: Path) -> None:
    tmp_dir = tmp_path / "tmp"
    cache = tmp_path / "cache"
    tmp_dir.mkdir()
    cache.mkdir()
    assert _run(tmp_dir, cache) == str(cache)
    assert [p.name.endswith(".capabilities.pickle") for p in cache.iterdir()] == [True]
    pickle = next(cache.iterdir())
    before = pickle.stat().st_mtime_ns
    assert _run(tmp_dir, cache) == str(cache)
    assert pickle.stat().st_mtime_ns == before  # read, not written again
    # python-escpos's own mkdtemp() still runs (an empty directory); nothing else is left
    assert all(p.is_dir() and not any(p.iterdir()) for p in tmp_dir.iterdir())
