"""The terminal API's event stream in a small fair of real processes (tests/uplink_harness.py):
a till connected to terminal 1 sees its sales approved and declined when another terminal's
uplink settles them, sees a card sale expire when its offline window closes, and picks up what
it missed with Last-Event-ID."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from api_harness import ApiClient, EventStream
from meshpos.apps.procs import ProcessGroup
from uplink_harness import DECLINED_05, VISA, Fair

pytestmark = pytest.mark.slow


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    for child in group.children.values():
        if child.proc is not None and child.alive:
            os.killpg(child.proc.pid, signal.SIGTERM)
    group.stop_all()


def fair_with_api(tmp_path: Path, procs: ProcessGroup, **kw: Any) -> Fair:
    fair = Fair.create(tmp_path, procs, terminals=2, start_nodes=False, **kw)
    for node in fair.nodes.values():
        cfg_path = node / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["api"] = "127.0.0.1:0"
        cfg_path.write_text(json.dumps(cfg))
    for name in fair.nodes:
        fair.start_node(name)
    return fair


def sale(api: ApiClient, body: dict[str, Any]) -> str:
    got = api.request("POST", "/v1/sales", body, {"Idempotency-Key": str(uuid.uuid4())})
    assert got.status == 201, got.body
    return str(got.body["id"])


def card(pan: str, amount: str = "4.00") -> dict[str, Any]:
    return {"amount": amount, "method": "card", "card": {"pan": pan, "expiry": "1230"}}


def until(stream: EventStream, want: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """Sale events read until every (event, sale id) in ``want`` was seen."""
    got: list[dict[str, Any]] = []
    while not want <= {(e["event"], e["data"]["id"]) for e in got}:
        ev = stream.next()
        if ev["event"].startswith("sale."):
            got.append(ev)
    return got


def test_a_till_sees_sales_settled_through_another_nodes_uplink(tmp_path: Path, procs: ProcessGroup) -> None:
    fair = fair_with_api(tmp_path, procs)
    api = ApiClient(fair.nodes["t1"], "tcp")
    stream = EventStream(api)
    ok, declined, cash = sale(api, card(VISA)), sale(api, card(DECLINED_05)), sale(api, {"amount": "2.00",
                                                                                           "method": "cash"})
    created = until(stream, {("sale.created", s) for s in (ok, declined, cash)})
    stream.close()  # the till goes away before the outcomes arrive
    fair.uplink("t2")  # terminal 1 never has an uplink: the results reach it through the mesh
    fair.wait(lambda: all(fair.view("t1")[s]["settled_at"] for s in (ok, declined, cash)),
              "the sales did not settle on t1", state=fair.progress)
    back = EventStream(api, last_event_id=created[-1]["id"])  # it comes back: it gets what it missed
    outcomes = until(back, {("sale.approved", ok), ("sale.declined", declined), ("sale.approved", cash)})
    back.close()
    by_sale = {e["data"]["id"]: e for e in outcomes}
    assert by_sale[ok]["data"]["status"] == "approved" and len(by_sale[ok]["data"]["auth_code"]) == 6
    assert by_sale[declined]["data"]["response_code"] == "05"
    ids = [e["id"] for e in created + outcomes]
    assert len(ids) == len(set(ids)), "an event came twice"
    assert api.request("GET", f"/v1/sales/{ok}").body["status"] == "approved"
    api.close()


def test_a_till_sees_a_card_sale_expire_when_its_window_closes(tmp_path: Path, procs: ProcessGroup) -> None:
    fair = fair_with_api(tmp_path, procs, policy={"offline_window_s": 3})
    api = ApiClient(fair.nodes["t1"], "unix")
    stream = EventStream(api)
    sold = sale(api, card(VISA))
    events = until(stream, {("sale.created", sold), ("sale.expired", sold)})
    expired = [e for e in events if e["event"] == "sale.expired"][0]["data"]
    assert expired["status"] == "expired" and expired["settled_at"] is None  # the window, not the switch
    fair.uplink("t2")  # the switch confirms it: expired, never sent to the acquirer
    while True:
        ev = stream.next()
        if ev["event"] == "sale.expired" and ev["data"]["settled_at"]:
            break
    stream.close()
    api.close()
