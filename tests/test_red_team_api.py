"""Red-team attacks on the terminal API (issue 14) from a hostile or careless POS app, against a
real node process over real HTTP on loopback (tests/api_harness.py validates every answer against
protocols/terminal-api.yaml)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from api_harness import ApiClient, make_site, start
from meshpos.apps.procs import ProcessGroup

CASH = {"amount": "1.00", "method": "cash"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("redapi")
    make_site(root, "t1")
    group = ProcessGroup(root / "logs")
    start(group, "t1", root / "t1")
    yield root / "t1"
    group.stop_all()


@pytest.fixture
def api(node: Path) -> Iterator[ApiClient]:
    c = ApiClient(node, "tcp")
    yield c
    c.close()


def test_deeply_nested_json_is_a_400_not_a_500(api: ApiClient, node: Path) -> None:
    """Attack: a body of 10,000 nested objects (40 kB, under the size limit). json.loads raised
    RecursionError, which the API did not take for bad JSON: 500 and a traceback in the log."""
    deep = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    for path in ("/v1/sales", "/v1/sales/x/void", "/v1/sales/x/receipt"):
        answer = api.request("POST", path, raw=deep, headers={"Idempotency-Key": str(uuid.uuid4()),
                                                              "Content-Type": "application/json"})
        assert answer.status == 400, (path, answer.status, answer.body)
        assert "JSON" in answer.body["error"]["message"]
    assert api.request("POST", "/v1/sales", CASH, {"Idempotency-Key": str(uuid.uuid4())}).status == 201
    log = b"".join(p.read_bytes() for p in (node.parent / "logs").glob("t1*"))
    assert b"RecursionError" not in log and b"Traceback" not in log
