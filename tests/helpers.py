"""Helpers the tests import: the real CLI in a subprocess, a scanner for card numbers, the check that a
stored secret is its scrypt hash alone."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

TEST_PANS = ("4111111111111111", "5555555555554444", "4000000000000002")


def run_cli(*args: str, cwd: Path | None = None, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``meshpos`` command in a subprocess; ``input`` is its standard input
    (a card number for ``--card -``, a password for ``--dashboard-password -``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "meshpos.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120, input=input if input is not None else "")
    if check and proc.returncode != 0:
        raise AssertionError(f"meshpos {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_cli_site(root: Path, terminals: tuple[str, ...] = ("t1", "t2")) -> Path:
    """A site made with the real CLI (a fresh switch key, a switch URL nobody answers) and its
    terminals enrolled in ``root``; returns ``root``."""
    import nacl.signing

    from meshpos.identity import keys

    key = nacl.signing.SigningKey.generate()
    (root / "switch.pub").write_text(keys.x25519_public_of(key).hex() + "\n")
    run_cli("site", "init", str(root / "site"), "--name", "Sagra", "--switch-key",
            str(root / "switch.pub"), "--switch-url", "https://127.0.0.1:9443", check=True)
    for name in terminals:
        run_cli("enroll", str(root / "site"), str(root / name), "--role", "terminal", "--name", name, check=True)
    return root


def scan_for(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under ``root`` holding any of ``needles`` (also as UTF-16 and hex)."""
    forms = []
    for n in needles:
        forms += [n, n.decode().encode("utf-16-le"), n.hex().encode()]
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for form in forms:
                if form in data:
                    hits.append(f"{path}: {form[:8]!r}...")
    return hits


def is_scrypt_hash_of(stored: str | None, secret: str) -> bool:
    """True when ``stored`` is exactly ``scrypt$<16-byte salt>$<64-byte digest>`` in hex and the digest is
    scrypt (n=2**14, r=8, p=1) of ``secret``, recomputed here: nothing else (the secret itself, say) is
    kept beside it. (Asking that the secret's digits not appear in the hex fails by chance.)"""
    match = re.fullmatch(r"scrypt\$([0-9a-f]{32})\$([0-9a-f]{128})", stored or "")
    if match is None:
        return False
    digest = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(match[1]), n=2**14, r=8, p=1)
    return digest.hex() == match[2]


def fill_disk(path: Path) -> int:
    """Write ``path`` until its file system is full (ENOSPC); the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    written = 0
    try:
        block = b"\0" * 4096
        while True:
            try:
                written += os.write(fd, block)
            except OSError:
                break
    finally:
        os.close(fd)
    return written


def load_tool(name: str) -> types.ModuleType:
    """Import ``tools/NAME.py`` as a module (tools/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
