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
                 "meshpos.switch", "meshpos.node", "meshpos.ledger", "meshpos.infra"):
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
    rules = tree / "meshpos" / "domain" / "rules.py"
    rules.write_text(rules.read_text() + "\nfrom meshpos.ledger.store import Store  # noqa\n")
    found = wire_violations(tree / "meshpos", _wire_forbidden(tree / "pyproject.toml"))
    assert any(p.startswith("meshpos.domain.rules:") and p.endswith("imports meshpos.ledger.store") for p in found), found


# --- import-linter ------------------------------------------------------------------------------


def test_lint_imports_keeps_every_contract() -> None:
    done = _run_lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for contract_id in ("layers", "wire-pure", "domain-pure", "node-not-switch", "switch-not-node"):
        assert _contract(ROOT / "pyproject.toml", contract_id)
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("wire/link.py", "import trio", "meshpos.wire is not allowed to import trio"),
    ("wire/envelope.py", "from meshpos.ledger.ledger import Ledger",
     "meshpos.wire is not allowed to import meshpos.ledger"),
    ("uplink/client.py", "from meshpos.switch import processor", "meshpos.uplink is not allowed to import meshpos.switch"),
    ("switch/service.py", "from meshpos.node import core", "meshpos.switch is not allowed to import meshpos.node"),
    ("switch/processor.py", "from meshpos.ledger import store", "meshpos.switch is not allowed to import meshpos.ledger"),
    # the layers: nothing imports a layer above it
    ("replication/sync.py", "from meshpos.node import core", "meshpos.replication is not allowed to import meshpos.node"),
    ("ledger/ledger.py", "from meshpos.replication import sync",
     "meshpos.ledger is not allowed to import meshpos.replication"),
    ("node/runner.py", "from meshpos.cli import output", "meshpos.node is not allowed to import meshpos.cli"),
    ("domain/rules.py", "import nacl", "meshpos.domain is not allowed to import nacl"),
])
def test_lint_imports_fails_on_a_new_import_across_a_wall(tmp_path: Path, module: str, line: str,
                                                          contract: str) -> None:
    tree = _copy_tree(tmp_path)
    target = tree / "meshpos" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    done = _run_lint_imports(tree)
    assert done.returncode != 0
    assert contract in done.stdout, done.stdout


# --- only the CLI writes to the terminal ---------------------------------------------------------


# The signature helper is a child process whose protocol runs over its stdin/stdout pipes.
PIPE_PROTOCOLS = {"identity/sigcheck.py"}


def terminal_writes(package_root: Path) -> list[str]:
    """``print(...)`` calls and writes to ``sys.stdout``/``sys.stderr`` outside ``meshpos/cli``:
    everything else reports through return values, logging or a callback the CLI gives."""
    found = []
    for path in sorted(package_root.rglob("*.py")):
        rel = path.relative_to(package_root)
        if rel.parts[0] == "cli":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(package_root)}:{node.lineno} print")
            if (isinstance(node, ast.Attribute) and node.attr in {"stdout", "stderr"}
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"
                    and str(rel) not in PIPE_PROTOCOLS):
                found.append(f"{path.relative_to(package_root)}:{node.lineno} sys.{node.attr}")
    return found


def test_only_the_cli_writes_to_the_terminal() -> None:
    assert terminal_writes(ROOT / "meshpos") == []


def test_the_print_check_catches_a_print_outside_the_cli(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    target = tree / "meshpos" / "node" / "runner.py"
    target.write_text(target.read_text() + "\nprint('hello')  # noqa\n")
    assert terminal_writes(tree / "meshpos") == [f"node/runner.py:{len(target.read_text().splitlines())} print"]
