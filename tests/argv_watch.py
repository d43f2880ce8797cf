"""Watch the argv of every process the test suite starts for full card numbers.

A command line is readable by every local user (``/proc/PID/cmdline``, ``ps``), so no meshpos
process may ever carry a card number in it (issue 12). ``ArgvWatch`` samples
``/proc/*/cmdline`` from a background thread every ``INTERVAL_S`` during the whole session;
``tests/conftest.py`` fails the session if it saw one. Only this test run's own processes count
(descendants of the pytest process): other test runs on the same machine are not ours to judge.
What it reports names the process and masks the number (last 4 digits only).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from meshpos.domain.rules import PAN_MAX, PAN_MIN, luhn_ok  # the one Luhn check
from meshpos.wire.envelope import SALE_ID_IN_TEXT

INTERVAL_S = 0.05
# A digit run, possibly grouped by spaces or dashes as people type card numbers.
_GROUPED = re.compile(r"[0-9](?:[0-9 -]*[0-9])?")
# A node id (16 hex digits, at least one a letter) is no card number, whatever run of digits it holds:
# `meshpos sales DIR --terminal NODE_ID` was flagged when a random id held 12+ digits passing Luhn.
_NODE_ID = re.compile(r"\b(?=[0-9a-f]{0,15}[a-f])[0-9a-f]{16}\b")


def card_numbers_in(arg: str, known: tuple[str, ...] = ()) -> list[str]:
    """The card numbers in one argv element: 12-19 ASCII digits (spaces or dashes between groups
    allowed) passing Luhn, or one of ``known`` anywhere in it."""
    found = [k for k in known if k in arg]
    for match in _GROUPED.finditer(_NODE_ID.sub(" ", SALE_ID_IN_TEXT.sub(" ", arg))):  # nor a sale id's or node id's digits
        text = match.group()
        for digits in {text.replace(" ", "").replace("-", ""), *re.findall(r"[0-9]+", text)}:
            if PAN_MIN <= len(digits) <= PAN_MAX and luhn_ok(digits) and digits not in found:
                found.append(digits)
    return found


def masked(text: str, numbers: list[str]) -> str:
    for number in numbers:
        text = text.replace(number, "*" * (len(number) - 4) + number[-4:])
    # a grouped form ("4111 1111 1111 1111") is masked group by group
    return _GROUPED.sub(lambda m: _mask_grouped(m.group(), numbers), text)


def _mask_grouped(text: str, numbers: list[str]) -> str:
    compact = text.replace(" ", "").replace("-", "")
    if compact in numbers:
        return "".join("*" if ch.isdigit() else ch for ch in text[:-4]) + text[-4:]
    return text


def _a_program_of_ours(argv: list[str]) -> bool:
    """A meshpos command or a Python process (what the suite runs); not, say, the Chromium a test
    drives, whose numeric handles can pass the Luhn check and whose profile directory is named
    after meshpos."""
    program = os.path.basename(argv[0])
    return (program.startswith("python") or program == "meshpos"
            or any(a.startswith("meshpos.") or os.path.basename(a) == "meshpos" for a in argv[1:4]))


@dataclass(frozen=True)
class Sighting:
    pid: int
    argv0: str
    shown: str  # the command line with every card number masked

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.argv0}): {self.shown}"


def _cmdline(pid: str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] if raw else None


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


class ArgvWatch:
    def __init__(self, known: tuple[str, ...] = (), root_pid: int | None = None) -> None:
        self.known = known
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.sightings: dict[int, Sighting] = {}
        self.forgiven: set[int] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="argv-watch", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> "ArgvWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _ours(self, pid: int) -> bool:  # a descendant of this test session
        seen = set()
        while pid > 1 and pid not in seen:
            if pid == self.root_pid:
                return True
            seen.add(pid)
            parent = _parent(pid)
            if parent is None:
                return False
            pid = parent
        return False

    def sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            argv = _cmdline(entry)
            if not argv or not _a_program_of_ours(argv):
                continue
            numbers = [n for a in argv for n in card_numbers_in(a, self.known)]
            pid = int(entry)
            if numbers and pid not in self.sightings and self._ours(pid):
                with self._lock:
                    self.sightings[pid] = Sighting(pid, os.path.basename(argv[0]), masked(" ".join(argv), numbers))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.sample()

    def seen(self, pid: int) -> Sighting | None:
        with self._lock:
            return self.sightings.get(pid)

    def forgive(self, pid: int) -> None:
        """A test that put a card number into an argv on purpose (to show the watch sees it)."""
        self.forgiven.add(pid)

    def offenders(self) -> list[Sighting]:
        with self._lock:
            return [s for pid, s in sorted(self.sightings.items()) if pid not in self.forgiven]
