"""Ed25519 keys as small pure functions, and the one place a bad signature
becomes a typed error.

A device has one Ed25519 key: it signs sales and is the key of its TLS
certificate. Reading and writing it (PKCS#8 PEM, mode 0600) is meshpos.identity.keyfile;
nothing here touches a file, so meshpos.wire may sign and verify with it.
"""

from __future__ import annotations

import functools
import hashlib

import nacl.exceptions
import nacl.signing
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshpos.domain.errors import CryptoError, VerificationError

KEY_LEN = 32
SIG_LEN = 64
P = 2**255 - 19


# What cryptography raises for bytes that are not a usable certificate: ValueError; InvalidVersion
# (not a ValueError) for a version field other than v1 or v3, which anyone can put in a cert entry;
# UnsupportedAlgorithm when the certificate's key is of a type it does not know (raised only once
# ``public_key()`` reads it: cryptography parses lazily).
# Here, not in meshpos.identity.certs, so that meshpos.wire (the switch pin) shares it.
X509_PARSE_ERRORS = (ValueError, x509.InvalidVersion, UnsupportedAlgorithm)


def generate() -> nacl.signing.SigningKey:
    """A new key whose id (``node_id_of``) holds at least one hex letter: an id of 16 decimal
    digits (one key in ~1,900) makes its sale ids look like card numbers to the scans that keep
    card numbers out of error messages and logs (wire/envelope.py SALE_ID_IN_TEXT), which then
    blanked the node's own sale ids in its answers."""
    while True:
        key = nacl.signing.SigningKey.generate()
        if not node_id_of(bytes(key.verify_key)).isdigit():
            return key


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


# X25519 key -> the Ed25519 candidate that verified last: tried first next time. Every result a
# switch signs is checked on every node, and the wrong candidate first cost a second Ed25519
# check each time for a switch key whose sign bit is set (half of them).
_LAST_GOOD: dict[bytes, bytes] = {}
_LAST_GOOD_MAX = 64


def verify_by_x25519(x25519_public: bytes, message: bytes, signature: bytes) -> None:
    first, second = montgomery_to_edwards_candidates(x25519_public)
    if _LAST_GOOD.get(x25519_public) == second:
        first, second = second, first
    for candidate in (first, second):
        try:
            verify(candidate, message, signature)
        except VerificationError:
            continue
        if candidate != first and (x25519_public in _LAST_GOOD or len(_LAST_GOOD) < _LAST_GOOD_MAX):
            _LAST_GOOD[x25519_public] = candidate
        return
    raise VerificationError("bad signature (not by the pinned switch key)")


def x25519_public_of(key: nacl.signing.SigningKey) -> bytes:
    return bytes(key.verify_key.to_curve25519_public_key())


def x25519_private_of(key: nacl.signing.SigningKey) -> bytes:
    return bytes(key.to_curve25519_private_key())
