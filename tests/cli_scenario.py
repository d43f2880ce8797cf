"""One scenario of `meshpos` commands against a running node, and the shape of what it prints.

Recorded once with the code from before the CLI moved onto the terminal API (the newline-JSON
control socket, commit db16b7a) into tests/data/cli_outputs_control_socket.json, and run again by
tests/test_cli_socket.py: the `--json` outputs must keep their shape (members and JSON types) and
every command its exit code. To record, from a checkout of the old code:

    python PATH/TO/tests/cli_scenario.py OUT.json      (cwd: the old checkout)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEST_PAN = "4111111111111111"  # the public Visa test number


def meshpos(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "meshpos.cli.main", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=120, cwd=cwd)


def shape(value: Any) -> Any:
    """The JSON type of ``value``: objects member by member, arrays by their first item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[type(value)]


def same_shape(old: Any, new: Any, where: str = "$") -> list[str]:
    """Differences between two shapes; null matches any type (a member that is null in one run
    and set in another, such as an error not met)."""
    if old == "null" or new == "null":
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = [f"{where}.{k}: gone" for k in old if k not in new]
        out += [f"{where}.{k}: new" for k in new if k not in old]
        for k in old.keys() & new.keys():
            out += same_shape(old[k], new[k], f"{where}.{k}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        return same_shape(old[0], new[0], where + "[]") if old and new else []
    return [] if old == new else [f"{where}: {old} became {new}"]


def enroll(root: Path, cwd: Path | None = None) -> Path:
    import nacl.signing

    from meshpos.identity import keys
    key = nacl.signing.SigningKey.generate()
    (root / "switch.pub").write_text(keys.x25519_public_of(key).hex() + "\n")
    for args in (["site", "init", str(root / "site"), "--name", "Sagra", "--switch-key", str(root / "switch.pub"),
                  "--switch-url", "https://127.0.0.1:9"],
                 ["enroll", str(root / "site"), str(root / "t1"), "--role", "terminal", "--name", "T1",
                  "--api", "127.0.0.1:0"]):
        proc = meshpos(*args, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
    return root / "t1"


def wait_running(node: Path, cwd: Path | None = None, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = meshpos("status", str(node), "--json", cwd=cwd)
        if proc.returncode == 0:
            st: dict[str, Any] = json.loads(proc.stdout)
            if "running" in st:
                return st
        time.sleep(0.3)
    raise AssertionError(f"{node}: the node did not start")


def run_scenario(node: Path, cwd: Path | None = None) -> dict[str, Any]:
    """The commands, against the node running in ``node``: {"json": {name: output},
    "exit": {name: exit code}}."""
    n = str(node)
    outputs: dict[str, Any] = {}
    codes: dict[str, int] = {}

    def run(name: str, *args: str, stdin: str = "") -> Any:
        proc = meshpos(*args, stdin=stdin, cwd=cwd)
        codes[name] = proc.returncode
        if proc.returncode != 0:
            assert proc.stderr.startswith("meshpos: error: ") and "Traceback" not in proc.stderr, proc.stderr
            assert TEST_PAN not in proc.stderr + proc.stdout
            return None
        if "--json" in args:
            outputs[name] = json.loads(proc.stdout)
            return outputs[name]
        return proc.stdout

    cash = run("sell_cash", "sell", n, "--amount", "2.50", "--cash", "--description", "polenta", "--json")
    card = run("sell_card", "sell", n, "--amount", "3.00", "--card", "-", "--json", stdin=f"{TEST_PAN} 1230\n")
    run("sales", "sales", n, "--json")
    run("sales_terminal", "sales", n, "--terminal", cash["terminal"], "--json")
    run("void", "void", n, cash["id"], "--reason", "changed mind", "--json")
    run("status", "status", n, "--json")
    run("report", "report", n, "--json")
    run("uplink_on", "uplink", n, "on")
    run("uplink_off", "uplink", n, "off")
    run("receipt_preview", "receipt", n, card["id"], "--preview")
    # refusals: each keeps its exit code
    run("void_again", "void", n, cash["id"], "--json")
    run("void_unknown", "void", n, "0123456789abcdef-00000099")
    run("void_control_char", "void", n, card["id"], "--reason", "bell \x07")
    run("sell_bad_amount", "sell", n, "--amount", "two", "--cash")
    run("sell_bad_card", "sell", n, "--amount", "1.00", "--card", "-", stdin="4111111111111112 1230\n")
    run("sell_expired_card", "sell", n, "--amount", "1.00", "--card", "-", stdin=f"{TEST_PAN} 0120\n")
    run("receipt_no_printer", "receipt", n, card["id"])
    run("receipt_unknown", "receipt", n, "0123456789abcdef-00000099", "--preview")
    return {"json": outputs, "exit": codes}


def record(out: Path) -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = enroll(root)
        child = subprocess.Popen([sys.executable, "-m", "meshpos.cli.main", "run", str(node), "--no-mdns"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_running(node)
            result = run_scenario(node)
        finally:
            child.terminate()
            child.wait(30)
    shapes = {"json": {k: shape(v) for k, v in result["json"].items()}, "exit": result["exit"]}
    out.write_text(json.dumps(shapes, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]))
