"""Red team: the cashier app's PIN login (meshpos.terminal.cashier) under odd input and wrong clocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpos.site.cashierpin import LockState, read_lock_state, set_cashier_pin
from meshpos.terminal.cashier import LOCK_MS, MAX_FAILURES, CashierLogin, Locked, WrongPin

PIN = "4831"
DAY_MS = 86_400_000


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def login_at(tmp_path: Path, clock: Clock) -> CashierLogin:
    if not (tmp_path / "cashier-pin").exists():
        set_cashier_pin(tmp_path / "cashier-pin", PIN)
    return CashierLogin(tmp_path / "cashier-pin", tmp_path / "cashier-lock.json", clock)


async def test_a_pin_that_cannot_be_one_is_a_wrong_pin_not_a_crash(tmp_path: Path) -> None:
    """A lone surrogate in the JSON body ('{"pin": "\\ud800"}') made the PIN check raise
    UnicodeEncodeError in its worker thread: a 500 and a traceback in the node's log per request."""
    login = login_at(tmp_path, Clock(1_800_000_000_000))
    for junk in ("\ud800", "48\u0663\u0661", "pin!", "4" * 10_000):
        with pytest.raises(WrongPin):
            await login.login(junk)
    assert read_lock_state(tmp_path / "cashier-lock.json") == LockState(4, 0)  # each counted as a guess


async def test_a_clock_set_back_after_a_lock_out_locks_for_a_minute_not_for_days(tmp_path: Path) -> None:
    """A terminal whose clock ran 3 days ahead (common at a fair) locks its login after five wrong
    PINs; once its clock is corrected, the lock's end lay 3 days ahead: no cashier could log in
    for 3 days, not even with the right PIN."""
    clock = Clock(1_800_000_000_000 + 3 * DAY_MS)
    login = login_at(tmp_path, clock)
    for _ in range(MAX_FAILURES):
        with pytest.raises(WrongPin):
            await login.login("0000")
    clock.ms -= 3 * DAY_MS  # the clock is set right
    restarted = login_at(tmp_path, clock)
    with pytest.raises(Locked) as locked:
        await restarted.login(PIN)
    assert locked.value.retry_after_s == LOCK_MS // 1000
    clock.ms += LOCK_MS
    assert restarted.sessions.valid(await restarted.login(PIN))


async def test_wrong_pins_from_the_network_do_not_lock_the_devices_own_screen(tmp_path: Path) -> None:
    """With the API on the fair's Wi-Fi, anyone there could send five wrong PINs a minute and keep
    the terminal's own screen (the kiosk browser on loopback) locked out for good: one count per
    node. The network's tries are counted apart (all together: still five guesses a minute)."""
    clock = Clock(1_800_000_000_000)
    login = login_at(tmp_path, clock)
    for _ in range(MAX_FAILURES):
        with pytest.raises(WrongPin):
            await login.login("0000", local=False)
    with pytest.raises(Locked):
        await login.login(PIN, local=False)  # the network is locked out, even with the right PIN
    assert login.sessions.valid(await login.login(PIN))  # the device's own screen is not
    assert read_lock_state(tmp_path / "cashier-lock-remote.json").locked_until_ms == clock.ms + LOCK_MS
    assert read_lock_state(tmp_path / "cashier-lock.json") == LockState()
