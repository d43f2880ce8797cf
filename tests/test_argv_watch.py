"""The session-wide argv watch (tests/conftest.py) sees a card number in a command line."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from argv_watch import ArgvWatch, card_numbers_in, luhn_ok, masked

from helpers import TEST_PANS

SLEEPER = "import time; time.sleep(30)"


def _wait_seen(watch: ArgvWatch, pid: int, timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = watch.seen(pid)
        if seen is not None:
            return seen
        time.sleep(0.05)
    return None


@pytest.mark.parametrize("card", [TEST_PANS[0], "4111 1111 1111 1111", "6011000990139424", "371449635398431"])
def test_the_session_watch_sees_a_card_number_in_argv(argv_watch: ArgvWatch, card: str) -> None:
    # A process looking like the old `meshpos sell --card PAN`, kept alive until the watch saw it.
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, "meshpos", "sell", "t1", "--amount", "5", "--card", card])
    try:
        seen = _wait_seen(argv_watch, proc.pid)
    finally:
        proc.kill()
        proc.wait()
        argv_watch.forgive(proc.pid)  # put there on purpose: not a failure of the session
    assert seen is not None, "the argv watch missed a card number on a command line"
    text = str(seen)
    assert str(proc.pid) in text and "python" in text and "--card" in text  # names the process
    digits = card.replace(" ", "")
    assert digits not in text and card not in text and digits[-4:] in text  # masked, last 4 kept


def test_a_process_without_card_numbers_is_not_reported(argv_watch: ArgvWatch) -> None:
    # 13-digit millisecond times, ports, a non-Luhn 16-digit run: not card numbers.
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, "meshpos", "--at", "1767225660001", "--port", "8443",
                             "--id", "4111111111111112"])
    try:
        samples = argv_watch.samples
        deadline = time.monotonic() + 10
        while argv_watch.samples < samples + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert argv_watch.samples >= samples + 5
        assert argv_watch.seen(proc.pid) is None
    finally:
        proc.kill()
        proc.wait()


def test_detection_rules() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert card_numbers_in("--card=4111111111111111") == ["4111111111111111"]
    assert card_numbers_in("4111-1111-1111-1111") == ["4111111111111111"]
    assert card_numbers_in("1767225660001") == []
    assert card_numbers_in("x5555555555554444y", known=TEST_PANS) == ["5555555555554444"]
    assert masked("--card 4111 1111 1111 1111", ["4111111111111111"]) == "--card **** **** **** 1111"
    assert masked("--card=4111111111111111", ["4111111111111111"]) == "--card=************1111"


def test_a_sale_id_is_no_card_number_but_a_card_number_beside_it_is() -> None:
    """A sale id whose node id ends in digits makes, with its number, a Luhn-valid run across the
    dash (`meshpos receipt NODE abcdef0123456789-00000003` was reported in a CI run); an all-digit
    "node id" is no sale id and stays suspect."""
    assert luhn_ok("0123456789" + "00000003")
    assert card_numbers_in("abcdef0123456789-00000003") == []
    assert card_numbers_in("abcdef0123456789-00000003 4111111111111111") == ["4111111111111111"]
    assert card_numbers_in("4111111111111111-00000003") == ["4111111111111111"]


def test_a_node_id_is_no_card_number_even_when_it_holds_a_luhn_run() -> None:
    run = next(f"4111111111111{x}" for x in range(10) if luhn_ok(f"4111111111111{x}"))
    node_id = "5e" + run  # 16 hex digits: a random node id can hold 14 digits in a row
    assert card_numbers_in(run) == [run]
    assert card_numbers_in(node_id) == [] and card_numbers_in(f"--terminal={node_id}") == []
    assert card_numbers_in(f"{node_id} 4111111111111111") == ["4111111111111111"]
