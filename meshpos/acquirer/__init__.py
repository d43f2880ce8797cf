"""Acquirer links: ISO 8583 over TLS (plain TCP only when configured so) and JSON over HTTPS, behind one
interface (base.py); the host side's TLS in tls.py."""

from .base import (AcquirerLink, AcquirerRequest, AcquirerResult, LateAnswer, UnsendableRequest, advise_until_answered,
                   exponential_backoff)

__all__ = ["AcquirerLink", "AcquirerRequest", "AcquirerResult", "LateAnswer", "UnsendableRequest", "advise_until_answered",
           "exponential_backoff"]
