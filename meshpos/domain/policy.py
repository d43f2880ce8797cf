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

MAX_SWITCH_INSTANCES = 16
MAX_SWITCH_URL = 200


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
    switch_url: str | None = None  # the switch's first instance (protocols/files.md, "Switch instances")
    # its further instances, in order of preference after switch_url; on the wire only when not
    # empty, so a one-instance policy reads exactly as before this field existed
    switch_more_urls: tuple[str, ...] = ()
    dashboard_password: str | None = None
    # ms since the epoch from which this version is in force (0: from the start); sales are
    # judged by the version in force at their own time (meshpos.domain.rules.policy_at)
    effective_at: int = 0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.switch_more_urls:
            data["switch_more_urls"] = list(self.switch_more_urls)
        else:
            del data["switch_more_urls"]  # an older decoder refuses unknown fields: absent when unused
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> "SitePolicy":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: policy must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{where}: unknown policy fields {sorted(unknown)}")
        if isinstance(data.get("switch_more_urls"), list):
            data = {**data, "switch_more_urls": tuple(data["switch_more_urls"])}
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
        self._validate_switch_urls(where)
        if self.switch_key is not None:
            try:
                if len(bytes.fromhex(self.switch_key)) != 32:
                    raise ValueError
            except ValueError as exc:
                raise ConfigError(f"{where}: switch_key must be 64 hex characters") from exc

    def _validate_switch_urls(self, where: str) -> None:
        more = self.switch_more_urls
        if not isinstance(more, tuple) or not all(isinstance(u, str) for u in more):
            raise ConfigError(f"{where}: switch_more_urls must be a list of URLs")
        if more and self.switch_url is None:
            raise ConfigError(f"{where}: switch_more_urls needs switch_url (the first instance)")
        if len(more) > MAX_SWITCH_INSTANCES - 1:
            raise ConfigError(f"{where}: at most {MAX_SWITCH_INSTANCES} switch instances")
        urls = self.switch_urls
        for url in more:  # switch_url itself is checked where it is set (older policies hold it as it was)
            if not url.startswith("https://") or len(url) > MAX_SWITCH_URL:
                raise ConfigError(f"{where}: a switch URL must be https://HOST:PORT "
                                  f"(at most {MAX_SWITCH_URL} characters), got {str(url)[:80]!r}")
        if len(set(urls)) != len(urls):
            raise ConfigError(f"{where}: a switch instance is listed twice")

    @property
    def switch_urls(self) -> tuple[str, ...]:
        """Every instance of the switch, in the policy's order: switch_url, then switch_more_urls."""
        return () if self.switch_url is None else (self.switch_url, *self.switch_more_urls)

    @property
    def switch_key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.switch_key) if self.switch_key else None

    @property
    def offline_window_ms(self) -> int:
        return self.offline_window_s * 1000

    def _fmt(self, minor: int) -> str:
        return f"{format_amount(minor, self.currency)} {self.currency}"

    def check_amount(self, amount_minor: int) -> None:
        """Refuse a sale (card or cash) over the per-sale cap."""
        fmt = self._fmt
        if amount_minor > self.max_sale_minor:
            raise PolicyError(
                f"amount {fmt(amount_minor)} is over the per-sale offline cap of {fmt(self.max_sale_minor)} "
                f"by {fmt(amount_minor - self.max_sale_minor)}"
            )

    def check_sale(self, amount_minor: int, terminal_pending_minor: int) -> None:
        """Refuse a card sale over the per-sale cap or the terminal's stored-total cap (of the card
        sales awaiting authorization: cash is final when taken and counts in no stored total)."""
        fmt = self._fmt
        self.check_amount(amount_minor)
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
