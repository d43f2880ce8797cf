"""Acquirer links: ISO 8583 over TCP and JSON over HTTPS, behind one interface (base.py)."""

from .base import AcquirerLink, AcquirerRequest, AcquirerResult, advise_until_answered, exponential_backoff

__all__ = ["AcquirerLink", "AcquirerRequest", "AcquirerResult", "advise_until_answered", "exponential_backoff"]
