"""tools/count_instructions.py: callgrind's output read right (each library's own instructions,
objects named once and referred to by number, a call's inclusive cost not counted twice), and
the ledger path counted alone: the pushes, not the setup around them, with the Ed25519
verification of every received sale among them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "count_instructions.py"

# a callgrind output file in the shape valgrind 3.19 writes it: libpython is first named in a
# cob= line (the callee of a call from libfoo), then referred to as ob=(2)
CALLGRIND_OUT = """\
version: 1
creator: callgrind-3.19.0
positions: line
events: Ir
summary: 1000

ob=(1) /usr/lib/x86_64-linux-gnu/libfoo.so.1
fl=(1) foo.c
fn=(1) f
10 100
cob=(2) /usr/lib/libpython3.11.so.1.0
cfi=(2) ceval.c
cfn=(2) g
calls=3 20
+2 700
11 50

ob=(2)
fl=(2)
fn=(2)
20 600
+1 100

ob=(3) /venv/site-packages/automerge/_automerge.cpython-311-x86_64-linux-gnu.so
fl=(3) ???
fn=(3) h
0 150

totals: 1000
"""


def _tool() -> types.ModuleType:
    return load_tool("count_instructions")


def test_each_library_gets_its_own_instructions() -> None:
    tool = _tool()
    libs = tool.by_library(CALLGRIND_OUT)
    assert libs == {"libpython3.11.so.1.0": 700, "libfoo.so.1": 150, "_automerge": 150}
    assert sum(libs.values()) == tool.total_of(CALLGRIND_OUT) == 1000


def test_a_file_without_a_total_is_refused() -> None:
    with pytest.raises(SystemExit, match="no total"):
        _tool().total_of("version: 1\nevents: Ir\n")


@pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
                    reason="valgrind is not installed (apt-get install valgrind)")
def test_the_ledger_path_is_counted_alone_with_its_signature_checks() -> None:
    done = subprocess.run([sys.executable, str(TOOL), "ledger", "--pushes", "20", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(done.stdout.splitlines()[-1])
    assert res["pushes"] == 20
    per_sale = res["instructions_per_sale"]
    # setting up the seller and the receiver (imports, keys, 20 sales signed) is a few hundred
    # million instructions: counted with the pushes it would be over 10 M per sale
    assert 0.5e6 < per_sale < 10e6, per_sale
    libs = res["by_library_per_sale"]
    assert abs(sum(libs.values()) - per_sale) < 1.0
    # every received sale's signature is checked: one Ed25519 verification is ~0.5 M instructions
    assert libs["_sodium.abi3.so"] > 0.3e6, libs
    assert libs["_automerge"] > 0, libs
    # the baseline beside it, counted the same way: the same pushes into plain Automerge
    assert 0 < res["plain_automerge_instructions_per_sale"] < per_sale
    assert res["ratio_to_plain"] == pytest.approx(per_sale / res["plain_automerge_instructions_per_sale"])
