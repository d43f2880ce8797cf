"""Clocks (issue 15, part 7): a node estimates its clock's offset from its peers' statuses and from
the switch; the inspector and `meshpos doctor` warn past two minutes; a terminal whose clock is
three days behind still gets its sales settled (protocols/clocks.md)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

from meshpos.wire.status import StatusBody
from meshpos.domain.clockskew import WARN_SKEW_MS, ClockSkew, describe
from meshpos.infra.clock import SYSTEM_CLOCK, OffsetClock
from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import ProcessGroup
from meshpos.status.meshview import Known, analyze
from meshpos.wire.forwarding import health_time_ms
from tests.helpers import run_cli
from tests.uplink_harness import Fair, VISA

DAY_MS = 86_400_000


def test_peers_estimate_is_the_median_and_one_liar_cannot_move_it() -> None:
    skew = ClockSkew()
    now = 100.0
    assert skew.estimate(now) is None
    # three honest peers agree that we are 3 days behind; one peer is 5 h ahead of everyone
    for peer in ("a", "b", "c"):
        skew.peer_sample(peer, received_at_ms=1_000_000 - 3 * DAY_MS + 40, status_at_ms=1_000_000, now=now)
    skew.peer_sample("liar", received_at_ms=1_000_000 - 3 * DAY_MS, status_at_ms=1_000_000 + 5 * 3_600_000, now=now)
    est = skew.estimate(now)
    assert est is not None and est.source == "peers" and est.peers == 4
    assert abs(est.offset_ms + 3 * DAY_MS) < 1000
    # a status relayed late (or handed over again on a new link) does not make us look ahead
    skew.peer_sample("a", received_at_ms=2_000_000 - 3 * DAY_MS + 20_000, status_at_ms=2_000_000, now=now)
    assert abs(skew.estimate(now).offset_ms + 3 * DAY_MS) < 1000  # type: ignore[union-attr]
    # peers not heard from for a long time no longer count
    assert skew.estimate(now + 10_000) is None
    assert describe(-3 * DAY_MS) == "3 day(s) 0 h behind" and describe(150_000) == "2 min ahead"


def test_the_switch_clock_is_preferred_and_read_from_the_health_reply() -> None:
    skew = ClockSkew()
    skew.peer_sample("a", received_at_ms=10_000, status_at_ms=10_000, now=0.0)
    skew.switch_sample(sent_ms=50_000, received_ms=50_200, switch_ms=50_100 + 600_000, now=0.0)
    est = skew.estimate(1.0)
    assert est is not None and est.source == "switch" and est.offset_ms == -600_000
    assert health_time_ms({"ok": True, "time_ms": 123}) == 123
    for junk in ({}, {"time_ms": "123"}, {"time_ms": True}, {"time_ms": -1}, [], None):
        assert health_time_ms(junk) is None


def _st(at: int, **extra: Any) -> dict[str, Any]:
    return {"at": at, "every_ms": 10_000, "links": [], **extra}


def test_view_warns_about_a_wrong_clock_and_dates_its_status_on_true_time() -> None:
    now = 10 * DAY_MS
    statuses = {"t1": _st(now - 3 * DAY_MS, clock={"offset_ms": -3 * DAY_MS, "source": "peers", "peers": 2}),
                "t2": _st(now + 90_000, clock={"offset_ms": 90_000, "source": "switch", "peers": 0})}
    known = {"t1": Known(name="T1", role="terminal"), "t2": Known(name="T2", role="terminal")}
    view = analyze({n: StatusBody.from_json(s) for n, s in statuses.items()}, known, now_ms=now, offline_window_ms=DAY_MS, warn_before_ms=3_600_000).to_json()
    nodes = {n["name"]: n for n in view["nodes"]}
    assert nodes["T1"]["reachable"] and nodes["T1"]["clock_offset_ms"] == -3 * DAY_MS
    assert any("T1: its clock is 3 day(s) 0 h behind" in w for w in view["warnings"])
    assert not any(w.startswith("T2") for w in view["warnings"])  # 90 s is within the 2 minutes
    assert 90_000 < WARN_SKEW_MS


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    group.env["MESHPOS_STATUS_INTERVAL"] = "1"
    yield group
    for child in group.children.values():
        if child.proc is not None and child.alive:
            os.killpg(child.proc.pid, signal.SIGTERM)
    group.stop_all()


def test_a_terminal_three_days_behind_gets_its_sales_settled_and_the_inspector_warns(
        tmp_path: Path, procs: ProcessGroup) -> None:
    # The site enrolled its terminals a week ago (certificates valid then): what a fair looks like.
    enrolled = OffsetClock(SYSTEM_CLOCK, -7 * DAY_MS)
    behind = str(-3 * 86_400)
    fair = Fair.create(tmp_path, procs, site_clock=enrolled, node_args={"t1": ["--clock-offset", behind]})
    card = fair.sell("t1", 1234, VISA)
    cash = fair.sell("t1", 500)
    ok = fair.sell("t2", 700, VISA)
    sale = client.running(fair.nodes["t1"]).sale(card)
    assert abs(sale["created_at_ms"] - (SYSTEM_CLOCK.now_ms() - 3 * DAY_MS)) < 600_000  # its own clock's time
    fair.wait_converged()
    fair.uplink("t3")
    fair.wait_settled()
    for name in fair.nodes:
        view = fair.view(name)
        # the switch's clock decides: the card sale is dated 3 days back, past the 24 h window
        assert view[card]["status"] == "expired"
        assert view[cash]["status"] == "approved"
        assert view[ok]["status"] == "approved"
    # the terminal knows its clock is off: its peers' statuses, whose times it refuses to believe
    # (they are days "ahead" of it), still tell it by how much
    fair.wait(lambda: (client.running(fair.nodes["t1"]).status()["clock"]["estimate"] or {})
              .get("offset_ms", 0) < -2 * DAY_MS, "t1 did not find out that its clock is behind")
    # the uplink node reads the switch's clock from its health replies, and prefers it
    fair.wait(lambda: (client.running(fair.nodes["t3"]).status()["clock"]["estimate"] or {})
              .get("source") == "switch", "t3 took no clock sample from the switch")
    est = client.running(fair.nodes["t3"]).status()["clock"]["estimate"]
    assert abs(est["offset_ms"]) < WARN_SKEW_MS  # the same host clock as the switch
    insp = tmp_path / "insp"
    t3_port = json.loads((fair.nodes["t3"] / "config.json").read_text())["listen"]
    enroll_one_step(fair.site, insp, "inspector", "Inspector", peers=[t3_port], clock=enrolled)

    def inspected() -> dict[str, Any]:
        proc = run_cli("inspect", str(insp), "--no-mdns", "--json", "--wait", "3")
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))
    view = inspected()
    for _ in range(5):
        if any("T1: its clock is 3 day(s)" in w for w in view["warnings"]):
            break
        view = inspected()
    assert any("T1: its clock is 3 day(s)" in w and "behind" in w for w in view["warnings"]), view["warnings"]
    t1 = {n["name"]: n for n in view["nodes"]}["T1"]
    assert t1["reachable"]  # dated on true time by its own estimate, not "unheard of for 3 days"
    # and `meshpos doctor` on the terminal says the same
    proc = run_cli("doctor", str(fair.nodes["t1"]), "--json", "--mdns-wait", "0")
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["clock"]["state"] == "warn" and "3 day(s)" in checks["clock"]["detail"]


def test_two_peers_that_disagree_do_not_make_a_node_blame_its_own_clock() -> None:
    skew = ClockSkew()
    skew.peer_sample("right", received_at_ms=5_000, status_at_ms=5_000, now=0.0)
    skew.peer_sample("wrong", received_at_ms=5_000, status_at_ms=5_000 + 3 * DAY_MS, now=0.0)
    est = skew.estimate(0.0)
    assert est is not None and est.offset_ms == 0 and est.peers == 2


def test_one_peer_alone_cannot_set_the_estimate() -> None:
    """Red team: a single (hostile) peer whose statuses say we are 3 days ahead made the node warn
    its cashier to set a right clock back by 3 days; one peer never decides, and beside one honest
    peer the liar can only pull the estimate towards zero."""
    skew = ClockSkew()
    skew.peer_sample("liar", received_at_ms=5_000 + 3 * DAY_MS, status_at_ms=5_000, now=0.0)
    assert skew.estimate(1.0) is None
    skew.peer_sample("honest", received_at_ms=9_000, status_at_ms=9_000 - 30, now=0.5)
    est = skew.estimate(1.0)
    assert est is not None and est.peers == 2 and abs(est.offset_ms) < WARN_SKEW_MS
