"""The switch's Prometheus metrics (prometheus-client), one registry per running instance.

Names (protocols/switch-instances.md, "Metrics"):
  meshpos_switch_forwarded_sales_total               sale entries received in batches
  meshpos_switch_advices_total{mti}                  0220 / 0221 / 0420 handed to the acquirer link
  meshpos_switch_results_total{outcome}              sales settled by this instance, by status
  meshpos_switch_pending_total                       sales answered "pending"
  meshpos_switch_refusals_total{reason}              entries refused, by a short reason
  meshpos_switch_acquirer_round_trip_seconds{mti}    request sent -> answer, per attempt
  meshpos_switch_db_seconds{op}                      database reads and group commits
  meshpos_switch_batches_in_flight                   batches being processed now
  meshpos_switch_ready                               1 while /readyz says ready
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshpos.acquirer.base import AcquirerLink, BeforeSend
from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult

CONTENT_TYPE = CONTENT_TYPE_LATEST
ROUND_TRIP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

#: refusal reasons as a short label (bounded cardinality); the full reason goes to the log
REFUSAL_KINDS = (("conflict", "conflict"), ("not an envelope", "malformed"),
                 ("not forwarded to the switch", "wrong_type"), ("two different sale envelopes", "conflict"),
                 ("revocation", "revoked"), ("signature", "signature"), ("not enrolled", "unenrolled"),
                 ("site", "other_site"))


def refusal_kind(reason: str) -> str:
    for needle, kind in REFUSAL_KINDS:
        if needle in reason:
            return kind
    return "invalid"


class SwitchMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.forwarded = Counter("meshpos_switch_forwarded_sales", "Sale entries received in forwarded batches",
                                 registry=r)
        self.advices = Counter("meshpos_switch_advices", "Advices handed to the acquirer link, by MTI", ["mti"],
                               registry=r)
        self.results = Counter("meshpos_switch_results", "Sales settled by this instance, by outcome", ["outcome"],
                               registry=r)
        self.pending = Counter("meshpos_switch_pending", "Sales answered pending", registry=r)
        self.refusals = Counter("meshpos_switch_refusals", "Entries refused, by reason", ["reason"], registry=r)
        self.round_trip = Histogram("meshpos_switch_acquirer_round_trip_seconds",
                                    "Acquirer request to answer, per attempt", ["mti"], buckets=ROUND_TRIP_BUCKETS,
                                    registry=r)
        self.db = Histogram("meshpos_switch_db_seconds", "Database reads and group commits", ["op"],
                            buckets=DB_BUCKETS, registry=r)
        self.in_flight = Gauge("meshpos_switch_batches_in_flight", "Batches being processed now", registry=r)
        self.ready = Gauge("meshpos_switch_ready", "1 while the instance is ready (database and acquirer)",
                           registry=r)
        # the labelled series of the per-sale paths, looked up once (``labels`` per call costs)
        self.advices_by_mti = {mti: self.advices.labels(mti) for mti in ("0220", "0221", "0420")}  # at 0 from the start
        self._results_by: dict[str, Counter] = {}
        self._db_by: dict[str, Histogram] = {}
        self._round_trip_by: dict[str, Histogram] = {}

    def result(self, outcome: str) -> None:
        """One sale settled by this instance with ``outcome``."""
        child = self._results_by.get(outcome)
        if child is None:
            child = self._results_by[outcome] = self.results.labels(outcome)
        child.inc()

    def round_trip_observe(self, mti: str, seconds: float) -> None:
        child = self._round_trip_by.get(mti)
        if child is None:  # a series appears with its first observation, as with ``labels``
            child = self._round_trip_by[mti] = self.round_trip.labels(mti)
        child.observe(seconds)

    def db_observe(self, op: str, seconds: float) -> None:
        child = self._db_by.get(op)
        if child is None:
            child = self._db_by[op] = self.db.labels(op)
        child.observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals.labels(refusal_kind(reason)).inc()

    @contextmanager
    def timed_db(self, op: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.db_observe(op, time.perf_counter() - started)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MeteredLink:
    """An acquirer link that counts what it hands on (by MTI) and times each attempt."""

    def __init__(self, link: AcquirerLink, metrics: SwitchMetrics) -> None:
        self._link = link
        self._metrics = metrics

    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        mti = "0221" if repeat else "0220"
        started = time.perf_counter()

        async def counted() -> None:
            nonlocal started
            if before_send is not None:
                await before_send()
            self._metrics.advices_by_mti[mti].inc()
            started = time.perf_counter()

        result = await self._link.advise(req, repeat=repeat, before_send=counted)
        self._metrics.round_trip_observe(mti, time.perf_counter() - started)
        return result

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        self._metrics.advices_by_mti["0420"].inc()
        started = time.perf_counter()
        result = await self._link.reverse(req)
        self._metrics.round_trip_observe("0420", time.perf_counter() - started)
        return result

    async def aclose(self) -> None:
        await self._link.aclose()


__all__ = ["SwitchMetrics", "MeteredLink", "CONTENT_TYPE", "refusal_kind"]
