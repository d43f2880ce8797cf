"""The node's forwarder: which of the site's sales to send to the switch, and when.

Everything it needs lives in the ledger (pending sales, voids, certificates,
revocations, leases), so a restarted node resumes where it stopped. What it
keeps in memory is only back-off and suspicion:

* a sale the switch left pending or refused waits ``sale_backoff(attempts)`` before
  it is sent again;
* a batch that never left this node (no route, TLS, the switch refusing this node)
  makes the worker that sent it wait ``backoff(failures)``, each worker counting its
  own failures;
* a batch the switch failed as a whole (HTTP 400/413/5xx, or the connection lost once
  it was sent) may hold one sale that fails every batch it is in: the batch is split
  in halves, each sent on its own, until a failing sale stands alone. A sale that fails
  alone is sent alone from then on; once it failed alone ``SET_ASIDE_AFTER`` times while
  the switch took other batches, it is *set aside*: logged once with its id, counted in
  :meth:`Forwarder.status`, retried every ``set_aside_s`` only. Every other sale goes on.

Not forwarded at all: sales the node's view holds as refused (``sales.refused``), sales
dated more than ``rules.MAX_SKEW_MS`` ahead of this node's clock, or of the switch's when this
node's clock is measured behind it (not valid yet: :meth:`Forwarder.not_after`), and
voids after approval whose reversal is known (``sales.reversed_at``).

:class:`Forwarder` makes one decision at a time (:meth:`Forwarder.step`) against
an injected clock and an injected :class:`Transport`; :func:`run_forwarder` is the
loop the node service runs. No sqlite transaction is ever held across an await:
every store access is synchronous and finishes before the next await.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Awaitable, Protocol, runtime_checkable

import trio

from meshpos.domain.backoff import exponential_backoff
from meshpos.infra.clock import Clock
from meshpos.domain.errors import ConfigError, EncodingError, UplinkError, VerificationError
from meshpos.site.roster import Verified
from meshpos.domain.rules import MAX_SKEW_MS
from meshpos.wire import envelope
from meshpos.wire.forwarding import MAX_BODY_BYTES, ForwardReply, request_size
from meshpos.uplink import leases as lease_rules
from meshpos.uplink.batching import BatchSizer
from meshpos.uplink.client import (PROBE_TIMEOUT_S, Exchanged, NotSent, SwitchRefused, coded, forward_body,
                                   health_reply, make_client_context, post, results_body)
from meshpos.uplink.instances import InstanceChooser, Verdict, verdict
from meshpos.wire.forwarding import FORWARD_PATH
from meshpos.wire.forwarding_codings import RESULTS_PATH

from meshpos.uplink.host import UplinkHost

log = logging.getLogger(__name__)

BATCH_SALES = 200
BATCH_BYTES = MAX_BODY_BYTES // 2
PARALLEL_BATCHES = 2  # batches in flight at once
POLL_S = 5.0  # how often the loop looks for work when nothing wakes it
SET_ASIDE_AFTER = 3  # failures alone (while the switch took other batches) before a sale is set aside
INGEST_SLICE = 25  # at most this many results taken into the ledger per commit (a reply holds up to BATCH_SALES)
# ... and a slice ends once it took this long: a result's event waits for the rest of its slice, and
# a slice of 25 is ~15 ms on this host's cores but 5-10 x that on a terminal's ARM core
INGEST_SLICE_S = 0.004
STALL_S = 2 * lease_rules.LEASE_MS / 1000  # another node's scopes with no sale settled for this long: forwarded here too
OVERDUE_S = 10 * lease_rules.LEASE_MS / 1000  # ... and any sale that waited this long in them, whatever else settled
SET_ASIDE_S = 1800.0  # how often a set-aside sale is tried again: 48 times in a 24 h offline window
# Answers that say the switch will take nothing from this node (who it is, where it sends, how
# fast), whatever the batch holds: splitting the batch would learn nothing.
NODE_REFUSALS = frozenset({401, 403, 404, 405, 429, 503})


class Transport(Protocol):
    async def forward(self, entries: list[bytes]) -> ForwardReply:
        """Send one batch to the switch; NotSent if it never left this node, another
        UplinkError if the switch did not take it (SwitchRefused: it answered so)."""


@runtime_checkable
class ResultsLookup(Protocol):
    async def results(self, sale_ids: list[str]) -> ForwardReply:
        """What the switch already knows of these sales (protocols/forwarding.md, "Resuming a
        batch"): their signed results, or pending; errors as for ``forward``."""


def batch_fault(exc: UplinkError) -> bool:
    """Whether a failed exchange may be the batch's own doing, so that splitting it can find
    the sale: the switch failed it (HTTP 400, 413, 5xx...) or the connection was lost once it
    was sent. Not when it never left this node, nor when the switch refuses this node."""
    if isinstance(exc, NotSent):
        return False
    if isinstance(exc, SwitchRefused):
        return exc.status not in NODE_REFUSALS
    return True


class HttpsTransport:
    """The real transport: HTTPS to the policy's switch instances, pinned to the policy's switch key.

    Each request goes to one instance and fails over to the next (meshpos/uplink/instances.py,
    protocols/forwarding.md "Switch instances and failover"); ``instances`` holds which one is in
    use and each one's back-off. Request bodies go gzip-compressed once the instance announced it
    takes them (an ``Accept-Encoding: gzip`` answer header; protocols/forwarding.md, "Compression");
    a 415 to a compressed body turns compression off again and the request is sent plain at once.
    ``compress=False`` compresses nothing, either way. ``body_bytes`` / ``requests`` count what was
    sent (every attempt, answered or not)."""

    def __init__(self, core: UplinkHost, switch_url: str | None = None, *, compress: bool = True,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.core = core
        self.switch_url = switch_url  # overrides the policy's instances (a static route, or tests)
        self.compress = compress
        self.now = clock  # monotonic seconds, for the instances' back-off
        self.instances = InstanceChooser()
        self.gzip_urls: set[str] = set()  # the instances that last announced gzip request bodies
        self.body_bytes = 0
        self.requests = 0
        self._ctx: ssl.SSLContext | None = None
        self._for: str | None = None

    def urls(self) -> tuple[str, ...]:
        return (self.switch_url,) if self.switch_url else self.core.policy.switch_urls

    def _context(self) -> tuple[tuple[str, ...], ssl.SSLContext]:
        policy = self.core.policy
        urls = self.urls()
        if not urls or policy.switch_key is None:
            raise NotSent("the site policy names no switch (meshpos site set-switch)")
        if self._ctx is None or self._for != policy.switch_key:
            try:
                self._ctx = make_client_context(self.core, policy)
            except ConfigError as exc:
                raise NotSent(str(exc)) from exc
            self._for = policy.switch_key
        return urls, self._ctx

    async def forward(self, entries: list[bytes]) -> ForwardReply:
        return await self._post(FORWARD_PATH, forward_body(entries))

    async def results(self, sale_ids: list[str]) -> ForwardReply:
        """Any instance answers it: they share one database."""
        return await self._post(RESULTS_PATH, results_body(sale_ids))

    async def health(self, timeout: float = PROBE_TIMEOUT_S) -> tuple[str, dict[str, Any]] | None:
        """The first instance, in failover order, that answers ``GET /v1/health`` and accepts this
        node: (its URL, its reply). None if none does, or if one refuses this node (a 4xx: the
        others would too). Raises NotSent only when no switch is named. A GET changes nothing, so
        the probe moves on after any failure of an instance but a 4xx."""
        urls, ctx = self._context()
        url: str | None = self.instances.first(urls, self.now())
        tried: set[str] = set()
        while url is not None:
            tried.add(url)
            try:
                reply = await self._health_of(url, ctx, timeout)
            except UplinkError as exc:
                if verdict(exc) is Verdict.ANSWERED:
                    self.instances.answered(url)
                    return None
                self.instances.failed(url, self.now())
                url = self.instances.next(urls, url, tried, self.now())
                continue
            self.instances.answered(url)
            return url, reply
        return None

    async def _health_of(self, url: str, ctx: ssl.SSLContext, timeout: float) -> dict[str, Any]:
        return await health_reply(url, ctx, timeout)

    async def _post(self, path: str, body: bytes) -> ForwardReply:
        urls, ctx = self._context()
        url = self.instances.first(urls, self.now())
        tried: set[str] = set()
        while True:
            tried.add(url)
            try:
                reply = await self._post_to(url, ctx, path, body)
            except UplinkError as exc:
                seen = verdict(exc)
                if seen is Verdict.ANSWERED:
                    self.instances.answered(url)
                    raise
                self.instances.failed(url, self.now())
                following = self.instances.next(urls, url, tried, self.now()) if seen is Verdict.NEXT else None
                if following is None:
                    raise
                log.warning("switch instance %s failed (%s): trying %s", url, exc, following)
                url = following
                continue
            self.instances.answered(url)
            return reply

    async def _post_to(self, url: str, ctx: ssl.SSLContext, path: str, body: bytes) -> ForwardReply:
        gzip_body = self.compress and url in self.gzip_urls
        try:
            done = await self._send(url, ctx, path, coded(body, gzip_body), gzip_body)
        except SwitchRefused as exc:
            if not (gzip_body and exc.status == 415):
                raise
            self.gzip_urls.discard(url)  # this instance no longer takes gzip: plain at once
            done = await self._send(url, ctx, path, body, False)
        if done.gzip_announced:
            self.gzip_urls.add(url)
        else:
            self.gzip_urls.discard(url)
        return done.reply

    async def _send(self, url: str, ctx: ssl.SSLContext, path: str, wire: bytes, gzip_body: bool) -> Exchanged:
        self.body_bytes += len(wire)  # every attempt, answered or not: what the uplink carried
        self.requests += 1
        try:
            return await post(url, ctx, path, wire, gzip_body=gzip_body, accept_gzip=self.compress)
        except ConfigError as exc:  # a switch URL that cannot be used
            raise NotSent(str(exc)) from exc


@dataclass
class StepReport:
    """What one :meth:`Forwarder.step` did."""

    forwarded: list[str] = field(default_factory=list)  # sale ids (and voided sale ids) sent
    settled: int = 0  # results taken into the ledger
    pending: int = 0
    refused: int = 0
    reversed: int = 0
    held_by_others: dict[str, str] = field(default_factory=dict)
    leases_written: int = 0
    more: bool = False  # work is left in scopes this node holds
    error: str | None = None  # the switch failed the batch (it was split, or its one sale deferred)
    set_aside: list[str] = field(default_factory=list)  # sales set aside by this step
    resumed: int = 0  # sales of an unanswered batch the switch had settled: results taken, not sent again


@dataclass
class _Backoff:
    attempts: int
    not_before_ms: int


@dataclass
class _Trouble:
    """A sale that was in a batch the switch failed."""

    ok_mark: int  # batches the switch took (Forwarder._ok) when its failures began
    alone: bool = False  # it failed alone once: from now on it is sent alone
    counted: int = 0  # failures alone while the switch took other batches


@dataclass
class _HolderWatch:
    """Lease rule 6's view of another node holding leases: the sales pending here in its scopes
    when last seen, and since when none of them was settled."""
    ids: set[str]
    since: float
    stalled: bool = False


class Forwarder:
    def __init__(
        self,
        core: UplinkHost,
        clock: Clock,
        transport: Transport | None = None,
        *,
        batch_sales: int = BATCH_SALES,
        buckets: int = lease_rules.BUCKETS,
        lease_ms: int = lease_rules.LEASE_MS,
        renew_left_ms: int = lease_rules.RENEW_LEFT_MS,
        sale_backoff: Callable[[int], float] = exponential_backoff(5.0, 600.0),
        set_aside_s: float = SET_ASIDE_S,
        reachable: Callable[[str], bool] | None = None,
        switch_offset: Callable[[], int | None] = lambda: None,
        stall_s: float = STALL_S,
        overdue_s: float = OVERDUE_S,
    ) -> None:
        """``reachable(node_id)``: whether this node can reach that node now (lease rule 1c,
        meshpos/uplink/leases.py); by default every node is taken as reachable.
        ``switch_offset()``: how far this node's clock is ahead of the switch's, in ms (negative:
        behind), as last measured (meshpos.domain.clockskew), or None. ``stall_s``, ``overdue_s``: lease rule 6."""
        self.core = core
        self.clock = clock
        self.transport: Transport = transport if transport is not None else HttpsTransport(core, clock=clock.monotonic)
        self.batch_sales = batch_sales
        self.sizer = BatchSizer(maximum=batch_sales)  # batches sized to what gets through (uplink/batching.py)
        self.lookup = transport if isinstance(transport, ResultsLookup) else None
        self._unanswered: set[str] = set()  # sent in an exchange that broke after sending: ask before resending
        self.buckets = buckets
        self.lease_ms = lease_ms
        self.renew_left_ms = renew_left_ms
        self.sale_backoff = sale_backoff
        self.set_aside_s = set_aside_s
        self.reachable: Callable[[str], bool] = reachable if reachable is not None else (lambda node_id: True)
        self.switch_offset = switch_offset
        self._backoff: dict[str, _Backoff] = {}
        self._split: list[list[str]] = []  # halves of failed batches, each to be sent as a batch of its own
        self._trouble: dict[str, _Trouble] = {}
        self._set_aside: set[str] = set()
        self.wakers: list[Callable[[], None]] = []  # run_forwarder's: wake its idle workers
        self._ok = 0  # batches the switch took
        self._in_flight: set[str] = set()  # sent in a batch whose reply has not come back yet
        self._reversal_done: set[str] = set()
        self._leases: dict[str, lease_rules.Lease] = {}
        self.stall_s = stall_s
        self.overdue_s = overdue_s
        self._watched: dict[str, _HolderWatch] = {}  # holders with sales pending here in their scopes (rule 6)
        self._seen_at: dict[str, float] = {}  # sales pending in other nodes' scopes -> first seen there (monotonic)
        self._stalled_logged: set[str] = set()  # holders whose stalled scopes were logged

    @property
    def node_id(self) -> str:
        return self.core.node_id

    # -- reading the ledger ----------------------------------------------------------

    def pending(self, now: int) -> list[str]:
        """Sale ids to forward now: no result yet, or voided after approval and not reversed yet;
        never a sale this node's view refuses, nor one dated after :meth:`not_after`."""
        rows = self.core.store.to_forward(self.not_after(now))
        out = []
        for sale_id, status in rows:
            if sale_id in self._in_flight or (status is not None and sale_id in self._reversal_done):
                continue
            b = self._backoff.get(sale_id)
            if b is not None and now < b.not_before_ms:
                continue
            out.append(str(sale_id))
        self._forget_settled({str(sale_id) for sale_id, _ in rows})
        return out

    def not_after(self, now: int) -> int:
        """The latest sale time forwarded now: ``MAX_SKEW_MS`` past this node's clock, or past the
        switch's when this node's clock is behind it (measured). Only ever widened: a forwarder
        whose clock is behind would otherwise hold back every sale of the time it is behind, and
        card sales held back past their window expire (the switch, which decides, defers by its
        own clock: protocols/rules.md, "Clocks: the skew")."""
        offset = self.switch_offset()
        return now + max(0, -(offset or 0)) + MAX_SKEW_MS

    def _forget_settled(self, open_ids: set[str]) -> None:
        """Drop the suspicion of sales that need no forwarding any more (settled through another node)."""
        if self._set_aside - open_ids:
            self._set_aside &= open_ids
        for sale_id in [s for s in self._trouble if s not in open_ids and s not in self._in_flight]:
            del self._trouble[sale_id]

    def leases(self) -> list[lease_rules.Lease]:
        """Every lease entry this node holds, with when it received each (lease rule 3)."""
        for key, raw, received_at in self.core.store.entries_with_reception("lease"):
            if key not in self._leases:
                body = envelope.decode(raw).body
                self._leases[key] = lease_rules.Lease.from_body(body, received_at)
        return list(self._leases.values())

    def ignored_holders(self, leases: list[lease_rules.Lease]) -> set[str]:
        """Lease rules 1b and 1c: holders whose leases do not count here (revoked; not reachable)."""
        revoked = self.core.roster.revoked
        return {h for h in {lease.holder for lease in leases}
                if h in revoked or (h != self.node_id and not self.reachable(h))}

    def set_aside_count(self) -> int:
        return len(self._set_aside)
    def wake(self) -> None:
        """Wake the workers of run_forwarder now (an uplink came back)."""
        for waker in self.wakers:
            waker()

    def status(self) -> dict[str, object]:
        """For the node's status: the sales set aside (failing alone while others are forwarded)."""
        return {"set_aside": len(self._set_aside), "set_aside_sales": sorted(self._set_aside)}

    def rank(self, node_id: str) -> int:
        ident = self.core.roster.identities.get(node_id)
        return 0 if ident is not None and ident.role == "gateway" else 1

    def entries_for(self, sale_ids: list[str]) -> list[bytes]:
        """The batch: roster entries first (every policy version, certificates of the terminals,
        revocations), then sales and voids."""
        ledger = self.core.ledger
        out: list[bytes] = []
        # every policy version: the switch judges each sale by the one in force at its time
        # (protocols/rules.md), which need not be the newest
        out.extend(self.core.store.entries_of_type("policy"))
        terminals = sorted({sale_id.rsplit("-", 1)[0] for sale_id in sale_ids})
        for terminal in terminals:
            raw = ledger.raw(f"cert/{terminal}")
            if raw is not None:
                out.append(raw)
        out.extend(self.core.store.entries_of_type("revocation"))
        for sale_id in sale_ids:
            row = self.core.store.sale(sale_id)
            if row is None:
                continue
            if row["result_status"] is None:
                raw = ledger.raw(f"sale/{sale_id}")
                if raw is not None:
                    out.append(raw)
            void = ledger.raw(f"void/{sale_id}")
            if void is not None:
                out.append(void)
        return out

    # -- leases ------------------------------------------------------------------------

    def _write_leases(self, writes: tuple[lease_rules.LeaseWrite, ...] | list[lease_rules.LeaseWrite]) -> int:
        n = 0
        site = self.core.policy.site_id
        for w in writes:
            body = {"site": site, "holder": self.node_id, "scope": w.scope, "granted_at": w.granted_at,
                    "until": w.until}
            try:
                verified = self.core.ledger.write_local(envelope.seal("lease", self.node_id, body, self.core.key))
            except VerificationError as exc:  # the same lease exists already
                log.debug("lease not written: %s", exc)
                continue
            self._leases[verified.key] = lease_rules.Lease.from_body(body, self.clock.now_ms())
            n += 1
        return n

    def release(self) -> int:
        """Give up every live lease this node holds (uplink lost, or shutting down)."""
        return self._write_leases(lease_rules.releases(self.node_id, self.leases(), self.clock.now_ms()))

    # -- one step ------------------------------------------------------------------------

    def plan(self, now: int) -> tuple[list[str], lease_rules.LeasePlan, bool]:
        """The next batch (sale ids), the lease plan, and whether more work waits after it.

        A half of a failed batch goes first, as it was split; a sale that failed alone goes
        alone, after the batches of sales that did not fail."""
        pending = self.pending(now)
        scopes = {s: lease_rules.scope_of(s, self.buckets) for s in pending}
        leases = self.leases()
        lp = lease_rules.plan(self.node_id, set(scopes.values()), leases, now, self.rank,
                              self.lease_ms, self.renew_left_ms, ignore=self.ignored_holders(leases))
        stalled = self._stalled(pending, scopes, lp.held_by_others)
        mine = [s for s in pending if scopes[s] in lp.forward or s in stalled]
        eligible = set(mine)
        while self._split:
            group = [s for s in self._split.pop(0) if s in eligible]
            if group:
                return group, lp, len(mine) > len(group)
        alone = [s for s in mine if s in self._trouble and self._trouble[s].alone]
        together = [s for s in mine if not (s in self._trouble and self._trouble[s].alone)]
        if not together:
            return alone[:1], lp, len(alone) > 1
        batch: list[str] = []
        size = 0
        for sale_id in together:
            if len(batch) >= self.sizer.size:
                break
            est = 2 * envelope.MAX_ENVELOPE
            if batch and size + est > BATCH_BYTES:
                break
            batch.append(sale_id)
            size += est
        return batch, lp, len(mine) > len(batch)

    def _stalled(self, pending: list[str], scopes: dict[str, str], others: dict[str, str]) -> set[str]:
        """Lease rule 6 (protocols/forwarding.md): the pending sales of another node's scopes when
        it settled none of them for ``stall_s``; a holder that keeps renewing and never forwards
        (on purpose or not) must not keep the site's sales from the switch, and a holder working
        through a long backlog keeps its scopes as long as its sales keep leaving."""
        mono = self.clock.monotonic()
        by_holder: dict[str, set[str]] = {}
        for sale_id in pending:
            holder = others.get(scopes[sale_id])
            if holder is not None:
                by_holder.setdefault(holder, set()).add(sale_id)
        out: set[str] = set()
        watched: dict[str, _HolderWatch] = {}
        for holder, ids in by_holder.items():
            seen = self._watched.get(holder)
            if seen is None or (not seen.stalled and seen.ids - ids):
                seen = _HolderWatch(ids, since=mono)  # new, or the holder settled some: progress
            seen.ids = ids
            if not seen.stalled and mono - seen.since >= self.stall_s:
                seen.stalled = True  # for as long as this holder keeps sales pending in its scopes
                if holder not in self._stalled_logged:
                    self._stalled_logged.add(holder)
                    log.warning("node %s holds forwarding leases, but none of the %d sales pending in its "
                                "scopes was settled in %.0f s: forwarding them from here too (if it goes on, "
                                "check that node; revoke it if it is not yours)", holder, len(ids), mono - seen.since)
            if seen.stalled:
                out |= ids
            watched[holder] = seen
        self._watched = watched  # a holder with nothing pending in its scopes starts afresh
        # a holder settling one sale now and then (a drip that keeps it from counting as stalled)
        # still holds no sale longer than OVERDUE_S
        seen_at = {s: self._seen_at.get(s, mono) for ids in by_holder.values() for s in ids}
        self._seen_at = seen_at
        out |= {s for s, since in seen_at.items() if mono - since >= self.overdue_s}
        return out

    async def step(self) -> StepReport:
        """Claim or renew leases, forward at most one batch, take the results into the ledger.

        NotSent (and a refusal of this node) propagate: the uplink, not the batch, failed. A
        batch the switch failed is split, or, if it was one sale, that sale deferred."""
        now = self.clock.now_ms()
        batch, lp, more = self.plan(now)
        report = StepReport(held_by_others=dict(lp.held_by_others), more=more)
        report.leases_written = self._write_leases(lp.write)
        if not batch:
            return report
        report.forwarded = batch
        self._in_flight.update(batch)
        sent = batch
        try:
            batch = await self._resume(batch, report)
            if not batch:
                return report
            entries = self.entries_for(batch)
            if request_size(entries) > MAX_BODY_BYTES:  # defensive: estimates above keep well under
                raise UplinkError("batch too large for the switch")
            started = self.clock.monotonic()
            reply = await self.transport.forward(entries)
            self.sizer.answered(len(batch), self.clock.monotonic() - started)
        except UplinkError as exc:
            if not isinstance(exc, (NotSent, SwitchRefused)):
                self._unanswered.update(batch)  # the switch may have acted: ask it before sending again
            if not isinstance(exc, NotSent):
                self.sizer.failed()
            if not batch_fault(exc):
                if len(batch) > 1 and all(s in self._trouble for s in batch):
                    self._split.insert(0, batch)  # a half being searched: the search goes on from it
                raise
            self._batch_failed(batch, exc, report)
            return report
        else:
            self._ok += 1
            for sale_id in batch:
                self._trouble.pop(sale_id, None)
                if sale_id in self._set_aside:
                    self._set_aside.discard(sale_id)
                    log.info("sale %s, set aside, was taken by the switch", sale_id)
            await self._take_reply(batch, reply, report)  # in flight until taken: no other worker sends them
            return report
        finally:
            self._in_flight.difference_update(sent)

    async def _resume(self, batch: list[str], report: StepReport) -> list[str]:
        """The part of ``batch`` still to send: sales sent before in an exchange that broke are
        looked up first (a few bytes each), and those the switch settled meanwhile are taken
        into the ledger instead of being sent again."""
        ask = [s for s in batch if s in self._unanswered]
        if not ask or self.lookup is None:
            return batch
        known = await self.lookup.results(ask)
        self._unanswered.difference_update(ask)
        answered = {verified.env.body["sale_id"] for verified in self._ingest(known.results)}
        for sale_id in answered:
            self._backoff.pop(sale_id, None)
            self._trouble.pop(sale_id, None)
        report.settled += len(answered)
        report.resumed = len(answered)
        report.more = report.more or bool(answered)
        report.forwarded = [s for s in batch if s not in answered]
        return report.forwarded

    def _batch_failed(self, batch: list[str], exc: UplinkError, report: StepReport) -> None:
        report.error = str(exc)
        for sale_id in batch:
            self._trouble.setdefault(sale_id, _Trouble(ok_mark=self._ok))
        if len(batch) > 1:
            half = len(batch) // 2
            self._split.extend([batch[:half], batch[half:]])
            report.more = True
            log.warning("the switch failed a batch of %d sales (%s): sending it in halves to find the sale "
                        "that fails", len(batch), exc)
            return
        sale_id = batch[0]
        trouble = self._trouble[sale_id]
        trouble.alone = True
        if self._ok > trouble.ok_mark:  # the switch took other batches meanwhile: it is this sale
            trouble.counted += 1
        now = self.clock.now_ms()
        if trouble.counted >= SET_ASIDE_AFTER:
            if sale_id not in self._set_aside:
                self._set_aside.add(sale_id)
                report.set_aside.append(sale_id)
                log.error("sale %s set aside: the switch failed it alone %d times while it took other "
                          "batches (last: %s); it is tried again every %g s", sale_id, trouble.counted, exc,
                          self.set_aside_s)
            self._backoff[sale_id] = _Backoff(trouble.counted, now + int(self.set_aside_s * 1000))
        else:
            log.warning("the switch failed sale %s alone: %s", sale_id, exc)
            self._defer(sale_id, now)

    async def drain(self, parallel: int = PARALLEL_BATCHES) -> int:
        """Forward until nothing is left that this node may forward now; the number of sales sent.

        ``parallel`` batches are in flight at once, so the switch works on one while this
        node takes the results of another into its ledger.
        """
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while True:
                report = await self.step()
                sent += len(report.forwarded)
                if not report.forwarded:
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)
        return sent

    async def _take_reply(self, batch: list[str], reply: ForwardReply, report: StepReport) -> None:
        now = self.clock.now_ms()
        settled: set[str] = set()
        # in slices, each its own durable commit, with a checkpoint between them: the first
        # results of a large reply reach the sellers' event streams while the rest are taken in
        first = 0
        while first < len(reply.results):
            if first:
                await trio.lowlevel.checkpoint()
            verified_slice, first = self._ingest_slice(reply.results, first)
            for verified in verified_slice:
                settled.add(verified.env.body["sale_id"])
                self._backoff.pop(verified.env.body["sale_id"], None)
                report.settled += 1
        for sale_id in reply.reversed:
            self._reversal_done.add(sale_id)
            report.reversed += 1
        sent = set(batch)
        for p in reply.pending:
            report.pending += 1
            self._defer(p.sale_id, now)
        for r in reply.refused:
            report.refused += 1
            log.warning("switch refused %s entry (sale %s): %s", r.type or "an", r.sale_id, r.reason)
            if r.sale_id is not None:
                self._defer(r.sale_id, now)
        for sale_id in sent - settled - {p.sale_id for p in reply.pending} - {r.sale_id for r in reply.refused}:
            row = self.core.store.sale(sale_id)
            if row is not None and row["result_status"] is not None and sale_id not in self._reversal_done:
                # a void after approval the switch did not report as reversed yet
                self._defer(sale_id, now)
            elif row is not None and row["result_status"] is None:
                self._defer(sale_id, now)

    def _ingest(self, results: tuple[bytes, ...]) -> list[Verified]:
        """Take signed results into the ledger (so they replicate), in ONE durable commit.

        ``ingest_raw`` verifies before it changes anything, so a refused result is skipped
        without disturbing the others. Only a failing disk aborts the commit; the results
        are then simply forwarded again (the switch returns the same bytes).
        """
        return self._ingest_slice(results, 0, len(results), None)[0]

    def _ingest_slice(self, results: tuple[bytes, ...], first: int, most: int | None = None,
                      seconds: float | None = INGEST_SLICE_S) -> tuple[list[Verified], int]:
        """``_ingest`` of ``results[first:]``, in one commit, ending after ``most`` results
        (INGEST_SLICE) or once ``seconds`` have passed (at least one result): the verified
        results and the index of the first result not taken."""
        most = INGEST_SLICE if most is None else most
        out: list[Verified] = []
        ends = None if seconds is None else self.clock.monotonic() + seconds
        taken = first
        with self.core.store.transaction():
            for raw in results[first:first + most]:
                taken += 1
                try:
                    out.append(self.core.ledger.ingest_raw(raw, "switch"))
                except (EncodingError, VerificationError) as exc:
                    log.warning("a result from the switch was refused by the ledger: %s", exc)
                if ends is not None and self.clock.monotonic() >= ends:
                    break
        return out, taken

    def _defer(self, sale_id: str, now: int) -> None:
        b = self._backoff.get(sale_id)
        attempts = 1 if b is None else b.attempts + 1
        self._backoff[sale_id] = _Backoff(attempts, now + int(self.sale_backoff(attempts) * 1000))


async def run_forwarder(
    core: UplinkHost,
    clock: Clock,
    has_uplink: Callable[[], bool],
    *,
    transport: Transport | None = None,
    reachable: Callable[[str], bool] | None = None,
    switch_offset: Callable[[], int | None] = lambda: None,
    batch_sales: int = BATCH_SALES,
    backoff: Callable[[int], float] = exponential_backoff(2.0, 300.0),
    poll_s: float = POLL_S,
    idle_poll_s: float | None = None,
    parallel: int = PARALLEL_BATCHES,
    recheck: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[Forwarder] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward the site's queue while ``has_uplink()`` (this node may forward and its uplink
    works, as far as it knows).

    ``parallel`` workers each send one batch at a time (disjoint batches). A worker wakes
    on new sales, voids and leases in the ledger, or every ``poll_s``. A worker whose batch
    never reached the switch waits ``backoff(failures)``, ``failures`` counting that
    worker's own failures in a row (one worker's bad luck does not slow the other), and is
    not woken early by new entries. Leases are released only on a real loss of uplink, when
    ``has_uplink()`` turns false: failed batches alone never give them up. But a batch that
    failed for want of a connection (not a refusal of the switch) makes the worker call
    ``recheck()`` (the node probes its uplink at once) and look at ``has_uplink()`` again before
    backing off: an uplink lost mid-batch releases the leases without delay, so a node with
    signal takes the scopes over at once (protocols/forwarding.md, "Leases", rule 5).
    While ``has_uplink()`` is false a worker looks again every ``idle_poll_s`` (default
    ``poll_s``), or when woken by ``Forwarder.wake()`` (the caller's probe, on getting an uplink).
    ``task_status.started`` gets the :class:`Forwarder`.
    """
    fwd = Forwarder(core, clock, transport, batch_sales=batch_sales, reachable=reachable, switch_offset=switch_offset)
    wakes: list[trio.Event] = [trio.Event() for _ in range(parallel)]

    def on_accept(verified: Verified) -> None:
        # not without an uplink: its workers would wake on every sale of the site for nothing
        # (the probe wakes them when the node gets one)
        if verified.env.type in ("sale", "void", "lease") and has_uplink():
            for event in wakes:
                event.set()

    def wake_all() -> None:
        for event in wakes:
            event.set()
    fwd.wakers.append(wake_all)
    no_uplink_poll = poll_s if idle_poll_s is None else idle_poll_s

    released = False  # the node's leases, shared by the workers; leases from before a restart may be live

    async def worker(n: int) -> None:
        nonlocal released
        failures = 0

        async def wait(seconds: float) -> None:
            with trio.move_on_after(seconds):
                await wakes[n].wait()
            wakes[n] = trio.Event()

        while True:
            if not has_uplink():
                if not released:
                    fwd.release()
                    released = True
                await wait(no_uplink_poll)
                continue
            try:
                report = await fwd.step()
            except UplinkError as exc:
                failures += 1
                log.warning("forwarding failed (worker %d, %d in a row): %s", n, failures, exc)
                if recheck is not None and not isinstance(exc, SwitchRefused):
                    await recheck()
                    if not has_uplink():
                        continue  # released at the top of the loop, now
                await trio.sleep(backoff(failures))
                continue
            failures = 0
            if report.forwarded or report.leases_written:
                released = False
            if report.more or (report.forwarded and report.settled):
                await trio.lowlevel.checkpoint()
                continue
            await wait(poll_s)

    core.ledger.on_accept.append(on_accept)
    try:
        async with trio.open_nursery() as nursery:
            for n in range(parallel):
                nursery.start_soon(worker, n)
            task_status.started(fwd)
    finally:
        core.ledger.on_accept.remove(on_accept)
