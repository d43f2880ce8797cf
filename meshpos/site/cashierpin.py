"""The cashier PIN of a node: ``NODE_DIR/cashier-pin`` (0600) holds its scrypt hash, never the PIN;
``NODE_DIR/cashier-lock.json`` (0600) the count of wrong PINs and the end of a lock-out, so that
a restart of the node (or of the device) does not give five more tries.

The PIN is set at enrollment (``meshpos enroll ... --cashier-pin``) or later with
``meshpos cashier-pin NODE_DIR``; it is read on every login, so a new PIN takes effect on a
running node at once. The hash is the dashboard password's (scrypt, meshpos.domain.policy).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from meshpos.domain.errors import ConfigError, InputError
from meshpos.domain.policy import check_password, hash_password
from meshpos.identity.keyfile import write_secret

PIN_MIN, PIN_MAX = 4, 12
GENERATED_DIGITS = 6


def pin_problem(pin: str) -> str | None:
    if not (pin.isascii() and pin.isdigit()):
        return "a cashier PIN is digits only (0-9)"
    if not PIN_MIN <= len(pin) <= PIN_MAX:
        return f"a cashier PIN has {PIN_MIN} to {PIN_MAX} digits"
    if len(set(pin)) == 1:
        return "a cashier PIN of one digit repeated is too easy to guess"
    return None


def generate_pin() -> str:
    while True:
        pin = "".join(secrets.choice("0123456789") for _ in range(GENERATED_DIGITS))
        if pin_problem(pin) is None:
            return pin


def set_cashier_pin(path: Path, pin: str) -> None:
    problem = pin_problem(pin)
    if problem is not None:
        raise InputError(problem)
    write_secret(path, (hash_password(pin) + "\n").encode())


def read_pin_hash(path: Path) -> str | None:
    """The stored hash; None when no PIN was set."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{path}: the cashier PIN hash is readable by others (mode {mode:o}); chmod 600 it")
        stored = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the cashier PIN hash: {exc}") from exc
    if not stored.startswith("scrypt$"):
        raise ConfigError(f"{path}: not a cashier PIN hash (set the PIN again: meshpos cashier-pin NODE_DIR)")
    return stored


def pin_matches(stored: str, pin: str) -> bool:
    """Slow on purpose (scrypt, 16 MiB): run it in a worker thread."""
    return check_password(stored, pin)


@dataclass(frozen=True)
class LockState:
    failures: int = 0  # wrong PINs in a row
    locked_until_ms: int = 0  # wall-clock ms; 0: not locked


def read_lock_state(path: Path) -> LockState:
    """The persisted state: a missing file is no failures; a damaged one is an error (no login until
    it is deleted: fail closed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        failures, until = data["failures"], data["locked_until_ms"]
        if not (isinstance(failures, int) and isinstance(until, int)) or failures < 0 or until < 0:
            raise ValueError("bad values")
        return LockState(failures, until)
    except FileNotFoundError:
        return LockState()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: the cashier login state is damaged ({exc}); delete it to reset") from exc


def write_lock_state(path: Path, state: LockState) -> None:
    write_secret(path, (json.dumps({"failures": state.failures, "locked_until_ms": state.locked_until_ms})
                        + "\n").encode())
