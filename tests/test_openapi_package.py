"""/v1/openapi.json on an installed node: the OpenAPI document ships inside the package (package
data), and it is protocols/terminal-api.yaml itself (a symbolic link that builds copy), not a
second copy that could drift."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from meshpos.terminal.openapi import DOCUMENT, OpenApiDocument

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "protocols" / "terminal-api.yaml"


def test_the_packaged_document_is_the_protocols_document() -> None:
    assert DOCUMENT.read_bytes() == RECORD.read_bytes()
    packaged = ROOT / "meshpos" / "terminal" / "terminal-api.yaml"
    assert packaged.is_symlink() and packaged.resolve() == RECORD.resolve()  # one source of truth
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "terminal-api.yaml" in data["meshpos.terminal"]
    assert OpenApiDocument().get() == yaml.safe_load(RECORD.read_text())


def test_an_installed_package_serves_the_document_with_no_source_tree(tmp_path: Path) -> None:
    """As a wheel installs it: the package's files only (the link's content copied), nothing of the
    repository beside it; the node's document loads from there."""
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "meshpos", site / "meshpos", ignore=shutil.ignore_patterns("__pycache__"))
    assert not (site / "meshpos" / "terminal" / "terminal-api.yaml").is_symlink()
    script = ("import json, meshpos.terminal.openapi as o; "
              "print(json.dumps({'file': o.__file__, 'doc': o.OpenApiDocument().get()}))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["file"]).is_relative_to(site)
    assert out["doc"] == json.loads(json.dumps(yaml.safe_load(RECORD.read_text())))
