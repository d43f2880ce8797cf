"""The terminal API's bearer token: ``NODE_DIR/api-token``, mode 0600, made once.

Enrollment makes it; a node directory enrolled before the terminal API existed gets one the
first time the node runs. A POS app on the device reads it from the file (it is as secret as
the node directory itself) and sends it as ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from meshpos.domain.errors import ConfigError
from meshpos.identity.keyfile import write_secret

TOKEN_BYTES = 32  # 256 bits, as URL-safe base64 (43 characters)


def ensure_api_token(path: Path) -> str:
    """The token in ``path``, made first if the file does not exist."""
    if not path.exists():
        write_secret(path, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode())
    return read_api_token(path)


def read_api_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{path}: the API token is readable by others (mode {mode:o}); chmod 600 it")
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the API token: {exc}") from exc
    if len(token) < 32 or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{path}: not an API token (delete it and restart the node to make a new one)")
    return token


def token_matches(expected: str, presented: str) -> bool:
    """Constant-time comparison (no timing oracle for the token's characters)."""
    return hmac.compare_digest(expected.encode(), presented.encode())
