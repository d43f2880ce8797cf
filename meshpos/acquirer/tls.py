"""TLS of the acquirer links, host side: the server context of a host (the simulator), with a
certificate it is given or one it makes for itself.

The switch's side (which CA it trusts, its optional client certificate) is
``meshpos.switch.service.acquirer_tls_context``; both links (ISO 8583 and JSON) use it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshpos.domain.errors import ConfigError

VALID_DAYS = 365


def self_signed(hosts: Iterable[str], now_ms: int, valid_days: int = VALID_DAYS) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 server certificate for ``hosts`` (names or IP addresses):
    ``(certificate PEM, private key PEM)``. A client trusts it by loading the certificate
    as its CA file."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hosts if h not in ("", "0.0.0.0", "::")):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshpos acquirer host")])
    start = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_context(cert: Path | bytes, key: Path | bytes, client_ca: Path | None = None) -> ssl.SSLContext:
    """A host's server context from certificate and key files (or PEM bytes); with ``client_ca``,
    client certificates issued by it are required (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if isinstance(cert, bytes) or isinstance(key, bytes):
            with tempfile.TemporaryDirectory() as tmp:  # the ssl module loads a key from a file only
                cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
                key_path.touch(mode=0o600)
                cert_path.write_bytes(cert if isinstance(cert, bytes) else cert.read_bytes())
                key_path.write_bytes(key if isinstance(key, bytes) else key.read_bytes())
                ctx.load_cert_chain(cert_path, key_path)
        else:
            ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the acquirer host's TLS files: {exc}") from exc
    return ctx


__all__ = ["self_signed", "server_context"]
