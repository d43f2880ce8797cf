"""Limits and timing of the switch and the forwarding API, in one place."""

from __future__ import annotations

from typing import Final

#: HTTP paths of the forwarding API (protocols/forwarding.md)
FORWARD_PATH: Final = "/v1/forward"
HEALTH_PATH: Final = "/v1/health"

REQUEST_FORMAT: Final = "meshpos-forward/1"
REPLY_FORMAT: Final = "meshpos-forward-reply/1"

#: a request body larger than this is answered 413 before it is parsed
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
#: a reply body the uplink client accepts
MAX_REPLY_BYTES: Final = 8 * 1024 * 1024
#: entries (of any type) in one request
MAX_ENTRIES: Final = 4000
#: sale entries in one request
MAX_SALES: Final = 1000

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
