"""The switch's decisions for a forwarded batch: no HTTP here, only the store and the acquirer link.

Rules for one sale, in this order (protocols/forwarding.md, "Processing"):

0. One sale fails alone: whatever goes wrong with one sale (its content, its card data,
   its encoding, the acquirer's refusal of it) settles that sale ``rejected`` with a
   reason, or leaves it pending; the rest of the batch is processed and answered.
1. The envelope must decode. Roster entries of the batch (policy, cert, revocation) are
   verified and taken first, voids next, sales last, whatever their order in the batch.
   Every policy version the switch has seen for a site is kept: a sale is judged by the
   one in force at its ``created_at`` (``rules.policy_at``).
2. A sale id already in the de-duplication table with the SAME envelope bytes skips
   verification and gets the stored signed result (or continues where it stopped). With
   DIFFERENT bytes it is refused ("conflict"): a forger cannot borrow a real sale's id.
3. A new sale is verified by the site roster (signature, enrollment, site, role,
   certificate validity at ``created_at``). An envelope the switch cannot authenticate
   (forged, unknown or foreign signer, other site, malformed) is *refused*: answered
   ``rejected`` with the reason, logged, but never given a signed result, because a signed
   ``result/<sale id>`` would settle the real sale of that id in every ledger. An
   authentic sale of a revoked terminal is valid up to its revocation's cut
   (``rules.beyond_cut``: ``seq <= cut_seq``, or dated up to ``at``); beyond it, it gets
   a signed ``rejected`` result.
3b. Content (``rules.sale_problem`` under the policy in force at ``created_at``, and
   ``rules.future_problem`` against the switch's clock), then, once the card data is
   opened, ``rules.card_problem``: a sale breaking one is settled ``rejected`` (signed,
   final) before anything reaches the acquirer.
4. State machine of an accepted sale (store.py holds the states)::

       (new) --batch taken--> received --0220 about to leave--> advice_sent --answer--> settled
       received --voided | expired | cash | card data unusable--> settled   (acquirer never sees it)
       advice_sent --void known--> 0420 until answered --> settled (voided, reversed=true)
       settled(approved) --void known--> 0420 until answered (reversal: sent -> done); the result stays

   Each arrow commits before the switch acts on it, so a crash never sends a second 0220;
   "advice sent" is committed after the 0220 is encoded and before its first byte leaves.
   A void after approval, once its 0420 is answered, also yields a signed ``reversal``
   entry, returned with the results.
   Expiry (switch now > created_at + the site's offline window) applies only while nothing
   was sent. Cash sales are recorded ``approved`` without the acquirer.
5. An acquirer that does not answer within the attempts leaves the sale ``advice_sent``; the
   reply lists it as pending and the next forward goes on with 0221. An answer that
   arrives after its request stopped waiting (:meth:`Switch.take_late_answers`) settles
   the sale all the same: no answer is dropped.

One sale is handled by one task at a time in this process (``_exclusive``); sales of a batch
run concurrently, with at most ``in_flight`` requests outstanding at the acquirer.

6. Several instances on one database (protocols/switch-instances.md): the step received ->
   advice_sent is a compare-and-set that also claims the sale for this instance (``instance``);
   an instance that loses it sends nothing and waits a moment for the winner's result. A sale
   left ``advice_sent`` is continued (0221) only by the instance holding its claim, or by any
   instance once the claim expired (its holder died): claims are renewed by
   :meth:`Switch.keep_claims` while held. Settling is first-wins: whoever settles second returns
   the stored signed result, so every instance answers the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import nacl.public
import nacl.signing
import trio

from meshpos.domain.roles import SELLING_ROLES
from meshpos.domain import rules
from meshpos.wire import envelope
from meshpos.acquirer.base import (AcquirerLink, BeforeSend, LateAnswer, UnsendableRequest, Window,
                                   advise_until_answered)
from meshpos.domain.backoff import exponential_backoff
from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult, fit_auth_code
from meshpos.wire.cards import OpenedCard, open_card
from meshpos.infra.clock import Clock
from meshpos.wire.envelope import Envelope
from meshpos.domain.errors import (AcquirerError, ConfigError, CryptoError, EncodingError, InputError, MeshposError,
                      VerificationError)
from meshpos.identity import certs, keys
from meshpos.domain.policy import SitePolicy
from meshpos.site.roster import Roster
from meshpos.site.sitedir import verify_policy_envelope
from meshpos.wire.forwarding import MAX_SALES, ForwardReply, Pending, Refusal
from meshpos.switch.const import (ACQUIRER_IN_FLIGHT, ADVICE_ATTEMPTS, BACKOFF_BASE_S, BACKOFF_CAP_S, CLAIM_LEASE_S,
                    REVERSAL_ATTEMPTS, WAIT_FOR_OTHER_INSTANCE_S, WAIT_POLL_S)
from meshpos.switch.metrics import MeteredLink, SwitchMetrics
from meshpos.switch.store import (ADVICE_SENT, RECEIVED, REVERSAL_DONE, REVERSAL_SENT, SETTLED, AdviceSent, AlreadySettled,
                    ClaimLost, GroupCommit, SaleRow, Settle, SiteRow, SwitchStore)

# what one sale's own data can make go wrong before or at the acquirer: it settles ``rejected``
SALE_ERRORS = (CryptoError, InputError, EncodingError)

log = logging.getLogger(__name__)

ROSTER_ORDER = {"policy": 0, "cert": 1, "revocation": 2}
VERIFY_CHUNK = 64  # sales verified between two checkpoints, so a big batch does not stall the loop

RESPONSE_CODES = {
    "05": "do not honour", "12": "invalid transaction", "14": "invalid card number", "51": "insufficient funds",
    "54": "expired card", "57": "transaction not permitted", "61": "exceeds amount limit",
    "62": "restricted card", "91": "issuer unavailable",
}


def digest_of(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def rrn_of(ref: int) -> str:
    """Field 37 of a sale: its switch sequence number, 12 digits."""
    return f"{ref % 10**12:012d}"


def stan_of(ref: int) -> int:
    """Field 11 of a sale: 1..999999, cycling."""
    return (ref - 1) % 999_999 + 1


def terminal_id_of(node_id: str) -> str:
    """Field 41: the first 8 hex digits of the selling terminal's node id."""
    return node_id[:8]


def decline_reason(code: str) -> str:
    meaning = RESPONSE_CODES.get(code)
    return f"declined by the card issuer (code {code}{': ' + meaning if meaning else ''})"


def scrub(text: str, pan: str | None) -> str:
    """``text`` with any full card number replaced by its masked form (reasons and logs)."""
    if pan:
        text = text.replace(pan, "*" * (len(pan) - 4) + pan[-4:])
    return text


@dataclass
class SiteState:
    row: SiteRow
    roster: Roster
    known: set[bytes]  # digests of roster entries taken already

    @property
    def site_id(self) -> str:
        return self.row.site_id

    def policy_at(self, at_ms: int) -> SitePolicy:
        """The policy version in force at ``at_ms``: the roster keeps every version it verified."""
        return self.roster.policy_at(at_ms)

    def learn(self, env: Envelope) -> None:
        """Take a verified roster entry (certificate, revocation and its cut, policy version)."""
        self.roster.apply(env)


@dataclass(frozen=True)
class _Settled:
    raw: bytes
    reversed: bool = False
    reversal: bytes | None = None  # the signed ``reversal`` entry of a void after approval


class _PollRound:
    __slots__ = ("done", "rows")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.rows: dict[str, SaleRow] = {}


@dataclass(frozen=True)
class _Work:
    index: int
    env: Envelope
    digest: bytes


Outcome = _Settled | Pending | Refusal
T = TypeVar("T")


class Switch:
    """The switch's logic over its store, its key and one acquirer link."""

    def __init__(
        self,
        store: SwitchStore,
        key: nacl.signing.SigningKey,
        link: AcquirerLink,
        clock: Clock,
        *,
        in_flight: int = ACQUIRER_IN_FLIGHT,
        advice_attempts: int = ADVICE_ATTEMPTS,
        reversal_attempts: int = REVERSAL_ATTEMPTS,
        backoff: Callable[[int], float] = exponential_backoff(BACKOFF_BASE_S, BACKOFF_CAP_S),
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
        instance: str = "main",
        claim_lease_s: float = CLAIM_LEASE_S,
        wait_for_other_s: float = WAIT_FOR_OTHER_INSTANCE_S,
        metrics: SwitchMetrics | None = None,
    ) -> None:
        self.store = store
        self.instance = instance
        self.claim_lease_ms = int(claim_lease_s * 1000)
        self.wait_for_other_s = wait_for_other_s
        self.metrics = metrics or SwitchMetrics()
        self.key = key
        self.x25519_private = keys.x25519_private_of(key)
        self._card_key = nacl.public.PrivateKey(self.x25519_private)  # made once: see open_card
        self.x25519_public = keys.x25519_public_of(key)
        self.link: AcquirerLink = MeteredLink(link, self.metrics)
        self.clock = clock
        self.advice_attempts = advice_attempts
        self.reversal_attempts = reversal_attempts
        self.backoff = backoff
        self.sleep = sleep
        self.slots = Window(in_flight)
        self.writer = GroupCommit(store)
        self.writer.observe = self.metrics.db.labels("commit").observe
        self._claims: set[str] = set()  # sales this instance is advising now (renewed by keep_claims)
        self._awaited: dict[str, int] = {}  # sales another instance is advising, and how many wait here
        self._poll_round: _PollRound | None = None
        self.site_generation = -1
        self.sites: dict[str, SiteState] = {}
        self._busy: dict[str, trio.Event] = {}
        self.counters: dict[str, int] = {"refused": 0, "settled": 0, "repeated": 0, "pending": 0}
        self.load_sites()

    # -- sites -----------------------------------------------------------------------

    def load_sites(self) -> None:
        generation = self.store.site_generation()
        for row in self.store.sites():
            self.sites[row.site_id] = self._site_state(row)
        self.site_generation = generation

    async def reload_sites_if_changed(self) -> list[SiteRow]:
        """Take sites and roster entries another process added (``switch add-site``, another
        instance): rebuilt from the database when its site generation moved. The rows of sites
        new to this instance are returned (their CAs must be trusted for TLS)."""
        generation = await self._read(self.store.site_generation)
        if generation == self.site_generation:
            return []
        rows = await self._read(self.store.sites)
        entries = {row.site_id: await self._read(lambda: self.store.site_entries(row.site_id)) for row in rows}
        new = [row for row in rows if row.site_id not in self.sites]
        for row in rows:
            self.sites[row.site_id] = self._site_state(row, entries[row.site_id])
        self.site_generation = generation
        log.info("sites reloaded (generation %d): %d site(s), %d new", generation, len(rows), len(new))
        return new

    def _site_state(self, row: SiteRow, entries: list[bytes] | None = None) -> SiteState:
        ca = certs.load_pem(row.ca_pem, f"site {row.site_id} CA")
        policy = verify_policy_envelope(row.policy_env, ca, f"site {row.site_id} policy")
        roster = Roster(ca, policy)
        state = SiteState(row=row, roster=roster, known=set())
        now = self.clock.now_ms()
        for raw in self.store.site_entries(row.site_id) if entries is None else entries:
            try:
                env = envelope.decode(raw)
                roster.verify(env, now)
                state.learn(env)
            except (EncodingError, VerificationError, ConfigError) as exc:
                log.warning("stored roster entry of site %s no longer verifies: %s", row.site_id, exc)
                continue
            state.known.add(digest_of(raw))
        return state

    def add_site(self, row: SiteRow) -> SiteState:
        state = self.sites[row.site_id] = self._site_state(row)
        return state

    def identify_client(self, cert_der: bytes | None) -> tuple[SiteState, certs.NodeIdentity]:
        """The registered site and the identity of a forwarder's TLS client certificate."""
        if cert_der is None:
            raise VerificationError("no client certificate: forwarders authenticate with their node certificate")
        cert = certs.load_der(cert_der)
        for site in self.sites.values():
            if cert.issuer != site.roster.ca_cert.subject:
                continue
            ident = certs.verify_node_cert(cert, site.roster.ca_cert, now_ms=self.clock.now_ms(),
                                           revoked=frozenset(site.roster.revoked), roles=SELLING_ROLES)
            return site, ident
        raise VerificationError("client certificate of a site not registered at this switch")

    # -- one batch ---------------------------------------------------------------------

    async def forward(self, site: SiteState, entries: list[bytes]) -> ForwardReply:
        """Process one batch of a site's entries (see the rules at the top of this module)."""
        now = self.clock.now_ms()
        refused: list[Refusal] = []
        decoded: list[tuple[int, Envelope]] = []
        for i, raw in enumerate(entries):
            try:
                decoded.append((i, envelope.decode(raw)))
            except EncodingError as exc:
                refused.append(Refusal(i, None, None, f"not an envelope: {exc}"))
        n_sales = sum(1 for _, env in decoded if env.type == "sale")
        if n_sales > MAX_SALES:
            raise InputError(f"{n_sales} sales exceed the limit of {MAX_SALES} per request")
        self.metrics.forwarded.inc(n_sales)
        self.metrics.in_flight.inc()
        try:
            return await self._forward(site, decoded, refused, now)
        finally:
            self.metrics.in_flight.dec()

    async def _forward(self, site: SiteState, decoded: list[tuple[int, Envelope]], refused: list[Refusal],
                       now: int) -> ForwardReply:

        learned = self._take_roster_entries(site, [(i, e) for i, e in decoded if e.type in ROSTER_ORDER], now,
                                            refused)
        if learned:
            def remember(s: SwitchStore) -> None:
                for key, type_, raw in learned:
                    s.put_site_entry(site.site_id, key, type_, raw)

            await self.writer.commit(remember)
        voids = self._take_voids(site, [(i, e) for i, e in decoded if e.type == "void"], now, refused)
        for i, env in decoded:
            if env.type not in ROSTER_ORDER and env.type not in ("sale", "void"):
                refused.append(Refusal(i, env.type, None, f"{env.type} entries are not forwarded to the switch"))

        work: dict[str, _Work] = {}
        for i, env in decoded:
            if env.type != "sale":
                continue
            sale_id = env.body.get("sale_id") if isinstance(env.body.get("sale_id"), str) else None
            d = digest_of(env.raw)
            if sale_id is not None and sale_id in work:
                if work[sale_id].digest != d:
                    refused.append(Refusal(i, "sale", sale_id, "two different sale envelopes with one sale id"))
                continue
            try:
                envelope.check_schema(env)
            except (EncodingError, VerificationError) as exc:
                refused.append(Refusal(i, "sale", sale_id, str(exc)))
                continue
            assert sale_id is not None
            if env.body["site"] != site.site_id:
                # before the table is read: a sale the switch holds for another site is neither this
                # forwarder's to see (its result) nor to have judged and settled under this site's
                # policy and merchant (one that waits, deferred); the roster's check comes later
                refused.append(Refusal(i, "sale", sale_id, f"sale entry of another site ({str(env.body['site'])[:32]})"))
                continue
            work[sale_id] = _Work(i, env, d)

        outcomes: dict[str, Outcome] = {}
        new = await self._verify_new(site, list(work.values()), now, refused, outcomes)
        if new or voids:
            def received(s: SwitchStore) -> None:  # durable before anything else happens to these sales
                s.insert_received_many([(w.env.body["sale_id"], site.site_id, w.env.signer, w.digest, w.env.raw)
                                        for w in new], now)
                for sale_id, void in voids.items():
                    s.put_void(sale_id, site.site_id, void.raw, void.body["at"])

            await self.writer.commit(received, min([w.env.body["sale_id"] for w in new] + list(voids), default=""))
        # one query for the whole batch's rows and stored voids (not one per sale)
        ids = [sale_id for sale_id in work if sale_id not in outcomes]
        rows = await self._read(lambda: self.store.sales_of(ids))
        stored_voids = await self._read(lambda: self.store.voids_of([i for i in ids if i not in voids]))

        async def one(w: _Work) -> None:
            sale_id = w.env.body["sale_id"]
            void = voids.get(sale_id)
            if void is None and sale_id in stored_voids:
                void = envelope.decode(stored_voids[sale_id])
            outcomes[sale_id] = await self._alone(sale_id, self._process(site, w, void, rows.get(sale_id)))

        async def reverse_only(sale_id: str, void: Envelope) -> None:
            outcomes[sale_id] = await self._alone(sale_id, self._void_settled(site, sale_id))

        async with trio.open_nursery() as nursery:
            for w in work.values():
                if w.env.body["sale_id"] not in outcomes:
                    nursery.start_soon(one, w)
            for sale_id, void in voids.items():
                if sale_id not in work:
                    nursery.start_soon(reverse_only, sale_id, void)

        results: list[bytes] = []
        pending: list[Pending] = []
        reversed_: list[str] = []
        for sale_id, outcome in outcomes.items():
            if isinstance(outcome, _Settled):
                if sale_id in work:
                    results.append(outcome.raw)
                if outcome.reversal is not None:
                    results.append(outcome.reversal)
                if outcome.reversed:
                    reversed_.append(sale_id)
            elif isinstance(outcome, Pending):
                pending.append(outcome)
                self.counters["pending"] += 1
                self.metrics.pending.inc()
            elif isinstance(outcome, Refusal):
                refused.append(outcome)
        for r in refused:
            self.counters["refused"] += 1
            self.metrics.refused(r.reason)
            log.warning("site %s: refused %s entry %d (sale %s): %s", site.site_id, r.type or "an", r.index,
                        r.sale_id, r.reason)
        refused.sort(key=lambda r: r.index)
        return ForwardReply(results=tuple(results), pending=tuple(pending), refused=tuple(refused),
                            reversed=tuple(reversed_))

    async def _alone(self, sale_id: str, work: Awaitable[Outcome]) -> Outcome:
        """Run one sale's work so that nothing it raises reaches its batch: a failure the
        rules do not foresee (a bug, a database write that failed) leaves it pending."""
        try:
            return await work
        except Exception as exc:  # noqa: BLE001 -- the boundary that keeps one sale from failing its batch
            log.error("sale %s could not be processed now (%s: %s); it stays pending", sale_id,
                      type(exc).__name__, str(exc)[:200])
            return Pending(sale_id, "the switch could not process this sale now: forward it again later")

    def _take_roster_entries(self, site: SiteState, items: list[tuple[int, Envelope]], now: int,
                             refused: list[Refusal]) -> list[tuple[str, str, bytes]]:
        learned: list[tuple[str, str, bytes]] = []
        for i, env in sorted(items, key=lambda item: ROSTER_ORDER[item[1].type]):
            d = digest_of(env.raw)
            if d in site.known:
                continue
            try:
                verified = site.roster.verify(env, now)
                site.learn(env)
            except (EncodingError, VerificationError, ConfigError) as exc:
                refused.append(Refusal(i, env.type, None, str(exc)))
                continue
            site.known.add(d)
            learned.append((verified.key, env.type, env.raw))
        return learned

    def _take_voids(self, site: SiteState, items: list[tuple[int, Envelope]], now: int,
                    refused: list[Refusal]) -> dict[str, Envelope]:
        voids: dict[str, Envelope] = {}
        for i, env in items:
            try:
                revocation = self._verify_up_to_cut(site, env, now)
            except (EncodingError, VerificationError) as exc:
                sale_id = env.body.get("sale_id")
                refused.append(Refusal(i, "void", sale_id if isinstance(sale_id, str) else None, str(exc)))
                continue
            if revocation is not None and rules.beyond_cut(revocation, None, env.body["at"]):
                refused.append(Refusal(i, "void", env.body["sale_id"],
                                       "void dated after the revocation of its terminal"))
                continue
            voids.setdefault(env.body["sale_id"], env)
        return voids

    def _verify_up_to_cut(self, site: SiteState, env: Envelope, now: int, *,
                          schema_checked: bool = False) -> dict[str, Any] | None:
        """``Roster.verify`` of an entry (which applies revocation cuts, protocols/rules.md); an
        authentic sale of a revoked terminal after its cut passes too, and its revocation body is
        returned so that the caller settles it ``rejected``. None for every other entry.
        ``schema_checked``: as for ``Roster.verify`` (the batch's sales are, in ``_forward``)."""
        try:
            site.roster.verify(env, now, schema_checked=schema_checked)
        except VerificationError:
            if site.roster.revoked_sale_beyond_cut(env):
                return site.roster.revocations.get(env.signer)
            raise
        return None

    async def _verify_new(self, site: SiteState, work: list[_Work], now: int, refused: list[Refusal],
                          outcomes: dict[str, Outcome]) -> list[_Work]:
        """Verify the sales not in the table yet; the authentic ones are returned."""
        new: list[_Work] = []
        known = await self._read(lambda: self.store.sales_of([w.env.body["sale_id"] for w in work]))
        for n, w in enumerate(work):
            if n and n % VERIFY_CHUNK == 0:
                await trio.lowlevel.checkpoint()
            sale_id = w.env.body["sale_id"]
            if sale_id in known:
                continue  # known: _process compares the bytes
            try:
                revocation = self._verify_up_to_cut(site, w.env, now, schema_checked=True)
            except (EncodingError, VerificationError) as exc:
                outcomes[sale_id] = Refusal(w.index, "sale", sale_id, str(exc))
                continue
            if revocation is not None and rules.beyond_cut(revocation, w.env.body["seq"], w.env.body["created_at"]):
                cut = (f"sequence number {revocation['cut_seq']}" if revocation.get("cut_seq") is not None
                       else f"its time {revocation['at']}")
                ident = site.roster.identities.get(w.env.signer)
                outcomes[sale_id] = await self._settle_new_rejected(
                    site, w, f"sale by revoked node {ident.name if ident else w.env.signer} ({w.env.signer}) "
                             f"after the revocation's cut ({cut})")
                continue
            new.append(w)
        return new

    # -- one sale ------------------------------------------------------------------------

    @asynccontextmanager
    async def _exclusive(self, sale_id: str) -> AsyncIterator[None]:
        while (busy := self._busy.get(sale_id)) is not None:
            await busy.wait()
        event = self._busy[sale_id] = trio.Event()
        try:
            yield
        finally:
            del self._busy[sale_id]
            event.set()

    async def _read(self, fn: Callable[[], T]) -> T:
        """A read of the store: on the event loop for SQLite (local, fast), in a worker thread
        for PostgreSQL (a network round trip; a server away must not stall the loop)."""
        with self.metrics.timed_db("read"):
            if self.store.blocking_reads:
                return await trio.to_thread.run_sync(fn)
            return fn()

    async def _sale(self, sale_id: str) -> SaleRow | None:
        return await self._read(lambda: self.store.sale(sale_id))

    async def _void_of(self, sale_id: str) -> Envelope | None:
        raw = await self._read(lambda: self.store.void_of(sale_id))
        return envelope.decode(raw) if raw is not None else None

    def _claim_until(self) -> int:
        return self.clock.now_ms() + self.claim_lease_ms

    async def keep_claims(self) -> None:
        """Renew this instance's claims on the sales it is advising, every third of the lease,
        until cancelled: another instance takes a sale over only once its claim expired."""
        while True:
            await trio.sleep(self.claim_lease_ms / 3000)
            if self._claims:
                until = self._claim_until()

                def renew(s: SwitchStore) -> None:
                    s.renew_claims(self.instance, until)

                try:
                    await self.writer.commit(renew, "\uffff")  # many rows: after the single-sale ops
                except MeshposError as exc:
                    log.warning("claims not renewed: %s", exc)

    async def _await_other(self, sale_id: str, w: _Work) -> Outcome:
        """Another instance is advising this sale: wait a moment for its result."""
        self._awaited[sale_id] = self._awaited.get(sale_id, 0) + 1
        try:
            with trio.move_on_after(self.wait_for_other_s):
                while True:
                    row = await self._poll_awaited(sale_id)
                    if row is not None and row.state == SETTLED:
                        return self._known(row, w)
        finally:
            self._awaited[sale_id] -= 1
            if not self._awaited[sale_id]:
                del self._awaited[sale_id]
        return Pending(sale_id, "being advised by another instance of this switch: forward it again")

    async def _poll_awaited(self, sale_id: str) -> SaleRow | None:
        """The row of ``sale_id`` as of the next poll: ONE query every WAIT_POLL_S reads the rows
        of every sale awaited in this process (the first waiter of a round makes it)."""
        round_ = self._poll_round
        if round_ is not None:
            await round_.done.wait()
            return round_.rows.get(sale_id)
        round_ = self._poll_round = _PollRound()
        try:
            await trio.sleep(WAIT_POLL_S)
            self._poll_round = None  # whoever comes now waits for the next round
            ids = list(self._awaited)
            round_.rows = await self._read(lambda: self.store.sales_of(ids))
        finally:
            if self._poll_round is round_:
                self._poll_round = None
            round_.done.set()
        return round_.rows.get(sale_id)

    def _result(self, site: SiteState, sale_id: str, status: str, *, auth_code: str | None = None,
                response_code: str | None = None, reason: str | None = None, reversed_: bool = False) -> bytes:
        body: dict[str, Any] = {
            "sale_id": sale_id, "site": site.site_id, "status": status, "auth_code": auth_code,
            "response_code": response_code, "reason": reason[:300] if reason else None,
            "settled_at": self.clock.now_ms(), "reversed": reversed_,
        }
        return envelope.seal("result", "switch", body, self.key)

    async def _settle(self, sale_id: str, raw: bytes, status: str, reversal: str | None = None) -> _Settled:
        now = self.clock.now_ms()
        try:
            await self.writer.commit(Settle(sale_id, raw, status, reversal, now), sale_id)
        except AlreadySettled:
            self._claims.discard(sale_id)
            row = await self._sale(sale_id)
            if row is None or row.result is None:
                raise
            log.info("sale %s was settled by another instance first: its result stands", sale_id)
            return _Settled(row.result)
        self._claims.discard(sale_id)
        self.counters["settled"] += 1
        self.metrics.result(status)
        log.info("sale %s settled: %s", sale_id, status)
        return _Settled(raw)

    async def _settle_new_rejected(self, site: SiteState, w: _Work, reason: str) -> Outcome:
        sale_id = w.env.body["sale_id"]
        async with self._exclusive(sale_id):
            row = await self._sale(sale_id)
            if row is not None:
                return self._known(row, w)
            raw = self._result(site, sale_id, "rejected", reason=reason)
            log.warning("site %s: rejected sale %s: %s", site.site_id, sale_id, reason)
            now = self.clock.now_ms()

            def op(s: SwitchStore) -> None:
                s.insert_received(sale_id, site.site_id, w.env.signer, w.digest, w.env.raw, now)
                s.settle(sale_id, raw, "rejected", None, now)

            try:
                await self.writer.commit(op, sale_id)
            except AlreadySettled:  # another instance recorded it first
                row = await self._sale(sale_id)
                if row is None:
                    raise
                return self._known(row, w)
            self.counters["settled"] += 1
            self.metrics.result("rejected")
            return _Settled(raw)

    def _known(self, row: SaleRow, w: _Work) -> Outcome:
        if row.digest != w.digest:
            return Refusal(w.index, "sale", row.sale_id,
                           "conflict: another sale envelope under this sale id reached the switch first")
        assert row.result is not None
        self.counters["repeated"] += 1
        return _Settled(row.result)

    async def _process(self, site: SiteState, w: _Work, void: Envelope | None, fetched: SaleRow | None) -> Outcome:
        """``fetched``: the row as read for the whole batch (with ``void``, the batch's or the
        stored one); used unless another task of this process had the sale meanwhile. A row
        that another instance changed since is safe to act on: the steps that matter are
        compare-and-set updates (``store``), which then fail and say so."""
        sale_id = w.env.body["sale_id"]
        waited = sale_id in self._busy
        async with self._exclusive(sale_id):
            row = fetched
            if row is None or waited:
                row = await self._sale(sale_id)
                if void is None:
                    void = await self._void_of(sale_id)
            if row is None:
                return Pending(sale_id, "not recorded by the switch yet: forward it again")
            if row.digest != w.digest:
                return self._known(row, w)
            if row.state == SETTLED:
                if void is not None and row.result_status == "approved":
                    if row.reversal != REVERSAL_DONE:
                        return await self._reverse_settled(site, row)
                    return await self._reversed(site, row)
                return self._known(row, w)
            if row.state == RECEIVED:
                return await self._first_time(site, row, w, void)
            if not await self._claim(sale_id):
                return await self._await_other(sale_id, w)
            try:
                return await self._after_advice(site, row, w.env, void)
            finally:
                await self._release(sale_id)

    def content_problem(self, body: dict[str, Any], policy: SitePolicy) -> str | None:
        """Why a sale breaks a content rule (protocols/rules.md) at this switch, or None;
        ``policy``: the site's policy in force at the sale's ``created_at``."""
        return rules.sale_problem(body, policy)

    def dated_ahead(self, body: dict[str, Any]) -> str | None:
        """Why a sale is not believed yet: dated beyond the skew ahead of this switch's clock. Not
        final (a terminal whose clock runs fast only delays its own sales): answered pending,
        no result, judged again once the switch's clock gets there."""
        return rules.future_problem(body["created_at"], self.clock.now_ms(), "the sale's time")

    async def _reject(self, site: SiteState, sale_id: str, reason: str) -> _Settled:
        log.warning("site %s: rejected sale %s: %s", site.site_id, sale_id, reason)
        return await self._settle(sale_id, self._result(site, sale_id, "rejected", reason=reason), "rejected")

    async def _claim(self, sale_id: str) -> bool:
        now, until = self.clock.now_ms(), self._claim_until()
        claimed = False

        def op(s: SwitchStore) -> None:
            nonlocal claimed
            claimed = s.claim(sale_id, self.instance, now, until)

        await self.writer.commit(op, sale_id)
        if claimed:
            self._claims.add(sale_id)
        return claimed

    async def _release(self, sale_id: str) -> None:
        """Give up the claim on a sale still unsettled (no answer yet): another instance may go on."""
        if sale_id in self._claims:
            self._claims.discard(sale_id)
            try:
                await self.writer.commit(lambda s: s.release(sale_id, self.instance), sale_id)
            except MeshposError as exc:  # it expires by itself
                log.warning("sale %s: claim not released: %s", sale_id, exc)

    async def _first_time(self, site: SiteState, row: SaleRow, w: _Work, void: Envelope | None) -> Outcome:
        env = w.env
        body = env.body
        sale_id = row.sale_id
        policy = site.policy_at(body["created_at"])  # once: the content rules and the offline window
        problem = self.content_problem(body, policy)
        if problem is not None:
            return await self._reject(site, sale_id, problem)
        ahead = self.dated_ahead(body)
        if ahead is not None:
            log.warning("site %s: sale %s deferred: %s", site.site_id, sale_id, ahead)
            return Pending(sale_id, f"deferred: {ahead}; forward it again once the switch's clock gets there")
        if void is not None:
            return await self._settle(sale_id, self._result(
                site, sale_id, "voided", reason="voided before it was sent to the acquirer"), "voided")
        if body["method"] == "cash":
            return await self._settle(sale_id, self._result(
                site, sale_id, "approved", reason="cash sale: recorded, not sent to the acquirer"), "approved")
        deadline = body["created_at"] + policy.offline_window_ms
        now = self.clock.now_ms()
        if now > deadline:
            return await self._settle(sale_id, self._result(
                site, sale_id, "expired",
                reason=f"reached the switch {(now - deadline) // 1000} s after its offline window closed"),
                "expired")
        opened: OpenedCard | None = None
        try:
            opened = self._open(env)
            # rules.card_problem, the number's own part (rules.pan_problem) checked by the request
            # (wire/acquirer.py check_pan, InputError with the same words): each check runs once
            req = self._request(site, row, env, opened)
            problem = rules.card_match_problem(opened.pan, opened.expiry, body)
            if problem is not None:
                return await self._reject(site, sale_id, problem)
        except SALE_ERRORS as exc:
            return await self._reject(site, sale_id, scrub(str(exc), opened.pan if opened else None))

        async def on_sent() -> None:
            at, until = self.clock.now_ms(), self._claim_until()
            await self.writer.commit(AdviceSent(sale_id, at, self.instance, until), sale_id)
            self._claims.add(sale_id)

        try:
            return await self._advise(site, row, req, already_sent=False, on_sent=on_sent)
        except ClaimLost:  # another instance recorded its 0220 first: nothing was sent from here
            return await self._await_other(sale_id, w)
        finally:
            await self._release(sale_id)

    async def _after_advice(self, site: SiteState, row: SaleRow, env: Envelope, void: Envelope | None) -> Outcome:
        try:
            req = self._request(site, row, env, self._open(env))
        except SALE_ERRORS as exc:
            return Pending(row.sale_id, f"an advice went out but the card data no longer opens: {exc}")
        if void is not None:
            try:
                await self._reverse_until_answered(req)
            except AcquirerError as exc:
                return Pending(row.sale_id, f"voided after its advice went out; reversal not answered yet: {exc}")
            return await self._settle(row.sale_id, self._result(
                site, row.sale_id, "voided", reason="voided after its advice went out: reversed (0420)",
                reversed_=True), "voided", REVERSAL_DONE)

        async def on_sent() -> None:  # never called: already_sent
            raise AssertionError("a second 0220")

        return await self._advise(site, row, req, already_sent=True, on_sent=on_sent)

    async def _advise(self, site: SiteState, row: SaleRow, req: AcquirerRequest, *, already_sent: bool,
                      on_sent: Callable[[], Awaitable[None]]) -> Outcome:
        counting = _CountingLink(self.link)
        try:
            async with self.slots:
                answer = await advise_until_answered(
                    counting, req, already_sent=already_sent, on_sent=on_sent,
                    max_attempts=self.advice_attempts, backoff=self.backoff, sleep=self.sleep)
        except UnsendableRequest as exc:
            # it never left (it does not encode), or the host refused it as it is: final
            return await self._reject(site, row.sale_id, scrub(str(exc), req.pan))
        except AcquirerError as exc:
            repeats = counting.repeats
            if repeats > 0:
                at = self.clock.now_ms()
                await self.writer.commit(lambda s: s.add_attempts(row.sale_id, repeats, at), row.sale_id)
            log.warning("%s: acquirer gave no answer: %s", req.describe(), exc)
            return Pending(row.sale_id, "the acquirer did not answer yet: forward again (a repeat advice follows)")
        repeats = counting.repeats
        if repeats > 0:
            at = self.clock.now_ms()
            await self.writer.commit(lambda s: s.add_attempts(row.sale_id, repeats, at), row.sale_id)
        return await self._settle_answer(site, row.sale_id, answer)

    async def _settle_answer(self, site: SiteState, sale_id: str, answer: AcquirerResult) -> _Settled:
        if answer.approved:
            auth_code = fit_auth_code(answer.auth_code)
            if auth_code != answer.auth_code:
                log.warning("sale %s: approved with an auth code that is not 1 to 8 letters or digits (%d characters, "
                            "beginning %s); settled approved without it", sale_id, len(answer.auth_code or ""),
                            ascii((answer.auth_code or "")[:8]))
            raw = self._result(site, sale_id, "approved", auth_code=auth_code,
                               response_code=answer.response_code)
            return await self._settle(sale_id, raw, "approved")
        raw = self._result(site, sale_id, "declined", response_code=answer.response_code,
                           reason=decline_reason(answer.response_code))
        return await self._settle(sale_id, raw, "declined")

    def _open(self, env: Envelope) -> OpenedCard:
        """The sale's card data, opened with the switch key (the PAN lives only in memory). What it
        holds is checked once, before the first advice (``rules.card_problem`` in _first_time)."""
        return open_card(envelope.b64d(env.body["card"]["sealed"], "sealed card data"), self._card_key)

    def _request(self, site: SiteState, row: SaleRow, env: Envelope, opened: OpenedCard) -> AcquirerRequest:
        body = env.body
        card = body["card"]
        return AcquirerRequest(
            sale_id=row.sale_id, pan=opened.pan, expiry=opened.expiry, amount_minor=body["amount_minor"],
            currency=body["currency"], created_at_ms=body["created_at"], entry_mode=card["entry_mode"],
            terminal_id=terminal_id_of(row.terminal), merchant_id=site.row.merchant_id,
            stan=stan_of(row.ref), rrn=rrn_of(row.ref))

    # -- voids after settlement -----------------------------------------------------------

    async def _void_settled(self, site: SiteState, sale_id: str) -> Outcome:
        """A void whose sale is not in this batch: reverse it if it was charged."""
        async with self._exclusive(sale_id):
            row = await self._sale(sale_id)
            if row is None or row.state != SETTLED:
                # kept in the voids table; applied when the sale itself is forwarded
                return Pending(sale_id, "void recorded; the sale itself was not forwarded with it")
            if row.result_status == "approved" and row.reversal != REVERSAL_DONE:
                return await self._reverse_settled(site, row)
            assert row.result is not None
            if row.reversal == REVERSAL_DONE:
                return await self._reversed(site, row)
            return _Settled(row.result)

    async def _reverse_settled(self, site: SiteState, row: SaleRow) -> Outcome:
        assert row.result is not None
        try:
            env = envelope.decode(row.sale_raw)
            req = self._request(site, row, env, self._open(env))
        except SALE_ERRORS as exc:
            return Pending(row.sale_id, f"cannot reverse: {exc}")
        if row.reversal is None:
            at = self.clock.now_ms()
            await self.writer.commit(lambda s: s.set_reversal(row.sale_id, REVERSAL_SENT, at), row.sale_id)
        try:
            answer = await self._reverse_until_answered(req)
        except AcquirerError as exc:
            return Pending(row.sale_id, f"voided after approval; reversal not answered yet: {exc}")
        return await self._reversal_done(site, row, answer.response_code)

    async def _reversal_done(self, site: SiteState, row: SaleRow, response_code: str | None) -> _Settled:
        """Record that the 0420 of a void after approval was answered, with its signed ``reversal`` entry."""
        assert row.result is not None
        at = self.clock.now_ms()
        entry = envelope.seal("reversal", "switch", {
            "sale_id": row.sale_id, "site": site.site_id, "reversed_at": at, "response_code": response_code,
            "reason": "voided after approval: reversed at the acquirer (0420)"}, self.key)
        await self.writer.commit(lambda s: s.set_reversal(row.sale_id, REVERSAL_DONE, at, entry), row.sale_id)
        log.info("sale %s: voided after approval, reversed (0420)", row.sale_id)
        return _Settled(row.result, reversed=True, reversal=entry)

    async def _reversed(self, site: SiteState, row: SaleRow) -> _Settled:
        """A sale whose reversal is done: its result and the same reversal entry bytes as before
        (a row reversed before reversal entries existed gets one now)."""
        assert row.result is not None
        if row.reversal_entry is None:
            return await self._reversal_done(site, row, None)
        return _Settled(row.result, reversed=True, reversal=row.reversal_entry)

    # -- answers nobody waited for any more -------------------------------------------------

    async def take_late_answers(self, answers: trio.MemoryReceiveChannel[LateAnswer]) -> None:
        """Settle sales from answers that arrived after their request stopped waiting, until cancelled."""
        async for answer in answers:
            try:
                await self.settle_late(answer)
            except MeshposError as exc:
                log.error("late answer for rrn %s not taken: %s", answer.rrn, exc)

    async def settle_late(self, answer: LateAnswer) -> None:
        ref = int(answer.rrn) if answer.rrn.isascii() and answer.rrn.isdigit() else 0
        found = await self._read(lambda: self.store.sale_by_ref(ref)) if ref else None
        if found is None or (f"{stan_of(found.ref):06d}", terminal_id_of(found.terminal)) != (
                answer.stan, answer.terminal_id):
            log.warning("late answer for rrn %s matches no sale of this switch", answer.rrn)
            return
        site = self.sites.get(found.site_id)
        if site is None:
            log.warning("late answer for sale %s of a site no longer registered", found.sale_id)
            return
        async with self._exclusive(found.sale_id):
            row = await self._sale(found.sale_id)
            assert row is not None
            if answer.reversal:
                if row.state == SETTLED and row.result_status == "approved" and row.reversal == REVERSAL_SENT:
                    await self._reversal_done(site, row, answer.result.response_code)
                elif row.state == ADVICE_SENT and await self._void_of(row.sale_id) is not None:
                    await self._settle(row.sale_id, self._result(
                        site, row.sale_id, "voided", reason="voided after its advice went out: reversed (0420)",
                        reversed_=True), "voided", REVERSAL_DONE)
                return
            if row.state != ADVICE_SENT:
                log.info("late answer for sale %s: settled already", row.sale_id)
                return
            log.info("sale %s settled from a late answer", row.sale_id)
            await self._settle_answer(site, row.sale_id, answer.result)

    async def _reverse_until_answered(self, req: AcquirerRequest) -> AcquirerResult:
        last: AcquirerError | None = None
        async with self.slots:
            for attempt in range(self.reversal_attempts):
                if attempt:
                    await self.sleep(self.backoff(attempt))
                try:
                    return await self.link.reverse(req)
                except AcquirerError as exc:
                    last = exc
        raise AcquirerError(f"no answer to the reversal of {req.describe()}: {last}") from last


class _CountingLink:
    """Counts the repeat advices (0221) one sale's attempts make (for the ``attempts`` column;
    the 0220 is counted when it is recorded as sent)."""

    def __init__(self, link: AcquirerLink) -> None:
        self._link = link
        self.repeats = 0

    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        self.repeats += repeat
        return await self._link.advise(req, repeat=repeat, before_send=before_send)

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        return await self._link.reverse(req)

    async def aclose(self) -> None:
        pass


__all__ = ["Switch", "SiteState", "rrn_of", "stan_of", "terminal_id_of", "decline_reason", "digest_of"]
