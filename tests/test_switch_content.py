"""The switch judges the content of every sale, and one bad sale fails alone.

At the switch's HTTP API with hand-made envelopes signed by an enrolled terminal's real key
(bypassing ``sell``'s checks): a poison sale in a batch of honest ones is settled ``rejected``
with its reason (signed, final) and never reaches the acquirer, while every honest sale is
approved with exactly one 0220; the batch is answered, and the next one is served normally.
Also: a sale that does not encode, an answer that comes late, an error nobody foresaw, the
policy in force at the sale's time, the revocation's cut, and the signed reversal entry.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.public
import pytest
import trio

from meshpos.wire import canonical, envelope
from meshpos.acquirer.base import AcquirerLink, BeforeSend
from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.wire.iso8583 import DEFAULT_SPEC
from meshpos.acquirer.simulator import CardRule, SimRules
from meshpos.infra.clock import FakeClock
from meshpos.identity import keys
from meshpos.node.core import NodeCore
from meshpos.domain.rules import luhn_ok
from meshpos.site.sitedir import Site
from meshpos.wire.forwarding import ForwardReply
from meshpos.switch.store import ADVICE_SENT, REVERSAL_DONE, SETTLED, SwitchStore
from meshpos.uplink.client import forward, make_client_context

from switch_harness import VISA, card_sale, running_switch, switch_dir

assert switch_dir  # a fixture, used by name

MASTERCARD = "5555555555554444"
DAY_MS = 24 * 3600 * 1000


# -- hand-made entries, signed with the terminal's real key --------------------------------


def sealed(core: NodeCore, pan: str, expiry: str | None) -> str:
    """Card data sealed to the switch by hand: no check of the number or the expiry."""
    key = core.policy.switch_key_bytes
    assert key is not None
    box = nacl.public.SealedBox(nacl.public.PublicKey(key)).encrypt(canonical.encode({"pan": pan, "expiry": expiry}))
    return envelope.b64e(bytes(box))


def hand_sale(core: NodeCore, seq: int, *, amount: int = 1250, currency: str = "EUR", pan: str | None = VISA,
              last4: str | None = None, expiry: str | None = "1230", created_at: int | None = None) -> bytes:
    body: dict[str, Any] = {
        "sale_id": envelope.sale_id(core.node_id, seq), "site": core.policy.site_id, "terminal": core.node_id,
        "seq": seq, "created_at": core.clock.now_ms() if created_at is None else created_at,
        "amount_minor": amount, "currency": currency, "method": "card" if pan is not None else "cash",
        "description": None, "items": [],
        "card": None if pan is None else {"brand": "visa", "last4": last4 or pan[-4:], "entry_mode": "contactless",
                                          "sealed": sealed(core, pan, expiry)},
    }
    return envelope.seal("sale", core.node_id, body, core.key)


def roster_entries(site: Site, core: NodeCore) -> list[bytes]:
    return [site.policy_envelope(), core.ledger.raw(f"cert/{core.node_id}") or b""]


def sale_id_of(raw: bytes) -> str:
    return str(envelope.decode(raw).body["sale_id"])


def results_of(reply: ForwardReply) -> dict[str, dict[str, Any]]:
    return {sale_id_of(r): envelope.decode(r).body for r in reply.results if envelope.decode(r).type == "result"}


def luhn_complete(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_ok(prefix + d))


# -- the acceptance test -----------------------------------------------------------------------


async def test_each_poison_sale_is_refused_alone_and_the_honest_sales_are_charged_once(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    core = open_node(make_node("t"))
    now = clock.now_ms()
    cap = core.policy.max_sale_minor
    poisons: dict[str, tuple[bytes, str]] = {}  # what -> (envelope, a piece of the reason)

    def poison(what: str, seq: int, reason: str, **kw: Any) -> None:
        poisons[what] = (hand_sale(core, seq, **kw), reason)

    poison("full-width PAN", 1001, "no valid card number", pan="４１１１１１１１１１１１１１１１", last4="1111")
    poison("over the cap", 1002, "over the per-sale offline cap", amount=cap + 1)
    poison("JPY in an EUR site", 1003, "is not the site's (EUR)", currency="JPY", amount=1000)
    poison("currency XXX, cash 10^12", 1004, "is not the site's (EUR)", currency="XXX", amount=10**12, pan=None)
    poison("60 days ahead", 1005, "ahead of this node's clock", created_at=now + 60 * DAY_MS)
    poison("expired card", 1006, "card expired at the end of 01/20", expiry="0120")
    poison("PAN of zeros", 1007, "not an issued card number", pan="0000000000000000")
    poison("last 4 digits of another card", 1008, "does not match the envelope's last 4", last4="4444")

    honest: list[str] = []
    async with running_switch(switch_dir, clock) as h:
        ctx = make_client_context(core)
        for n, (what, (raw, reason)) in enumerate(poisons.items()):
            good = [card_sale(core, 1000 + n, VISA), card_sale(core, 2000 + n, MASTERCARD)]
            honest += good
            entries = roster_entries(site, core) + [core.ledger.raw(f"sale/{s}") or b"" for s in good]
            entries.insert(3, raw)  # the poison among the honest sales
            reply = await forward(h.url, ctx, entries)  # answered 200: never a 500 for the batch
            results = results_of(reply)
            bad = sale_id_of(raw)
            assert reply.refused == (), what
            assert h.at_acquirer(bad) == {}, f"{what}: reached the acquirer"
            for sale_id in good:
                assert results[sale_id]["status"] == "approved", (what, results[sale_id])
            if what == "60 days ahead":
                # not believed yet, not final either: no result, forwarded again once its time comes
                # (a terminal whose clock runs fast only delays its own sales; protocols/rules.md)
                assert bad not in results and [p.sale_id for p in reply.pending] == [bad], what
                assert reason in reply.pending[0].reason and "deferred" in reply.pending[0].reason
                continue
            assert reply.pending == (), what
            assert results[bad]["status"] == "rejected" and reason in results[bad]["reason"], (what, results[bad])
            # the rejection is a signed, final result: it verifies by the pinned switch key on the node
            core.ingest(next(r for r in reply.results if sale_id_of(r) == bad), "switch")

        # the next batch is served normally
        later = [card_sale(core, 3000 + n) for n in range(3)]
        reply = await forward(h.url, ctx, roster_entries(site, core) + [core.ledger.raw(f"sale/{s}") or b""
                                                                         for s in later])
        assert {s: b["status"] for s, b in results_of(reply).items()} == {s: "approved" for s in later}
        honest += later
        for sale_id in honest:
            assert h.at_acquirer(sale_id) == {"0220": 1}, sale_id
        assert h.sim.stats.totals["0220"] == len(honest) and h.sim.stats.totals["0221"] == 0
    for pan in (VISA, MASTERCARD, "４１１１１１１１１１１１１１１１"):
        assert pan not in caplog.text


# -- one bad sale fails alone --------------------------------------------------------------------


async def test_a_sale_that_does_not_encode_is_rejected_alone_and_never_recorded_as_sent(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """An acquirer whose field 2 takes at most 16 digits, and a valid 19-digit card: the 0220 does
    not encode. Encode first, then record, then send: nothing is recorded, nothing sent."""
    spec = copy.deepcopy(dict(DEFAULT_SPEC))
    spec["2"] = {**spec["2"], "max_len": 16}
    long_pan = luhn_complete("411111111111111111")
    core = open_node(make_node("t"))
    first = card_sale(core)
    long_card = card_sale(core, 900, long_pan)
    last = card_sale(core, 700, MASTERCARD)
    entries = roster_entries(site, core) + [core.ledger.raw(f"sale/{s}") or b"" for s in (first, long_card, last)]
    async with running_switch(switch_dir, clock, spec=spec) as h:
        reply = await forward(h.url, make_client_context(core), entries)
        results = results_of(reply)
        assert results[long_card]["status"] == "rejected" and "does not encode" in results[long_card]["reason"]
        assert long_pan not in results[long_card]["reason"]
        assert results[first]["status"] == results[last]["status"] == "approved"
        row = h.switch.store.sale(long_card)
        assert row is not None and row.state == SETTLED and row.attempts == 0  # "advice sent" never recorded
        assert h.at_acquirer(long_card) == {} and h.sim.stats.totals["0220"] == 2
        again = await forward(h.url, make_client_context(core), entries)  # the same answer, nothing sent
        assert sorted(again.results) == sorted(reply.results) and h.sim.stats.totals["0220"] == 2
    assert long_pan not in caplog.text


async def test_an_answer_that_comes_after_its_request_gave_up_settles_the_sale(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    slow = card_sale(core)
    entries = roster_entries(site, core) + [core.ledger.raw(f"sale/{slow}") or b""]
    rules = SimRules(seed=1, cards=(CardRule(VISA, delay_ms=600),))
    async with running_switch(switch_dir, clock, rules, link_timeout=0.1, attempts=1) as h:
        reply = await forward(h.url, make_client_context(core), entries)
        assert [p.sale_id for p in reply.pending] == [slow]  # the request stopped waiting
        with trio.fail_after(30):
            while (row := h.switch.store.sale(slow)) is None or row.state != SETTLED:
                await trio.sleep(0.05)
        assert row.result_status == "approved"  # settled from the answer that came late
        reply = await forward(h.url, make_client_context(core), entries)
        assert results_of(reply)[slow]["status"] == "approved"
        assert h.at_acquirer(slow) == {"0220": 1}  # no repeat was needed


class _Wrapped:
    """An acquirer link in front of a real one (a unit-level fault injection): reversals and closing
    pass through; each subclass says how it advises."""

    def __init__(self, link: AcquirerLink) -> None:
        self.link = link

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        return await self.link.reverse(req)

    async def aclose(self) -> None:
        await self.link.aclose()


class _FailsFor(_Wrapped):
    """A link that breaks in a way nobody foresaw for one card."""

    def __init__(self, link: AcquirerLink, last4: str) -> None:
        super().__init__(link)
        self.last4 = last4

    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        if req.pan.endswith(self.last4):
            raise RuntimeError("a bug in a link")
        return await self.link.advise(req, repeat=repeat, before_send=before_send)


async def test_an_unforeseen_error_in_one_sale_leaves_it_pending_and_the_batch_is_answered(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    ids = [card_sale(core), card_sale(core, 800, MASTERCARD), card_sale(core, 900)]
    entries = roster_entries(site, core) + [core.ledger.raw(f"sale/{s}") or b"" for s in ids]
    async with running_switch(switch_dir, clock, wrap_link=lambda link: _FailsFor(link, "4444")) as h:
        reply = await forward(h.url, make_client_context(core), entries)
        assert [p.sale_id for p in reply.pending] == [ids[1]]
        assert {s: b["status"] for s, b in results_of(reply).items()} == {ids[0]: "approved", ids[2]: "approved"}
        assert h.switch.store.sale(ids[1]).result is None  # type: ignore[union-attr]  # not settled: retried later


class _ApprovesWith(_Wrapped):
    """A host that approves every sale with the auth code its amount names: the codes a careless
    acquirer might send (the JSON adapter takes any string; ISO field 38, any ASCII)."""

    def __init__(self, link: AcquirerLink, codes: dict[int, str | None]) -> None:
        super().__init__(link)
        self.codes = codes

    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        if before_send is not None:
            await before_send()
        return AcquirerResult(True, "00", self.codes[req.amount_minor])


async def test_an_approval_with_an_unfit_auth_code_settles_approved_and_reaches_the_terminal(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """The approval is booked at the acquirer: the terminal must learn it. An auth code the signed
    result cannot carry (over 12 characters: every node would refuse the result, and the sale, booked,
    would expire on the terminals) or a receipt should not print (escape sequences, empty, not
    ASCII) is left out of the result and logged at the switch; a fit one is kept."""
    codes: dict[int, str | None] = {1001: "A1B2C3", 1002: "X" * 40, 1003: "AB\x1b[2J", 1004: "", 1005: "\uff21\uff11",
                                    1006: None}
    core = open_node(make_node("t"))
    ids = {amount: card_sale(core, amount) for amount in codes}
    entries = roster_entries(site, core) + [core.ledger.raw(f"sale/{s}") or b"" for s in ids.values()]
    async with running_switch(switch_dir, clock, wrap_link=lambda link: _ApprovesWith(link, codes)) as h:
        with caplog.at_level(logging.WARNING, logger="meshpos.switch.processor"):
            reply = await forward(h.url, make_client_context(core), entries)
    results = results_of(reply)
    assert {results[s]["status"] for s in ids.values()} == {"approved"} and reply.pending == ()
    assert {a: results[s]["auth_code"] for a, s in ids.items()} == {a: (c if a == 1001 else None) for a, c in codes.items()}
    for raw in reply.results:
        core.ingest(raw, "switch")  # every result verifies and passes the ledger's checks on the node
    assert {core.sale(s)["status"] for s in ids.values()} == {"approved"}
    warned = [r.getMessage() for r in caplog.records if "auth code that is not" in r.getMessage()]
    assert sorted(w.split(":")[0] for w in warned) == sorted(f"sale {ids[a]}" for a in (1002, 1003, 1004, 1005))
    assert all("\x1b" not in w for w in warned)  # the code is quoted escaped, never raw to the log


# -- the policy in force at the sale's time ------------------------------------------------------------


async def test_each_sale_is_judged_by_the_policy_in_force_at_its_time(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))  # enrolled under version 1: cap 500.00
    before = hand_sale(core, 501, amount=80_000)
    clock.advance(10)
    raised = site.update_policy(max_sale_minor=100_000, effective_at=clock.now_ms())  # version 2 from now: 1000.00
    clock.advance(10)
    after = hand_sale(core, 502, amount=80_000)
    async with running_switch(switch_dir, clock) as h:  # knows version 1 (add-site); the batch carries 2
        reply = await forward(h.url, make_client_context(core), roster_entries(site, core) + [before, after])
        results = results_of(reply)
        assert raised.version == 2 and envelope.decode(site.policy_envelope()).body["policy"]["version"] == 2
        assert results[sale_id_of(before)]["status"] == "rejected"
        assert "over the per-sale offline cap of 50000" in results[sale_id_of(before)]["reason"]
        assert results[sale_id_of(after)]["status"] == "approved"
    async with running_switch(switch_dir, clock) as h:  # a restarted switch still knows both versions
        late_before = hand_sale(core, 503, amount=80_000, created_at=clock.now_ms() - 15_000)
        reply = await forward(h.url, make_client_context(core), [core.ledger.raw(f"cert/{core.node_id}") or b"",
                                                                 late_before])
        assert results_of(reply)[sale_id_of(late_before)]["status"] == "rejected"


# -- revocation: entries up to the cut stay valid -------------------------------------------------------


async def test_a_revoked_terminals_sales_up_to_the_cut_settle_and_those_beyond_are_rejected(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    thief = open_node(make_node("lost"))
    s1, s2, s3 = card_sale(thief), card_sale(thief, 800), card_sale(thief, 900)  # seq 1, 2, 3
    thief.void(s2, "customer changed their mind")  # before the revocation: valid
    clock.advance(60)
    # the organizer's node held the lost terminal's entries up to seq 2: that is the cut
    revocation = envelope.seal("revocation", site.site_id, {
        "node_id": thief.node_id, "site": site.site_id, "at": clock.now_ms(), "reason": "lost", "cut_seq": 2},
        site.ca_key)
    clock.advance(60)
    thief.void(s1, "after the revocation")  # dated after it: refused; s1 itself stays valid
    entries = roster_entries(site, core) + [thief.ledger.raw(f"cert/{thief.node_id}") or b"", revocation] + [
        thief.ledger.raw(k) or b"" for k in (f"sale/{s1}", f"sale/{s2}", f"sale/{s3}", f"void/{s1}", f"void/{s2}")]
    async with running_switch(switch_dir, clock) as h:
        reply = await forward(h.url, make_client_context(core), entries)
        results = results_of(reply)
        assert results[s1]["status"] == "approved" and h.at_acquirer(s1) == {"0220": 1}
        assert results[s2]["status"] == "voided" and h.at_acquirer(s2) == {}
        assert results[s3]["status"] == "rejected" and "after the revocation's cut (sequence number 2)" in \
            results[s3]["reason"]
        assert h.at_acquirer(s3) == {}
        assert [(r.type, r.sale_id) for r in reply.refused] == [("void", s1)]
        assert "after the revocation" in reply.refused[0].reason


# -- reversals -----------------------------------------------------------------------------------


async def test_a_void_after_approval_returns_a_signed_reversal_entry(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    sale = card_sale(core)
    ctx = make_client_context(core)
    async with running_switch(switch_dir, clock) as h:
        first = await forward(h.url, ctx, roster_entries(site, core) + [core.ledger.raw(f"sale/{sale}") or b""])
        core.ingest(first.results[0], "switch")
        core.void(sale, "returned the goods")
        void_raw = core.ledger.raw(f"void/{sale}") or b""
        reply = await forward(h.url, ctx, roster_entries(site, core) + [void_raw])  # the void alone
        assert reply.reversed == (sale,) and h.at_acquirer(sale) == {"0220": 1, "0420": 1}
        [raw] = reply.results
        env = envelope.decode(raw)
        assert (env.type, env.signer) == ("reversal", "switch")
        assert env.body["sale_id"] == sale and env.body["site"] == site.site_id
        assert env.body["response_code"] == "00" and env.body["reversed_at"] == clock.now_ms()
        verified = core.roster.verify(env, clock.now_ms())  # signed with the switch key, like results
        assert verified.key == f"reversal/{sale}"
        forged = envelope.seal("reversal", "switch", env.body, keys.generate())
        with pytest.raises(Exception, match="signature|verify"):
            core.roster.verify(envelope.decode(forged), clock.now_ms())
        # forwarded again, with its sale: the same result and reversal bytes, no second 0420
        again = await forward(h.url, ctx, roster_entries(site, core) + [core.ledger.raw(f"sale/{sale}") or b"",
                                                                       void_raw])
        assert sorted(again.results) == sorted([first.results[0], raw]) and again.reversed == (sale,)
        assert h.at_acquirer(sale) == {"0220": 1, "0420": 1}
        assert h.switch.store.sale(sale).reversal == REVERSAL_DONE  # type: ignore[union-attr]


def test_add_site_again_keeps_every_policy_version(switch_dir: Path, site: Site, clock: FakeClock) -> None:
    from meshpos.switch.processor import Switch
    from meshpos.switch.switchdir import SwitchDir, add_site

    site.update_policy(max_sale_minor=100_000, effective_at=clock.now_ms() + 1000)
    add_site(switch_dir, site.path)  # the site row now holds version 2 only
    sd = SwitchDir(switch_dir)
    store = sd.open_store()
    try:
        state = Switch(store, sd.key(), _FailsFor(None, ""), clock).sites[site.site_id]  # type: ignore[arg-type]
        assert sorted(state.roster.policies) == [1, 2]
        assert state.policy_at(clock.now_ms()).max_sale_minor == 50_000  # version 2 is not in force yet
        assert state.policy_at(clock.now_ms() + 1000).max_sale_minor == 100_000
    finally:
        store.close()


# -- a forwarder of one site sends a sale of another that the switch holds ------------------------------


async def test_a_sale_of_another_site_is_refused_even_when_the_switch_holds_it(
        tmp_path: Path, switch_dir: Path, site: Site, make_node: Callable[..., Path],
        open_node: Callable[[Path], NodeCore], clock: FakeClock, switch_key: Any) -> None:
    """Found by an independent forwarder written from protocols/forwarding.md: the site check came
    after the table lookup. A forwarder of site A re-sending a sale of site B the switch held got
    B's signed result; and a sale of B still waiting (dated ahead, deferred) was judged under A's
    policy (A's cap: signed `rejected`) and settled with A's merchant. Now a sale of another site is
    refused before the table is read; B's own forwarder still gets its sale judged as B's."""
    from meshpos.identity import keys as keymod
    from meshpos.node.enroll import enroll_one_step
    from meshpos.site.sitedir import init_site
    from meshpos.switch.switchdir import add_site

    core = open_node(make_node("a1"))  # site A (the fixture's): per-sale cap 500.00
    other = init_site(tmp_path / "site-b", "Altra Fiera", switch_key=keymod.x25519_public_of(switch_key).hex(),
                      limits={"max_sale_minor": 200_000})
    add_site(switch_dir, other.path)
    enroll_one_step(other, tmp_path / "b1", "terminal", "b1")
    b1 = open_node(tmp_path / "b1")
    settled_b = card_sale(b1, 1500)
    ahead = hand_sale(b1, 900, amount=80_000, created_at=clock.now_ms() + 3_600_000)  # over A's cap, not B's
    b_entries = [other.policy_envelope(), b1.ledger.raw(f"cert/{b1.node_id}") or b""]
    async with running_switch(switch_dir, clock) as h:
        ctx_a, ctx_b = make_client_context(core), make_client_context(b1)
        reply = await forward(h.url, ctx_b, b_entries + [b1.ledger.raw(f"sale/{settled_b}") or b"", ahead])
        assert results_of(reply)[settled_b]["status"] == "approved"
        assert [p.sale_id for p in reply.pending] == [sale_id_of(ahead)]  # deferred: dated an hour ahead
        clock.advance(3600)  # seconds: the sale is due
        reply = await forward(h.url, ctx_a, roster_entries(site, core) + [b1.ledger.raw(f"sale/{settled_b}") or b"",
                                                                          ahead])
        assert reply.results == () and reply.pending == ()
        assert {r.sale_id: r.reason for r in reply.refused} == {
            settled_b: f"sale entry of another site ({other.site_id})",
            sale_id_of(ahead): f"sale entry of another site ({other.site_id})"}
        assert h.switch.store.sale(sale_id_of(ahead)).result is None  # type: ignore[union-attr]  # not judged
        reply = await forward(h.url, ctx_b, b_entries + [ahead])
        result = results_of(reply)[sale_id_of(ahead)]
        assert result["status"] == "approved" and result["site"] == other.site_id, result  # judged as B's, by B's cap
