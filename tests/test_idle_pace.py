"""Battery and idle cost (issue 15, part 5): paced status and keep-alive periods, the battery as the
OS reports it, and a node that says it is low. Fake clocks, no timing assertions."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from meshpos.domain import pace
from meshpos.domain.pace import Battery, Pace
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.node.parts import replicator_for
from meshpos.domain.clockskew import ClockSkew
from meshpos.status.board import StatusBoard
from meshpos.wire.status import PrinterSeen, UplinkSeen
from meshpos.node.status_pub import StatusPublisher, battery_state
from meshpos.wire import envelope
from meshpos.wire.link import IDLE_TIMEOUT, LinkState


def power_supply(root: Path, percent: int, status: str = "Discharging", mains: str | None = None) -> Path:
    bat = root / "BAT0"
    bat.mkdir(parents=True, exist_ok=True)
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text(f"{percent}\n")
    (bat / "status").write_text(status + "\n")
    if mains is not None:
        ac = root / "AC"
        ac.mkdir(exist_ok=True)
        (ac / "type").write_text("Mains\n")
        (ac / "online").write_text(mains + "\n")
    return root


def test_pace_is_fast_while_sales_flow_and_slow_when_idle_or_low() -> None:
    p = Pace()
    idle = p.periods(100.0, None)
    assert idle.status_s == pace.IDLE_STATUS_S > pace.ACTIVE_STATUS_S
    # an idle link is kept alive by statuses alone: no PING while they flow
    assert idle.keepalive_s > idle.status_s
    p.touch(100.0)
    assert p.periods(100.0 + pace.ACTIVE_FOR_S - 1, None).status_s == pace.ACTIVE_STATUS_S
    assert p.periods(100.0 + pace.ACTIVE_FOR_S - 1, None).keepalive_s == pace.ACTIVE_KEEPALIVE_S
    assert p.periods(100.0 + pace.ACTIVE_FOR_S, None).status_s == pace.IDLE_STATUS_S
    low = Battery(9, charging=False)
    assert low.low and p.periods(1000.0, low).status_s == pace.LOW_BATTERY_STATUS_S
    assert p.periods(1000.0, Battery(9, charging=True)).status_s == pace.IDLE_STATUS_S
    p.touch(1000.0)  # selling on a low battery: the cashier's sales still spread at the fast pace
    assert p.periods(1000.0, low).status_s == pace.ACTIVE_STATUS_S
    # every keep-alive leaves a PONG 20 s within the (unchanged) idle timeout; every status
    # period stays readable by viewers of every version (meshview.MAX_EVERY_MS)
    for periods in (idle, p.periods(1000.0, low)):
        assert periods.keepalive_s <= IDLE_TIMEOUT - 20
        assert periods.status_s * 1000 <= 60_000


def test_battery_state_reads_the_power_supply_class(tmp_path: Path) -> None:
    assert battery_state(tmp_path / "none") is None
    assert battery_state(power_supply(tmp_path / "a", 9)) == Battery(9, False)
    assert battery_state(power_supply(tmp_path / "b", 9, "Charging")) == Battery(9, True)
    assert battery_state(power_supply(tmp_path / "c", 9, mains="1")) == Battery(9, True)
    assert battery_state(power_supply(tmp_path / "d", 140)) == Battery(100, False)
    junk = power_supply(tmp_path / "e", 50)
    (junk / "BAT0" / "capacity").write_text("lots\n")
    assert battery_state(junk) is None


def _publisher(path: Path, clock: FakeClock, power: Path) -> tuple[NodeCore, StatusPublisher]:
    core = NodeCore.open(path, clock)
    board = StatusBoard(core.roster, clock)
    return core, StatusPublisher(core, board, None, listen_port=lambda: None,
                                 printer=lambda: PrinterSeen("none", 0), uplink=lambda: UplinkSeen("off", None),
                                 started_at=clock.now_ms(), skew=ClockSkew(), interval=None, power_root=power)


def _published(pub: StatusPublisher) -> dict[str, object]:
    raw = pub.board.statuses[pub.core.node_id].raw
    return dict(envelope.decode(raw).body["status"])


def _run_for(pub: StatusPublisher, clock: FakeClock, seconds: float) -> int:
    """Drive the publisher's loop by hand for ``seconds`` of fake time; statuses published."""
    before = pub.published
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        clock.advance(max(pub.step(clock.monotonic()), 0.01))
    return pub.published - before


def test_an_idle_node_publishes_less_often_and_a_sale_brings_the_fast_pace_back(
        make_node: Callable[..., Path], clock: FakeClock, tmp_path: Path) -> None:
    core, pub = _publisher(make_node("T1"), clock, power_supply(tmp_path / "power", 80))
    try:
        _run_for(pub, clock, 5)
        assert _published(pub)["every_ms"] == pace.IDLE_STATUS_S * 1000
        assert _run_for(pub, clock, 200) == 10  # one per 20 s
        core.sell(100)
        assert pub.pace.active(clock.monotonic())
        n = _run_for(pub, clock, 50)
        assert _published(pub)["every_ms"] == pace.ACTIVE_STATUS_S * 1000
        assert n >= 5
        _run_for(pub, clock, pace.ACTIVE_FOR_S + 30)
        assert _published(pub)["every_ms"] == pace.IDLE_STATUS_S * 1000
    finally:
        core.close()


def test_a_node_on_low_battery_says_so_and_slows_down_without_going_stale(
        make_node: Callable[..., Path], clock: FakeClock, tmp_path: Path) -> None:
    power = power_supply(tmp_path / "power", 60)
    core, pub = _publisher(make_node("T1"), clock, power)
    try:
        _run_for(pub, clock, 30)
        st = _published(pub)
        assert st["battery"] == 60 and st["battery_low"] is False
        power_supply(power, 12)
        last_at = int(st["at"])  # type: ignore[call-overload]
        announced = int(st["every_ms"])  # type: ignore[call-overload]
        for _ in range(6):  # the status announcing the longer period comes on the old one
            _run_for(pub, clock, 1)
            st = _published(pub)
            if int(st["at"]) != last_at:  # type: ignore[call-overload]
                assert int(st["at"]) - last_at <= announced  # type: ignore[call-overload]
                last_at, announced = int(st["at"]), int(st["every_ms"])  # type: ignore[call-overload]
        _run_for(pub, clock, 60)
        st = _published(pub)
        assert st["battery"] == 12 and st["battery_low"] is True
        assert st["every_ms"] == pace.LOW_BATTERY_STATUS_S * 1000
        assert _run_for(pub, clock, 400) == 10  # one per 40 s
    finally:
        core.close()


def test_keepalive_follows_the_pace_but_dead_links_close_after_the_same_idle_timeout(
        make_node: Callable[..., Path], clock: FakeClock) -> None:
    core = NodeCore.open(make_node("T1"), clock)
    peer_core = NodeCore.open(make_node("T2"), clock)
    try:
        rep, peer = replicator_for(core), replicator_for(peer_core)
        a = rep.open_session(label="a")
        b = peer.open_session(label="b")
        for _ in range(50):  # b"" would mean EOF: pass only bytes
            if out := a.data_to_send():
                b.receive_data(out)
            if out := b.data_to_send():
                a.receive_data(out)
        assert a.conn.state is LinkState.OPEN
        rep.set_keepalive(pace.IDLE_KEEPALIVE_S)
        assert a.conn.timeouts.keepalive == pace.IDLE_KEEPALIVE_S
        assert rep.open_session(label="new").conn.timeouts.keepalive == pace.IDLE_KEEPALIVE_S
        t0 = clock.monotonic()
        clock.advance(pace.ACTIVE_KEEPALIVE_S + 1)  # the old keep-alive would ping now
        a.tick()
        assert a.data_to_send() == b""
        clock.advance(pace.IDLE_KEEPALIVE_S - pace.ACTIVE_KEEPALIVE_S)
        a.tick()
        assert a.data_to_send() != b""  # the PING
        clock.advance(t0 + IDLE_TIMEOUT + 0.5 - clock.monotonic())
        a.tick()
        assert a.conn.state is LinkState.CLOSED and "nothing received for 45s" in (a.close_reason or "")
    finally:
        core.close()
        peer_core.close()


def test_inspector_warns_when_a_low_battery_terminal_holds_pending_sales_alone(
        tmp_path: Path, make_node: Callable[..., Path]) -> None:
    """Real node processes: T1 on a low battery (the power_supply class faked through the test-only
    MESHPOS_POWER_SUPPLY_DIR) with 3 pending card sales, linked to T2 on mains. While T2 holds
    them, the inspector only mentions T1's battery. T2 goes; T1 sells 2 more: the inspector warns
    about those 2, held only by T1 (T2's held vector says it holds the first 3 on its disk)."""
    import json

    from meshpos.apps.procs import ProcessGroup, free_ports
    from meshpos.infra.clock import SYSTEM_CLOCK
    from meshpos.node import client
    from meshpos.node.ops import SealedCard
    from meshpos.wire.cards import seal_card
    from tests.helpers import run_cli

    p1, p2 = free_ports(2)
    t1 = make_node("T1", listen=f"127.0.0.1:{p1}", peers=[f"127.0.0.1:{p2}"])
    t2 = make_node("T2", listen=f"127.0.0.1:{p2}")
    insp = make_node("Insp", role="inspector", peers=[f"127.0.0.1:{p1}"])
    low = ProcessGroup(tmp_path / "logs-low")
    low.env.update(MESHPOS_STATUS_INTERVAL="1",
                   MESHPOS_POWER_SUPPLY_DIR=str(power_supply(tmp_path / "power", 9)))
    mains = ProcessGroup(tmp_path / "logs-mains")
    mains.env["MESHPOS_STATUS_INTERVAL"] = "1"
    alone = ("2 pending sale(s) (4.00 EUR) held only by nodes on a low battery: T1 (9 %); "
             "charge one, or link a charged node to them before they die")

    def warnings() -> list[str]:
        proc = run_cli("inspect", str(insp), "--no-mdns", "--json", "--wait", "3")
        assert proc.returncode == 0, proc.stderr
        return list(json.loads(proc.stdout)["warnings"])

    def poll(cond: Callable[[list[str]], bool], what: str) -> list[str]:
        for _ in range(15):
            seen = warnings()
            if cond(seen):
                return seen
        raise AssertionError(f"{what}: {seen}")
    try:
        core = NodeCore.open(t1)
        try:
            for i in range(3):  # card sales: pending until authorized (cash is final when taken)
                core.sell(100 + i, card=core.seal_card("4111111111111111", "1230"))
        finally:
            core.close()
        mains.start_node("t2", t2, "--no-mdns")
        low.start_node("t1", t1, "--no-mdns")
        poll(lambda w: "T1: battery 9 %" in w and not any("held only by" in x for x in w),
             "no battery warning for T1, or a warning about sales T2 holds")
        own = [s["status"] for s in client.running(t1).statuses() if s["status"].get("name") == "T1"]
        assert own and own[0]["battery"] == 9 and own[0]["battery_low"] is True  # T1 says so itself
        mains.stop_all()
        policy = client.running(t1).policy()
        for amount in (150, 250):  # made after T2 went: nobody but T1 holds them
            capture = seal_card("4111111111111111", "1230", "manual", bytes.fromhex(policy.switch_key or ""),
                                at_ms=SYSTEM_CLOCK.now_ms())
            client.running(t1, timeout=10).sell(amount, SealedCard.of(capture))
        seen = poll(lambda w: alone in w, "no warning about the sales only T1 holds")
        assert not any("3 pending" in w or "5 pending" in w for w in seen)  # T2 holds the first three
    finally:
        low.stop_all()
        mains.stop_all()


def test_a_selling_node_publishes_once_per_active_period_whatever_its_counts_do(
        make_node: Callable[..., Path], clock: FakeClock, tmp_path: Path) -> None:
    """Every sale changes the counts a status carries; while selling, those changes wait for the
    active status period (every node of the site verifies and relays each status)."""
    core, pub = _publisher(make_node("T1"), clock, power_supply(tmp_path / "power", 80))
    try:
        _run_for(pub, clock, 5)
        published = 0
        for i in range(60):  # a sale a second for a minute
            core.sell(100 + i)
            published += _run_for(pub, clock, 1)
        assert _published(pub)["every_ms"] == pace.ACTIVE_STATUS_S * 1000
        assert published <= 60 / pace.ACTIVE_STATUS_S + 1
    finally:
        core.close()
