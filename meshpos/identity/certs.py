"""X.509 certificates of a site: the site CA and the devices it enrolls.

A device certificate carries the device's own Ed25519 key and names it in its
subject: CN = human name, OU = role, O = site id, UID = node id. The CA
certificate has CN = site name, O = site id, UID = site id.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import AbstractSet

import nacl.signing
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshpos.domain.roles import ROLES
from meshpos.domain.errors import CryptoError, VerificationError
from meshpos.identity import keys



@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    site_id: str
    role: str
    name: str
    public_key: bytes
    not_before_ms: int
    not_after_ms: int
    serial: int


def _ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)


def make_ca(site_name: str, key: nacl.signing.SigningKey, now_ms: int, valid_days: int = 3650) -> x509.Certificate:
    site_id = keys.node_id_of(bytes(key.verify_key))
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, site_name or site_id),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, site_id),
        x509.NameAttribute(NameOID.USER_ID, site_id),
    ])
    private = keys.to_crypto_private(key)
    start = _at(now_ms) - dt.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(private, None)
    )


def issue(
    ca_cert: x509.Certificate,
    ca_key: nacl.signing.SigningKey,
    public_key: bytes,
    role: str,
    name: str,
    now_ms: int,
    valid_days: int,
) -> x509.Certificate:
    if role not in ROLES:
        raise CryptoError(f"role must be one of {', '.join(ROLES)}")
    site_id = site_id_of(ca_cert)
    node_id = keys.node_id_of(public_key)
    start = _at(now_ms) - dt.timedelta(minutes=5)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, site_id),
        x509.NameAttribute(NameOID.USER_ID, node_id),
    ])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(keys.to_crypto_public(public_key))
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{node_id}.{site_id}.meshpos.invalid")]), critical=False)
        .sign(keys.to_crypto_private(ca_key), None)
    )


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    found = name.get_attributes_for_oid(oid)
    if len(found) != 1:
        raise VerificationError(f"certificate subject lacks exactly one {oid._name}")
    value = found[0].value
    return value if isinstance(value, str) else value.decode()


def site_id_of(ca_cert: x509.Certificate) -> str:
    return _attr(ca_cert.subject, NameOID.USER_ID)


def ca_public_key(ca_cert: x509.Certificate) -> bytes:
    pub = ca_cert.public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise CryptoError("site CA key is not Ed25519")
    return keys.public_bytes(pub)


def to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def load_pem(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except keys.X509_PARSE_ERRORS as exc:
        raise CryptoError(f"{what}: not a PEM certificate") from exc


def load_der(data: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(data)
    except keys.X509_PARSE_ERRORS as exc:
        raise VerificationError("not a DER certificate") from exc


def verify_node_cert(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    now_ms: int | None,
    revoked: AbstractSet[str] = frozenset(),
    roles: AbstractSet[str] = frozenset(ROLES),
) -> NodeIdentity:
    """Check chain to the site CA, validity at ``now_ms`` (None: skip), revocation and role."""
    try:
        return _verify_node_cert(cert, ca_cert, now_ms, revoked, roles)
    except keys.X509_PARSE_ERRORS as exc:  # cryptography parses lazily: a bad field fails only when read
        raise VerificationError(f"certificate does not parse: {exc}") from exc


def _verify_node_cert(cert: x509.Certificate, ca_cert: x509.Certificate, now_ms: int | None,
                      revoked: AbstractSet[str], roles: AbstractSet[str]) -> NodeIdentity:
    if cert.issuer != ca_cert.subject:
        raise VerificationError("certificate was not issued by this site's CA (another site?)")
    try:
        keys.to_crypto_public(ca_public_key(ca_cert)).verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature as exc:
        raise VerificationError("certificate signature does not verify against the site CA") from exc
    pub = cert.public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise VerificationError("certificate key is not Ed25519")
    public_key = keys.public_bytes(pub)
    ident = NodeIdentity(
        node_id=_attr(cert.subject, NameOID.USER_ID),
        site_id=_attr(cert.subject, NameOID.ORGANIZATION_NAME),
        role=_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        name=_attr(cert.subject, NameOID.COMMON_NAME),
        public_key=public_key,
        not_before_ms=_ms(cert.not_valid_before_utc),
        not_after_ms=_ms(cert.not_valid_after_utc),
        serial=cert.serial_number,
    )
    if ident.node_id != keys.node_id_of(public_key):
        raise VerificationError("certificate node id does not match its key")
    if ident.site_id != site_id_of(ca_cert):
        raise VerificationError(f"certificate belongs to site {ident.site_id}, not {site_id_of(ca_cert)}")
    if now_ms is not None and not ident.not_before_ms <= now_ms <= ident.not_after_ms:
        raise VerificationError(f"certificate of {ident.name} ({ident.node_id}) is expired or not yet valid")
    if ident.node_id in revoked:
        raise VerificationError(f"node {ident.name} ({ident.node_id}) is revoked")
    if ident.role not in roles:
        raise VerificationError(f"role {ident.role} of {ident.name} may not do this")
    return ident
