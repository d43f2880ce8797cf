"""TLS of the forwarding API: the switch's certificate and its server context (the pin a node
checks is meshpos.wire.pin).

The switch has ONE Ed25519 key. Its HTTPS certificate is self-signed with that key;
a node does not trust it through any CA but pins it: after the TLS 1.3 handshake
(whose CertificateVerify proves the server holds the certificate's key) the node
checks that the certificate's Ed25519 public key is one of the two Ed25519 keys
whose X25519 form is the ``switch_key`` of the site policy
(:func:`meshpos.identity.keys.montgomery_to_edwards_candidates`). The same policy
field thus pins the TLS peer, the signer of results and the recipient of sealed
card data.

Forwarders authenticate with their enrolled node certificates: the server context
requires a client certificate and trusts the CA certificates of all registered
sites; the handler then checks which site issued it, its role and revocation.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterable
from pathlib import Path

import nacl.signing
from cryptography import x509
from cryptography.x509.oid import NameOID

from meshpos.domain.errors import ConfigError
from meshpos.identity import keys
from meshpos.switch.const import TLS_VALID_DAYS


def make_tls_cert(key: nacl.signing.SigningKey, hosts: Iterable[str], now_ms: int,
                  valid_days: int = TLS_VALID_DAYS) -> x509.Certificate:
    """A self-signed Ed25519 server certificate for ``hosts`` (names or IP addresses)."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    private = keys.to_crypto_private(key)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshpos switch"),
                         x509.NameAttribute(NameOID.USER_ID, keys.x25519_public_of(key).hex()[:32])])
    start = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.timezone.utc) - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(private.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=valid_days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(private, None)


def server_context(cert_path: Path, key_path: Path, site_ca_pems: Iterable[bytes]) -> ssl.SSLContext:
    """TLS 1.3 server context: our certificate, client certificates required from any registered site CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the switch TLS certificate {cert_path} / key {key_path}: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    trust_sites(ctx, site_ca_pems)
    return ctx


def trust_sites(ctx: ssl.SSLContext, site_ca_pems: Iterable[bytes]) -> None:
    """Add site CAs to a server context (new handshakes see them at once)."""
    for pem in site_ca_pems:
        try:
            ctx.load_verify_locations(cadata=pem.decode("ascii"))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"cannot trust a site CA certificate: {exc}") from exc


