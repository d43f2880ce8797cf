"""The real field (issue 15): `meshpos run` processes on lab hosts whose network is lossy,
filters multicast or isolates wireless clients (tools/netns_lab.py profiles).

1. 20 % random loss on every host's interface: the mesh converges and one uplink (the
   gateway's) settles every sale, each card sale reaching the acquirer exactly once.
2. Multicast filtered everywhere, terminals configured with the gateway's address only:
   peer exchange lets them find each other, mesh and go on without the gateway.
3. Client isolation: the terminals reach the gateway only; everything flows through it and
   the inspector shows the star.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshpos.node.enroll import enroll_one_step

from field_site import ENV, NODE_PORT, build, open_links, start_nodes, status
from uplink_harness import Fair

pytestmark = [pytest.mark.lab, pytest.mark.slow]


@pytest.fixture
def fairs() -> Any:
    made: list[Fair] = []
    yield made
    for fair in made:
        fair.procs.stop_all()


def test_six_hosts_with_20_percent_loss_converge_and_settle_through_one_uplink(
        make_lab: Any, tmp_path: Path, fairs: list[Fair]) -> None:
    lab = make_lab(6)
    for i in range(6):
        lab.loss(i, 20)
    fair = build(lab, tmp_path, terminals=5, switch=True)
    fairs.append(fair)
    start_nodes(fair, lab)
    fair.sell_mix(30, names=[f"t{i}" for i in range(1, 6)])
    fair.wait_settled(timeout=180)
    fair.check_exactly_once(repeats_allowed=False)
    # one uplink: the gateway forwarded everything; the terminals never could
    assert status(fair, "gw")["uplink"]["results_received"] >= len(fair.expected)
    for i in range(1, 6):
        assert status(fair, f"t{i}")["uplink"]["state"] == "off"
    dropped = subprocess.run(["ip", "netns", "exec", lab.host_ns(3), "nft", "list", "ruleset"],
                             capture_output=True, text=True).stdout
    assert "numgen random mod 100 < 20 drop" in dropped  # the loss was really there


def test_without_multicast_terminals_that_know_only_the_gateway_find_each_other(
        make_lab: Any, tmp_path: Path, fairs: list[Fair]) -> None:
    lab = make_lab(5)
    for i in range(5):
        lab.block_multicast(i)
    fair = build(lab, tmp_path, terminals=4, switch=False)
    fairs.append(fair)
    start_nodes(fair, lab)  # mDNS on: it finds nobody
    terminals = [f"t{i}" for i in range(1, 5)]
    ids = {name: status(fair, name)["node_id"] for name in fair.nodes}
    fair.wait(lambda: all(set(status(fair, t)["peers"]["hinted"]) >= set(ids.values()) - {ids[t]}
                          for t in terminals),
              "the terminals did not learn every node's address",
              state=lambda: str({t: status(fair, t)["peers"] for t in terminals}))
    names = {t.upper() for t in terminals}
    fair.wait(lambda: all(open_links(fair, t) & (names - {t.upper()}) for t in terminals),
              "the terminals did not link to each other",
              state=lambda: str({t: sorted(open_links(fair, t)) for t in terminals}))
    assert all(status(fair, name)["peers"]["discovered"] == [] for name in fair.nodes)  # no mDNS at all
    for k, t in enumerate(terminals):
        fair.sell(t, 100 + k)
    fair.wait_converged()

    fair.procs.stop("gw")  # the one configured address gone: the terminals go on among themselves
    fair.wait(lambda: all(open_links(fair, t) and open_links(fair, t) <= names for t in terminals),
              "links to GW remain")
    for k, t in enumerate(terminals):
        fair.sell(t, 200 + k)
    fair.wait_converged(terminals)


def inspect(lab: Any, host: int, inspector: Path, gateway: str) -> dict[str, Any]:
    proc = lab.run(host, [sys.executable, "-m", "meshpos.cli.main", "inspect", str(inspector), "--json",
                          "--no-mdns", "--peer", gateway, "--wait", "6"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    view: dict[str, Any] = json.loads(out)
    return view


def test_client_isolation_everything_flows_through_the_gateway_and_the_inspector_shows_the_star(
        make_lab: Any, tmp_path: Path, fairs: list[Fair]) -> None:
    lab = make_lab(6)  # host 0: the wired gateway; 1..4: terminals; 5: the inspector, on Wi-Fi too
    lab.isolate([1, 2, 3, 4, 5])
    fair = build(lab, tmp_path, terminals=4, switch=False)
    fairs.append(fair)
    insp = tmp_path / "inspector"
    enroll_one_step(fair.site, insp, "inspector", "Inspector")
    start_nodes(fair, lab)
    terminals = [f"t{i}" for i in range(1, 5)]
    ids = {name: status(fair, name)["node_id"] for name in fair.nodes}
    for k, t in enumerate(terminals):
        fair.sell(t, 100 + k)
    fair.wait_converged()
    # they know where the others are (peer exchange) but cannot reach them: only the gateway links
    fair.wait(lambda: all(set(status(fair, t)["peers"]["hinted"]) >= set(ids.values()) - {ids[t]}
                          for t in terminals), "the terminals did not learn every node's address")
    assert all(open_links(fair, t) == {"GW"} for t in terminals), {t: open_links(fair, t) for t in terminals}
    assert open_links(fair, "gw") == {t.upper() for t in terminals}

    gateway = f"{lab.addr(0)}:{NODE_PORT}"
    view = inspect(lab, 5, insp, gateway)
    for _ in range(10):
        if view["topology"]["shape"] == "star" and view["totals"]["reachable"] == 5:
            break
        view = inspect(lab, 5, insp, gateway)
    assert view["topology"] == {"shape": "star", "hub": "GW"}, (view["topology"], view["edges"])
    assert sorted(view["edges"]) == [["GW", t.upper()] for t in terminals]
    assert any(w.startswith("star: every link goes through GW") for w in view["warnings"]), view["warnings"]
    assert view["totals"]["reachable"] == 5 and not view["partition"]
    text = lab.run(5, [sys.executable, "-m", "meshpos.cli.main", "inspect", str(insp), "--no-mdns", "--peer",
                       gateway, "--wait", "6"], stdout=subprocess.PIPE, text=True).communicate(timeout=60)[0]
    assert "topology: a star through GW" in text
