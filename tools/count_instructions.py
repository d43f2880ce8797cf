#!/usr/bin/env python3
"""Instructions per received sale, counted by valgrind's callgrind: a figure that does not move
with the host's load, and that tells what a node's CPU time per sale is made of.

    python tools/count_instructions.py ledger [--pushes 200] [--json]
    python tools/count_instructions.py node [--rate 3] [--seconds 60] [--json]

``ledger``: the path of ``tools/bench_receive.py`` (a receiving node's ``Ledger.receive_push`` for
each PUSH of ``--pushes`` sales, a group commit every 8), run once under callgrind with only that
loop counted, and three times without valgrind for its thread CPU (the median); beside it, the
same pushes into plain Automerge documents (one per shard), counted and timed the same way. The count is the same from run to run
(within ~0.1 %: keys and ids are random), so a cut of 1 % shows, where the CPU time of
``bench_receive`` moves by more than that between two runs on a shared host.

``node``: a 4-node mesh of ``meshpos run`` processes on loopback (as ``tools/bench_mesh.py``), node
n03 sells nothing and receives every sale of the other three at ``--rate`` sales/s. The mesh runs
twice: once with n03 under callgrind (counting from the load's start to the last sale on n03, and
in an idle window of 20 s before it), once without valgrind for n03's process CPU over the same
windows. Per received sale: instructions and CPU, the idle cost per second taken off both.

Both print the instructions per sale by the library they were spent in (libpython: the Python
interpreter; _sodium: Ed25519; _automerge; libsqlite3; libcrypto: TLS...), and instructions per
nanosecond of CPU: the warm loop runs at several per ns, a node in place at a fraction of that;
what is missing is time the CPU waits for memory (caches that other processes, or other guests of
the host, filled since the node last ran).

Needs valgrind (Debian package ``valgrind``: ``valgrind``, ``callgrind_control``). Under callgrind a process runs ~50 times slower: keep ``--rate`` low.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

# the C function the counted region runs inside: ctypes' call of a function pointer, here a
# callback into Python; nothing on the receive path calls through ctypes
TOGGLE = "PyCFuncPtr_call"
IDLE_S = 20.0
PLAIN_RUNS = 3  # ledger: runs without valgrind for the CPU figure, their median
_NAMED = re.compile(r"\((\d+)\)(?: (.*))?$")
_TOTAL = re.compile(r"^(?:summary|totals):\s*(\d+)", re.M)


def by_library(callgrind_out: str) -> dict[str, int]:
    """Instructions by shared object (its file name) from a callgrind output file: the self cost
    lines of each function, under the ``ob=`` (object) they follow. Objects are named once, as
    ``ob=(N) path`` or ``cob=(N) path``, then ``ob=(N)``; a ``calls=`` line's cost line is the
    callee's inclusive cost, counted in the callee already."""
    names: dict[str, str] = {}
    out: collections.Counter[str] = collections.Counter()
    current = "???"
    after_call = False
    for line in callgrind_out.splitlines():
        if not line:
            continue
        if line[0].isdigit() or line[0] in "+-*":
            if after_call:
                after_call = False
            else:
                parts = line.split()
                if len(parts) >= 2:
                    out[current] += int(parts[1])
        elif line.startswith("ob="):
            m = _NAMED.match(line[3:])
            if m is None:
                current = Path(line[3:].strip()).name
            else:
                if m.group(2):
                    names[m.group(1)] = Path(m.group(2).strip()).name
                current = names.get(m.group(1), "???")
            current = current.split(".cpython-")[0]
        elif line.startswith("cob="):  # names an object for later ``ob=(N)`` lines too
            m = _NAMED.match(line[4:])
            if m is not None and m.group(2):
                names[m.group(1)] = Path(m.group(2).strip()).name
        elif line.startswith("calls="):
            after_call = True
    return dict(out.most_common())


def total_of(callgrind_out: str) -> int:
    """The instruction total that a callgrind output file records."""
    m = _TOTAL.search(callgrind_out)
    if m is None:
        raise SystemExit("callgrind wrote no total: is this a callgrind output file?")
    return int(m.group(1))


def read_counts(path: Path) -> tuple[int, dict[str, int]]:
    text = path.read_text(errors="replace")
    return total_of(text), by_library(text)


def need_valgrind() -> None:
    missing = [c for c in ("valgrind", "callgrind_control") if shutil.which(c) is None]
    if missing:
        raise SystemExit(f"needs valgrind: {', '.join(missing)} not found (Debian package valgrind)")


# ---- ledger: the receive path alone -------------------------------------------------------------

def child_ledger(pushes_n: int, plain: bool) -> None:
    """Run inside callgrind (or not): set up a seller and a receiver, then take every push inside
    one ctypes callback each, so that only the pushes are counted: into the receiving node's
    ledger, or (``plain``) into plain Automerge documents, one per shard. Prints the loop's
    thread CPU."""
    import automerge.core as am
    import bench_receive as br

    logging.basicConfig(level=logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="meshpos-count-"))
    try:
        seller, bootstrap, pushes, fresh = br.prepare(root, pushes_n)
        peer = seller.core.node_id
        node = fresh(0)
        docs: dict[str, am.Document] = {}
        for shard, changes in bootstrap:
            br._apply_plain(docs, shard, changes)
        store, ledger = node.core.store, node.core.ledger
        store.hold()
        at: list[Any] = [0, None]

        def take() -> None:
            i, (shard, changes) = at
            if plain:
                br._apply_plain(docs, shard, changes)
                return
            ledger.receive_push(shard, changes, peer)
            if i % 8 == 0 or i == len(pushes):
                store.flush()

        counted = ctypes.CFUNCTYPE(None)(take)
        spent = 0.0
        for i, push in enumerate(pushes, 1):
            at[0], at[1] = i, push
            t = time.thread_time()
            counted()
            spent += time.thread_time() - t
        if not plain and store.entry_count() < seller.core.store.entry_count():
            raise SystemExit("the receiver did not take every sale")
        print(json.dumps({"pushes": len(pushes), "thread_cpu_s": spent}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def count_child(pushes_n: int, plain: bool) -> tuple[int, dict[str, Any], dict[str, int]]:
    """Instructions of the counted loop, its thread CPU without valgrind (median of
    ``PLAIN_RUNS``), and the instructions by library."""
    me = [sys.executable, str(Path(__file__).resolve()), "--child-plain" if plain else "--child-ledger",
          str(pushes_n)]
    runs = [json.loads(subprocess.run(me, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for _ in range(PLAIN_RUNS)]
    timed = {"pushes": runs[0]["pushes"], "thread_cpu_s": statistics.median(r["thread_cpu_s"] for r in runs)}
    with tempfile.TemporaryDirectory(prefix="meshpos-count-") as d:
        out = Path(d) / "callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--toggle-collect={TOGGLE}",
                        f"--callgrind-out-file={out}", *me], check=True, capture_output=True, text=True)
        total, libs = read_counts(out)
    if total == 0:
        raise SystemExit(f"callgrind counted nothing inside {TOGGLE}: this Python's ctypes module "
                         "may have no symbols to toggle on")
    return total, timed, libs


def run_ledger(args: argparse.Namespace) -> dict[str, Any]:
    total, timed, libs = count_child(args.pushes, False)
    plain_total, plain_timed, _ = count_child(args.pushes, True)
    n = timed["pushes"]
    cpu_ms = timed["thread_cpu_s"] * 1000 / n
    return {"what": "ledger", "pushes": n, "instructions_per_sale": total / n, "cpu_ms_per_sale": cpu_ms,
            "instructions_per_ns": total / n / (cpu_ms * 1e6),
            "by_library_per_sale": {k: v / n for k, v in libs.items()},
            "plain_automerge_instructions_per_sale": plain_total / n,
            "plain_automerge_cpu_ms_per_sale": plain_timed["thread_cpu_s"] * 1000 / n,
            "ratio_to_plain": total / plain_total}


# ---- node: one node of a small mesh, in place ------------------------------------------------------

def mesh_pass(rate: float, seconds: float, under_callgrind: bool) -> dict[str, Any]:
    """One 4-node mesh; node n03 receives every sale. Returns its idle and load windows' CPU and,
    under callgrind, its counts (the dumps of the two windows)."""
    import bench_mesh as bm
    from meshpos.identity import keys
    from meshpos.site.nodedir import NodeDir

    n, v = 4, 3
    tmp = Path(tempfile.mkdtemp(prefix="meshpos-count-mesh-"))
    switch = keys.x25519_public_of(keys.generate())
    mesh = bm.Mesh(tmp, n, "planner", switch_key=switch.hex())
    try:
        mesh.build()
        wrap = {v: ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={tmp / 'callgrind.out'}"]} if under_callgrind else {}
        mesh.start(timeout=600, wrap=wrap)
        dbs = [NodeDir(p).db_path for p in mesh.nodes]
        time.sleep(35)  # the planner closes the links it no longer needs 30 s after its targets settle
        pid = mesh.procs.children[f"n{v:02d}"].proc.pid  # type: ignore[union-attr]

        def control(*a: str) -> None:
            if under_callgrind:
                subprocess.run(["callgrind_control", *a, str(pid)], check=True, capture_output=True)

        control("-i", "on")
        control("-z")
        c0, t0 = bm.cpu_seconds(pid), time.monotonic()
        time.sleep(IDLE_S)
        c1, t1 = bm.cpu_seconds(pid), time.monotonic()
        control("-d", "idle")
        sold = bm.run_load(mesh.nodes[:v], rate, seconds, switch, keep_alive=True)
        ok = [s for s in sold if s.sale_id]
        if not bm.wait_everywhere([dbs[v]], "sale", {f"sale/{s.sale_id}" for s in ok}, timeout=900):
            raise SystemExit("node n03 did not receive every sale")
        c2, t2 = bm.cpu_seconds(pid), time.monotonic()
        control("-d", "load")
        control("-i", "off")
        res: dict[str, Any] = {"sales": len(ok), "idle_s": t1 - t0, "idle_cpu_s": c1 - c0,
                               "load_s": t2 - t1, "load_cpu_s": c2 - c1}
        if under_callgrind:
            for window, suffix in (("idle", ".1"), ("load", ".2")):
                res[window] = read_counts(tmp / f"callgrind.out{suffix}")
        return res
    finally:
        mesh.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def run_node(args: argparse.Namespace) -> dict[str, Any]:
    print(f"mesh without valgrind, {args.rate:g} sales/s for {args.seconds:g} s...", file=sys.stderr, flush=True)
    plain = mesh_pass(args.rate, args.seconds, False)
    print("mesh with n03 under callgrind (slow)...", file=sys.stderr, flush=True)
    counted = mesh_pass(args.rate, args.seconds, True)
    (idle_total, idle_libs), (load_total, load_libs) = counted["idle"], counted["load"]
    # the idle rate over the load window taken off: what the sales themselves cost
    per_s = idle_total / counted["idle_s"]
    instructions = (load_total - per_s * counted["load_s"]) / counted["sales"]
    cpu_ms = (plain["load_cpu_s"] - plain["idle_cpu_s"] / plain["idle_s"] * plain["load_s"]) * 1000 / plain["sales"]
    libs = {k: (v - idle_libs.get(k, 0) / counted["idle_s"] * counted["load_s"]) / counted["sales"]
            for k, v in load_libs.items()}
    return {"what": "node", "rate": args.rate, "seconds": args.seconds, "sales": counted["sales"],
            "instructions_per_sale": instructions, "cpu_ms_per_sale": cpu_ms,
            "instructions_per_ns": instructions / (cpu_ms * 1e6),
            "idle_instructions_per_s": per_s, "idle_cpu_ms_per_s": plain["idle_cpu_s"] * 1000 / plain["idle_s"],
            "by_library_per_sale": dict(sorted(libs.items(), key=lambda kv: -kv[1]))}


def report(res: dict[str, Any]) -> None:
    print(f"{res['what']}: {res['instructions_per_sale'] / 1e6:.2f} M instructions per received sale, "
          f"{res['cpu_ms_per_sale']:.3f} ms CPU per sale (measured without valgrind): "
          f"{res['instructions_per_ns']:.2f} instructions per ns")
    if "plain_automerge_instructions_per_sale" in res:
        print(f"  beside it, plain Automerge (the same pushes into one document per shard): "
              f"{res['plain_automerge_instructions_per_sale'] / 1e6:.2f} M instructions, "
              f"{res['plain_automerge_cpu_ms_per_sale']:.3f} ms; x{res['ratio_to_plain']:.1f} in instructions")
    whole = res["instructions_per_sale"]
    for lib, n in list(res["by_library_per_sale"].items())[:10]:
        print(f"  {n / 1e3:8.0f} k  {100 * n / whole:5.1f} %  {lib}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("--child-ledger", "--child-plain"):
        child_ledger(int(sys.argv[2]), plain=sys.argv[1] == "--child-plain")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("ledger", "node"))
    ap.add_argument("--pushes", type=int, default=200, help="ledger: pushed sales taken in (default 200)")
    ap.add_argument("--rate", type=float, default=3.0, help="node: sales per second, site-wide (default 3)")
    ap.add_argument("--seconds", type=float, default=60.0, help="node: seconds of load (default 60)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.pushes < 1 or args.rate <= 0 or args.seconds <= 0:
        ap.error("--pushes, --rate and --seconds take positive numbers")
    need_valgrind()
    res = run_ledger(args) if args.what == "ledger" else run_node(args)
    report(res)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
