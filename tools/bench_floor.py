#!/usr/bin/env python3
"""The floor under the 1 ms goal: what a received sale costs a mesh node when only the libraries'
work is left, measured in place, beside ``tools/bench_mesh.py``.

    python tools/bench_floor.py                      # 20 processes, 40 sales/s for 60 s
    python tools/bench_floor.py --nodes 6 --seconds 30 --json
    python tools/bench_floor.py --callgrind --nodes 4 --rate 4 --seconds 20

Issue 15 asks for at most 1 ms of CPU per sale per node in the 20-node benchmark. The Python node
spends ~1.8 ms, and the measurements in BENCHMARKS.md leave a node written in a compiled language
as the one route whose arithmetic reaches 1 ms. This tool measures that arithmetic's floor instead
of estimating it: ``tools/floor_node/floor_node.c`` (built here with the system's C compiler) does,
in C, the library work a node does for every sale it receives, and nothing else:

- mutually authenticated TLS 1.3 links over loopback (OpenSSL; Ed25519 certificates of one CA, as
  meshpos's node certificates; the links of the product's ring planner,
  ``meshpos.replication.planner.ring_targets``, as ``bench_mesh`` gives its nodes);
- for every sale received: the frame read, a copy it has dropped, the origin's Ed25519 signature
  verified (libsodium), the sale stored in SQLite (WAL; the entry, the sale's row and a change
  chunk: three inserts, as meshpos's store; a group commit with fsync every 50 ms) and pushed on to
  its children in the origin's breadth-first tree over the links (what meshpos's push trees settle
  into: each sale arrives about once);
- each process also sells at its share of the site's rate (a ~400-byte body, signed).

Left out, so the figure is a floor, not a node: Automerge's merge and the canonical and history
checks of a change, the envelope's decoding and schema, the statuses, the terminal API that takes
a node's own sales. The same command line as ``bench_mesh`` (``--nodes --rate --seconds``) makes
the two figures comparable: CPU of every process from the load's start to its last sale received,
summed, per site sale and per node.

``--callgrind``: node 0's instructions per site sale, counted by valgrind's callgrind in two runs
of ``--seconds`` and three times that (the difference: start-up and link set-up cancel out), by
library, beside its CPU per site sale in a run of the longer length without valgrind: the
instructions per ns a compiled node runs at in place, to set beside the Python node's
(``tools/count_instructions.py node``). Keep the rate low: under callgrind a process runs ~50 times
slower.

Needs a C compiler and the headers of OpenSSL, libsodium and SQLite (Debian: gcc, libssl-dev,
libsodium-dev, libsqlite3-dev; ``.ci/run`` installs them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
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

from cryptography.hazmat.primitives import serialization  # noqa: E402

from bench_mesh import pct  # noqa: E402
from meshpos.apps.procs import free_ports  # noqa: E402
from meshpos.identity import certs, keys  # noqa: E402
from meshpos.replication.planner import ring_targets  # noqa: E402

SOURCE = TOOLS / "floor_node" / "floor_node.c"
LIBS = ("-lssl", "-lcrypto", "-lsodium", "-lsqlite3", "-lpthread")


def build(out_dir: Path) -> Path:
    """Compile floor_node.c into ``out_dir``; a clear error when the compiler or a header is missing."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench_floor: no C compiler (Debian: apt-get install gcc)")
    exe = out_dir / "floor_node"
    done = subprocess.run([cc, "-O2", "-o", str(exe), str(SOURCE), *LIBS], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit("bench_floor: floor_node.c does not build (Debian: libssl-dev libsodium-dev "
                         f"libsqlite3-dev):\n{done.stderr.strip()}")
    return exe


def links(n: int) -> dict[int, list[int]]:
    """Node i -> the nodes it dials: the product's ring planner over n ids (one dial per pair)."""
    ids = [f"n{i:02d}" for i in range(n)]
    index = {nid: i for i, nid in enumerate(ids)}
    dials: dict[int, list[int]] = {i: [] for i in range(n)}
    pairs: set[tuple[int, int]] = set()
    for i, nid in enumerate(ids):
        for j in sorted(index[t] for t in ring_targets(nid, set(ids))):
            if (min(i, j), max(i, j)) not in pairs:
                pairs.add((min(i, j), max(i, j)))
                dials[i].append(j)
    return dials


def node_file(root: Path, i: int, suffix: str) -> Path:
    """Node i's file of a run: .pem .key (its certificate and key), .db, .json (its result), .log."""
    return root / f"n{i:02d}{suffix}"


def credentials(root: Path, n: int) -> tuple[Path, list[tuple[Path, Path]]]:
    """A CA and n node certificates (Ed25519, as a site's), written as PEM files under ``root``."""
    now = int(time.time() * 1000)
    ca_key = keys.generate()
    ca = certs.make_ca("floor", ca_key, now)
    ca_path = root / "ca.pem"
    ca_path.write_bytes(certs.to_pem(ca))
    out = []
    for i in range(n):
        key = keys.generate()
        cert = certs.issue(ca, ca_key, bytes(key.verify_key), "terminal", f"F{i:02d}", now, 1)
        cert_path, key_path = node_file(root, i, ".pem"), node_file(root, i, ".key")
        cert_path.write_bytes(certs.to_pem(cert))
        key_path.write_bytes(keys.to_crypto_private(key).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        key_path.chmod(0o600)
        out.append((cert_path, key_path))
    return ca_path, out


def propagation(root: Path, nodes: int) -> list[float]:
    """For each sale, ms from its signing to its being stored on the last node (one host clock)."""
    spread: dict[tuple[int, int], int] = {}  # (origin, seq) -> the latest received_at - at so far
    for i in range(nodes):
        with sqlite3.connect(node_file(root, i, ".db")) as db:
            for origin, seq, delay in db.execute(
                    "SELECT e.origin, e.seq, e.received_at - s.at FROM entries e JOIN sales s USING (origin, seq)"):
                spread[(origin, seq)] = max(spread.get((origin, seq), delay), delay)
    return sorted(float(d) for d in spread.values())


def run(exe: Path, root: Path, nodes: int, rate: float, seconds: float,
        forge: tuple[int, int] | None = None, timeout: float = 90.0,
        wrap: dict[int, list[str]] | None = None) -> dict[str, Any]:
    """One run: ``nodes`` processes, ``rate`` sales/s for the site; ``forge`` = (node, every K):
    that node changes every K-th sale after signing it (the others must refuse those); ``wrap``:
    node -> the command its process runs under (valgrind)."""
    if nodes < 2 or rate <= 0 or seconds <= 0:
        raise SystemExit("bench_floor: --nodes must be at least 2, --rate and --seconds positive")
    root.mkdir(parents=True, exist_ok=True)
    ca, creds = credentials(root, nodes)
    dials = links(nodes)
    edges = ",".join(f"{i}-{j}" for i, js in dials.items() for j in js)
    ports = ",".join(str(p) for p in free_ports(nodes))
    own = max(1, round(rate * seconds / nodes))
    forged = own // forge[1] if forge else 0
    start_ms = int(time.time() * 1000) + 2000 + 100 * nodes
    procs = []
    try:
        for i in range(nodes):
            expect = (nodes - 1) * own - (forged if forge and forge[0] != i else 0)
            argv = [*(wrap or {}).get(i, []), str(exe), "--id", str(i), "--n", str(nodes), "--ports", ports, "--edges", edges,
                    "--dial", ",".join(str(j) for j in dials[i]), "--rate", str(rate / nodes),
                    "--count", str(own), "--start-ms", str(start_ms), "--expect", str(expect),
                    "--cert", str(creds[i][0]), "--key", str(creds[i][1]), "--ca", str(ca),
                    "--db", str(node_file(root, i, ".db")), "--out", str(node_file(root, i, ".json")),
                    "--deadline-s", str(int(seconds + timeout))]
            if forge and forge[0] == i:
                argv += ["--forge-every", str(forge[1])]
            log = node_file(root, i, ".log").open("wb")
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        results: list[dict[str, Any]] = []
        files = [node_file(root, i, ".json") for i in range(nodes)]
        end = start_ms / 1000 + seconds + timeout + 5
        while time.time() < end:
            dead = [i for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                raise SystemExit(f"bench_floor: node {dead[0]} exited ({procs[dead[0]].returncode}):\n"
                                 + node_file(root, dead[0], ".log").read_text(errors="replace")[-2000:])
            if all(f.exists() for f in files):
                results = [json.loads(f.read_text()) for f in files]
                break
            time.sleep(0.2)
        else:
            raise SystemExit("bench_floor: the nodes did not finish in time")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)  # callgrind writes its counts on the way out
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    sales = sum(r["own"] for r in results) - forged
    cpu = sum(r["cpu_s"] for r in results)
    spread = propagation(root, nodes)
    return {
        "nodes": nodes, "rate": rate, "seconds": seconds, "links": sum(len(js) for js in dials.values()),
        "sales": sales, "forged": forged,
        "missing": sum(max(0, r["expected"] - r["received"]) for r in results),
        "refused": sum(r["refused"] for r in results), "dups": sum(r["dups"] for r in results),
        "cpu_ms_per_sale_per_node": cpu * 1000 / (sales * nodes),
        "wall_s_max": max(r["wall_s"] for r in results),
        "p50_ms": pct(spread, 50) if spread else 0.0, "p99_ms": pct(spread, 99) if spread else 0.0,
        "max_rss_kb_median": statistics.median(r["max_rss_kb"] for r in results),
        "per_node": results,
    }


def count(exe: Path, root: Path, nodes: int, rate: float, seconds: float) -> dict[str, Any]:
    """Node 0's instructions per site sale (callgrind; two lengths, the difference) and its CPU per
    site sale without valgrind; see the module's docstring."""
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_floor: --callgrind needs valgrind (Debian: valgrind)")
    from count_instructions import by_library, total_of
    totals, libs, sales = [], [], []
    for k, length in enumerate((seconds, 3 * seconds)):
        out = root / f"callgrind.{k}.out"
        r = run(exe, root / f"count{k}", nodes, rate, length, timeout=300.0,
                wrap={0: ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]})
        text = out.read_text()
        totals.append(total_of(text))
        libs.append(by_library(text))
        sales.append(r["sales"])
    per_sale = (totals[1] - totals[0]) / (sales[1] - sales[0])
    names = set(libs[0]) | set(libs[1])
    by_lib = {name: (libs[1].get(name, 0) - libs[0].get(name, 0)) / (sales[1] - sales[0]) for name in names}
    plain = run(exe, root / "cpu", nodes, rate, 3 * seconds)
    cpu_ms = plain["per_node"][0]["cpu_s"] * 1000 / plain["sales"]
    if cpu_ms <= 0:
        raise SystemExit("bench_floor: node 0 used no measurable CPU: make --seconds or --rate larger")
    # the kernel splits a process's CPU into user and system by sampled clock ticks: for the few
    # ms of a short run the split is rough, the sum exact
    user_ms = plain["per_node"][0]["user_s"] * 1000 / plain["sales"]
    return {"nodes": nodes, "rate": rate, "seconds": [seconds, 3 * seconds], "sales": sales,
            "instructions_per_site_sale": per_sale,
            "by_library": dict(sorted(by_lib.items(), key=lambda kv: -kv[1])),
            "cpu_ms_per_site_sale": cpu_ms, "user_ms_per_site_sale": user_ms,
            # per ns of the process's CPU, as tools/count_instructions.py gives the Python node's
            # (callgrind counts user space only: the kernel's share lowers both alike)
            "instructions_per_ns": per_sale / (cpu_ms * 1e6)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20, help="processes in the mesh (default 20, as bench_mesh)")
    ap.add_argument("--rate", type=float, default=40.0, help="sales per second for the whole site (default 40)")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the load (default 60)")
    ap.add_argument("--runs", type=int, default=1, help="runs, one after the other; the median is printed too")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--callgrind", action="store_true",
                    help="count node 0's instructions per site sale instead (needs valgrind; keep the rate low)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        exe = build(Path(tmp))
        if args.callgrind:
            c = count(exe, Path(tmp), args.nodes, args.rate, args.seconds)
            if args.json:
                print(json.dumps(c, indent=1))
            else:
                print(f"node 0: {c['instructions_per_site_sale'] / 1e6:.3f} M instructions per site sale, "
                      f"{c['cpu_ms_per_site_sale']:.3f} ms CPU per site sale without valgrind (user about "
                      f"{c['user_ms_per_site_sale']:.3f} ms): {c['instructions_per_ns']:.2f} instructions per ns")
                for name, n in list(c["by_library"].items())[:8]:
                    print(f"  {name:24s} {n / 1e3:9.0f} k")
            return 0
        res = []
        for k in range(args.runs):
            r = run(exe, Path(tmp) / f"run{k}", args.nodes, args.rate, args.seconds)
            res.append(r)
            if not args.json:
                print(f"run {k + 1}: {r['sales']} sales, {r['missing']} missing, "
                      f"{r['cpu_ms_per_sale_per_node']:.3f} ms CPU per sale per node, sale -> every "
                      f"process p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms (max RSS {r['max_rss_kb_median'] / 1024:.1f} MB median)", file=sys.stderr)
    med = statistics.median(r["cpu_ms_per_sale_per_node"] for r in res)
    if args.json:
        print(json.dumps({"runs": [{k: v for k, v in r.items() if k != "per_node"} for r in res],
                          "cpu_ms_per_sale_per_node_median": med}, indent=1))
    else:
        print(f"floor: {med:.3f} ms CPU per sale per node (median of {len(res)})")
    return 1 if any(r["missing"] for r in res) else 0


if __name__ == "__main__":
    sys.exit(main())
