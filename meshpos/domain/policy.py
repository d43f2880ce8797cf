"""The site policy: currency, offline rules, the switch; signed by the site CA.

The policy travels as a ``policy`` envelope signed by the site CA with a
version number; a node keeps the highest version it has verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from meshpos.domain.currency import check_currency, format_amount
from meshpos.domain.errors import ConfigError, PolicyError


@dataclass(frozen=True)
class SitePolicy:
    site_id: str
    name: str
    currency: str = "EUR"
    version: int = 1
    offline_window_s: int = 24 * 3600
    warn_before_s: int = 3 * 3600
    max_sale_minor: int = 50_000
    max_terminal_pending_minor: int = 1_000_000
    max_site_pending_minor: int = 10_000_000
    switch_key: str | None = None
    switch_url: str | None = None
    dashboard_password: str | None = None
    # ms since the epoch from which this version is in force (0: from the start); sales are
    # judged by the version in force at their own time (meshpos.domain.rules.policy_at)
    effective_at: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "SitePolicy":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: policy must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{where}: unknown policy fields {sorted(unknown)}")
        try:
            policy = cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        policy.validate(where)
        return policy

    def validate(self, where: str) -> None:
        ints = ("version", "offline_window_s", "warn_before_s", "max_sale_minor",
                "max_terminal_pending_minor", "max_site_pending_minor")
        if not isinstance(self.effective_at, int) or isinstance(self.effective_at, bool) or self.effective_at < 0:
            raise ConfigError(f"{where}: effective_at must be a non-negative integer (ms)")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: {name} must be a positive integer")
        try:
            check_currency(self.currency)
        except Exception as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if self.switch_key is not None:
            try:
                if len(bytes.fromhex(self.switch_key)) != 32:
                    raise ValueError
            except ValueError as exc:
                raise ConfigError(f"{where}: switch_key must be 64 hex characters") from exc

    @property
    def switch_key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.switch_key) if self.switch_key else None

    @property
    def offline_window_ms(self) -> int:
        return self.offline_window_s * 1000

    def check_sale(self, amount_minor: int, terminal_pending_minor: int) -> None:
        """Refuse a sale over the per-sale cap or the terminal's stored-total cap."""
        def fmt(minor: int) -> str:
            return f"{format_amount(minor, self.currency)} {self.currency}"
        if amount_minor > self.max_sale_minor:
            raise PolicyError(
                f"amount {fmt(amount_minor)} is over the per-sale offline cap of {fmt(self.max_sale_minor)} "
                f"by {fmt(amount_minor - self.max_sale_minor)}"
            )
        total = terminal_pending_minor + amount_minor
        if total > self.max_terminal_pending_minor:
            raise PolicyError(
                f"this sale would bring the terminal's pending offline total to {fmt(total)}, over its cap of "
                f"{fmt(self.max_terminal_pending_minor)} by {fmt(total - self.max_terminal_pending_minor)}; "
                "forward the queue (uplink) or take cash"
            )


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(stored: str, password: str) -> bool:
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return hmac.compare_digest(digest.hex(), digest_hex)
