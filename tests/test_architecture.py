"""The walls between packages (pyproject.toml, [tool.importlinter]; README "Code map").

``lint-imports`` checks every contract; the AST check below re-checks the one that matters most,
"meshpos.wire is pure", from the same forbidden list without import-linter, so it also holds
where import-linter is not installed.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _contract(pyproject: Path, contract_id: str) -> dict[str, object]:
    config = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]
    for contract in config["contracts"]:
        if contract.get("id") == contract_id:
            return dict(contract)
    raise AssertionError(f"no import-linter contract {contract_id!r} in {pyproject}")


def _lint_imports() -> str:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if found is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]'); the AST check still runs")
    return found


def _run_lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([_lint_imports(), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


# --- the AST check ------------------------------------------------------------------------------


def _module_of(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # ``from meshpos.wire import envelope`` imports the module meshpos.wire.envelope
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _matches(module: str, forbidden: str) -> bool:
    return module == forbidden or module.startswith(forbidden + ".")


def wire_violations(package_root: Path, forbidden: list[str]) -> list[str]:
    """Imports reachable from ``meshpos.wire`` (through meshpos modules it imports) that hit a
    forbidden module: one line per offence, ``module:line imports target``."""
    files = {_module_of(p, package_root): p for p in package_root.rglob("*.py")}
    todo = [m for m in files if _matches(m, "meshpos.wire")]
    seen: set[str] = set()
    problems: list[str] = []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for target, line in _imports(files[module], module):
            bad = [f for f in forbidden if _matches(target, f)]
            if bad:
                problems.append(f"{module}:{line} imports {target}")
            elif target in files:
                todo.append(target)
    return sorted(set(problems))


def _wire_forbidden(pyproject: Path) -> list[str]:
    forbidden = _contract(pyproject, "wire-pure")["forbidden_modules"]
    assert isinstance(forbidden, list)
    return [str(m) for m in forbidden]


def test_wire_imports_nothing_forbidden_by_its_source() -> None:
    forbidden = _wire_forbidden(ROOT / "pyproject.toml")
    for must in ("trio", "socket", "ssl", "sqlite3", "subprocess", "threading", "automerge",
                 "meshpos.switch", "meshpos.node", "meshpos.ledger.ledger", "meshpos.ledger.store"):
        assert must in forbidden
    assert wire_violations(ROOT / "meshpos", forbidden) == []


def test_wire_modules_do_no_file_io_or_clock_reads() -> None:
    """What import-linter cannot see: file and clock access through modules every layer may import."""
    for path in sorted((ROOT / "meshpos" / "wire").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                names = []
            for name in names:
                assert name.split(".")[0] not in {"os", "pathlib", "io", "time", "random", "logging"}, \
                    f"{path.name}:{node.lineno} imports {name}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "open", f"{path.name}:{node.lineno} opens a file"
            if isinstance(node, ast.Attribute) and node.attr in {"now", "utcnow", "today"}:
                raise AssertionError(f"{path.name}:{node.lineno} reads the clock ({node.attr})")


def _copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "meshpos", tree / "meshpos", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_ast_check_catches_an_indirect_forbidden_import(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    # wire may import meshpos.domain.rules; rules reaching the store (and so sqlite3) must be caught
    rules = tree / "meshpos" / "rules.py"
    rules.write_text(rules.read_text() + "\nfrom .store import Store  # noqa\n")
    found = wire_violations(tree / "meshpos", _wire_forbidden(tree / "pyproject.toml"))
    assert any(p.startswith("meshpos.domain.rules:") and p.endswith("imports meshpos.ledger.store") for p in found), found


# --- import-linter ------------------------------------------------------------------------------


def test_lint_imports_keeps_every_contract() -> None:
    done = _run_lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for contract_id in ("wire-pure", "node-not-switch", "switch-not-node"):
        assert _contract(ROOT / "pyproject.toml", contract_id)
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("wire/link.py", "import trio", "meshpos.wire is not allowed to import trio"),
    ("wire/envelope.py", "from ..ledger import Ledger", "meshpos.wire is not allowed to import meshpos.ledger.ledger"),
    ("uplink/client.py", "from ..switch import processor", "meshpos.uplink is not allowed to import meshpos.switch"),
    ("switch/service.py", "from ..node import core", "meshpos.switch is not allowed to import meshpos.node"),
])
def test_lint_imports_fails_on_a_new_import_across_a_wall(tmp_path: Path, module: str, line: str,
                                                          contract: str) -> None:
    tree = _copy_tree(tmp_path)
    target = tree / "meshpos" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    done = _run_lint_imports(tree)
    assert done.returncode != 0
    assert contract in done.stdout, done.stdout
