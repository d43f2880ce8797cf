"""TLS 1.3 for links: mutual authentication with the nodes' Ed25519 certificates.

The site CA (ca.pem) is the only trust root; both ends must present a
certificate (CERT_REQUIRED on both sides). Host names mean nothing on a fair's
Wi-Fi, so ``check_hostname`` is off and the peer's identity is checked at the
application layer by ``peer_identity``: chain to this site's CA, validity now,
not revoked, a role that may hold a link, the same key the ledger knows for
that node. OpenSSL already refuses another site's, a self-signed or an expired
certificate during the handshake; ``peer_identity`` repeats those checks with
the roster's revocations, which OpenSSL does not know.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

from meshpos.domain.errors import ConfigError, VerificationError
from meshpos.identity import certs
from meshpos.site.roster import Roster

LINK_ROLES = frozenset(certs.ROLES)  # every enrolled role may hold a link ...
WRITE_ROLES = certs.SELLING_ROLES  # ... but only these are trusted to send entries


@dataclass(frozen=True)
class LinkPeer:
    identity: certs.NodeIdentity
    read_only: bool

    @property
    def node_id(self) -> str:
        return self.identity.node_id


def _context(purpose: ssl.Purpose, server_side: bool, cert_path: Path, key_path: Path,
             ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except (ssl.SSLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert_path} / key {key_path}: {exc}") from exc
    return ctx


def server_context(cert_path: Path, key_path: Path, ca_pem: bytes) -> ssl.SSLContext:
    return _context(ssl.Purpose.CLIENT_AUTH, True, cert_path, key_path, ca_pem)


def client_context(cert_path: Path, key_path: Path, ca_pem: bytes) -> ssl.SSLContext:
    return _context(ssl.Purpose.SERVER_AUTH, False, cert_path, key_path, ca_pem)


class HasPeerCert(Protocol):
    """ssl.SSLObject, ssl.SSLSocket, or trio.SSLStream (which forwards getpeercert)."""

    def getpeercert(self, binary_form: bool = ...) -> object: ...


def peer_identity(ssl_object: HasPeerCert, ca_cert: x509.Certificate, roster: Roster,
                  now_ms: int) -> LinkPeer:
    """Who is on the other end of a finished handshake; VerificationError with the reason if refused."""
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        raise VerificationError("peer presented no certificate")
    cert = certs.load_der(der)
    ident = certs.verify_node_cert(cert, ca_cert, now_ms, revoked=frozenset(roster.revoked), roles=LINK_ROLES)
    known = roster.identities.get(ident.node_id)
    if known is not None and known.public_key != ident.public_key:
        raise VerificationError(f"node {ident.node_id} presents a key other than the one the ledger holds")
    return LinkPeer(ident, read_only=ident.role not in WRITE_ROLES)
