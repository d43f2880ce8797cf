"""The pin of the switch's TLS certificate (protocols/forwarding.md, "the pin"): the one check a
node makes of the switch it forwards to, on the certificate's DER bytes.

The switch has ONE Ed25519 key; its HTTPS certificate is self-signed with it. A node trusts no
CA for the switch: after the TLS 1.3 handshake it checks that the certificate's Ed25519 public
key is one of the two Ed25519 keys whose X25519 form is the ``switch_key`` of the site policy
(:func:`meshpos.identity.keys.montgomery_to_edwards_candidates`). The switch's certificate and
server context are meshpos.switch.tls; the node's client is meshpos.uplink.client.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshpos.domain.errors import VerificationError
from meshpos.identity import keys


def certificate_key(der: bytes) -> bytes:
    try:
        cert = x509.load_der_x509_certificate(der)
        pub = cert.public_key()
    except keys.X509_PARSE_ERRORS as exc:
        raise VerificationError("the switch presented no usable certificate") from exc
    if not isinstance(pub, Ed25519PublicKey):
        raise VerificationError("the switch's certificate key is not Ed25519")
    return keys.public_bytes(pub)


def check_pin(der: bytes | None, switch_key_x25519: bytes) -> None:
    """Raise VerificationError unless the certificate ``der`` carries the pinned switch key."""
    if der is None:
        raise VerificationError("the switch presented no certificate")
    if certificate_key(der) not in keys.montgomery_to_edwards_candidates(switch_key_x25519):
        raise VerificationError("the server's key is not the switch key pinned by the site policy "
                                "(wrong address, or someone in between)")
