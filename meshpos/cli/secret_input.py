"""Secrets a person types: a card number, a password. Never from argv.

A command line is readable by every local user (``ps``, ``/proc/PID/cmdline``) and lands in
shell history, so an option that takes a secret accepts only:

- ``-``: read it from standard input, one line (a pipe, a file, a card reader's keyboard
  wedge): ``printf '4111111111111111 1230\\n' | meshpos sell NODE --amount 5 --card -``;
  when standard input is a terminal, it is asked for without echo instead;
- no value: ask for it on the terminal without echo (``getpass``).

Anything else on the command line is refused, without repeating it.
"""

from __future__ import annotations

import getpass
import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from meshpos.domain.errors import InputError
from meshpos.domain.rules import pan_problem

ASK = ""  # the ``const`` of an option given without a value: ask on the terminal
FROM_STDIN = "-"
MAX_LINE = 1024


@dataclass(frozen=True)
class Console:
    """Where a secret comes from; the real terminal by default, a fake one in unit tests."""

    stdin: TextIO
    ask: Callable[[str], str]  # a no-echo prompt (getpass.getpass)

    @classmethod
    def real(cls) -> "Console":
        return cls(stdin=sys.stdin, ask=getpass.getpass)

    def is_terminal(self) -> bool:
        try:
            return self.stdin.isatty()
        except (AttributeError, ValueError):
            return False


def _read_line(console: Console, what: str) -> str:
    line = console.stdin.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise InputError(f"{what} on standard input is longer than {MAX_LINE} characters")
    line = line.rstrip("\r\n")
    if not line.strip():
        raise InputError(f"no {what} on standard input (give it as one line)")
    return line


def refuse_argv(value: str | None, option: str, what: str) -> None:
    """Refuse a secret given on the command line (without repeating it): callers check this
    first, before anything else can fail and the person retypes the command."""
    if value not in (None, FROM_STDIN, ASK):
        raise InputError(f"{option} does not take the {what} on the command line, where every local user "
                         f"can read it (ps, /proc) and the shell keeps it in its history: use `{option} -` and "
                         f"give it on standard input, or `{option}` alone to type it without echo")


def _source(value: str | None, option: str, what: str, console: Console) -> str:
    """'-' (stdin) or ASK (terminal): the way to read ``option``; anything else is refused."""
    refuse_argv(value, option, what)
    if value == FROM_STDIN:
        # standard input that is a terminal would echo what is typed: ask without echo instead
        return ASK if console.is_terminal() else FROM_STDIN
    if value == ASK:
        if not console.is_terminal():
            raise InputError(f"{option} without a value asks on a terminal, and there is none here: "
                             f"give the {what} on standard input with `{option} -`")
        return ASK
    raise InputError(f"{option}: no value to read")  # unreachable: refuse_argv let only these through


def read_card(value: str | None, expiry: str | None, option: str = "--card",
              console: Console | None = None) -> tuple[str, str | None]:
    """The PAN and expiry for ``--card``: one line ``PAN [MMYY]`` from stdin (``-``), or typed
    without echo. The expiry may instead come from ``--expiry`` (not both)."""
    console = console or Console.real()
    if _source(value, option, "card number", console) == FROM_STDIN:
        line = _read_line(console, "card number")
    else:
        line = console.ask("card number (not shown): ")
    pan, given_expiry = split_card_line(line)
    if given_expiry is not None and expiry is not None:
        raise InputError("the expiry was given twice (after the card number and with --expiry)")
    return pan, given_expiry if given_expiry is not None else expiry


def split_card_line(line: str) -> tuple[str, str | None]:
    """``PAN [MMYY]``: the whole line is the card number (spaces and dashes allowed) when it is
    one; otherwise a last group of 4 characters after 12 to 19 others is its expiry."""
    line = line.strip()
    if not line:
        raise InputError("no card number given")
    if pan_problem(_compact(line)) is None:
        return line, None
    head, sep, tail = line.rpartition(" ")
    # a last group of 4 after something as long as a card number is the expiry, so that a bad
    # number is reported as such (not as "20 digits")
    if sep and len(tail) == 4 and 12 <= len(_compact(head)) <= 19:
        return head.strip(), tail
    return line, None


def _compact(text: str) -> str:
    return text.replace(" ", "").replace("-", "")


def read_password(value: str | None, option: str, console: Console | None = None) -> str:
    """A password for ``option``: one line from stdin (``-``), or typed twice without echo."""
    console = console or Console.real()
    if _source(value, option, "password", console) == FROM_STDIN:
        return _read_line(console, "password")
    first = console.ask("password (not shown): ")
    if not first:
        raise InputError("the password is empty")
    if console.ask("the same password again: ") != first:
        raise InputError("the two passwords differ")
    return first


def read_pin(value: str | None, option: str, console: Console | None = None) -> str:
    """A cashier PIN for ``option``: one line from stdin (``-``), or typed twice without echo."""
    console = console or Console.real()
    if _source(value, option, "PIN", console) == FROM_STDIN:
        return _read_line(console, "PIN").strip()
    first = console.ask("cashier PIN (not shown): ").strip()
    if console.ask("the same PIN again: ").strip() != first:
        raise InputError("the two PINs differ")
    return first
