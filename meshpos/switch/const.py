"""Limits and timing of the switch, in one place (the forwarding API's own limits are in
meshpos.wire.forwarding)."""

from __future__ import annotations

from typing import Final

#: advices outstanding at the acquirer at once, over all batches
ACQUIRER_IN_FLIGHT: Final = 64
#: attempts per sale and request (one 0220 or 0221 each) before the sale is answered "pending"
ADVICE_ATTEMPTS: Final = 5
REVERSAL_ATTEMPTS: Final = 5
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 10.0
#: per-call timeout of the acquirer link
ACQUIRER_TIMEOUT_S: Final = 10.0

SWITCH_FORMAT: Final = "meshpos-switch/1"
TLS_VALID_DAYS: Final = 3650
