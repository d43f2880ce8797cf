"""Card numbers: Luhn check, brand, masking, and sealing to the switch's key.

A full PAN exists only between the reader (or the ``--card`` option standing in
for one) and :func:`seal_card`; everything after holds the sealed box, the
brand and the last 4 digits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import nacl.exceptions
import nacl.public

from meshpos.domain.errors import CryptoError, EncodingError, InputError
from meshpos.domain.rules import ENTRY_MODES, expiry_problem, is_ascii_digits, pan_problem
from meshpos.wire import canonical





def brand_of(pan: str) -> str:
    if pan.startswith("4"):
        return "visa"
    two, four = int(pan[:2]), int(pan[:4])
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return "mastercard"
    if two in (34, 37):
        return "amex"
    if pan.startswith(("50", "56", "57", "58", "6")):
        return "maestro"
    return "other"


def check_pan(pan: str) -> str:
    """A typed card number, spaces and dashes allowed between digits; ASCII digits only."""
    pan = pan.replace(" ", "").replace("-", "")
    problem = pan_problem(pan)
    if problem:
        raise InputError(problem)
    return pan


def check_expiry(expiry: str | None, at_ms: int | None = None) -> str | None:
    """MMYY in ASCII digits; with ``at_ms``, also not expired at that time."""
    problem = expiry_problem(expiry, at_ms)
    if problem:
        raise InputError(problem)
    return expiry


def mask(pan: str) -> str:
    return "*" * (len(pan) - 4) + pan[-4:]


@dataclass(frozen=True)
class CardCapture:
    """What leaves the card reader: never the PAN itself."""

    brand: str
    last4: str
    entry_mode: str
    sealed: bytes


def seal_card(pan: str, expiry: str | None, entry_mode: str, switch_key: bytes,
              at_ms: int | None = None, ephemeral: bytes | None = None) -> CardCapture:
    """Validate a PAN (and, with ``at_ms``, that the card is not expired then) and seal it
    with its expiry to the switch's X25519 public key.

    ``ephemeral``: the sealed box's one-time X25519 private key (32 bytes), for the site
    simulation only, where a seed must give the same sale bytes; the box is then made as
    libsodium's sealed box makes it (the nonce BLAKE2b(ephemeral public key || switch key), then
    crypto_box), and opens the same way. A till leaves it out: a fresh random key per card."""
    pan = check_pan(pan)
    expiry = check_expiry(expiry, at_ms)
    if entry_mode not in ENTRY_MODES:
        raise InputError(f"entry mode must be one of {', '.join(ENTRY_MODES)}")
    if len(switch_key) != 32:
        raise CryptoError("switch public key must be 32 bytes")
    plaintext = canonical.encode({"pan": pan, "expiry": expiry})
    if ephemeral is None:
        sealed = bytes(nacl.public.SealedBox(nacl.public.PublicKey(switch_key)).encrypt(plaintext))
    else:
        one_time = nacl.public.PrivateKey(ephemeral)
        public = bytes(one_time.public_key)
        nonce = hashlib.blake2b(public + switch_key, digest_size=24).digest()
        box = nacl.public.Box(one_time, nacl.public.PublicKey(switch_key))
        sealed = public + box.encrypt(plaintext, nonce).ciphertext
    return CardCapture(brand=brand_of(pan), last4=pan[-4:], entry_mode=entry_mode, sealed=sealed)


@dataclass(frozen=True)
class OpenedCard:
    pan: str
    expiry: str | None


def open_card(sealed: bytes, switch_private_key: bytes | nacl.public.PrivateKey) -> OpenedCard:
    """The switch side of :func:`seal_card`. A switch opening many passes its key as a
    ``PrivateKey`` made once (making one from bytes derives the public key: a scalar multiplication).
    The number is checked to be ASCII digits only: whether it is a card number (its length, the
    Luhn check, an issued number) is ``rules.pan_problem``'s, which the switch applies once per
    sale (``rules.card_problem``), and every :class:`~meshpos.wire.acquirer.AcquirerRequest` made
    from it checks it again (``check_pan``) before anything reaches an acquirer."""
    try:
        key = (switch_private_key if isinstance(switch_private_key, nacl.public.PrivateKey)
               else nacl.public.PrivateKey(switch_private_key))
        plaintext = nacl.public.SealedBox(key).decrypt(sealed)
        data = canonical.decode(plaintext)
        pan, expiry = data["pan"], data["expiry"]
    except (nacl.exceptions.CryptoError, EncodingError, KeyError, TypeError, ValueError) as exc:
        raise CryptoError("sealed card data cannot be opened (tampered, or sealed to another switch)") from exc
    if not is_ascii_digits(pan):
        raise CryptoError("sealed card data holds no valid card number")
    return OpenedCard(pan=pan, expiry=expiry if isinstance(expiry, str) else None)
