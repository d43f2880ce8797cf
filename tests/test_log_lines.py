"""A log line is one line, and acts on no terminal: what a message quotes from outside (a peer's
reason, an mDNS name, an acquirer's answer) has its newlines, escape sequences and bidirectional
controls written as escapes, on the console of every command and in `meshpos run --log-file`; so
has a command's error message."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

from meshpos.cli.more import open_log_file
from meshpos.infra.logfmt import console_handler

FRAMES = '  File "x.py", line 1, in f\n    boom()'
HOSTILE = "peer said ok\n2026-12-04 10:00:00,000 INFO meshpos.uplink: sale approved\x1b[2J\u202egnp.\x07"


def _logged(handler: logging.Handler) -> None:
    logger = logging.getLogger("meshpos.test_log_lines")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("refused: %s", HOSTILE)
        logger.error("conn from %s failed", "a\nb", extra={"frames": FRAMES})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed on %s", "x\ny")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close()


def _check(text: str) -> None:
    lines = text.splitlines()
    refused = [ln for ln in lines if "refused:" in ln]
    assert len(refused) == 1, text
    assert "peer said ok\\n2026-12-04" in refused[0] and "\\x1b[2J" in refused[0] and "\\u202e" in refused[0]
    assert not any(ln.startswith("2026-12-04 10:00:00,000 INFO") for ln in lines)  # no forged line
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    conn = next(i for i, ln in enumerate(lines) if "conn from a\\nb failed" in ln)
    assert lines[conn + 1: conn + 3] == FRAMES.splitlines()  # a record's frames, as written
    failed = next(i for i, ln in enumerate(lines) if "failed on x\\ny" in ln)
    assert lines[failed + 1] == "Traceback (most recent call last):"  # the traceback as Python writes it
    assert lines[-1] == "ValueError: boom"


def test_the_console_handler_writes_one_line_per_record() -> None:
    out = io.StringIO()
    _logged(console_handler(out))
    _check(out.getvalue())


def test_the_run_log_file_writes_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    _logged(open_log_file(path))
    _check(path.read_text(encoding="utf-8"))


def test_each_command_logs_through_it() -> None:
    """`meshpos ...`, its pass-through commands (`meshpos switch ...`, `acquirer-sim`) configure the
    root logger with the one-line formatter: a hostile message logged after the command's set-up."""
    for argv in (["-v", "status", "/nonexistent-node"], ["switch", "-v", "status", "/nonexistent-switch"]):
        code = ("import logging, sys\n"
                "from meshpos.cli.main import main\n"
                f"main({argv!r})\n"
                f"logging.getLogger('meshpos.peer').warning('refused: %s', {HOSTILE!r})\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        refused = [ln for ln in proc.stderr.splitlines() if "refused:" in ln]
        assert len(refused) == 1 and "\\n2026-12-04" in refused[0], (argv, proc.stderr)
        assert "\x1b" not in proc.stderr and "\u202e" not in proc.stderr, argv


def test_an_error_message_acts_on_no_terminal(tmp_path: Path) -> None:
    """`meshpos: error: ...` quotes what it could not use (a path, a value): written escaped."""
    from helpers import run_cli

    proc = run_cli("status", str(tmp_path / "no\x1b[2Jnode\u202e"))
    assert proc.returncode != 0 and "meshpos: error:" in proc.stderr
    assert "\x1b" not in proc.stderr and "\u202e" not in proc.stderr and "no\\x1b[2Jnode\\u202e" in proc.stderr
    switch = subprocess.run([sys.executable, "-m", "meshpos.cli.main", "switch", "status", str(tmp_path / "sw\x1b[2J")],
                            capture_output=True, text=True, timeout=60)
    assert switch.returncode != 0 and "meshpos switch: error:" in switch.stderr and "\x1b" not in switch.stderr
