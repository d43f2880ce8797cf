#!/usr/bin/env python3
"""Run every meshpos benchmark and write the results table into BENCHMARKS.md.

    python tools/bench.py              # the full set (about 20 minutes on 2 cores)
    python tools/bench.py --quick      # a smoke run of every script with small sizes (~2 minutes)
    python tools/bench.py --only mesh,settlement --no-write

Each benchmark runs as its own subprocess with --json; this script reads the last JSON line of its
output. The table in BENCHMARKS.md sits between the two `bench:` marker comments and is replaced
whole on every run (not on --quick unless --write is given); everything outside the markers is
kept. Raw outputs go to --out (default: a temporary directory, printed at the end).
All traffic stays on 127.0.0.1. The child processes import meshpos from this script's tree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench_mesh import cpu_model  # tools/ is this script's directory

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- bench:begin (written by tools/bench.py; edit outside these markers) -->"
END = "<!-- bench:end -->"

Row = tuple[str, str, str, bool | None]  # figure, goal, measured, met (None: no goal)


@dataclass
class Bench:
    name: str
    script: str
    args: list[str]
    quick: list[str]
    rows: Callable[[dict[str, Any]], list[Row]]
    timeout: float = 1800.0
    extra: list[str] = field(default_factory=list)


def ms(x: float) -> str:
    return f"{x:,.0f} ms" if x >= 100 else f"{x:.1f} ms" if x >= 10 else f"{x:.2f} ms"


def sale_rows(r: dict[str, Any]) -> list[Row]:
    return [(f"Durable sale commit (sign, seal card, SQLite FULL commit, ledger), p99 over {r['sales']:,} sales, "
             f"median of {r['runs']} runs", "p99 < 5 ms",
             f"p99 {ms(r['p99_ms'])}, median {ms(r['median_ms'])} (bare fsync {ms(r['fsync_ms'])})",
             r["p99_ms"] < 5)]


def sync_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = [
        (f"Fresh node joins a peer holding {r['sales']:,} sales: bytes on the wire (raw envelopes "
         f"{r['raw_bytes'] / 1e6:.1f} MB)", "<= 1.5 x raw bytes",
         f"{r['join_bytes'] / 1e6:.1f} MB = {r['join_bytes'] / r['raw_bytes']:.2f} x raw; plain Automerge one doc "
         f"{r['baseline_join_bytes'] / 1e6:.1f} MB = {r['baseline_join_bytes'] / r['raw_bytes']:.2f} x raw",
         r["join_bytes"] <= 1.5 * r["raw_bytes"]),
        (f"Fresh node joins a peer holding {r['sales']:,} sales, both ends in one process (in-memory link): "
         "wall time", "— (loopback row below)",
         f"{r['join_s']:.1f} s; plain Automerge one doc {r['baseline_join_s']:.1f} s", None),
    ]
    levels = sorted(r["cpu_ms_per_sale"], key=int)
    smallest = r["cpu_ms_per_sale"][levels[0]]
    for level in levels:
        ours = r["cpu_ms_per_sale"][level]
        base = r["baseline_cpu_ms_per_sale"][level]
        rows.append((f"CPU per sale propagated over one link (both ends), {int(level):,} sales in the ledger, "
                     f"median of {r['runs']} x {r['per_level']}", "<= 5 ms, not growing with the ledger",
                     f"{ms(ours)}; plain Automerge one doc {ms(base)}", ours <= 5 and ours <= 2 * smallest))
    return rows


def join_rows(r: dict[str, Any]) -> list[Row]:
    return [(f"Fresh node joins a peer holding {r['sales']:,} sales: two `meshpos run` processes, real TLS link on "
             f"loopback, median of {r['runs']} runs", "<= 10 s, <= 1.5 x raw bytes",
             f"{r['join_s']:.1f} s, {r['join_bytes'] / 1e6:.1f} MB sent = {r['join_bytes'] / r['raw_bytes']:.2f} x raw",
             r["join_s"] <= 10 and r["join_bytes"] <= 1.5 * r["raw_bytes"])]


def mesh_rows_for(label: str) -> Callable[[dict[str, Any]], list[Row]]:
    def rows(r: dict[str, Any]) -> list[Row]:
        if not r.get("samples"):
            return [(f"Sale commit -> on every node{label}", "p99 <= 500 ms", "no samples", False)]
        missing = f", {r['missing']} never arrived" if r["missing"] else ""
        runs = r.get("runs", 1)
        each = ", ".join(ms(v) for v in r.get("p99_runs_ms", [r["p99_ms"]]))
        committed = (f"; committed on every node (observer polling the SQLite files): p99 "
                     f"{ms(r['observer_p99_ms'])}" if r.get("observer_p99_ms") is not None else "")
        return [(f"Sale commit -> present on every node{label}: {r['nodes']} node processes ({r['links']} TLS links, "
                 f"diameter {r['diameter']}), {r['rate']:g} sales/s for {r['seconds']:g} s; percentiles over "
                 f"{r['samples']:,.0f} sales per run, median of {runs} run{'s' if runs > 1 else ''}", "p99 <= 500 ms",
                 f"p99 {ms(r['p99_ms'])} (runs: {each}), p50 {ms(r['p50_ms'])}, max {ms(r['max_ms'])}{missing}"
                 f"{committed}; node CPU {r['node_cpu_s_per_s']:.2f} cores ({r['node_cpu_ms_per_sale_per_node']:.2f} "
                 f"ms per sale per node); sell call p99 {ms(r['sell_p99_ms'])}",
                 r["p99_ms"] <= 500 and not r["missing"])]
    return rows


def forwarding_rows(r: dict[str, Any]) -> list[Row]:
    return [(f"Forwarding throughput end to end ({r['sales']:,} queued card sales -> switch -> ISO 8583 acquirer "
             f"answering after {r['delay_ms']} ms -> results in the ledger), median of {len(r['runs'])} runs",
             ">= 500 sales/s", f"{r['sales_per_s']:,.0f} sales/s", r["sales_per_s"] >= 500)]


def settlement_rows(r: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for phase, what in (("backlog", "backlog of {sales} offline card sales, then one node's uplink comes on"),
                        ("live", "uplink on, {rate:g} card sales/s for {seconds:g} s")):
        p = r.get(phase)
        if not p:
            continue
        desc = what.format(**p)
        if not p.get("samples"):
            out.append((f"Acquirer answer -> result on every node ({desc})", "p99 <= 1.5 s", "no samples", False))
            continue
        missing = f", {p['missing']} never arrived" if p["missing"] else ""
        out.append((f"Acquirer answer -> settlement result on every node, {r['nodes']} nodes, acquirer delay "
                    f"{r['delay_ms']} ms ({desc}); percentiles over {p['samples']:,} results", "p99 <= 1.5 s",
                    f"p99 {ms(p['p99_ms'])}, p50 {ms(p['p50_ms'])}, max {ms(p['max_ms'])}{missing}; on the "
                    f"forwarding node p99 {ms(p.get('answer_to_forwarder_p99_ms', 0))}",
                    p["p99_ms"] <= 1500 and not p["missing"]))
    return out


def acquirer_rows(r: dict[str, Any]) -> list[Row]:
    return [(f"ISO 8583 advices through one link, host answering after {r['delay_ms']} ms ({r['count']:,} advices), "
             f"median of {len(r['runs'])} runs", "—", f"{r['advices_per_s']:,.0f} advices/s", None)]


def idle_rows(r: dict[str, Any]) -> list[Row]:
    return [(f"Idle node ({r['nodes']} node processes, {r['nodes'] - 1} TLS links each, nothing sold): CPU and "
             f"wake-ups over {r['window_s']:g} s, median of {r['runs']} runs; beside an idle trio process",
             "next to nothing",
             f"{r['node_cpu_pct']:.3f} % CPU, {r['node_wakeups_per_s']:.2f} wake-ups/s "
             f"(idle trio: {r['trio_cpu_pct']:.3f} %, {r['trio_wakeups_per_s']:.2f}/s)", None)]


BENCHES = [
    Bench("sale", "tools/bench_sale.py", [], ["--sales", "300", "--runs", "1"], sale_rows),
    Bench("sync", "tools/bench_sync.py", [], ["--sales", "2000", "--levels", "1000,2000", "--per-level", "10",
                                               "--runs", "1"], sync_rows),
    Bench("join", "tools/bench_join.py", [], ["--sales", "2000", "--runs", "1"], join_rows),
    Bench("mesh", "tools/bench_mesh.py", ["--runs", "3"], ["--nodes", "6", "--rate", "10", "--seconds", "5"],
          mesh_rows_for("")),
    Bench("mesh-tmpfs", "tools/bench_mesh.py", ["--tmpdir", "/dev/shm"], [], mesh_rows_for(
        " [node directories on tmpfs: no disk fsync; diagnostic]")),
    Bench("forwarding", "tools/bench_forwarding.py", [], ["--sales", "500", "--runs", "1"], forwarding_rows),
    Bench("settlement", "tools/bench_settlement.py", [], ["--nodes", "6", "--backlog", "60", "--live-rate", "5",
                                                           "--live-seconds", "5"], settlement_rows),
    Bench("acquirer", "tools/bench_acquirer.py", [], ["--count", "1000", "--runs", "1"], acquirer_rows),
    Bench("idle", "tools/bench_idle.py", [], ["--runs", "1", "--window", "10", "--settle", "5"], idle_rows),
]
FULL_ONLY = {"mesh-tmpfs"}


def machine() -> str:
    model = cpu_model() or platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} x {model}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def code_label() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "meshpos"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" with uncommitted changes in meshpos/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MESHPOS_BENCH_CODE", "unknown")


def run_one(b: Bench, quick: bool, out_dir: Path) -> tuple[dict[str, Any] | None, str, float]:
    argv = [b.script, *b.args, *(b.quick if quick else []), "--json"]
    shown = "python " + " ".join(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    log = out_dir / f"{b.name}.log"
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=b.timeout)
        text, rc = proc.stdout, proc.returncode
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    except subprocess.TimeoutExpired as exc:
        text, rc = "", -1
        log.write_text(f"timed out after {b.timeout} s\n{exc.stdout or ''}\n{exc.stderr or ''}")
    elapsed = time.monotonic() - t0
    result = None
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    if rc != 0 or result is None:
        print(f"  {b.name}: FAILED (exit {rc}); see {log}", flush=True)
        return None, shown, elapsed
    return result, shown, elapsed


def table(rows: list[tuple[Row, str]], date: str, mach: str, code: str, quick: bool) -> str:
    lines = [BEGIN, "",
             f"Measured {date} on {mach}; code {code}." + (" QUICK smoke sizes, not the real figures." if quick
                                                            else ""), "",
             "| figure | goal | measured | met | command |", "|---|---|---|---|---|"]
    for (figure, goal, measured, met), cmd in rows:
        mark = "—" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {figure} | {goal} | {measured} | {mark} | `{cmd}` |")
    lines += ["", END]
    return "\n".join(lines)


HEADER = """# Benchmarks

Every figure with its goal and the command that measured it. Regenerate the table with
`python tools/bench.py` (all of it) or `python tools/bench.py --quick` (smoke run only).

"""


def write_md(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else HEADER + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--only", default="", help="comma-separated: " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--out", type=Path, default=None, help="directory for raw outputs and results.json")
    ap.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick or --only")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--reuse", type=Path, metavar="RESULTS_JSON",
                    help="take the results of benchmarks that a previous run's results.json holds instead of "
                         "running them again (rows are recomputed: goals may have changed)")
    args = ap.parse_args()
    previous = json.loads(args.reuse.read_text())["results"] if args.reuse else {}
    only = {x for x in args.only.split(",") if x}
    unknown = only - {b.name for b in BENCHES}
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="meshpos-bench-results-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mach, code = machine(), code_label()
    print(f"meshpos benchmarks{' (quick)' if args.quick else ''} on {mach}; results in {out_dir}", flush=True)
    rows: list[tuple[Row, str]] = []
    results: dict[str, Any] = {"date": date, "machine": mach, "code": code, "quick": args.quick, "results": {}}
    failed = 0
    for b in BENCHES:
        if only and b.name not in only:
            continue
        if args.quick and b.name in FULL_ONLY:
            continue
        print(f"- {b.name} ...", flush=True)
        if previous.get(b.name, {}).get("result") is not None:
            old = previous[b.name]
            result, cmd, elapsed = old["result"], old["command"], old["seconds"]
            print(f"  (reused from {args.reuse})", flush=True)
        else:
            result, cmd, elapsed = run_one(b, args.quick, out_dir)
        results["results"][b.name] = {"command": cmd, "seconds": elapsed, "result": result}
        if result is None:
            failed += 1
            rows.append(((b.name, "", "FAILED", False), cmd))
            continue
        for row in b.rows(result):
            rows.append((row, cmd))
            print(f"  {row[0][:90]}: {row[2]}", flush=True)
        print(f"  ({elapsed:.0f} s)", flush=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    block = table(rows, date, mach, code, args.quick)
    print()
    print(block)
    if not args.no_write and (args.write or (not args.quick and not only) or args.reuse):
        write_md(args.md, block)
        print(f"\nwrote {args.md}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
