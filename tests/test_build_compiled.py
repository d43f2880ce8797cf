"""tools/build_compiled.py (the mypyc experiment): its source changes still apply to the package,
and it refuses to write over an existing directory. The compile itself (~1 min of gcc) is not run
here; BENCHMARKS.md has its measurement."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

from helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "build_compiled.py"


def _tool() -> types.ModuleType:
    return load_tool("build_compiled")


def test_every_patch_finds_its_text_and_every_module_exists() -> None:
    tool = _tool()
    for rel in tool.MODULES:
        assert (ROOT / rel).is_file(), rel
    for rel, old, new, why in tool.PATCHES:
        text = (ROOT / rel).read_text()
        assert old in text, f"patch for {rel} ({why}) no longer applies"
        assert old != new


def test_it_refuses_an_existing_directory(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(TOOL), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "exists" in done.stderr
    assert list(tmp_path.iterdir()) == []
