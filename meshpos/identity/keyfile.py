"""A device's Ed25519 key on disk: PKCS#8 PEM (what ``ssl`` loads) with mode 0600.

The pure key functions are meshpos.identity.keys; this is the file side.
"""

from __future__ import annotations

import os
from pathlib import Path

import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshpos.domain.errors import ConfigError
from meshpos.identity.keys import to_crypto_private


def write_private_key(path: Path, key: nacl.signing.SigningKey) -> None:
    pem = to_crypto_private(key).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(path, pem)


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, not even briefly) and fsync it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_private_key(path: Path) -> nacl.signing.SigningKey:
    if path.exists() and path.stat().st_mode & 0o077:
        mode = path.stat().st_mode & 0o777
        raise ConfigError(f"{path}: private key is readable by others (mode {mode:o}); chmod 600 it")
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: key file is missing") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a PEM private key") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    raw = loaded.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return nacl.signing.SigningKey(raw)
