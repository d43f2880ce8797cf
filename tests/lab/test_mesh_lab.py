"""Full nodes over real multicast: 5 hosts in network namespaces, no static peers.

Each host runs `meshpos run`; they must find each other by mDNS alone, link,
and converge; a host that leaves must be noticed by the others.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import wait_for
from meshpos.site.sitedir import Site

pytestmark = [pytest.mark.lab, pytest.mark.slow]
PORT = 7420
TTL = 4


def test_five_hosts_discover_each_other_by_mdns_and_converge(make_lab, site: Site, tmp_path: Path) -> None:
    lab = make_lab(5)
    nodes = []
    expected = set()
    for i in range(5):
        path = tmp_path / f"h{i}"
        enroll_one_step(site, path, "terminal", f"Host {i}", listen=f"0.0.0.0:{PORT}")
        nodes.append(path)
        with client.open_node(path) as stopped:
            expected.add(stopped.sell(100 + i)["id"])
    env = {**os.environ, "MESHPOS_MDNS_TTL": str(TTL), "PYTHONUNBUFFERED": "1"}
    procs = []
    for i, path in enumerate(nodes):
        log = open(tmp_path / f"h{i}.log", "wb")
        procs.append(lab.run(i, [sys.executable, "-m", "meshpos.cli.main", "-v", "run", str(path)],
                             stdout=log, stderr=log, env=env))
    for i, path in enumerate(nodes):  # a start takes seconds, many times that on a host shared by many tests
        wait_for(lambda: _running(path), 120,
                 lambda: f"{path.name} did not start: {(tmp_path / f'h{i}.log').read_text()[-2000:]}")
    for i, path in enumerate(nodes):
        expected.add(client.running(path).sell(200 + i)["id"])

    def converged() -> bool:
        return all({s["id"] for s in client.running(p).sales()} == expected for p in nodes)
    wait_for(converged, 60, "the five hosts did not converge by mDNS discovery: " + _logs(tmp_path))
    wait_for(lambda: all(len(client.running(p).status()["peers"]["discovered"]) == 4 for p in nodes),
             60, "not every host discovered the four others")
    assert all(client.running(p).status()["peers"]["static"] == [] for p in nodes)
    leaving = procs[4]
    leaving_id = client.running(nodes[4]).status()["node_id"]
    leaving.send_signal(signal.SIGTERM)
    leaving.wait(timeout=30)
    wait_for(lambda: all(leaving_id not in client.running(p).status()["peers"]["discovered"]
                         for p in nodes[:4]), 60, "the others did not notice the host that left")


def _running(path: Path) -> bool:
    try:
        client.running(path, timeout=5).status()
        return True
    except Exception:
        return False


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-10:])
                     for p in sorted(tmp_path.glob("h*.log")))
