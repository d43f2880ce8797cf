"""Signed envelopes: the one format of every entry of the site ledger.

Normative spec: protocols/envelope.md. An envelope is canonical JSON
(meshpos.canonical) of ``{"v", "type", "signer", "body", "sig"}``; the
signature is Ed25519 over ``DOMAIN + canonical({"v","type","signer","body"})``.
Decoding is strict: unknown keys, a wrong version, a non-canonical encoding or
an oversize envelope are refused before any signature is checked.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Callable

import nacl.signing

from meshpos.domain.errors import EncodingError, VerificationError
from meshpos.identity import keys
from meshpos.domain.rules import is_ascii_digits
from meshpos.wire import canonical

VERSION = 1
DOMAIN = b"meshpos-envelope-v1\0"
MAX_ENVELOPE = 8192
TYPES = ("sale", "void", "result", "reversal", "cert", "revocation", "policy", "lease", "status")
_FIELDS = {"v", "type", "signer", "body", "sig"}


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise EncodingError(f"{what} must be a base64url string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise EncodingError(f"{what} is not base64url") from exc
    if b64e(raw) != text:
        raise EncodingError(f"{what} is not canonical base64url")
    return raw


@dataclass(frozen=True)
class Envelope:
    type: str
    signer: str
    body: dict[str, Any]
    sig: bytes
    raw: bytes

    def signed_bytes(self) -> bytes:
        """DOMAIN + canonical JSON without "sig", cut out of ``raw`` itself.

        ``raw`` is canonical with keys sorted body < sig < signer < type < v, so removing
        its top-level ``,"sig":"..."`` member yields exactly the signed encoding. The
        top-level member is the last occurrence (nothing after it can hold that text); if
        a body were to hold the same text, the wrong cut only makes verification fail.
        """
        member = b',"sig":"' + b64e(self.sig).encode("ascii") + b'"'
        at = self.raw.rfind(member)
        if at < 0:
            return signed_bytes(self.type, self.signer, self.body)
        return DOMAIN + self.raw[:at] + self.raw[at + len(member):]


def signed_bytes(type_: str, signer: str, body: dict[str, Any]) -> bytes:
    return DOMAIN + canonical.encode({"v": VERSION, "type": type_, "signer": signer, "body": body})


def seal(type_: str, signer: str, body: dict[str, Any], key: nacl.signing.SigningKey) -> bytes:
    if type_ not in TYPES:
        raise EncodingError(f"unknown envelope type {type_!r}")
    sig = keys.sign(key, signed_bytes(type_, signer, body))
    raw = canonical.encode({"v": VERSION, "type": type_, "signer": signer, "body": body, "sig": b64e(sig)})
    if len(raw) > MAX_ENVELOPE:
        raise EncodingError(f"envelope of {len(raw)} bytes exceeds {MAX_ENVELOPE}")
    return raw


def decode(raw: bytes) -> Envelope:
    if not isinstance(raw, (bytes, bytearray)):
        raise EncodingError("envelope must be bytes")
    raw = bytes(raw)
    if len(raw) > MAX_ENVELOPE:
        raise EncodingError(f"envelope of {len(raw)} bytes exceeds {MAX_ENVELOPE}")
    obj = canonical.decode(raw)
    if not isinstance(obj, dict) or set(obj) != _FIELDS:
        raise EncodingError("envelope must have exactly the fields v, type, signer, body, sig")
    if obj["v"] != VERSION or type(obj["v"]) is not int:  # true == 1 in Python: no second encoding
        raise EncodingError(f"unsupported envelope version {obj['v']!r}")
    if obj["type"] not in TYPES:
        raise EncodingError(f"unknown envelope type {obj['type']!r}")
    signer = obj["signer"]
    if not isinstance(signer, str) or not 1 <= len(signer) <= 64:
        raise EncodingError("envelope signer must be a short string")
    if not isinstance(obj["body"], dict):
        raise EncodingError("envelope body must be an object")
    sig = b64d(obj["sig"], "signature")
    if len(sig) != keys.SIG_LEN:
        raise EncodingError("signature must be 64 bytes")
    return Envelope(type=obj["type"], signer=signer, body=obj["body"], sig=sig, raw=raw)


def check_signature(env: Envelope, public_key: bytes) -> None:
    keys.verify(public_key, env.signed_bytes(), env.sig)


# -- body schemas --------------------------------------------------------------

Check = Callable[[Any], bool]


def _str(max_len: int) -> Check:
    return lambda v: isinstance(v, str) and len(v) <= max_len


def _int(lo: int, hi: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _opt(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _may_lack(check: Check) -> Check:
    """A field that may be absent (added after version 1 of the body; absent = None)."""
    def ok(v: Any) -> bool:
        return check(v)
    ok.optional = True  # type: ignore[attr-defined]
    return ok


def _one_of(*values: Any) -> Check:
    return lambda v: v in values


@dataclass(frozen=True)
class _Fields:
    """A body schema as ``check_body`` walks it: the field sets worked out once, not per entry."""
    checks: tuple[tuple[str, Check], ...]
    required: frozenset[str]
    allowed: frozenset[str]


def _fields(schema: dict[str, Check]) -> _Fields:
    optional = {f for f, ok in schema.items() if getattr(ok, "optional", False)}
    return _Fields(tuple(schema.items()), frozenset(set(schema) - optional), frozenset(schema))


_ABSENT = object()


def _check_fields(body: dict[str, Any], fields: _Fields, what: str) -> None:
    present = body.keys()
    if not (fields.required <= present and present <= fields.allowed):
        missing = fields.allowed - present
        extra = present - fields.allowed
        raise EncodingError(f"{what}: missing {sorted(missing)} / unexpected {sorted(extra)}")
    get = body.get
    for field, ok in fields.checks:
        value = get(field, _ABSENT)
        if value is not _ABSENT and not ok(value):
            raise EncodingError(f"{what}: field {field!r} has a bad value")


def check_body(body: dict[str, Any], schema: dict[str, Check], what: str) -> None:
    _check_fields(body, _fields(schema), what)


INT64 = 2**53
SCHEMAS: dict[str, dict[str, Check]] = {
    "sale": {
        "sale_id": _str(64), "site": _str(32), "terminal": _str(32), "seq": _int(1, INT64),
        "created_at": _int(0, INT64), "amount_minor": _int(1, 10**12), "currency": _str(3),
        "method": _one_of("card", "cash"), "description": _opt(_str(200)),
        "items": lambda v: isinstance(v, list) and len(v) <= 50 and all(isinstance(i, dict) for i in v),
        "card": lambda v: v is None or isinstance(v, dict),
    },
    "void": {"sale_id": _str(64), "site": _str(32), "at": _int(0, INT64), "reason": _opt(_str(200))},
    "result": {
        "sale_id": _str(64), "site": _str(32), "status": _one_of("approved", "declined", "expired", "rejected", "voided"),
        "auth_code": _opt(_str(12)), "response_code": _opt(_str(4)), "reason": _opt(_str(300)),
        "settled_at": _int(0, INT64), "reversed": lambda v: isinstance(v, bool),
    },
    # a void after approval, reversed at the acquirer (0420): signed by the switch
    "reversal": {
        "sale_id": _str(64), "site": _str(32), "reversed_at": _int(0, INT64),
        "response_code": _opt(_str(4)), "reason": _opt(_str(300)),
    },
    "cert": {"cert": _str(4096)},
    # cut_seq: entries of the revoked terminal with seq <= cut_seq stay valid; with no
    # cut_seq, entries dated up to ``at`` do (protocols/rules.md, "Revocation")
    "revocation": {"node_id": _str(32), "site": _str(32), "at": _int(0, INT64), "reason": _opt(_str(200)),
                   "cut_seq": _may_lack(_opt(_int(0, INT64)))},
    "policy": {"policy": lambda v: isinstance(v, dict)},
    "lease": {"site": _str(32), "holder": _str(32), "scope": _str(64), "granted_at": _int(0, INT64), "until": _int(0, INT64)},
    "status": {"status": lambda v: isinstance(v, dict)},
}

CARD_SCHEMA: dict[str, Check] = {
    "brand": _str(16), "last4": lambda v: is_ascii_digits(v, 4, 4),
    "entry_mode": _one_of("chip", "contactless", "magstripe", "manual"), "sealed": _str(1024),
}


_SCHEMA_FIELDS = {type_: _fields(schema) for type_, schema in SCHEMAS.items()}
_CARD_FIELDS = _fields(CARD_SCHEMA)


def check_schema(env: Envelope) -> None:
    _check_fields(env.body, _SCHEMA_FIELDS[env.type], f"{env.type} envelope")
    if env.type == "sale":
        card = env.body["card"]
        if (env.body["method"] == "card") != (card is not None):
            raise EncodingError("sale envelope: card data must be present exactly for card sales")
        if card is not None:
            _check_fields(card, _CARD_FIELDS, "sale envelope card")
            b64d(card["sealed"], "sealed card data")
        if env.body["terminal"] != env.signer:
            raise VerificationError("sale envelope signed by another node than its terminal")
        if env.body["sale_id"] != sale_id(env.body["terminal"], env.body["seq"]):
            raise EncodingError("sale envelope: sale id does not match terminal and sequence")


def sale_id(terminal_id: str, seq: int) -> str:
    return f"{terminal_id}-{seq:08d}"


# A sale id inside some text. Its node id's last hex digits and its number make a digit run that
# is no card number; one whose node id is all digits is not matched (it could be a card number).
# Whoever scans text for card numbers (error messages, argv) leaves these out.
SALE_ID_IN_TEXT = re.compile(r"\b(?=[0-9a-f]{0,15}[a-f])[0-9a-f]{16}-\d{8}\b")
