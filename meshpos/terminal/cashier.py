"""The cashier app's login, without HTTP: the PIN check, the lock-out after wrong PINs, sessions.

Rules (protocols/terminal-api.yaml, "The cashier app's session"):
- ``MAX_FAILURES`` wrong PINs in a row lock the login for ``LOCK_MS``; while locked no PIN is
  even checked (a right one included). A right PIN ends the count.
- The count and the lock's end are written to ``NODE_DIR/cashier-lock.json`` before the answer
  goes out: a restart of the node, or a power cycle of the device, gives no new tries. The lock
  is counted per node, not per client address: on loopback every client has the same address,
  and the node serves one screen. Logins from beyond loopback (an API listening on the Wi-Fi)
  are counted apart, in ``cashier-lock-remote.json``, all of them together: anyone on the
  fair's Wi-Fi could otherwise keep the device's own screen locked out for good, five wrong
  PINs a minute; guesses from the network are still five a minute in all.
- Attempts are taken one at a time: five parallel guesses are five attempts in a row.
- A PIN that cannot be one (not 4 to 12 ASCII digits: letters, a lone surrogate...) is a wrong
  PIN, counted, and never hashed.
- The lock's end is wall-clock time: a lock that ends more than ``LOCK_MS`` from now was set
  before the clock was set back (a terminal's clock corrected by days after a lock-out); it
  ends ``LOCK_MS`` from now instead, so a corrected clock never locks the cashier out for days.
- A session is a random token (256 bits) in an HttpOnly, SameSite=Strict cookie; the node keeps
  only its hash, in memory (a restart of the node logs the cashier out), for ``SESSION_MS``
  after the login; at most ``MAX_SESSIONS`` at once (the oldest goes first).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import trio

from meshpos.domain.errors import MeshposError
from meshpos.site.cashierpin import (LockState, pin_matches, pin_problem, read_lock_state, read_pin_hash,
                                     write_lock_state)

MAX_FAILURES = 5
LOCK_MS = 60_000
SESSION_MS = 12 * 3600 * 1000  # a working day at a stall
MAX_SESSIONS = 16
COOKIE = "meshpos_cashier"


class LoginRefused(MeshposError):
    """A login that did not open a session (the base of the three below)."""


class NoPin(LoginRefused):
    """No cashier PIN was set on this node."""


class WrongPin(LoginRefused):
    def __init__(self, tries_left: int) -> None:
        super().__init__(f"wrong PIN ({tries_left} tries left before a one-minute lock)" if tries_left
                         else "wrong PIN: the login is locked for a minute")
        self.tries_left = tries_left


class Locked(LoginRefused):
    def __init__(self, retry_after_ms: int) -> None:
        seconds = max(1, -(-retry_after_ms // 1000))
        super().__init__(f"too many wrong PINs: try again in {seconds} s")
        self.retry_after_s = seconds


def after_attempt(state: LockState, ok: bool, now_ms: int) -> LockState:
    """The lock state after one checked PIN (the rule, in one place)."""
    if ok:
        return LockState()
    failures = state.failures + 1
    if failures >= MAX_FAILURES:
        return LockState(0, now_ms + LOCK_MS)  # the count starts again once the lock is over
    return LockState(failures, 0)


def locked_for(state: LockState, now_ms: int) -> int:
    """ms left of the lock (0: not locked)."""
    return max(0, state.locked_until_ms - now_ms)


def after_clock_change(state: LockState, now_ms: int) -> LockState:
    """``state`` with a lock that ends further off than LOCK_MS (the clock was set back since it
    began) ending LOCK_MS from ``now_ms``."""
    if state.locked_until_ms - now_ms > LOCK_MS:
        return LockState(state.failures, now_ms + LOCK_MS)
    return state


class Sessions:
    def __init__(self, now_ms: Callable[[], int]) -> None:
        self._now = now_ms
        self._ends: OrderedDict[bytes, int] = OrderedDict()  # token hash -> end (ms)

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    def open(self) -> str:
        token = secrets.token_urlsafe(32)
        self._ends[self._key(token)] = self._now() + SESSION_MS
        while len(self._ends) > MAX_SESSIONS:
            self._ends.popitem(last=False)
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        key = self._key(token)
        ends = self._ends.get(key)
        if ends is None:
            return False
        if ends <= self._now():
            del self._ends[key]
            return False
        return True

    def close(self, token: str | None) -> None:
        if token:
            self._ends.pop(self._key(token), None)


class CashierLogin:
    """The PIN login of one node; ``now_ms`` is the wall clock (the lock's end is persisted)."""

    def __init__(self, pin_path: Path, lock_path: Path, now_ms: Callable[[], int]) -> None:
        self.pin_path = pin_path
        self.lock_path = lock_path
        self.remote_lock_path = lock_path.with_name(lock_path.stem + "-remote" + lock_path.suffix)
        self.now_ms = now_ms
        self.sessions = Sessions(now_ms)
        self._one_at_a_time = trio.Lock()

    def pin_set(self) -> bool:
        return read_pin_hash(self.pin_path) is not None

    async def login(self, pin: str, local: bool = True) -> str:
        """A new session's token, or LoginRefused (NoPin, Locked, WrongPin); ``local``: the client
        is on loopback (the device's own screen), else its tries are counted apart."""
        lock_path = self.lock_path if local else self.remote_lock_path
        async with self._one_at_a_time:
            state = read_lock_state(lock_path)
            now = self.now_ms()
            if (fixed := after_clock_change(state, now)) != state:
                write_lock_state(lock_path, fixed)
                state = fixed
            left = locked_for(state, now)
            if left:
                raise Locked(left)
            stored = read_pin_hash(self.pin_path)
            if stored is None:
                raise NoPin("no cashier PIN is set on this terminal: run `meshpos cashier-pin NODE_DIR` on it")
            ok = pin_problem(pin) is None and await trio.to_thread.run_sync(pin_matches, stored, pin)
            new = after_attempt(state, ok, self.now_ms())
            if new != state:
                write_lock_state(lock_path, new)
            if not ok:
                raise WrongPin(MAX_FAILURES - new.failures if new.failures else 0)
            return self.sessions.open()


@dataclass(frozen=True)
class CookiePolicy:
    secure: bool  # TLS (off loopback): the cookie goes over HTTPS only

    def set(self, token: str) -> str:
        return (f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_MS // 1000}"
                + ("; Secure" if self.secure else ""))

    def clear(self) -> str:
        return f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0" + ("; Secure" if self.secure else "")


def cookie_value(header: str | None) -> str | None:
    """The session token in a ``Cookie`` header, if any."""
    if not header:
        return None
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None
