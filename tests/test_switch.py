"""The switch over real HTTPS on 127.0.0.1, the acquirer simulator over ISO 8583, real node directories."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from meshpos.wire import envelope
from meshpos.acquirer.base import AcquirerLink, BeforeSend
from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.acquirer.simulator import CardRule, SimRules, auth_code
from meshpos.wire.cards import CardCapture
from meshpos.infra.clock import FakeClock
from meshpos.domain.errors import ProtocolError, UplinkError
from meshpos.identity import certs, keys
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.site.sitedir import Site, init_site
from meshpos.wire.forwarding import FORWARD_PATH, ForwardReply
from meshpos.switch.store import ADVICE_SENT, SETTLED
from meshpos.switch.switchdir import SwitchDir, add_site
from meshpos.uplink.client import forward, make_client_context, open_switch, probe
from meshpos.uplink.forwarder import Forwarder

from helpers import scan_for
from switch_harness import DECLINED, VISA, card_sale, drain, merge, running_switch, switch_dir, transport

assert switch_dir  # a fixture, used by name

# -- the main path --------------------------------------------------------------------


async def test_thirty_sales_from_three_terminals_charged_once_and_results_replicate(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    terminals = [open_node(make_node(f"t{i}")) for i in range(3)]
    sale_ids: list[str] = []
    for n in range(10):
        for core in terminals:
            sale_ids.append(card_sale(core, 1000 + n, DECLINED if n == 7 else VISA))
    a, b, c = terminals
    merge(a, b, c)
    merge(b, a, c)
    assert len([s for s in a.sales() if s["status"] == "pending"]) == 30

    async with running_switch(switch_dir, clock) as h:
        fwd = Forwarder(a, clock, transport(a, h.url), batch_sales=12)
        assert sorted(await drain(fwd)) == sorted(sale_ids)
        assert h.sim.stats.totals["0220"] == 30 and h.sim.stats.totals["0221"] == 0
        for sale_id in sale_ids:
            assert h.at_acquirer(sale_id) == {"0220": 1}
        by_id = {s["id"]: s for s in a.sales()}
        for sale_id in sale_ids:
            sale = by_id[sale_id]
            if sale_id.endswith(("-00000008",)):
                assert (sale["status"], sale["response_code"], sale["auth_code"]) == ("declined", "05", None)
            else:
                assert sale["status"] == "approved"
                assert sale["auth_code"] == auth_code(1, h.rrn(sale_id), sale["amount_minor"])
        first = {envelope.decode(r).body["sale_id"]: r for r in a.store.entries_of_type("result")}

        # another node forwards the same sales again: the same signed bytes, no second charge
        again = await forward(h.url, make_client_context(b), Forwarder(b, clock).entries_for(sale_ids))
        assert {envelope.decode(r).body["sale_id"]: r for r in again.results} == first
        assert h.sim.stats.totals["0220"] == 30 and h.sim.stats.totals["0221"] == 0
        for raw in again.results:
            b.ingest(raw, "switch")
        assert {s["id"]: (s["status"], s["auth_code"]) for s in b.sales()} == \
               {s["id"]: (s["status"], s["auth_code"]) for s in a.sales()}
        # the third node learns them by replication from the forwarder
        merge(c, a)
        assert all(s["status"] in ("approved", "declined") for s in c.sales(c.node_id))
        assert h.switch.store.count_states()[SETTLED] == 30


class OutstandingGate:
    """An acquirer link in front of the real one that counts the advices handed to it at once and
    holds each until ``target`` are outstanding together (or 10 s passed: then the window was smaller)."""

    def __init__(self, link: AcquirerLink, target: int) -> None:
        self.link, self.target = link, target
        self.outstanding = self.peak = 0
        self.all_there = trio.Event()

    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        self.outstanding += 1
        self.peak = max(self.peak, self.outstanding)
        if self.outstanding >= self.target:
            self.all_there.set()
        try:
            with trio.move_on_after(10):
                await self.all_there.wait()
            return await self.link.advise(req, repeat=repeat, before_send=before_send)
        finally:
            self.outstanding -= 1

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        return await self.link.reverse(req)

    async def aclose(self) -> None:
        await self.link.aclose()


async def test_a_batch_of_two_hundred_card_sales_has_every_advice_outstanding_at_once(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    """The switch's default window at the acquirer is deeper than a full batch: with a host that
    answers after 50 ms, a window of 64 bounded an instance at ~850 sales/s (BENCHMARKS.md)."""
    core = open_node(make_node("a"))
    ids = [card_sale(core, 100 + n) for n in range(200)]
    gates: list[OutstandingGate] = []

    def gated(link: AcquirerLink) -> AcquirerLink:
        gates.append(OutstandingGate(link, len(ids)))
        return gates[-1]

    async with running_switch(switch_dir, clock, SimRules(seed=1, delay_ms=50), wrap_link=gated) as h:
        reply = await forward(h.url, make_client_context(core), Forwarder(core, clock).entries_for(ids))
        assert len(reply.results) == 200 and not reply.pending
        assert gates[0].peak == 200
        assert all(h.at_acquirer(s) == {"0220": 1} for s in ids)


async def test_same_sales_from_two_nodes_at_once_are_advised_once(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    a, b = open_node(make_node("a")), open_node(make_node("b"))
    ids = [card_sale(a, 500 + n) for n in range(20)]
    merge(b, a)
    rules = SimRules(seed=1, delay_ms=20)
    async with running_switch(switch_dir, clock, rules) as h:
        replies: list[ForwardReply] = []

        async def send(core: NodeCore) -> None:
            replies.append(await forward(h.url, make_client_context(core), Forwarder(core, clock).entries_for(ids)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, a)
            nursery.start_soon(send, b)
        assert sorted(replies[0].results) == sorted(replies[1].results) and len(replies[0].results) == 20
        assert all(h.at_acquirer(s) == {"0220": 1} for s in ids)


# How long the switch waits for an answer the simulator drops. An answer that is NOT dropped must
# still come within it: 0.2 s timed out on a host at load average 50 (test_voids failed so).
LINK_TIMEOUT = 1.0


async def test_dropped_advices_are_repeated_as_0221_only(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    ids = [card_sale(core) for _ in range(3)]
    rules = SimRules(seed=1, cards=(CardRule(VISA, drop_first=2),))
    async with running_switch(switch_dir, clock, rules, link_timeout=LINK_TIMEOUT) as h:
        await drain(Forwarder(core, clock, transport(core, h.url)))
        for sale_id in ids:
            assert h.at_acquirer(sale_id) == {"0220": 1, "0221": 2}
            assert h.switch.store.sale(sale_id).attempts == 3  # type: ignore[union-attr]
        assert all(s["status"] == "approved" for s in core.sales())


async def test_acquirer_silent_leaves_sale_pending_and_the_retry_is_a_repeat(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    sale_id = card_sale(core)
    rules = SimRules(seed=1, cards=(CardRule(VISA, drop_first=2),))
    async with running_switch(switch_dir, clock, rules, link_timeout=LINK_TIMEOUT, attempts=1) as h:
        fwd = Forwarder(core, clock, transport(core, h.url), sale_backoff=lambda n: 0.0)
        first = await fwd.step()
        assert first.pending == 1 and first.settled == 0
        assert h.switch.store.sale(sale_id).state == ADVICE_SENT  # type: ignore[union-attr]
        assert core.sale(sale_id)["status"] == "pending"
        await fwd.step()
        await fwd.step()
        assert h.at_acquirer(sale_id) == {"0220": 1, "0221": 2}
        assert core.sale(sale_id)["status"] == "approved"


async def test_switch_killed_between_advice_and_answer_repeats_with_0221(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    sale_id = card_sale(core)
    entries = Forwarder(core, clock).entries_for([sale_id])
    slow = SimRules(seed=1, delay_ms=60_000)
    failed: list[Exception] = []

    async def send(url: str) -> None:
        try:
            await forward(url, make_client_context(core), entries)
        except UplinkError as exc:
            failed.append(exc)

    async with trio.open_nursery() as forwarder:
        async with running_switch(switch_dir, clock, slow) as h1:
            forwarder.start_soon(send, h1.url)
            while h1.sim.stats.totals["0220"] == 0:  # the 0220 reached the host; its answer is 60 s away
                await trio.sleep(0.01)
            first_rrn = h1.rrn(sale_id)
            assert h1.switch.store.sale(sale_id).state == ADVICE_SENT  # type: ignore[union-attr]
            h1.cancel.cancel()  # the switch dies mid-flight: its database is left as the crash left it
    assert len(failed) == 1  # the forwarder saw the connection die
    async with running_switch(switch_dir, clock) as h2:  # a fresh switch on the same database
        reply = await forward(h2.url, make_client_context(core), entries)
        assert envelope.decode(reply.results[0]).body["status"] == "approved"
        assert h2.rrn(sale_id) == first_rrn
        assert h2.at_acquirer(sale_id) == {"0221": 1}
    assert h1.sim.stats.totals["0220"] == 1


async def test_expired_sales_are_settled_expired_and_never_reach_the_acquirer(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    old = [card_sale(core) for _ in range(3)]
    clock.advance(23 * 3600)
    fresh = card_sale(core)
    clock.advance(2 * 3600)  # the first three are 25 h old, past the 24 h window; the last one 2 h
    async with running_switch(switch_dir, clock) as h:
        await drain(Forwarder(core, clock, transport(core, h.url)))
        for sale_id in old:
            assert core.sale(sale_id)["status"] == "expired"
            assert h.at_acquirer(sale_id) == {}
        assert core.sale(fresh)["status"] == "approved"
        assert h.sim.stats.totals["0220"] == 1


async def test_voids(switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
                     clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    before, after_advice, after_approval = card_sale(core), card_sale(core), card_sale(core, 900, "5555555555554444")
    core.void(before, "customer changed their mind")
    rules = SimRules(seed=1, cards=(CardRule(VISA, drop_first=1),))
    async with running_switch(switch_dir, clock, rules, link_timeout=LINK_TIMEOUT, attempts=1) as h:
        fwd = Forwarder(core, clock, transport(core, h.url), sale_backoff=lambda n: 0.0)
        await fwd.step()
        # a void before forwarding: never sent
        assert core.sale(before)["status"] == "voided" and h.at_acquirer(before) == {}
        assert core.sale(after_approval)["status"] == "approved"
        # the 0220 of this one went out unanswered: the void now needs a reversal
        assert h.switch.store.sale(after_advice).state == ADVICE_SENT  # type: ignore[union-attr]
        core.void(after_advice)
        core.void(after_approval)
        await fwd.step()
        result = envelope.decode(core.ledger.raw(f"result/{after_advice}") or b"")
        assert (result.body["status"], result.body["reversed"]) == ("voided", True)
        assert h.at_acquirer(after_advice) == {"0220": 1, "0420": 1}
        # voided after approval: reversed at the acquirer; the signed approval stays (ledger entries are immutable)
        assert h.at_acquirer(after_approval) == {"0220": 1, "0420": 1}
        # the dropped 0220 was booked by the host (only its answer was lost): both charges are undone
        assert h.sim.stats.snapshot()["reversed"] == sorted([h.rrn(after_advice), h.rrn(after_approval)])
        assert (await fwd.step()).forwarded == []  # nothing left to forward, no second reversal
        # the switch's signed reversal entry is in the ledger: the sale ends reversed on the node, and
        # a restarted node has nothing left to send for it (no second 0420)
        assert core.sale(after_approval)["status"] == "reversed"
        fresh = Forwarder(core, clock, transport(core, h.url))
        report = await fresh.step()
        assert (report.forwarded, report.reversed) == ([], 0)
        assert h.at_acquirer(after_approval) == {"0220": 1, "0420": 1}


# -- what the switch refuses, and that it goes on serving -------------------------------


def forged(raw: bytes, **changes: Any) -> bytes:
    obj = json.loads(raw)
    obj["body"].update(changes)
    return envelope.canonical.encode(obj)


async def test_forged_unenrolled_revoked_other_site_and_tampered_sales(
        tmp_path: Path, switch_dir: Path, site: Site, switch_key: nacl.signing.SigningKey,
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    good = card_sale(core)
    good_raw = core.ledger.raw(f"sale/{good}") or b""
    fwd = Forwarder(core, clock)
    base = fwd.entries_for([good])[:-1]  # policy and certificate
    # forged: a real terminal's sale with the amount changed after signing
    forged_raw = forged(good_raw, amount_minor=999, sale_id=core.node_id + "-00000099", seq=99)
    # unenrolled: a key the site never enrolled, claiming to be a terminal of this site
    rogue = keys.generate()
    rogue_id = keys.node_id_of(bytes(rogue.verify_key))
    rogue_body = {**json.loads(good_raw)["body"], "terminal": rogue_id, "sale_id": f"{rogue_id}-00000001"}
    rogue_raw = envelope.seal("sale", rogue_id, rogue_body, rogue)
    # other site: a terminal of another site registered at the same switch
    other = init_site(tmp_path / "other-site", "Altra Fiera", switch_key=keys.x25519_public_of(switch_key).hex())
    add_site(switch_dir, other.path)
    enroll_one_step(other, tmp_path / "o1", "terminal", "o1")
    o1 = open_node(tmp_path / "o1")
    foreign = card_sale(o1)
    foreign_entries = [o1.ledger.raw(f"cert/{o1.node_id}") or b"", o1.ledger.raw(f"sale/{foreign}") or b""]
    # tampered sealed data in an authentic envelope, and card data sealed to another switch
    tampered = str(core.sell(700, card=CardCapture("visa", "1111", "chip", b"\x01" * 80))["id"])
    elsewhere = keys.x25519_public_of(keys.generate())
    from meshpos.wire.cards import seal_card
    wrong_key = str(core.sell(800, card=seal_card(VISA, "1228", "chip", elsewhere))["id"])
    # revoked: a terminal whose sale reached the ledger before its revocation (valid: up to the
    # revocation's cut) and one it signed after (refused, signed "rejected")
    thief = open_node(make_node("stolen"))
    stolen = card_sale(thief)
    merge(core, thief)
    revocation = site.revoke(thief.node_id, "stolen", clock)
    clock.advance(5)
    after_cut = card_sale(thief)

    async with running_switch(switch_dir, clock) as h:
        ctx = make_client_context(core)
        reply = await forward(h.url, ctx, base + [forged_raw, rogue_raw] + foreign_entries + [
            core.ledger.raw(f"sale/{tampered}") or b"", core.ledger.raw(f"sale/{wrong_key}") or b"",
            core.ledger.raw(f"cert/{thief.node_id}") or b"", revocation, core.ledger.raw(f"sale/{stolen}") or b"",
            thief.ledger.raw(f"sale/{after_cut}") or b"", b"this is not an envelope", good_raw])
        refused = {r.sale_id: r.reason for r in reply.refused}
        assert "bad signature" in refused[core.node_id + "-00000099"]
        assert "no certificate known" in refused[f"{rogue_id}-00000001"]
        assert "another site" in refused[foreign]
        assert any(r.sale_id is None and "not an envelope" in r.reason for r in reply.refused)
        assert all(r.status == "rejected" for r in reply.refused)
        results = {envelope.decode(r).body["sale_id"]: envelope.decode(r).body for r in reply.results}
        assert set(results) == {tampered, wrong_key, stolen, after_cut, good}
        for sale_id in (tampered, wrong_key):
            assert results[sale_id]["status"] == "rejected" and "cannot be opened" in results[sale_id]["reason"]
        assert results[stolen]["status"] == "approved"  # made before the revocation: up to its cut
        assert results[after_cut]["status"] == "rejected" and "after the revocation's cut" in results[after_cut]["reason"]
        assert results[good]["status"] == "approved"
        assert h.sim.stats.totals["0220"] == 2  # only the good sale and the one before the cut reached the acquirer
        # a refused envelope poisons nothing: the real sale of a forged id is still taken
        assert h.switch.store.sale(core.node_id + "-00000099") is None
        for raw in reply.results:
            core.ingest(raw, "switch")
        assert core.sale(tampered)["status"] == "rejected"

        # malformed bodies: 400 with a reason, oversize 413, and the switch goes on serving
        conn = await open_switch(h.url, ctx)
        for body in (b"{nope", b'{"format":"meshpos-forward/1","entries":"x"}', b'{"format":"other","entries":[]}'):
            answer = await conn.request("POST", FORWARD_PATH, {"content-type": "application/json"}, body)
            assert answer.status == 400 and answer.json()["error"]
        await conn.aclose()
        conn = await open_switch(h.url, ctx)
        try:  # the switch answers 413 at once and closes; the client may still be sending
            big = await conn.request("POST", FORWARD_PATH, {}, b"x" * (5 * 1024 * 1024))
            assert big.status == 413
        except ProtocolError:
            pass
        await conn.aclose()
        # the revoked node itself may no longer forward
        with pytest.raises(UplinkError, match="403"):
            await forward(h.url, make_client_context(thief), [])
        again = await forward(h.url, ctx, [good_raw])
        assert again.results == (core.ledger.raw(f"result/{good}"),)
    # no PAN on disk anywhere: nodes, switch, site
    assert scan_for(tmp_path, [VISA.encode()]) == []


async def test_client_authentication_and_pinning(
        tmp_path: Path, switch_dir: Path, make_node: Callable[..., Path],
        open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    inspector = open_node(make_node("i", role="inspector"))
    stranger_site = init_site(tmp_path / "stranger", "Unregistered", switch_key=SwitchDir(switch_dir).pub_path
                              .read_text().strip())
    enroll_one_step(stranger_site, tmp_path / "s1", "terminal", "s1")
    async with running_switch(switch_dir, clock) as h:
        assert await probe(h.url, make_client_context(core))
        assert not await probe(h.url, make_client_context(inspector))  # 403: inspectors do not forward
        assert not await probe(h.url, make_client_context(tmp_path / "s1"))  # CA not registered: TLS fails
        pinned_elsewhere = make_client_context(core)
        pinned_elsewhere.switch_key = keys.x25519_public_of(keys.generate())
        with pytest.raises(UplinkError, match="pinned"):
            await forward(h.url, pinned_elsewhere, [])
        unpinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unpinned.check_hostname, unpinned.verify_mode = False, ssl.CERT_NONE
        with pytest.raises(UplinkError, match="unauthenticated"):
            await forward(h.url, unpinned, [])
        assert await probe(h.url, make_client_context(core))  # still serving
    assert not await probe(h.url, make_client_context(core))  # switch gone


async def test_results_verify_only_with_the_pinned_switch_key(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    sale_id = card_sale(core)
    body = {"sale_id": sale_id, "site": core.policy.site_id, "status": "approved", "auth_code": "ABC123",
            "response_code": "00", "reason": None, "settled_at": clock.now_ms(), "reversed": False}
    fake = envelope.seal("result", "switch", body, keys.generate())
    from meshpos.domain.errors import VerificationError
    with pytest.raises(VerificationError):
        core.ingest(fake, "switch")
    assert core.sale(sale_id)["status"] == "pending"
    assert certs  # the module is used by the fixtures above
