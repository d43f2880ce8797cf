"""Discovery over real multicast: hosts in network namespaces, no static peers."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODE = Path(__file__).with_name("discovery_node.py")
TTL = 4  # seconds; the default is 120 (meshpos.replication.discovery.DEFAULT_TTL)
SITE, OTHER_SITE = "fair-A", "fair-B"


@dataclass
class Node:
    node_id: str
    proc: subprocess.Popen[str]
    events: "queue.Queue[dict[str, Any]]" = field(default_factory=queue.Queue)
    log: list[dict[str, Any]] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    gone: dict[str, float] = field(default_factory=dict)
    uplink: dict[str, bool] = field(default_factory=dict)
    ready: bool = False

    def start_reader(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    self.events.put({"event": "junk", "line": line})

        threading.Thread(target=read, daemon=True).start()

    def drain(self) -> None:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            self.log.append(ev)
            if ev["event"] == "ready":
                self.ready = True
            elif ev["event"] == "seen":
                self.peers.add(ev["node_id"])
                self.gone.pop(ev["node_id"], None)
                self.uplink[ev["node_id"]] = ev["uplink"]
            elif ev["event"] == "gone":
                self.peers.discard(ev["node_id"])
                self.gone[ev["node_id"]] = ev["t"]


def wait_until(nodes: list[Node], cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for n in nodes:
            n.drain()
        if cond():
            return
        if time.monotonic() > deadline:
            state = {n.node_id: {"ready": n.ready, "peers": sorted(n.peers), "gone": sorted(n.gone)} for n in nodes}
            pytest.fail(f"timed out after {timeout}s waiting for {what}; state: {state}")
        for n in nodes:
            if n.proc.poll() is not None and n.proc.returncode not in (0, -15) and not n.ready:
                pytest.fail(f"{n.node_id} exited with {n.proc.returncode} before it was ready")
        time.sleep(0.05)


def test_five_hosts_find_each_other_and_notice_departures(make_lab: Any, tmp_path: Path) -> None:
    lab = make_lab(6)
    nodes: list[Node] = []
    for i in range(6):
        site = SITE if i < 5 else OTHER_SITE
        argv = [sys.executable, str(NODE), "--site", site, "--node", f"n{i}", "--ttl", str(TTL)]
        if i == 0:
            argv.append("--commands")
        proc = lab.run(
            i, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"n{i}.err", "w"), text=True,
        )
        node = Node(f"n{i}", proc)
        node.start_reader()
        nodes.append(node)
    same = nodes[:5]
    ids = {n.node_id for n in same}

    # 1. every host of the site sees the 4 others; the foreign site is ignored both ways
    wait_until(nodes, lambda: all(n.peers == ids - {n.node_id} for n in same) and nodes[5].ready,
               timeout=15, what="5 hosts to see each other")
    time.sleep(1.0)  # give a wrongly accepted foreign node the time to show up
    for n in nodes:
        n.drain()
    for n in same:
        assert "n5" not in n.peers, f"{n.node_id} accepted a node of another site"
    assert nodes[5].peers == set(), "the foreign node accepted nodes of another site"
    for n in same:
        for ev in n.log:
            if ev["event"] == "seen":
                assert ev["site_id"] == SITE and ev["port"] == 7443
                assert ev["addresses"] == [lab.addr(int(ev["node_id"][1:]))]

    # 2. a TXT change (uplink flips on n0) reaches everyone as a new PeerSeen
    assert nodes[0].proc.stdin is not None
    nodes[0].proc.stdin.write("uplink 1\n")
    nodes[0].proc.stdin.flush()
    wait_until(nodes, lambda: all(n.uplink.get("n0") for n in same[1:]), timeout=5,
               what="uplink=1 of n0 to reach the others")

    # 3. a clean stop (SIGTERM -> goodbye packets) is noticed within about a second
    t_stop = time.time()
    nodes[1].proc.send_signal(signal.SIGTERM)
    watchers = [nodes[0], nodes[2], nodes[3], nodes[4]]
    wait_until(nodes, lambda: all("n1" in n.gone for n in watchers), timeout=5,
               what="n1's goodbye to be noticed")
    goodbye_delay = max(n.gone["n1"] for n in watchers) - t_stop
    assert goodbye_delay < 2.0, f"goodbye took {goodbye_delay:.2f}s"
    assert nodes[1].proc.wait(timeout=5) == 0

    # 4. a silent cut (link down, no goodbye) is noticed when the TTL runs out
    t_cut = time.time()
    lab.cut(2)
    watchers = [nodes[0], nodes[3], nodes[4]]
    wait_until(nodes, lambda: all("n2" in n.gone for n in watchers), timeout=TTL + 4,
               what="the cut n2 to be noticed")
    cut_delays = [n.gone["n2"] - t_cut for n in watchers]
    assert max(cut_delays) <= TTL + 1.5, cut_delays
    # the survivors still see each other (the refresh queries kept them alive)
    for n in watchers:
        assert n.peers == {w.node_id for w in watchers} - {n.node_id}, (n.node_id, n.peers)
    print(f"goodbye noticed after {goodbye_delay:.2f}s, cut after {[round(d, 2) for d in cut_delays]}s")

    # 5. the cut host comes back and is found again without a restart
    lab.restore(2)
    wait_until(nodes, lambda: all("n2" in n.peers for n in watchers), timeout=TTL * 2 + 3,
               what="the restored n2 to be seen again")

    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    for n in nodes:
        assert n.proc.wait(timeout=10) in (0, -15), n.node_id
