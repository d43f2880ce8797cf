"""A started switch process settles its garbage collector (issue 16: CPU per sale).

``meshpos switch run`` freezes what it holds once started (modules, site rosters, metrics: never
garbage) and collects young objects less often (meshpos/switch/gcpolicy.py). Read from a real
process: the function's effect in a fresh interpreter, and the running switch's log line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nacl.signing
import trio

from meshpos.site.sitedir import Site
from meshpos.switch.gcpolicy import OLDER_THRESHOLDS, YOUNG_THRESHOLD
from meshpos.switch.switchdir import add_site, init_switch


def test_settle_gc_freezes_what_the_process_holds_and_collects_young_objects_less_often() -> None:
    code = ("import gc; from meshpos.switch.gcpolicy import settle_gc; "
            "before = (gc.get_freeze_count(), gc.get_threshold()); settle_gc(); "
            "print(before[0], before[1][0], gc.get_freeze_count(), *gc.get_threshold())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    frozen_before, young_before, frozen, young, middle, old = map(int, out)
    assert (frozen_before, young_before) == (0, 700)  # Python's defaults
    assert frozen > 1_000  # the imported modules, at least
    assert (young, middle, old) == (YOUNG_THRESHOLD, *OLDER_THRESHOLDS)


async def test_switch_run_settles_its_garbage_collector_once_started(
        tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey) -> None:
    sw = tmp_path / "sw"
    init_switch(sw, "127.0.0.1:0", "127.0.0.1:1", key=switch_key, acquirer_plain=True)
    add_site(sw, site.path)
    proc = subprocess.Popen([sys.executable, "-m", "meshpos.cli.switch_cmd", "run", str(sw)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
        assert "listening on port" in line
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 30) == 0
        log = proc.stderr.read()  # type: ignore[union-attr]
        assert f"garbage collector settled: young threshold {YOUNG_THRESHOLD}" in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
