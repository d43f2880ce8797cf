"""The site simulation (meshpos.apps.sitesim) at a small size: terminals selling at a fair's rate
with lost segments, connection resets, partitions and restarts, two of them forwarding to the real
switch processor. Once the network heals every acknowledged sale is on every node, the ledgers are
identical, and every card sale was advised with exactly one 0220. The full 200-terminal run is
tools/bench_site_sim.py (figures in BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshpos.apps.sitesim import GuaranteeBroken, SiteSim, SiteSimConfig, build_template

SMALL = SiteSimConfig(terminals=12, seed=7, warmup_s=10.0, duration_s=90.0, sale_interval_s=15.0, loss=0.1,
                      resets_per_link_hour=60.0, partitions=2, partition_share=0.3, partition_s=30.0, restarts=3,
                      restart_down_s=10.0, uplinks=2, forward_interval_s=10.0)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_template(tmp_path_factory.mktemp("sitesim-template"), SMALL.terminals)


def test_small_site_keeps_every_guarantee_through_loss_partitions_and_restarts(template: Path) -> None:
    sim = SiteSim(SMALL, template=template)
    try:
        report = sim.run()  # raises GuaranteeBroken if a guarantee fails
    finally:
        sim.close()
    assert report.sales > 50 and report.card_sales > 20
    assert report.resets > 0 and report.restarts == 3 and report.partitions == 2
    # the faults mattered: some sales reached every node only after a fault ended
    assert report.propagation_all_p99_s > 1.0
    assert report.advices_0220 == report.card_sales and report.settled_s is not None
    assert report.frames_per_sale_per_node > 0 and report.cpu_ms_per_sale_per_node > 0
    assert 0 < report.push_copies_per_sale_per_node < report.frames_per_sale_per_node


_ONE_RUN = """
import json, sys
from pathlib import Path
from meshpos.apps.sitesim import SiteSim, SiteSimConfig
sim = SiteSim(SiteSimConfig(**json.loads(sys.argv[2])), template=Path(sys.argv[1]))
try:
    r = sim.run()
    print(json.dumps({"acked": sorted([k, *v] for k, v in sim.acked.items()), "cards": sorted(sim.cards),
                      "faults": [r.partitions, r.restarts, r.resets, r.advices_0220],
                      "bytes": r.bytes_per_sale_per_node}))
finally:
    sim.close()
"""


def test_the_same_seed_gives_the_same_run(template: Path) -> None:
    """The world (which sales, when, which faults) is the seed's, and so are the bytes: the ledgers'
    Automerge actor ids and the sealed boxes of card sales come from seeded streams, and the
    simulated clocks start at the template's epoch, not the wall clock (see meshpos.apps.sitesim);
    with a random ephemeral key per sealed card one run in three or four differed by 1-12 % in
    bytes and even in the faults that follow from them; now runs differ by under 0.1 %. Two
    processes with different hash seeds, so that an iteration over a set of strings or bytes
    deciding the course of the run would show here."""
    config = json.dumps({**SMALL.__dict__, "duration_s": 40.0})
    runs = []
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", _ONE_RUN, str(template), config], capture_output=True,
                             text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed}, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    r0, r1 = runs
    assert r0["acked"] and r0["cards"]
    assert (r0["acked"], r0["cards"], r0["faults"]) == (r1["acked"], r1["cards"], r1["faults"])
    assert r1["bytes"] == pytest.approx(r0["bytes"], rel=0.02)


def test_check_catches_a_node_that_lost_an_acknowledged_sale(template: Path) -> None:
    """The guarantee check is not vacuous: a sale deleted from one node's store after the run fails it."""
    sim = SiteSim(SiteSimConfig(**{**SMALL.__dict__, "duration_s": 30.0, "uplinks": 0}), template=template)
    try:
        sim.run()
        victim = sim.node(5).core.store
        sale_id = sorted(sim.acked)[0]
        victim.conn.execute("DELETE FROM sales WHERE sale_id=?", (sale_id,))
        with pytest.raises(GuaranteeBroken, match="lacks 1 acknowledged"):
            sim.check()
    finally:
        sim.close()


def test_check_catches_a_second_0220(template: Path) -> None:
    sim = SiteSim(SiteSimConfig(**{**SMALL.__dict__, "duration_s": 30.0}), template=template)
    try:
        sim.run()
        sale_id = sorted(sim.cards)[0]
        sim.acquirer.count[sale_id]["0220"] += 1  # as if a retry had advised it again
        with pytest.raises(GuaranteeBroken, match="0220"):
            sim.check()
    finally:
        sim.close()


def test_overlapping_partitions_each_hold_until_their_own_end(template: Path) -> None:
    """A pair that two partitions separate stays separated until the later one ends."""
    sim = SiteSim(SMALL, template=template)
    try:
        sim._partition()  # ends at 30 s
        first = {pair for pair, n in sim.blocked.items() if n > 0}
        sim.clock.now = 10.0
        sim._partition()  # ends at 40 s
        second = {pair for pair, n in sim.blocked.items() if n > 0} - first
        both = {pair for pair, n in sim.blocked.items() if n == 2}
        assert both, "the seed gives overlapping partitions"
        sim.run_until(35.0)
        still = {pair for pair, n in sim.blocked.items() if n > 0}
        assert still == both | second
        sim.run_until(45.0)
        assert not any(n > 0 for n in sim.blocked.values())
    finally:
        sim.close()
