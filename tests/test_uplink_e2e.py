"""Acceptance tests of the uplink, with real processes on 127.0.0.1.

Every test runs the acquirer host simulator (``meshpos acquirer-sim``), the switch
(``meshpos switch run``) and terminals (``meshpos run``) as separate processes with
real TLS links and ISO 8583 over TLS (tests/uplink_harness.py). What reached the
acquirer is read from the simulator's stats file; what the switch decided from its
de-duplication table; what each terminal shows from its ``sales`` operation.
Every wait is bounded and polls; no assertion depends on how long something took.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from meshpos.wire import canonical, envelope
from meshpos.wire.cards import CardCapture
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.node.core import NodeCore
from meshpos.apps.procs import ProcessGroup
from meshpos.uplink.client import forward, make_client_context
from meshpos.uplink.forwarder import Forwarder

from uplink_harness import (DECLINED_05, DECLINED_51, MASTERCARD, VISA, Fair, base_rules, other_site_terminal,
                            rogue_key)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    for child in group.children.values():  # all at once, then wait for each
        if child.proc is not None and child.alive:
            os.killpg(child.proc.pid, signal.SIGTERM)
    group.stop_all()


# -- 1. the main path ---------------------------------------------------------------------


def test_offline_sales_of_three_terminals_are_forwarded_by_the_one_with_uplink(tmp_path: Path,
                                                                               procs: ProcessGroup) -> None:
    fair = Fair.create(tmp_path, procs)
    fair.sell_mix(30)
    pans = [e.pan for e in fair.expected.values()]
    assert DECLINED_05 in pans and DECLINED_51 in pans and None in pans
    fair.wait_converged()
    # no uplink anywhere: every card sale is pending on every node (cash is paid: final when taken),
    # and nothing reached the acquirer
    for name, view in fair.views().items():
        assert {view[e.sale_id]["status"] for e in fair.expected.values() if e.card} == {"pending"}, name
        assert {view[e.sale_id]["status"] for e in fair.expected.values() if not e.card} == {"paid"}, name
    assert fair.stats()["totals"].get("0220", 0) == 0

    fair.uplink("t3")
    fair.wait_settled()

    stats = fair.check_exactly_once(repeats_allowed=False)
    cards = [e for e in fair.expected.values() if e.card]
    assert stats["totals"]["0220"] == len(cards) and stats["totals"].get("0221", 0) == 0
    # terminals 1 and 2 never had an uplink: they learnt every outcome through the mesh
    for name in ("t1", "t2"):
        view = fair.view(name)
        for e in fair.expected.values():
            sale = view[e.sale_id]
            if e.pan in (DECLINED_05, DECLINED_51):
                assert sale["status"] == "declined" and sale["response_code"] == {DECLINED_05: "05",
                                                                                   DECLINED_51: "51"}[e.pan]
                assert sale["auth_code"] is None and "declined by the card issuer" in sale["reason"]
            elif e.card:
                assert sale["status"] == "approved" and len(sale["auth_code"]) == 6
            else:
                assert sale["status"] == "approved" and "cash" in sale["reason"]
    # only terminal 3 forwarded
    log = fair.switch_log()
    assert "from T3" in log and "from T1" not in log and "from T2" not in log


# -- 2. faults ------------------------------------------------------------------------------


def test_two_uplink_nodes_at_once_charge_each_sale_once(tmp_path: Path, procs: ProcessGroup) -> None:
    """t1 and t3 get an uplink at the same moment while t2, the only node between them, is down:
    neither sees the other's leases, so both forward the whole queue; the switch de-duplicates.
    Then the mesh heals and both keep their uplinks while more sales come in. (Peer exchange is
    off: it would link t1 and t3 directly, and the point is two uplinks that cannot see each other.)"""
    fixed = ["--no-peer-exchange"]
    fair = Fair.create(tmp_path, procs, rules=base_rules(delay_ms=100),
                       node_args={"t1": fixed, "t2": fixed, "t3": fixed})
    fair.sell_mix(30)
    fair.wait_converged()
    procs.stop("t2")
    fair.uplink("t1")
    fair.uplink("t3")
    fair.wait_settled(["t1", "t3"])
    log = fair.switch_log()
    assert "from T1" in log and "from T3" in log  # both forwarded the site's queue

    fair.start_node("t2")
    fair.sell_mix(9, first_amount=2000)  # both uplinks on, the mesh whole again: leases share the work
    fair.wait_settled()
    fair.check_exactly_once(repeats_allowed=False)


def test_switch_killed_mid_batch_and_restarted(tmp_path: Path, procs: ProcessGroup) -> None:
    """A slow acquirer keeps a batch in flight; the switch is killed with SIGKILL and restarted.

    The acquirer answers in 300 ms, and in 2.5 s for one card used by 4 sales; the switch has 3
    advices outstanding at most. Whatever order it takes the batch in, when the first slow 0220
    reaches the acquirer that sale is ``advice_sent`` (durable before its bytes left) and at least
    one slow sale is still only ``received`` (4 slow sales cannot all hold one of 3 slots within
    2.5 s). That is when the switch is killed.
    """
    slow = "5454545454545454"
    rules = base_rules(delay_ms=300)
    rules["cards"].append({"prefix": slow, "delay_ms": 2500})
    fair = Fair.create(tmp_path, procs, rules=rules, switch_settings={"in_flight": 3})
    for k, name in enumerate(["t1", "t2", "t3", "t1"]):
        fair.sell(name, 1111 + k, slow)
    fair.sell_mix(26)
    slow_ids = {sid for sid, e in fair.expected.items() if e.pan == slow}
    fair.wait_converged()
    fair.uplink("t3")

    def slow_advised() -> bool:
        rows = fair.switch_rows()
        by_sale = fair.stats()["by_sale"]
        return any(by_sale.get(rows[sid]["rrn"], {}).get("0220") for sid in slow_ids if sid in rows)
    fair.wait(slow_advised, "the slow card's advice never reached the acquirer",
              state=lambda: str(fair.stats()["totals"]), interval=0.05)
    procs.kill("switch", signal.SIGKILL)
    at_kill = fair.switch_rows()  # the switch is dead: this is what it had made durable
    stats_at_kill = fair.stats()
    states = {sid: row["state"] for sid, row in at_kill.items()}
    advice_sent = {sid for sid, st in states.items() if st == "advice_sent"}
    received = {sid for sid, st in states.items() if st == "received"}
    assert advice_sent & slow_ids and received & slow_ids, f"the kill did not fall mid-batch: {states}"

    fair.start_switch()
    fair.wait_settled()
    stats = fair.check_exactly_once(repeats_allowed=True)
    rows = fair.switch_rows()
    for sid in advice_sent:  # its answer died with the switch: repeated as 0221, never a second 0220
        counts = stats["by_sale"][rows[sid]["rrn"]]
        assert counts.get("0221", 0) >= 1 and counts.get("0220", 0) <= 1, (sid, counts)
    for sid in received:  # never sent before the kill: one original after the restart
        if fair.expected[sid].card:
            assert stats["by_sale"][rows[sid]["rrn"]] == {"0220": 1}, sid
    for sid, st in states.items():  # settled before the kill: the acquirer heard nothing more of it
        if st == "settled" and fair.expected[sid].card:
            assert stats["by_sale"][rows[sid]["rrn"]] == stats_at_kill["by_sale"][rows[sid]["rrn"]], sid


def test_acquirer_dropping_and_closing_connections(tmp_path: Path, procs: ProcessGroup) -> None:
    """drop_rate 0.1, close_rate 0.05 with seed 113: its first message is answered by a closed
    connection and its second is dropped, whatever the order of the sales."""
    rules = base_rules(seed=113, delay_ms=20, drop_rate=0.1, close_rate=0.05)
    fair = Fair.create(tmp_path, procs, rules=rules, switch_settings={"acquirer_timeout_s": 2.0})
    fair.sell_mix(30)
    fair.wait_converged()
    fair.uplink("t3")
    fair.wait_settled(timeout=90)
    stats = fair.check_exactly_once(repeats_allowed=True)
    totals = stats["totals"]
    assert totals.get("closed", 0) >= 1 and totals.get("dropped", 0) >= 1, totals
    assert totals.get("0221", 0) >= 1, totals  # the faults were survived by repeats only


# -- 3. the offline window ------------------------------------------------------------------


def test_sales_past_the_offline_window_expire_everywhere_and_never_reach_the_acquirer(
        tmp_path: Path, procs: ProcessGroup) -> None:
    fair = Fair.create(tmp_path, procs, policy={"offline_window_s": 2})
    for k, (name, pan) in enumerate([("t1", VISA), ("t2", MASTERCARD), ("t3", DECLINED_05), ("t1", VISA),
                                     ("t2", DECLINED_51), ("t3", MASTERCARD)]):
        fair.sell(name, 500 + k, pan)
    fair.wait_converged()
    # the window closes (2 s after each sale): every node sees them expired before any uplink
    fair.wait(lambda: all(v[sid]["status"] == "expired" for v in fair.views().values() for sid in fair.expected),
              "sales did not expire on the nodes", state=fair.progress)
    fair.uplink("t2")
    fair.wait_settled()
    for name, view in fair.views().items():
        for sid in fair.expected:
            assert view[sid]["status"] == "expired" and view[sid]["auth_code"] is None, (name, view[sid])
            assert "offline window closed" in view[sid]["reason"], (name, view[sid])
    rows = fair.switch_rows()
    assert set(rows) == set(fair.expected)
    assert {(r["state"], r["result_status"], r["attempts"]) for r in rows.values()} == {("settled", "expired", 0)}
    stats = fair.stats()
    assert stats["by_sale"] == {} and not stats["totals"].get("0220") and not stats["totals"].get("0221")


# -- 4. what the switch refuses, at process level ---------------------------------------------


def _forged(raw: bytes, **changes: Any) -> bytes:
    obj: dict[str, Any] = json.loads(raw)
    obj["body"].update(changes)
    return canonical.encode(obj)


def _card(core: NodeCore, amount: int, pan: str = VISA) -> str:
    return str(core.sell(amount, card=core.seal_card(pan, "1228", "contactless"))["id"])


def test_running_switch_refuses_bad_envelopes_with_reasons_and_goes_on_serving(tmp_path: Path,
                                                                               procs: ProcessGroup) -> None:
    fair = Fair.create(tmp_path, procs, terminals=2, start_nodes=False)
    # the other site must be registered before the switch starts: restart it
    _, o1_dir = other_site_terminal(tmp_path, fair.switch_dir)
    procs.stop("switch")
    fair.start_switch()

    core = NodeCore.open(fair.nodes["t1"], SYSTEM_CLOCK)
    thief = NodeCore.open(fair.nodes["t2"], SYSTEM_CLOCK)
    o1 = NodeCore.open(o1_dir, SYSTEM_CLOCK)
    try:
        good = _card(core, 1250)
        good_raw = core.ledger.raw(f"sale/{good}") or b""
        # forged: an authentic sale with its amount and id changed after signing
        forged_id = f"{core.node_id}-00000099"
        forged_raw = _forged(good_raw, amount_minor=999, sale_id=forged_id, seq=99)
        # unenrolled: a key the site never enrolled, claiming to be one of its terminals
        rogue, rogue_id = rogue_key()
        rogue_sale = f"{rogue_id}-00000001"
        rogue_raw = envelope.seal("sale", rogue_id, {**json.loads(good_raw)["body"], "terminal": rogue_id,
                                                     "sale_id": rogue_sale}, rogue)
        # other site: a terminal of another site registered at this switch
        foreign = _card(o1, 1300)
        foreign_entries = [o1.ledger.raw(f"cert/{o1.node_id}") or b"", o1.ledger.raw(f"sale/{foreign}") or b""]
        # tampered sealed card data in an authentic envelope
        tampered = str(core.sell(700, card=CardCapture("visa", "1111", "chip", b"\x01" * 80))["id"])
        # revoked: a stolen terminal whose sale reached t1's ledger before the revocation did (valid: up
        # to the revocation's cut), and one it signed after the revocation (rejected)
        stolen = _card(thief, 1400)
        for type_ in ("cert", "sale"):
            for raw in thief.store.entries_of_type(type_):
                core.ingest(raw, "peer")
        core.ingest(fair.site.revoke(thief.node_id, "stolen"), "organizer")
        time.sleep(0.01)
        late_stolen = _card(thief, 1450)

        # the batch t1's forwarder builds (policy, certificates, revocation, its sales) plus the intruders
        batch = Forwarder(core, SYSTEM_CLOCK).entries_for([tampered, stolen, good])
        batch[-1:-1] = [forged_raw, rogue_raw, *foreign_entries,  # the valid sale stays last
                        thief.ledger.raw(f"sale/{late_stolen}") or b""]
        url = core.policy.switch_url
        ctx = make_client_context(core)
        reply = trio.run(forward, url, ctx, batch)

        refused = {r.sale_id: r.reason for r in reply.refused if r.type == "sale"}
        assert "bad signature" in refused[forged_id]
        assert "no certificate known" in refused[rogue_sale]
        assert "another site" in refused[foreign]
        results = {envelope.decode(r).body["sale_id"]: envelope.decode(r).body for r in reply.results}
        assert set(results) == {good, tampered, stolen, late_stolen}
        assert results[good]["status"] == "approved" and results[good]["auth_code"]
        assert results[tampered]["status"] == "rejected" and "cannot be opened" in results[tampered]["reason"]
        assert results[stolen]["status"] == "approved"
        assert results[late_stolen]["status"] == "rejected" and "revoked" in results[late_stolen]["reason"]
        stats = fair.stats()
        assert stats["totals"].get("0220") == 2 and len(stats["by_sale"]) == 2  # only the valid sales

        # every refusal and rejection is in the switch's log, with its reason
        log = fair.switch_log()
        for sale_id, reason in ((forged_id, "bad signature"), (rogue_sale, "no certificate known"),
                                (foreign, "another site")):
            assert any(sale_id in line and reason in line for line in log.splitlines()), (sale_id, reason)
        for sale_id, reason in ((tampered, "cannot be opened"), (late_stolen, "revoked")):
            assert any(sale_id in line and "rejected" in line and reason in line for line in log.splitlines()), \
                (sale_id, reason)

        # ...and goes on serving: a further valid batch settles
        assert procs.children["switch"].alive
        second = _card(core, 1500, MASTERCARD)
        again = trio.run(forward, url, ctx, Forwarder(core, SYSTEM_CLOCK).entries_for([second]))
        assert not again.refused and len(again.results) == 1
        body = envelope.decode(again.results[0]).body
        assert body["sale_id"] == second and body["status"] == "approved"
        for raw in reply.results + again.results:
            core.ingest(raw, "switch")
        assert core.sale(good)["status"] == "approved" and core.sale(tampered)["status"] == "rejected"
        assert fair.stats()["totals"].get("0220") == 3
    finally:
        for c in (core, thief, o1):
            c.close()
