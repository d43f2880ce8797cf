#!/usr/bin/env python3
"""Experiment: the node's receive path compiled to C with mypyc, to measure what compiling saves.

Copies the ``meshpos`` package into ``--out``, makes the few source changes mypyc needs (each one
keeps the behaviour; listed in ``PATCHES`` with the reason), and compiles the modules a received
sale passes through (``MODULES``: the wire codecs and checks, the ledger and its store, the sync
session and push tree, the roster and the content rules) into extension modules beside their
sources. The rest of the package stays Python. Python imports an extension module before the
``.py`` of the same name, so a process started with ``PYTHONPATH=<out>`` runs the compiled
modules, and so do the ``meshpos run`` processes a benchmark starts from it:

    python tools/build_compiled.py --out /tmp/meshpos-compiled      # ~75 s of gcc on one core
    cd /tmp/meshpos-compiled && PYTHONPATH=$PWD python tools/bench_mesh.py --json --settle 0
    cd /tmp/meshpos-compiled && PYTHONPATH=$PWD python tools/bench_receive.py --runs 5 --cold 1

(``tools/`` is copied too: a script puts its own directory first on ``sys.path``, so it must be
run from the copy with ``PYTHONPATH`` set, or it imports the checkout's package.) Needs mypy's
``mypyc`` (the test extra) and a C compiler with Python's headers. Not part of the product: the
measurement is in BENCHMARKS.md ("compiled with mypyc"), and nothing checks in CI that the
package still compiles; a patch that no longer applies stops this script with its name.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODULES = [
    "meshpos/wire/amcanon.py", "meshpos/wire/amchange.py", "meshpos/wire/amhistory.py",
    "meshpos/wire/canonical.py", "meshpos/wire/envelope.py", "meshpos/wire/leb128.py",
    "meshpos/wire/link.py", "meshpos/wire/link_frames.py", "meshpos/wire/shards.py",
    "meshpos/wire/shortids.py", "meshpos/wire/status.py", "meshpos/wire/heldvec.py",
    "meshpos/ledger/ledger.py", "meshpos/ledger/store.py", "meshpos/ledger/amguard.py",
    "meshpos/ledger/holdings.py", "meshpos/replication/sync.py", "meshpos/replication/pushtree.py",
    "meshpos/site/roster.py", "meshpos/domain/rules.py", "meshpos/domain/policy.py",
    "meshpos/domain/text.py",
]

# (file, text, replacement of every occurrence, why mypyc needs it)
PATCHES: list[tuple[str, str, str, str]] = [
    ("meshpos/domain/rules.py", '_SURROGATE = re.compile("[\\ud800-\\udfff]")',
     '_SURROGATE = re.compile("[" + chr(0xD800) + "-" + chr(0xDFFF) + "]")',
     "mypyc refuses surrogate code points in string literals"),
    ("meshpos/site/roster.py", "    _verify_reversal = _verify_result\n",
     "    def _verify_reversal(self, env: Envelope, now_ms: int) -> None:\n"
     "        self._verify_result(env, now_ms)\n",
     "a method alias is not an attribute of a compiled class (getattr finds nothing)"),
    ("meshpos/site/roster.py", "    _verify_revocation = _verify_ca_signed\n",
     "    def _verify_revocation(self, env: Envelope, now_ms: int) -> None:\n"
     "        self._verify_ca_signed(env, now_ms)\n",
     "the same"),
    ("meshpos/wire/amhistory.py", "    doc: object\n", '    doc: "Document"\n',
     "a compiled dataclass cannot resolve the annotation 'object' at import"),
    ("meshpos/replication/pushtree.py", "class _Wanted(Generic[L]):", "class _Wanted:",
     "a generic dataclass does not import compiled"),
    ("meshpos/replication/pushtree.py", "    announcers: list[L] = field", "    announcers: list[Any] = field",
     "the same"),
    ("meshpos/replication/pushtree.py", "class GraftDue(Generic[L]):", "class GraftDue:", "the same"),
    ("meshpos/replication/pushtree.py", "    link: L\n", "    link: Any\n", "the same"),
    ("meshpos/replication/pushtree.py", "_Wanted[L]", "_Wanted", "the same"),
    ("meshpos/replication/pushtree.py", "GraftDue[L]", "GraftDue", "the same"),
    ("meshpos/replication/pushtree.py", "from typing import Generic,", "from typing import Any, Generic,",
     "the same"),
    ("meshpos/wire/amcanon.py",
     "    @functools.lru_cache(maxsize=CHECKED_MEMO)\n    def memo(data: bytes) -> tuple[Op, ...]:\n",
     "    def checked(data: bytes) -> tuple[Op, ...]:\n",
     "a decorated nested function is unbound in the compiled closure"),
    ("meshpos/wire/amcanon.py", "        return ops\n\n    @functools.wraps(decode)",
     "        return ops\n\n    memo = functools.lru_cache(maxsize=CHECKED_MEMO)(checked)\n\n"
     "    @functools.wraps(decode)", "the same"),
    ("meshpos/replication/sync.py", "\nclass SyncSession:", "\n@mypyc_attr(native_class=False)\nclass SyncSession:",
     "the node keeps its dialled sessions in a WeakSet; a native class takes no weak references"),
    ("meshpos/replication/sync.py", "from __future__ import annotations\n",
     "from __future__ import annotations\nfrom mypy_extensions import mypyc_attr\n", "the same"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory for the copy (made; must not exist)")
    args = p.parse_args(argv)
    out: Path = args.out.resolve()
    if out.exists():
        p.error(f"{out} exists: give a new directory")
    mypyc = shutil.which("mypyc", path=str(Path(sys.executable).parent)) or shutil.which("mypyc")
    if mypyc is None:
        p.error("mypyc not found: pip install -e '.[test]' (it comes with mypy)")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    shutil.copytree(ROOT / "meshpos", out / "meshpos", ignore=ignore)
    shutil.copytree(ROOT / "tools", out / "tools", ignore=ignore)
    for rel, old, new, why in PATCHES:
        path = out / rel
        text = path.read_text()
        if old not in text:
            print(f"patch for {rel} ({why}) no longer applies: {old!r} not found", file=sys.stderr)
            return 1
        path.write_text(text.replace(old, new))
    print(f"compiling {len(MODULES)} modules into {out} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run([mypyc, *MODULES], cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        print("mypyc failed (its output above)", file=sys.stderr)
        return 1
    print(f"compiled in {time.monotonic() - started:.0f} s; run with PYTHONPATH={out} from {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
