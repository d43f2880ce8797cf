"""A node uses every instance of the switch (issue 16, part 3), with real processes on loopback:
two switch instances on one PostgreSQL database (tests/switch_instances.py), a terminal run by
`meshpos run` whose site policy lists both, sales sold through its control socket, `meshpos status`
and `meshpos inspect` read as a user reads them. The failover rules themselves, with a fake
clock: tests/test_switch_failover.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from meshpos.apps.procs import ProcessGroup, free_ports
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.node import client
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.node.ops import SealedCard
from meshpos.switch.switchdir import add_site
from meshpos.uplink.client import SwitchRefused
from meshpos.uplink.forwarder import Forwarder, HttpsTransport
from meshpos.wire.cards import seal_card

from helpers import run_cli
from pg import PgCluster
from switch_instances import Instances, card_sales

pytestmark = pytest.mark.slow

WAIT_S = 90.0
FINAL = {"approved", "declined", "expired"}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    group.env["MESHPOS_STATUS_INTERVAL"] = "1"
    yield group
    group.stop_all()


def two_instances(tmp_path: Path, procs: ProcessGroup, db: str, **kw: Any) -> Instances:
    """Two instances, and the site policy listing both (the first one first), registered again
    at the switch (the running instances read the new version from the database)."""
    inst = Instances.create(tmp_path, procs, db, 2, **kw)
    inst.site.update_policy(switch_more_urls=(inst.url(1),))
    assert inst.site.policy.switch_urls == (inst.url(0), inst.url(1))
    add_site(inst.dirs[0], inst.site.path)
    return inst


def wait(predicate: Callable[[], bool], what: str, state: Callable[[], str], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (after {timeout:g} s): {state()}")
        time.sleep(0.1)


def sell(node: Path, amount: int) -> str:
    """One card sale on a running terminal, the card sealed here as `meshpos sell --card` does."""
    live = client.running(node)
    key = bytes.fromhex(live.policy().switch_key or "")
    sale = live.sell(amount, SealedCard.of(seal_card("4111111111111111", "1230", "contactless", key)))
    assert sale["status"] == "pending", sale
    return str(sale["id"])


def statuses(node: Path) -> dict[str, str]:
    return {s["id"]: s["status"] for s in client.running(node).sales()}


def status_json(node: Path) -> dict[str, Any]:
    done = run_cli("status", str(node), "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_a_node_settles_through_the_second_instance_when_the_first_is_killed_and_status_says_so(
        tmp_path: Path, procs: ProcessGroup, pg_cluster: PgCluster) -> None:
    # the acquirer answers after 1 s, so the first instance can be killed with a batch in flight
    inst = two_instances(tmp_path, procs, pg_cluster.new_database(), delay_ms=1000, claim_lease_s=2.0)
    port, = free_ports(1)
    node = tmp_path / "t1"
    enroll_one_step(inst.site, node, "terminal", "T1", listen=f"127.0.0.1:{port}", uplink=False)
    insp = tmp_path / "insp"
    enroll_one_step(inst.site, insp, "inspector", "Inspector", peers=[f"127.0.0.1:{port}"])
    procs.start_node("t1", node, "--no-mdns")
    first = [sell(node, 100 + k) for k in range(30)]

    client.running(node).uplink(True)
    # advices of the first batch reached the acquirer through instance 0: kill it mid-batch
    inst.wait_stats(lambda s: s["totals"].get("0220", 0) >= 1, "no advice reached the acquirer")
    inst.kill(0)  # SIGKILL, most likely while the batch waits for the acquirer's answers

    def progress() -> str:
        return f"{statuses(node)}\n{inst.log_tails()}"
    wait(lambda: all(statuses(node).get(s) in FINAL for s in first), "the sales did not settle", progress)

    # later sales go to the second instance at once: the node sticks to the one that answers
    later = [sell(node, 500 + k) for k in range(10)]
    wait(lambda: all(statuses(node).get(s) in FINAL for s in later), "the later sales did not settle", progress)
    assert not inst.alive(0)

    # exactly once at the acquirer: never a second 0220; what the killed instance had marked "advice
    # sent" is finished as 0221 (a repeat), which may be the acquirer's first sight of it when the
    # kill came between the mark and the send (protocols/switch-instances.md)
    by_rrn = inst.stats()["by_sale"]
    counts = {s: by_rrn.get(rrn, {}) for s, rrn in inst.rrns(first + later).items()}
    assert len(counts) == 40 and all(c.get("0220", 0) <= 1 and c and set(c) <= {"0220", "0221"}
                                     for c in counts.values()), counts
    assert all(c == {"0220": 1} for s, c in counts.items() if s in later)  # after the kill: once, plainly

    st = status_json(node)["uplink"]
    assert st["switch_url"] == inst.url(1), st
    assert [i["url"] for i in st["instances"]] == [inst.url(0), inst.url(1)]
    assert [i["current"] for i in st["instances"]] == [False, True]
    assert st["instances"][0]["failures"] >= 1 and st["instances"][1]["failures"] == 0
    text = run_cli("status", str(node)).stdout
    assert f"switch instance reached: {inst.url(1)}" in text and f"2/2 {inst.url(1)}: in use" in text

    # the inspector, through the node's signed status: the instance it reaches
    address = inst.url(1).removeprefix("https://")

    def seen() -> dict[str, Any]:
        done = run_cli("inspect", str(insp), "--no-mdns", "--json", "--wait", "3")
        assert done.returncode == 0, done.stderr
        return {n["name"]: n for n in json.loads(done.stdout)["nodes"]}.get("T1", {})
    wait(lambda: seen().get("switch") == address, "the inspector does not show the second instance",
         lambda: json.dumps(seen()))
    assert f"up via {address}" in run_cli("inspect", str(insp), "--no-mdns", "--wait", "3").stdout


async def test_a_4xx_refusal_does_not_fail_over(tmp_path: Path, procs: ProcessGroup, pg_cluster: PgCluster) -> None:
    """A revoked terminal gets 403 from the first instance: the second (one database, the same
    revocation) would say the same, so the node does not ask it, and counts no failure."""
    inst = two_instances(tmp_path, procs, pg_cluster.new_database())
    enroll_one_step(inst.site, tmp_path / "t1", "terminal", "T1")
    core = NodeCore.open(tmp_path / "t1", SYSTEM_CLOCK)
    try:
        ids = card_sales(core, 3)
        transport = HttpsTransport(core, clock=SYSTEM_CLOCK.monotonic)
        entries = Forwarder(core, SYSTEM_CLOCK).entries_for
        reply = await transport.forward(entries(ids[:1]))
        assert transport.instances.current == inst.url(0) and reply.results  # the first instance serves it
        # the batch carried the policy listing both instances: the switch took it (it judges sales by it)
        assert not reply.refused and core.policy.switch_urls == (inst.url(0), inst.url(1))

        inst.site.revoke(core.node_id, "stolen")
        add_site(inst.dirs[0], inst.site.path)  # every running instance learns it within seconds
        refused: SwitchRefused | None = None
        for _ in range(100):
            try:
                await transport.results(ids)
            except SwitchRefused as exc:
                refused = exc
                break
            await trio.sleep(0.1)
        assert refused is not None and refused.status == 403, "the revocation never reached the instance"
        before = transport.requests
        with pytest.raises(SwitchRefused) as again:
            await transport.forward(entries(ids[1:]))
        assert again.value.status == 403
        assert transport.requests == before + 1  # one request: the second instance was not asked
        states = transport.instances.states(transport.urls(), SYSTEM_CLOCK.monotonic())
        assert transport.instances.current == inst.url(0) and [s.failures for s in states] == [0, 0]
        assert "refused a forwarder" not in (procs.log_dir / "sw1.log").read_text()
        assert "refused a forwarder" in (procs.log_dir / "sw0.log").read_text()
    finally:
        core.close()
