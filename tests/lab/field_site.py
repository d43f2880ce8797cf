"""A fair in the field lab: real `meshpos run` processes, one per lab host, and optionally the
acquirer simulator and the switch inside the gateway's host (on its loopback, so only the
gateway has an uplink). Built on tests/uplink_harness.py's Fair, whose checks (every sale
settled on every node, one 0220 per card sale) apply unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshpos.apps.procs import ProcessGroup, wait_for
from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.site.sitedir import init_site
from meshpos.switch.switchdir import add_site, init_switch

from uplink_harness import WAIT_S, Fair, base_rules

NODE_PORT = 7420
ACQ_PORT, SWITCH_PORT = 7500, 7501  # inside the gateway's namespace: nothing else binds there
ENV = {"PYTHONUNBUFFERED": "1", "MESHPOS_STATUS_INTERVAL": "2"}


def ns(lab: Any, i: int) -> list[str]:
    return ["ip", "netns", "exec", lab.host_ns(i)]


def build(lab: Any, root: Path, *, terminals: int, switch: bool, peers_gateway_only: bool = True) -> Fair:
    """Host 0 is the gateway ("gw", uplink on when ``switch``), hosts 1..terminals are terminals
    t1..tN (each configured with the gateway's address only, if ``peers_gateway_only``)."""
    procs = ProcessGroup(root / "logs")
    procs.env.update(ENV)
    rules = base_rules()
    rules_path, stats_path = root / "acquirer-rules.json", root / "acquirer-stats.json"
    rules_path.write_text(json.dumps(rules))
    switch_dir = root / "switch"
    if switch:
        acquirer_ca = root / "acquirer-ca.pem"
        acq = procs.start("acquirer", "acquirer-sim", "--listen", f"127.0.0.1:{ACQ_PORT}", "--rules",
                          str(rules_path), "--stats", str(stats_path), "--tls-cert-out", str(acquirer_ca),
                          wrap=ns(lab, 0))
        wait_for(lambda: acq.log_path.exists() and "listening on" in acq.log_path.read_text(), WAIT_S,
                 lambda: f"the acquirer simulator did not start\n{acq.log_tail(15)}", alive=acq)
        init_switch(switch_dir, f"127.0.0.1:{SWITCH_PORT}", f"127.0.0.1:{ACQ_PORT}", acquirer_ca=acquirer_ca)
        switch_key = (switch_dir / "switch.pub").read_text().strip()
        site = init_site(root / "site", "Fiera sul Campo", "EUR", switch_key=switch_key,
                         switch_url=f"https://127.0.0.1:{SWITCH_PORT}")
        add_site(switch_dir, site.path)
    else:
        site = init_site(root / "site", "Fiera sul Campo", "EUR")
    fair = Fair(root, procs, rules, site, switch_dir, stats_path)
    gw = f"{lab.addr(0)}:{NODE_PORT}"
    enroll_one_step(site, root / "gw", "gateway", "GW", listen=gw, uplink=switch)
    fair.nodes["gw"] = root / "gw"
    for i in range(1, terminals + 1):
        enroll_one_step(site, root / f"t{i}", "terminal", f"T{i}", listen=f"{lab.addr(i)}:{NODE_PORT}",
                        peers=[gw] if peers_gateway_only else [])
        fair.nodes[f"t{i}"] = root / f"t{i}"
    if switch:
        child = procs.start("switch", "switch", "run", str(switch_dir), wrap=ns(lab, 0))
        fair.wait(lambda: "switch listening on port" in child.log_path.read_text(), "the switch did not start",
                  alive="switch")
    return fair


def start_nodes(fair: Fair, lab: Any, *extra: str) -> None:
    for i, name in enumerate(fair.nodes):
        fair.procs.start_node(name, fair.nodes[name], *extra, timeout=WAIT_S, wrap=ns(lab, i))


def status(fair: Fair, name: str) -> dict[str, Any]:
    return dict(client.running(fair.nodes[name]).status())


def open_links(fair: Fair, name: str) -> set[str]:
    return {link["peer_name"] for link in status(fair, name)["peers"]["links"] if link["state"] == "open"}
