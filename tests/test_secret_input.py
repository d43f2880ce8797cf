"""Card numbers and passwords never come from argv (issue 12, reproduction 6): `--card -` reads
stdin, `--card` alone asks without echo on a terminal, a number on the command line is refused."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshpos.cli.secret_input import Console, read_card, read_password, split_card_line
from meshpos.domain.errors import InputError
from meshpos.domain.policy import check_password
from meshpos.site.sitedir import load_site

from argv_watch import ArgvWatch
from helpers import TEST_PANS, make_cli_site, run_cli


@pytest.fixture
def cli_node(tmp_path: Path) -> Path:
    return make_cli_site(tmp_path, ("t1",)) / "t1"


def _run_with_a_card_in_argv(argv_watch: ArgvWatch, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI given a card number in its argv, on purpose: the session's argv watch
    must see it (and forgive it: this test is about what the CLI does with it)."""
    proc = subprocess.Popen([sys.executable, "-m", "meshpos.cli.main", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    argv_watch.forgive(proc.pid)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_card_number_on_the_command_line_is_refused_without_repeating_it(cli_node: Path,
                                                                          argv_watch: ArgvWatch) -> None:
    for form in (["--card", TEST_PANS[0]], [f"--card={TEST_PANS[1]}"], ["--card", "4111 1111 1111 1111"]):
        proc = _run_with_a_card_in_argv(argv_watch, "sell", str(cli_node), "--amount", "5", *form)
        assert proc.returncode == InputError.exit_code, proc.stderr
        assert "--card -" in proc.stderr and "command line" in proc.stderr and "Traceback" not in proc.stderr
        assert "1111 1111" not in proc.stderr and not any(p in proc.stderr + proc.stdout for p in TEST_PANS)
    assert json.loads(run_cli("sales", str(cli_node), "--json", check=True).stdout) == []


def test_card_from_stdin_with_its_expiry(cli_node: Path) -> None:
    sale = json.loads(run_cli("sell", str(cli_node), "--amount", "5", "--card", "-", "--json", check=True,
                              input=f"{TEST_PANS[1]} 1230\n").stdout)
    assert sale["method"] == "card" and sale["card_last4"] == "4444" and sale["card_brand"] == "mastercard"
    spaced = json.loads(run_cli("sell", str(cli_node), "--amount", "6", "--card", "-", "--json", check=True,
                                input="4111 1111 1111 1111\n").stdout)
    assert spaced["card_last4"] == "1111"


def _run_on_a_terminal(args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run `meshpos ARGS` with a pseudo-terminal as its controlling terminal; type each answer
    after the next prompt (a line ending in ': '). Returns the exit code and everything shown."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin/stdout/stderr and /dev/tty are the pty
        os.execv(sys.executable, [sys.executable, "-m", "meshpos.cli.main", *args])
    shown = b""
    deadline = time.monotonic() + 60
    pending = list(answers)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            shown += data
            if pending and shown.rstrip(b" ").endswith(b":"):
                os.write(fd, pending.pop(0).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_card_alone_asks_on_the_terminal_without_echo(cli_node: Path) -> None:
    code, shown = _run_on_a_terminal(["sell", str(cli_node), "--amount", "7", "--card", "--expiry", "1230"],
                                     [TEST_PANS[0]])
    assert code == 0, shown
    assert "card number" in shown and "visa **** 1111" in shown
    assert TEST_PANS[0] not in shown  # the terminal did not echo what was typed


def test_dashboard_password_from_stdin_or_asked_never_argv(tmp_path: Path) -> None:
    proc = run_cli("site", "init", str(tmp_path / "a"), "--name", "A", "--dashboard-password", "hunter2hunter2")
    assert proc.returncode == InputError.exit_code and "--dashboard-password -" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout and not (tmp_path / "a").exists()

    run_cli("site", "init", str(tmp_path / "b"), "--name", "B", "--dashboard-password", "-", check=True,
            input="correct horse\n")
    stored = load_site(tmp_path / "b").dashboard_hash()
    assert stored is not None and check_password(stored, "correct horse")

    code, shown = _run_on_a_terminal(["site", "init", str(tmp_path / "c"), "--name", "C", "--dashboard-password"],
                                     ["battery staple", "battery staple"])
    assert code == 0, shown
    assert "battery" not in shown
    stored = load_site(tmp_path / "c").dashboard_hash()
    assert load_site(tmp_path / "c").policy.dashboard_password is None  # the hash is not in the policy every node gets
    assert stored is not None and check_password(stored, "battery staple")

    code, shown = _run_on_a_terminal(["site", "init", str(tmp_path / "d"), "--name", "D", "--dashboard-password"],
                                     ["one", "two"])
    assert code == InputError.exit_code and "differ" in shown and not (tmp_path / "d").exists()


# -- the reading rules, without a process ------------------------------------------------------

class FakeTerminal:
    def __init__(self, *typed: str) -> None:
        self.typed = list(typed)
        self.prompts: list[str] = []

    def ask(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.typed.pop(0)


class TtyText(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("line, pan, expiry", [
    ("4111111111111111", "4111111111111111", None),
    ("4111111111111111 1230", "4111111111111111", "1230"),
    ("4111 1111 1111 1111", "4111 1111 1111 1111", None),  # the last group is part of the number
    ("4111 1111 1111 1111 1230", "4111 1111 1111 1111", "1230"),
    ("4111-1111-1111-1111", "4111-1111-1111-1111", None),
    ("  5555555555554444  ", "5555555555554444", None),
    ("4111111111111112 1230", "4111111111111112", "1230"),  # a bad number and its expiry: check_pan says why
])
def test_card_line_format(line: str, pan: str, expiry: str | None) -> None:
    assert split_card_line(line) == (pan, expiry)


def test_reading_rules() -> None:
    piped = Console(stdin=io.StringIO("4111111111111111 1230\nmore\n"), ask=FakeTerminal().ask)
    assert read_card("-", None, console=piped) == ("4111111111111111", "1230")
    term = FakeTerminal(TEST_PANS[1])
    assert read_card("", "0131", console=Console(stdin=TtyText(), ask=term.ask)) == (TEST_PANS[1], "0131")
    assert term.prompts and "not shown" in term.prompts[0]
    term = FakeTerminal(TEST_PANS[0] + " 1230")  # `--card -` on a terminal: no echo either
    assert read_card("-", None, console=Console(stdin=TtyText("typed with echo\n"), ask=term.ask)) \
        == (TEST_PANS[0], "1230")
    assert len(term.prompts) == 1
    with pytest.raises(InputError, match="none here"):
        read_card("", None, console=Console(stdin=io.StringIO(), ask=FakeTerminal().ask))
    with pytest.raises(InputError, match="longer than"):
        read_card("-", None, console=Console(stdin=io.StringIO("4" * 5000), ask=FakeTerminal().ask))
    with pytest.raises(InputError, match="command line") as info:
        read_card(TEST_PANS[2], None, console=piped)
    assert TEST_PANS[2] not in str(info.value)
    assert read_password("-", "--x", Console(stdin=io.StringIO("pw with spaces \n"), ask=FakeTerminal().ask)) \
        == "pw with spaces "
    with pytest.raises(InputError, match="empty"):
        read_password("", "--x", Console(stdin=TtyText(), ask=FakeTerminal("", "").ask))
