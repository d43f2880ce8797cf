"""Limits and timing of the switch, in one place (the forwarding API's own limits are in
meshpos.wire.forwarding)."""

from __future__ import annotations

from typing import Final

#: advices outstanding at the acquirer at once, over all batches. The window bounds an instance's
#: rate at (window / time a slot is held): a slot is held for the "advice sent" commit and the
#: host's answer, so at 64 and a 50 ms host (75 ms with the commit) one instance could not pass
#: ~850 sales/s however idle it was; 512 leaves the CPU as the bound (BENCHMARKS.md, issue 16).
#: Each ISO 8583 connection takes up to 1000 outstanding requests (acquirer/iso8583_link.py).
ACQUIRER_IN_FLIGHT: Final = 512
#: attempts per sale and request (one 0220 or 0221 each) before the sale is answered "pending"
ADVICE_ATTEMPTS: Final = 5
REVERSAL_ATTEMPTS: Final = 5
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 10.0
#: per-call timeout of the acquirer link
ACQUIRER_TIMEOUT_S: Final = 10.0

SWITCH_FORMAT: Final = "meshpos-switch/1"
TLS_VALID_DAYS: Final = 3650

#: how long an instance's claim on a sale it is advising holds without renewal (it renews every
#: third of it while alive); a sale whose claim expired is continued by another instance (0221)
CLAIM_LEASE_S: Final = 15.0
#: how long an instance that lost the race for a sale waits for the winner's result before
#: answering it pending, and how often it looks
WAIT_FOR_OTHER_INSTANCE_S: Final = 3.0
WAIT_POLL_S: Final = 0.05
#: how often a running instance looks for sites added or changed by another process
SITE_RELOAD_S: Final = 1.0
#: how long /readyz waits for the database and for an acquirer connection
READY_CHECK_TIMEOUT_S: Final = 2.0
