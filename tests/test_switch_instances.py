"""Several switch instances, real processes, on one PostgreSQL database (tests/switch_instances.py):
exactly once across instances, an instance killed mid-batch, PostgreSQL restarted under load,
sites added and revoked while running, /healthz /readyz /metrics. Two nodes forward the issue's
2,000 card sales through two and through three instances at once; the other tests use a size that keeps them short
(tools/bench_switch_backends.py measures the throughput)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.domain.errors import UplinkError
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import ProcessGroup
from meshpos.site.sitedir import init_site
from meshpos.switch.switchdir import add_site
from meshpos.uplink.client import forward, make_client_context
from meshpos.uplink.forwarder import Forwarder
from meshpos.wire import envelope

from pg import PgCluster, remove_cluster, start_cluster
from switch_instances import Instances, card_sales, copy_sales, forward_until_settled

pytestmark = pytest.mark.slow


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop_all()


def nodes(inst: Instances, names: list[str]) -> list[NodeCore]:
    cores = []
    for name in names:
        enroll_one_step(inst.site, inst.root / name, "terminal", name.upper())
        cores.append(NodeCore.open(inst.root / name, SYSTEM_CLOCK))
    return cores


def metric(text: bytes, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition, parsed by prometheus_client's parser."""
    total = 0.0
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def acquirer_counts(inst: Instances, sale_ids: list[str]) -> dict[str, dict[str, int]]:
    by_rrn = inst.stats()["by_sale"]
    return {s: dict(by_rrn.get(rrn, {})) for s, rrn in inst.rrns(sale_ids).items()}


@pytest.mark.parametrize("n_instances", [2, 3])
async def test_two_nodes_forward_the_same_sales_through_different_instances_at_once(
        tmp_path: Path, procs: ProcessGroup, pg_cluster: PgCluster, n_instances: int) -> None:
    inst = Instances.create(tmp_path, procs, pg_cluster.new_database(), n_instances, delay_ms=5,
                            acquirer_connections=2)  # each instance with a pool of two ISO 8583 connections
    a, b = nodes(inst, ["a", "b"])
    ids = card_sales(a, 2000)  # the size
    copy_sales(b, a)
    urls = [inst.url(i) for i in range(n_instances)]
    got: dict[str, dict[str, bytes]] = {}

    async def uplink(name: str, core: NodeCore, first: int) -> None:
        # each node sends each batch to the next instance in turn: a and b never use the same one at once
        got[name] = await forward_until_settled(core, urls, ids, batch=60, start=first, rotate=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(uplink, "a", a, 0)
        nursery.start_soon(uplink, "b", b, 1)

    assert got["a"] == got["b"] and sorted(got["a"]) == sorted(ids)  # the same signed bytes on both nodes
    counts = acquirer_counts(inst, ids)
    wrong = {s: c for s, c in counts.items() if c != {"0220": 1}}
    assert len(counts) == len(ids) and not wrong, (len(counts), wrong)
    assert {s["id"]: s["status"] for s in a.sales()} == {s["id"]: s["status"] for s in b.sales()}
    assert all(s["status"] == "approved" for s in a.sales())

    totals = inst.stats()["totals"]
    scraped = [inst.ops(i, "/metrics") for i in range(n_instances)]
    assert all(status == 200 for status, _ in scraped)
    assert sum(metric(body, "meshpos_switch_advices_total", mti="0220") for _, body in scraped) == totals["0220"]
    assert sum(metric(body, "meshpos_switch_advices_total", mti="0221") for _, body in scraped) == \
        totals.get("0221", 0) == 0
    assert sum(metric(body, "meshpos_switch_results_total", outcome="approved") for _, body in scraped) == len(ids)
    assert all(metric(body, "meshpos_switch_acquirer_round_trip_seconds_count", mti="0220") > 0
               or metric(body, "meshpos_switch_advices_total", mti="0220") == 0 for _, body in scraped)
    assert all(metric(body, "meshpos_switch_batches_in_flight") == 0 for _, body in scraped)
    for i in range(n_instances):
        assert inst.ops(i, "/healthz")[0] == 200
        status, body = inst.ops(i, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
    a.close()
    b.close()


async def test_instances_killed_mid_batch_leave_their_sales_to_the_others_as_0221_only(
        tmp_path: Path, procs: ProcessGroup, pg_cluster: PgCluster) -> None:
    inst = Instances.create(tmp_path, procs, pg_cluster.new_database(), 3, delay_ms=300, claim_lease_s=1.0)
    a, b = nodes(inst, ["a", "b"])
    ids = card_sales(a, 150)
    copy_sales(b, a)
    urls = [inst.url(i) for i in range(3)]
    got: dict[str, dict[str, bytes]] = {}
    kills = 0

    async def uplink(name: str, core: NodeCore, first: int) -> None:
        got[name] = await forward_until_settled(core, urls, ids, batch=50, start=first, timeout=120)

    async def advices_sent(i: int) -> float | None:
        try:
            status, body = await trio.to_thread.run_sync(inst.ops, i, "/metrics")
        except OSError:  # down, or starting
            return None
        return metric(body, "meshpos_switch_advices_total", mti="0220") if status == 200 else None

    async def killer() -> None:
        # Mid-batch: an instance is killed right after its count of 0220 advices rose, so some of
        # its advices are at the acquirer, their answers 300 ms away. (Killing on the site-wide
        # count could hit an instance with nothing in flight, and then no 0221 need follow.)
        nonlocal kills
        last: list[float | None] = [None, None, None]
        while kills < 3 and len(got) < 2:
            for i in range(3):
                sent = await advices_sent(i)
                if sent is not None and last[i] is not None and sent > last[i]:
                    inst.kill(i)
                    kills += 1
                    await trio.sleep(0.5)
                    await trio.to_thread.run_sync(inst.start, i)
                    last[i] = None  # a new process counts from 0
                    break
                last[i] = sent
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(uplink, "a", a, 0)
        nursery.start_soon(uplink, "b", b, 1)
        nursery.start_soon(killer)

    assert kills >= 2 and inst.stats()["totals"].get("0221", 0) > 0  # the dead instances' sales were repeated
    assert got["a"] == got["b"] and sorted(got["a"]) == sorted(ids)
    counts = acquirer_counts(inst, ids)
    # never a second 0220, repeats 0221 only; an instance killed after recording its 0220 but
    # before the bytes left makes the 0221 the first the acquirer sees (protocols/switch-instances.md,
    # "Every sale is finished"): advised exactly once all the same, and charged once
    assert all(c and c.get("0220", 0) <= 1 and set(c) <= {"0220", "0221"} for c in counts.values()), counts
    assert set(inst.stats()["charged"]) == set(inst.rrns(ids).values())
    a.close()
    b.close()


async def test_postgresql_restarted_under_load_instances_are_unready_then_recover_by_themselves(
        tmp_path: Path, procs: ProcessGroup) -> None:
    cluster = start_cluster()
    try:
        inst = Instances.create(tmp_path, procs, cluster.new_database(), 2, delay_ms=50)
        a, b = nodes(inst, ["a", "b"])
        ids = card_sales(a, 200)
        copy_sales(b, a)
        urls = [inst.url(0), inst.url(1)]
        got: dict[str, dict[str, bytes]] = {}
        readiness: list[list[int]] = []

        async def uplink(name: str, core: NodeCore, first: int) -> None:
            got[name] = await forward_until_settled(core, urls, ids, batch=40, start=first, rotate=True, timeout=120)

        async def restart() -> None:
            while inst.stats()["totals"].get("0220", 0) < 40:
                await trio.sleep(0.02)
            await trio.to_thread.run_sync(cluster.stop, "fast")
            readiness.append([(await trio.to_thread.run_sync(inst.ops, i, "/readyz"))[0] for i in range(2)])
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(cluster.start)
            for _ in range(100):
                states = [(await trio.to_thread.run_sync(inst.ops, i, "/readyz"))[0] for i in range(2)]
                if states == [200, 200]:
                    break
                await trio.sleep(0.2)
            readiness.append(states)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(uplink, "a", a, 0)
            nursery.start_soon(uplink, "b", b, 1)
            nursery.start_soon(restart)

        assert readiness[0] == [503, 503] and readiness[1] == [200, 200]
        assert got["a"] == got["b"] and sorted(got["a"]) == sorted(ids)
        counts = acquirer_counts(inst, ids)
        assert all(c.get("0220") == 1 and set(c) <= {"0220", "0221"} for c in counts.values()), counts
        assert all(inst.alive(i) for i in range(2))  # recovered by themselves: never restarted
        a.close()
        b.close()
    finally:
        procs.stop_all()
        remove_cluster(cluster)


async def test_add_site_and_a_revocation_reach_running_instances_without_a_restart(
        tmp_path: Path, procs: ProcessGroup, pg_cluster: PgCluster) -> None:
    inst = Instances.create(tmp_path, procs, pg_cluster.new_database(), 2)
    new_site = init_site(tmp_path / "site2", "Fiera Nuova", "EUR", switch_key=inst.site.policy.switch_key,
                         switch_url=inst.url(1))
    enroll_one_step(new_site, tmp_path / "n1", "terminal", "N1")
    core = NodeCore.open(tmp_path / "n1", SYSTEM_CLOCK)
    sale = card_sales(core, 1)
    with pytest.raises(UplinkError):  # not registered yet: its certificate is not trusted
        await forward(inst.url(1), make_client_context(core), Forwarder(core, SYSTEM_CLOCK).entries_for(sale))

    add_site(inst.dirs[0], new_site.path)  # on the database, while both instances run
    for i in (0, 1):
        with trio.fail_after(10):
            while True:
                try:
                    reply = await forward(inst.url(i), make_client_context(core),
                                          Forwarder(core, SYSTEM_CLOCK).entries_for(sale))
                    break
                except UplinkError:
                    await trio.sleep(0.2)
        assert envelope.decode(reply.results[0]).body["status"] == "approved"

    new_site.revoke(core.node_id, "stolen")
    add_site(inst.dirs[0], new_site.path)  # the revocation, registered while running
    for i in (0, 1):
        with trio.fail_after(10):
            while True:
                try:
                    await forward(inst.url(i), make_client_context(core), Forwarder(core, SYSTEM_CLOCK).entries_for(sale))
                except UplinkError as exc:
                    assert "403" in str(exc) or "revoked" in str(exc).lower(), exc
                    break
                await trio.sleep(0.2)
    assert all(inst.alive(i) for i in (0, 1))
    core.close()
