"""Ed25519 keys as small pure functions, and the one place a bad signature
becomes a typed error.

A device has one Ed25519 key: it signs sales and is the key of its TLS
certificate. It is stored as PKCS#8 PEM (what ``ssl`` loads) with mode 0600.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError, CryptoError, VerificationError

KEY_LEN = 32
SIG_LEN = 64
P = 2**255 - 19


def generate() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def node_id_of(public_key: bytes) -> str:
    """The id of a node or site: 16 hex digits of SHA-256 over its Ed25519 public key."""
    _check_len(public_key, KEY_LEN, "public key")
    return hashlib.sha256(b"meshpos-id\0" + public_key).hexdigest()[:16]


def _check_len(data: bytes, n: int, what: str) -> None:
    if not isinstance(data, bytes) or len(data) != n:
        raise CryptoError(f"{what} must be {n} bytes")


def sign(key: nacl.signing.SigningKey, message: bytes) -> bytes:
    return bytes(key.sign(message).signature)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise VerificationError unless ``signature`` is ``public_key``'s over ``message``."""
    _check_len(public_key, KEY_LEN, "public key")
    if len(signature) != SIG_LEN:
        raise VerificationError("signature has the wrong length")
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError) as exc:
        raise VerificationError("bad signature") from exc


def to_crypto_private(key: nacl.signing.SigningKey) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(key))


def to_crypto_public(public_key: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key)


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


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


@functools.lru_cache(maxsize=64)
def montgomery_to_edwards_candidates(x25519_public: bytes) -> tuple[bytes, bytes]:
    """The two Ed25519 public keys whose X25519 form is ``x25519_public``.

    The switch has one Ed25519 key: it signs settlement results with it and
    receives sealed card data on its X25519 form (what the site policy pins).
    The birational map u -> y = (u - 1) / (u + 1) loses only the sign of x, so a
    verifier holding the pinned X25519 key checks a result against both.
    """
    _check_len(x25519_public, KEY_LEN, "X25519 public key")
    u = int.from_bytes(x25519_public, "little") & ((1 << 255) - 1)
    if (u + 1) % P == 0:
        raise CryptoError("X25519 key is not on the curve's usable part")
    y = (u - 1) * pow(u + 1, P - 2, P) % P
    y_bytes = y.to_bytes(32, "little")
    with_sign = bytearray(y_bytes)
    with_sign[31] |= 0x80
    return y_bytes, bytes(with_sign)


def verify_by_x25519(x25519_public: bytes, message: bytes, signature: bytes) -> None:
    errors = 0
    for candidate in montgomery_to_edwards_candidates(x25519_public):
        try:
            verify(candidate, message, signature)
            return
        except VerificationError:
            errors += 1
    raise VerificationError("bad signature (not by the pinned switch key)")


def x25519_public_of(key: nacl.signing.SigningKey) -> bytes:
    return bytes(key.verify_key.to_curve25519_public_key())


def x25519_private_of(key: nacl.signing.SigningKey) -> bytes:
    return bytes(key.to_curve25519_private_key())
