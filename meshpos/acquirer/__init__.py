"""Acquirer links: ISO 8583 over TLS (plain TCP only when configured so) and JSON over HTTPS, behind one
interface (base.py); the host side's TLS in tls.py. The messages themselves (a sale as the acquirer sees it,
ISO 8583 encoding and matching) are pure and live in meshpos.wire.acquirer and meshpos.wire.iso8583."""

from meshpos.acquirer.base import AcquirerLink, LateAnswer, UnsendableRequest, advise_until_answered, exponential_backoff

__all__ = ["AcquirerLink", "LateAnswer", "UnsendableRequest", "advise_until_answered", "exponential_backoff"]
