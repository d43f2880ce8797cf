"""The typed statuses (issue 13): one dataclass per status, one encoder, one tolerant decoder."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from pathlib import Path

from meshpos.domain.errors import ConfigError, EncodingError
from meshpos.domain.jsonable import to_jsonable
from meshpos.node.runner import NodeTuning
from meshpos.node.status import AtRisk, DashboardStatus, LocalStatus, NodeSummary, PendingSummary, SalesCount
from meshpos.wire.status import (LedgerSize, LinkSeen, PendingCount, PrinterSeen, RefusedCount, StatusBody,
                                 UplinkSeen)

FULL = StatusBody(
    at=1_767_225_600_000, role="terminal", name="T1", version="0.1.0", addresses=("10.0.0.2",), port=7400,
    links=(LinkSeen("a" * 16, "gateway", 12), LinkSeen("b" * 16, "terminal", None)),
    ledger=LedgerSize(entries=40, shards=3), pending=PendingCount(2, 300, 1_767_225_500_000),
    site_pending=PendingCount(5, 900, 1_767_225_400_000), refused=RefusedCount(1, {"c" * 16: 1}),
    held={"a" * 16: 12, "c" * 16: 3},
    uplink=UplinkSeen("up", 1_767_225_590_000), printer=PrinterSeen("ok", 0), battery=80, every_ms=10_000,
    started_at=1_767_225_000_000)


def test_a_status_survives_its_own_encoding_through_json() -> None:
    wire = json.loads(json.dumps(FULL.to_json()))
    assert StatusBody.from_json(wire) == FULL
    # the signed object keeps today's shape: nested objects and arrays, absent values as null
    assert wire["pending"] == {"count": 2, "amount_minor": 300, "oldest_created_at": 1_767_225_500_000}
    assert wire["links"][1] == {"node": "b" * 16, "role": "terminal", "rtt_ms": None}
    assert StatusBody(at=5).to_json()["uplink"] == {"state": None, "last_forward_at": None, "switch": None}


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("battery", True, None),  # a boolean is not a count
    ("battery", -1, None),
    ("battery", 10**16, None),
    ("port", "7400", None),
    ("name", "T\x1b[2J1" + "x" * 60, "T[2J1" + "x" * 34),  # cut to 40 characters, control ones out
    ("ledger", 5, LedgerSize()),
    ("addresses", 7, ()),
    ("links", [{"role": "terminal"}, "n", {"node": "n2", "rtt_ms": "fast"}], (LinkSeen("n2", None, None),)),
    ("refused", {"by_terminal": ["h"]}, RefusedCount()),
    ("refused", {"by_terminal": {"h": "3", "g": 2}}, RefusedCount(None, {"g": 2})),
    ("held", "!!not base64", {}),  # its own format (wire/heldvec.py): a malformed one holds nothing
    ("held", 7, {}),
])
def test_a_field_of_the_wrong_type_reads_as_absent(field: str, value: Any, expected: Any) -> None:
    body = StatusBody.from_json({"at": 1, field: value})
    assert getattr(body, field) == expected


def test_lists_and_maps_are_bounded() -> None:
    body = StatusBody.from_json({"at": 1, "links": [{"node": f"n{i}"} for i in range(500)],
                                 "addresses": [f"10.0.0.{i}" for i in range(50)],
                                 "refused": {"by_terminal": {f"t{i}": i + 1 for i in range(100)}}})
    assert (len(body.links), len(body.addresses), len(body.refused.by_terminal)) == (64, 8, 16)


@pytest.mark.parametrize("junk", [None, [], "x", {"at": -1}, {"at": "5"}, {"at": True}, {}])
def test_a_status_without_a_usable_time_is_refused(junk: Any) -> None:
    with pytest.raises(EncodingError):
        StatusBody.from_json(junk)


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "str", "bool", "null", "float"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, -5, 10**20, rng.randrange(10**6)])
    if kind == "str":
        return rng.choice(["", "up", "\x00\u202e", "é" * 50])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.random()
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    names = [f.name for f in __import__("dataclasses").fields(StatusBody)] + ["node", "count", "state", "by_terminal"]
    return {rng.choice(names): _random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


def test_no_json_value_breaks_the_decoder() -> None:
    rng = random.Random(13)
    for _ in range(3000):
        value = _random_json(rng)
        if isinstance(value, dict):
            value["at"] = 1
        try:
            body = StatusBody.from_json(value)
        except EncodingError:
            assert not isinstance(value, dict)
            continue
        again = StatusBody.from_json(json.loads(json.dumps(body.to_json())))
        assert again == body  # what was read is a valid status in its own right


def test_the_local_status_leaves_out_the_parts_a_node_does_not_run() -> None:
    summary = NodeSummary(node_id="n", name="T1", role="terminal", site_id="s", site_name="S", version="0.1.0",
                          certificate_expires=None, certificate_valid=True, uplink_allowed=False,
                          switch_configured=True, ledger=LedgerSize(1, 1), sales=SalesCount(0, {"pending": 0}, 0),
                          pending=PendingSummary(0, 0, None), at_risk=AtRisk(0, 0, 2), revoked_nodes=[],
                          policy={"currency": "EUR"})
    fields = {f: getattr(summary, f) for f in summary.__dataclass_fields__}
    bare = to_jsonable(LocalStatus(**fields))
    assert "dashboard" not in bare and "uplink" not in bare and bare["ledger"] == {"entries": 1, "shards": 1}
    served = to_jsonable(LocalStatus(**fields, dashboard=DashboardStatus("http://127.0.0.1:1/", 1, None)))
    assert served["dashboard"] == {"url": "http://127.0.0.1:1/", "port": 1, "tls_fingerprint_sha256": None}
    assert summary.to_json().keys() == {f for f in fields}


def test_lab_tuning_comes_from_the_environment_once_and_is_checked() -> None:
    assert NodeTuning.from_env({}) == NodeTuning()
    assert NodeTuning.from_env({"MESHPOS_MDNS_TTL": "4", "MESHPOS_STATUS_INTERVAL": "0.5"}) == NodeTuning(4, 0.5)
    assert NodeTuning.from_env({"MESHPOS_POWER_SUPPLY_DIR": "/x"}).power_root == Path("/x")
    with pytest.raises(ConfigError, match="MESHPOS_MDNS_TTL"):
        NodeTuning.from_env({"MESHPOS_MDNS_TTL": "soon"})
