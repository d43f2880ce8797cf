"""Where one running node's CPU goes, part by part: a probe ``tools/bench_mesh.py --breakdown N``
loads into its node processes (this directory first on PYTHONPATH, so Python imports this file at
start-up). Only the node whose directory is named ``$MESHPOS_CPU_PROBE_NODE`` is probed; in any
other process this file does nothing.

In the probed node, SIGUSR1 starts counting and SIGUSR2 stops it and writes ``$MESHPOS_CPU_PROBE``
(JSON): the wall and process CPU seconds in between, the main thread's CPU seconds, the thread
CPU spent in each trio task (by its function's name, one ``time.thread_time`` before and after
every task step), in trio's wait for I/O, and in a few functions of the receive path (each
inclusive of what it calls, so the parts nest: ``PARTS`` below). What it costs: two
``thread_time`` calls per task step and per call of a listed function (a few per received sale).
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

# (module, qualified name): functions timed inclusive of what they call
PARTS = (
    ("meshpos.replication.sync", "SyncSession.receive_data"),  # a read's frames, all of them
    ("meshpos.ledger.ledger", "Ledger.receive_push"),  # one PUSH into the ledger
    ("meshpos.wire.amcanon", "check_chunks"),  # ... its canonical check, before Automerge
    ("meshpos.ledger.ledger", "Ledger._after_merge"),  # ... what follows Automerge's merge:
    ("meshpos.ledger.ledger", "Ledger._fits_history"),  # ...... the history check
    ("meshpos.ledger.ledger", "Ledger._scan"),  # ...... verifying the new entries
    ("meshpos.site.roster", "Roster.verify"),  # ......... an entry's decoding, schema, signature
    ("meshpos.ledger.ledger", "Ledger._write_rows"),  # ......... its rows in SQLite
    ("meshpos.ledger.ledger", "Ledger._persist"),  # ...... the change chunk in SQLite
    ("meshpos.ledger.ledger", "Ledger._notify"),  # ...... hooks, and the pushes to the other links
    ("meshpos.wire.link", "LinkConnection.receive_data"),  # frame decoding
    ("meshpos.replication.tlsstream", "LinkTLSStream._decrypt"),
    ("meshpos.replication.sync", "SyncSession.data_to_send"),  # frames to write, encoded
    ("meshpos.status.board", "StatusBoard.received"),  # a peer's status
    ("meshpos.ledger.store", "Store.commit"),  # the group commit (its fsync runs in a thread)
)


def _install(out: Path) -> None:
    import trio

    tt = time.thread_time
    on = False
    start: dict[str, float] = {}
    parts: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    tasks: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    io = [0, 0.0]
    step = {"t": 0.0, "io": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def probe(*args: Any, **kwargs: Any) -> Any:
            if not on:
                return fn(*args, **kwargs)
            t = tt()
            try:
                return fn(*args, **kwargs)
            finally:
                part = parts[name]
                part[0] += 1
                part[1] += tt() - t
        return probe

    for module, qualname in PARTS:
        owner: Any = importlib.import_module(module)
        *path, attr = qualname.split(".")
        for name in path:
            owner = getattr(owner, name)
        setattr(owner, attr, timed(qualname, getattr(owner, attr)))

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            step["t"] = tt()

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            if on:
                entry = tasks[task.name.rsplit(".", 1)[-1]]
                entry[0] += 1
                entry[1] += tt() - step["t"]

        def before_io_wait(self, timeout: float) -> None:
            step["io"] = tt()

        def after_io_wait(self, timeout: float) -> None:
            if on:
                io[0] += 1
                io[1] += tt() - step["io"]

    def begin(signum: int, frame: Any) -> None:
        nonlocal on
        start.update(wall=time.monotonic(), cpu=time.process_time(), main=tt())
        on = True

    def end(signum: int, frame: Any) -> None:
        nonlocal on
        if not on:
            return
        on = False

        def table(d: dict[str, list[float]]) -> dict[str, list[float]]:
            return {k: [v[0], round(v[1], 6)] for k, v in sorted(d.items(), key=lambda kv: -kv[1][1])}

        result = {"wall_s": time.monotonic() - start["wall"], "process_cpu_s": time.process_time() - start["cpu"],
                  "main_thread_cpu_s": tt() - start["main"], "io_wait": [io[0], round(io[1], 6)],
                  "tasks": table(tasks), "parts": table(parts)}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(out)

    signal.signal(signal.SIGUSR1, begin)
    signal.signal(signal.SIGUSR2, end)
    run = trio.run

    def probed_run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), Steps()]
        return run(*args, **kwargs)

    trio.run = probed_run


_node = os.environ.get("MESHPOS_CPU_PROBE_NODE")
_out = os.environ.get("MESHPOS_CPU_PROBE")
if _node and _out and "run" in sys.argv and any(Path(a).name == _node for a in sys.argv[1:]):
    sys.path.insert(0, os.getcwd())  # where ``python -m`` will find meshpos: the same modules as the node's
    _install(Path(_out))
