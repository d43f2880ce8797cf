"""Card numbers: Luhn check, brand, masking, and sealing to the switch's key.

A full PAN exists only between the reader (or the ``--card`` option standing in
for one) and :func:`seal_card`; everything after holds the sealed box, the
brand and the last 4 digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.exceptions
import nacl.public

from . import canonical
from .errors import CryptoError, EncodingError, InputError

ENTRY_MODES = ("chip", "contactless", "magstripe", "manual")


def luhn_ok(pan: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


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
    pan = pan.replace(" ", "").replace("-", "")
    if not pan.isdigit() or not 12 <= len(pan) <= 19:
        raise InputError("card number must be 12 to 19 digits")
    if not luhn_ok(pan):
        raise InputError(f"card number ending {pan[-4:]} fails the Luhn check (mistyped?)")
    return pan


def check_expiry(expiry: str | None) -> str | None:
    if expiry is None:
        return None
    if len(expiry) != 4 or not expiry.isdigit() or not 1 <= int(expiry[:2]) <= 12:
        raise InputError(f"expiry must be MMYY, got {expiry!r}")
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


def seal_card(pan: str, expiry: str | None, entry_mode: str, switch_key: bytes) -> CardCapture:
    """Validate a PAN and seal it (with expiry) to the switch's X25519 public key."""
    pan = check_pan(pan)
    expiry = check_expiry(expiry)
    if entry_mode not in ENTRY_MODES:
        raise InputError(f"entry mode must be one of {', '.join(ENTRY_MODES)}")
    if len(switch_key) != 32:
        raise CryptoError("switch public key must be 32 bytes")
    plaintext = canonical.encode({"pan": pan, "expiry": expiry})
    sealed = nacl.public.SealedBox(nacl.public.PublicKey(switch_key)).encrypt(plaintext)
    return CardCapture(brand=brand_of(pan), last4=pan[-4:], entry_mode=entry_mode, sealed=bytes(sealed))


@dataclass(frozen=True)
class OpenedCard:
    pan: str
    expiry: str | None


def open_card(sealed: bytes, switch_private_key: bytes) -> OpenedCard:
    """The switch side of :func:`seal_card`."""
    try:
        plaintext = nacl.public.SealedBox(nacl.public.PrivateKey(switch_private_key)).decrypt(sealed)
        data = canonical.decode(plaintext)
        pan, expiry = data["pan"], data["expiry"]
    except (nacl.exceptions.CryptoError, EncodingError, KeyError, TypeError, ValueError) as exc:
        raise CryptoError("sealed card data cannot be opened (tampered, or sealed to another switch)") from exc
    if not isinstance(pan, str) or not pan.isdigit() or not luhn_ok(pan):
        raise CryptoError("sealed card data holds no valid card number")
    return OpenedCard(pan=pan, expiry=expiry if isinstance(expiry, str) else None)
