"""The lab's field profiles (tools/netns_lab.py): each does to real packets what it says.

UDP datagrams and TCP connections between hosts in network namespaces, counted by
tests/lab/netprobe.py: random loss drops about the share asked, multicast filtering
stops group traffic, client isolation stops terminal-to-terminal traffic but not the
gateway's, the bandwidth limit and the flapping link are in place, and ``down()``
removes everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import netns_lab

pytestmark = [pytest.mark.lab]

PROBE = str(Path(__file__).with_name("netprobe.py"))


def udp_count(lab: Any, sender: int, receiver: int, n: int, *, group: str | None = None) -> int:
    """How many of ``n`` datagrams sent by host ``sender`` host ``receiver`` got."""
    port = 40000 + receiver
    recv = lab.run(receiver, [sys.executable, PROBE, "recv", str(port), "3", str(n), *([group] if group else [])],
                   stdout=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "ready"
    dest = group or lab.addr(receiver)
    lab.run(sender, [sys.executable, PROBE, "send", dest, str(port), str(n)]).wait(timeout=30)
    out, _ = recv.communicate(timeout=30)
    return int(out.strip())


def connects(lab: Any, a: int, b: int) -> bool:
    port = 41000 + b
    listener = lab.run(b, [sys.executable, PROBE, "listen", str(port), "5"], stdout=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "ready"
    out = lab.run(a, [sys.executable, PROBE, "connect", lab.addr(b), str(port)], stdout=subprocess.PIPE,
                  text=True).communicate(timeout=30)[0]
    listener.kill()
    listener.wait()
    return out.strip() == "ok"


def test_random_loss_drops_about_the_share_asked_and_only_where_asked(make_lab: Any) -> None:
    lab = make_lab(3)
    assert udp_count(lab, 0, 1, 200) == 200  # a clean bridge loses nothing
    lab.loss(1, 100)
    assert udp_count(lab, 0, 1, 100) == 0
    assert udp_count(lab, 0, 2, 100) == 100  # host 2 is untouched
    lab.loss(1, 50)
    got = udp_count(lab, 0, 1, 400)
    assert 100 < got < 300, got  # binomial(400, 0.5): 200 ± 10 (one sigma)
    lab.loss(1, 0)
    assert udp_count(lab, 0, 1, 100) == 100
    lab.link_loss(0, 2, 100)  # one link only, in the bridge
    assert udp_count(lab, 0, 2, 50) == 0 and udp_count(lab, 2, 0, 50) == 0
    assert udp_count(lab, 1, 2, 50) == 50


def test_multicast_filtered_stops_group_traffic_not_unicast(make_lab: Any) -> None:
    lab = make_lab(2)
    assert udp_count(lab, 0, 1, 50, group="224.0.0.251") == 50
    lab.block_multicast(1)
    assert udp_count(lab, 0, 1, 50, group="224.0.0.251") == 0
    assert udp_count(lab, 0, 1, 50) == 50


def test_client_isolation_lets_terminals_reach_the_gateway_but_not_each_other(make_lab: Any) -> None:
    lab = make_lab(4)
    assert connects(lab, 1, 2)
    lab.isolate([1, 2, 3])  # host 0 is the wired gateway
    assert not connects(lab, 1, 2) and not connects(lab, 3, 1)
    assert connects(lab, 1, 0) and connects(lab, 0, 2)
    assert udp_count(lab, 2, 3, 20) == 0 and udp_count(lab, 2, 0, 20) == 20
    lab.isolate([])
    assert connects(lab, 1, 2)


def qdisc(ns: str, dev: str) -> str:
    return subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout


def test_rate_limit_is_a_token_bucket_both_ways_and_comes_off(make_lab: Any) -> None:
    lab = make_lab(2)
    lab.rate(1, 256)
    for ns, dev in ((lab.host_ns(1), "eth0"), (lab.bridge_ns, "p1")):
        assert "tbf" in qdisc(ns, dev) and "rate 256Kbit" in qdisc(ns, dev)
    assert "tbf" not in qdisc(lab.host_ns(0), "eth0")
    assert udp_count(lab, 0, 1, 20) == 20  # slow, not cut
    lab.rate(1, None)
    assert "tbf" not in qdisc(lab.host_ns(1), "eth0") and "tbf" not in qdisc(lab.bridge_ns, "p1")
    with pytest.raises(netns_lab.LabError):
        lab.rate(1, 0)
    with pytest.raises(netns_lab.LabError):
        lab.loss(1, 101)


def port_up(lab: Any, i: int) -> bool:
    out = subprocess.run(["ip", "-n", lab.bridge_ns, "-o", "link", "show", f"p{i}"], capture_output=True,
                         text=True).stdout
    return "state UP" in out or ",UP" in out.split(">")[0]


def test_a_flapping_link_goes_down_and_up_on_its_schedule_and_stays_up_when_stopped(make_lab: Any) -> None:
    lab = make_lab(2)
    lab.flap(1, up_s=0.3, down_s=0.3)
    seen = set()
    deadline = time.monotonic() + 20
    while seen != {True, False} and time.monotonic() < deadline:
        seen.add(port_up(lab, 1))
        time.sleep(0.05)
    assert seen == {True, False}
    lab.stop_flaps()
    assert port_up(lab, 1)
    assert udp_count(lab, 0, 1, 20) == 20


def test_fifty_hosts_all_reach_each_other(make_lab: Any) -> None:
    # The kernel's neighbour (ARP) table is one for all namespaces, 1024 learnt entries by default:
    # 50 hosts talking to each other need 2,450. The lab pins them (Lab._pin_neighbours), so every
    # host hears every other one, as on a real network.
    n = 50
    lab = make_lab(n)
    probes = [lab.run(i, [sys.executable, PROBE, "all", "42000", "20", *(lab.addr(j) for j in range(n) if j != i)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(n)]
    for p in probes:
        assert p.stdout.readline().strip() == "ready"
    for p in probes:
        p.stdin.write("go\n")
        p.stdin.flush()
    heard = [int(p.communicate(timeout=60)[0].strip()) for p in probes]
    assert heard == [n - 1] * n


def test_down_removes_the_profiled_namespaces(make_lab: Any) -> None:
    lab = make_lab(2)
    lab.apply(0, netns_lab.Profile(loss_pct=20, rate_kbit=512, multicast=False))
    lab.isolate([0, 1])
    lab.flap(1, up_s=0.2, down_s=0.2)
    names = list(lab.created)
    lab.down()
    assert not set(names) & set(netns_lab.list_netns())


def test_cli_builds_a_profiled_lab_and_removes_it(tmp_path: Path) -> None:
    tool = str(Path(__file__).resolve().parents[2] / "tools" / "netns_lab.py")
    env = {**os.environ, "MESHPOS_LAB_STATE": str(tmp_path)}
    up = subprocess.run([sys.executable, tool, "up", "3", "--loss", "20", "--no-multicast", "--isolate", "1,2"],
                        capture_output=True, text=True, env=env)
    assert up.returncode == 0, up.stderr
    lab_id = json.loads(up.stdout)["id"]
    try:
        rules = subprocess.run(["ip", "netns", "exec", f"mpl{lab_id}-h1", "nft", "list", "ruleset"],
                               capture_output=True, text=True).stdout
        assert "numgen random mod 100 < 20 drop" in rules and "224.0.0.0/4 drop" in rules
        bridge = subprocess.run(["ip", "netns", "exec", f"mpl{lab_id}-br", "nft", "list", "ruleset"],
                                capture_output=True, text=True).stdout
        assert '"p1", "p2"' in bridge
        bad = subprocess.run([sys.executable, tool, "profile", "1", "--id", str(lab_id), "--loss", "300"],
                             capture_output=True, text=True, env=env)
        assert bad.returncode == 1 and "0..100" in bad.stderr
    finally:
        down = subprocess.run([sys.executable, tool, "down", "--id", str(lab_id)], capture_output=True, text=True,
                              env=env)
    assert down.returncode == 0, down.stderr
    assert not [n for n in netns_lab.list_netns() if n.startswith(f"mpl{lab_id}-")]
