"""held_by on real node processes (issue 14, part 3, acceptance): five terminals on loopback with
static peers and real TLS; a sale's held_by reaches 5 on every node, card and cash alike, and a
till connected to the selling terminal's event stream sees it rise live for both; it stops at 4
for sales made after one node is cut off, and the inspector lists a sale of an isolated terminal
as at risk."""

from __future__ import annotations

from meshpos.node.ops import SealedCard
import json
import time
from pathlib import Path
from typing import Any, Iterator

import uuid

import pytest

from tests.api_harness import ApiClient, EventStream
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.site.nodedir import NodeDir
from meshpos.site.sitedir import Site
from meshpos.wire.cards import seal_card
from tests.helpers import run_cli

VISA = "4111111111111111"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    group.env["MESHPOS_STATUS_INTERVAL"] = "1"
    yield group
    group.stop_all()


def sell_card(node: Path, amount_minor: int) -> dict[str, Any]:
    """A keyed card sale on a running node, the card sealed here as `meshpos sell --card -` does."""
    policy = client.running(node).policy()
    capture = seal_card(VISA, "1230", "manual", bytes.fromhex(policy.switch_key or ""), at_ms=SYSTEM_CLOCK.now_ms())
    sale = client.running(node, timeout=10).sell(amount_minor, SealedCard.of(capture))
    return sale


def held_by(node: Path, sale_id: str) -> int:
    return int(client.running(node).sale(sale_id)["held_by"])


def held_everywhere(nodes: list[Path], sale_id: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for node in nodes:
        listed = {s["id"]: s for s in client.running(node).sales()}
        out[node.name] = listed[sale_id]["held_by"] if sale_id in listed else None
    return out


def test_held_by_reaches_five_stops_at_four_after_a_cut_and_an_isolated_sale_is_at_risk(
        tmp_path: Path, site: Site, procs: ProcessGroup) -> None:
    ports = free_ports(5)
    nodes = []
    for i in range(5):
        peers = [f"127.0.0.1:{ports[i - 1]}"] if i else []  # a line: T0 - T1 - T2 - T3 - T4
        path = tmp_path / f"T{i}"
        enroll_one_step(site, path, "terminal", f"T{i}", listen=f"127.0.0.1:{ports[i]}", peers=peers,
                        api="127.0.0.1:0")
        nodes.append(path)
    insp = tmp_path / "insp"
    enroll_one_step(site, insp, "inspector", "Inspector", peers=[f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[4]}"])
    for i, path in enumerate(nodes):
        procs.start_node(f"T{i}", path, "--no-mdns")

    till = ApiClient(nodes[2], "unix")
    stream = EventStream(till, patience=90)
    first = sell_card(nodes[2], 1250)
    assert first["held_by"] == 1  # at once: only the terminal itself holds it
    answer = till.request("POST", "/v1/sales", {"amount": "3.00", "method": "cash"},
                          {"Idempotency-Key": str(uuid.uuid4())})
    assert answer.status == 201 and answer.body["status"] == "paid", answer.body
    cash = answer.body
    assert cash["held_by"] == 1
    for sale_id in (first["id"], cash["id"]):
        wait_for(lambda s=sale_id: set(held_everywhere(nodes, s).values()) == {5}, 60,
                 lambda s=sale_id: f"held_by did not reach 5 everywhere: {held_everywhere(nodes, s)}")
    # the till saw both rise, live: "held on N devices" for the card sale and the cash sale alike
    seen: dict[str, list[int]] = {first["id"]: [], cash["id"]: []}
    while any(5 not in counts for counts in seen.values()):
        event = stream.next()
        if event["event"] == "sale.replicated" and event["data"]["id"] in seen:
            seen[event["data"]["id"]].append(event["data"]["held_by"])
    stream.close()
    till.close()
    for counts in seen.values():
        assert 1 < counts[0] and all(a < b for a, b in zip(counts, counts[1:])), seen  # rising, once each
    wait_for(lambda: client.running(nodes[2]).status()["at_risk"]["count"] == 0, 30,
             "T2 still counts its sale at risk")

    # T4 cut off (stopped): sales made after the cut are held by the four others, never by five
    procs.stop("T4")
    second = sell_card(nodes[0], 2500)
    alive = nodes[:4]
    wait_for(lambda: set(held_everywhere(alive, second["id"]).values()) == {4}, 60,
             lambda: f"held_by did not reach 4 on the nodes left: {held_everywhere(alive, second['id'])}")
    third = sell_card(nodes[3], 300)  # T3 was T4's only link
    wait_for(lambda: set(held_everywhere(alive, third["id"]).values()) == {4}, 60,
             lambda: f"held_by did not reach 4 on the nodes left: {held_everywhere(alive, third['id'])}")
    time.sleep(3)  # several status rounds (one a second) later, nothing has counted the absent node
    assert set(held_everywhere(alive, second["id"]).values()) == {4}
    assert set(held_everywhere(alive, first["id"]).values()) == {5}  # what T4 held stays on its disk

    # T4 back, isolated (no peer, no mDNS; nobody dials it): its sale is held by T4 alone
    nd = NodeDir(nodes[4])
    cfg = nd.config()
    cfg.peers = []
    nd.save_config(cfg)
    procs.start_node("T4", nodes[4], "--no-mdns")
    lone = sell_card(nodes[4], 4200)
    assert held_by(nodes[4], lone["id"]) == 1
    st = client.running(nodes[4]).status()
    assert st["at_risk"] == {"count": 1, "amount_minor": 4200, "min_holders": 2}
    text = run_cli("status", str(nodes[4]), check=True).stdout
    assert "at risk: 1 of this terminal's pending sale(s) (42.00 EUR)" in text

    def view() -> dict[str, Any]:
        proc = run_cli("inspect", str(insp), "--no-mdns", "--json", "--wait", "3")
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))
    got: dict[str, Any] = {}

    def lone_at_risk() -> bool:
        got.update(view())
        return lone["id"] in {s["id"] for s in got.get("at_risk", [])}
    wait_for(lone_at_risk, 60, lambda: f"the inspector did not list the isolated sale: {got.get('at_risk')}")
    risky = {s["id"]: s for s in got["at_risk"]}
    assert risky[lone["id"]]["terminal_name"] == "T4" and risky[lone["id"]]["amount"] == "42.00"
    assert risky[lone["id"]]["held_by"] == 1
    assert first["id"] not in risky and second["id"] not in risky  # held by 5 and by 4: safe
    text = run_cli("inspect", str(insp), "--no-mdns", "--wait", "3", check=True).stdout
    assert "at risk: " in text and lone["id"] in text and "42.00 EUR" in text
