"""The terminal API against a real node process (``meshpos run``), on both transports: the TCP
listener on loopback and NODE_DIR/api.sock. Every response is validated against
protocols/terminal-api.yaml (tests/api_harness.py)."""

from __future__ import annotations

import json
import stat
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from api_harness import ApiClient, EventStream, make_site, start
from helpers import TEST_PANS, run_cli, scan_for
from meshpos.apps.procs import ProcessGroup
from meshpos.node import client

TRANSPORTS = ("tcp", "unix")
CASH = {"amount": "12.50", "method": "cash"}
VISA = {"amount": "3.20", "method": "card", "card": {"pan": "4111111111111111", "expiry": "1230"}}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("api")
    make_site(root, "t1")
    group = ProcessGroup(root / "logs")
    start(group, "t1", root / "t1")
    yield root / "t1"
    group.stop_all()


@pytest.fixture(params=TRANSPORTS)
def api(request: pytest.FixtureRequest, node: Path) -> Iterator[ApiClient]:
    c = ApiClient(node, request.param)
    yield c
    c.close()


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def own_sales(api: ApiClient) -> list[dict[str, Any]]:
    out, cursor = [], None
    while True:
        page = api.request("GET", "/v1/sales?limit=500" + (f"&cursor={cursor}" if cursor else "")).body
        out += page["sales"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def test_a_sale_is_created_once_and_the_same_key_answers_the_same_sale(api: ApiClient) -> None:
    k = key()
    first = api.request("POST", "/v1/sales", CASH, k)
    assert first.status == 201 and first.body["status"] == "paid" and first.body["amount"] == "12.50"
    assert first.body["idempotency_key"] == k["Idempotency-Key"]
    assert first.headers["location"] == f"/v1/sales/{first.body['id']}"
    before = len(own_sales(api))
    again = api.request("POST", "/v1/sales", {"method": "cash", "amount": "12.50"}, k)  # key order differs
    assert again.status == 200 and again.body["id"] == first.body["id"]
    assert len(own_sales(api)) == before
    assert api.request("GET", f"/v1/sales/{first.body['id']}").body == again.body
    # the same object as `meshpos sales --json` (through the node, as the CLI reads it)
    listed = {s["id"]: s for s in client.running(api.node_dir).sales()}
    assert listed[first.body["id"]] == again.body


def test_the_same_key_with_another_body_is_a_conflict(api: ApiClient) -> None:
    k = key()
    made = api.request("POST", "/v1/sales", CASH, k)
    other = api.request("POST", "/v1/sales", {**CASH, "amount": "12.51"}, k)
    assert other.status == 409 and other.body["error"]["code"] == "conflict"
    assert made.body["id"] in other.body["error"]["message"]


def test_concurrent_requests_with_one_key_make_one_sale(api: ApiClient) -> None:
    k = key()
    before = len(own_sales(api))
    answers: list[Any] = []
    barrier = threading.Barrier(8)

    def post() -> None:
        c = ApiClient(api.node_dir, api.transport)
        try:
            barrier.wait()
            answers.append(c.request("POST", "/v1/sales", VISA, k))
        finally:
            c.close()

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status for a in answers) == [200] * 7 + [201]
    assert len({a.body["id"] for a in answers}) == 1
    assert len(own_sales(api)) == before + 1


def test_a_sale_without_idempotency_key_is_refused(api: ApiClient) -> None:
    before = len(own_sales(api))
    got = api.request("POST", "/v1/sales", CASH)
    assert got.status == 400 and "Idempotency-Key" in got.body["error"]["message"]
    assert len(own_sales(api)) == before


@pytest.mark.parametrize("body,status,words", [
    ({"amount": "1e2", "method": "cash"}, 400, "plain decimal"),
    ({"amount": "-5", "method": "cash"}, 400, "greater than zero"),
    ({"amount": 5, "method": "cash"}, 400, "string"),
    ({"amount": "5", "method": "cheque"}, 400, "method"),
    ({"amount": "5", "method": "card"}, 400, "either"),
    ({"amount": "5", "method": "cash", "pan": "4111111111111111"}, 400, "unknown fields"),
    ({"amount": "4111111111111111", "method": "cash"}, 400, "not a number"),
    ({"amount": "5", "method": "card", "card": {"pan": "4111111111111112", "expiry": "1230"}}, 422, "check"),
    ({"amount": "5", "method": "card", "card": {"pan": "4111111111111111", "expiry": "0120"}}, 422, "expired"),
    ({"amount": "5", "method": "cash", "description": "card 4111 1111 1111 1111"}, 422, "card number"),
    ({"amount": "999999", "method": "cash"}, 422, "cap"),
    ({"amount": "5", "method": "card", "reader": True}, 422, "no card reader"),
])
def test_bad_sales_get_a_clear_error_without_the_card_number(api: ApiClient, body: dict[str, Any], status: int,
                                                               words: str) -> None:
    got = api.request("POST", "/v1/sales", body, key())
    assert got.status == status, got.body
    message = got.body["error"]["message"]
    assert words in message, message
    assert not any(pan in message or pan[:12] in message for pan in (*TEST_PANS, "4111111111111112")), message


def test_malformed_json_and_oversize_bodies(api: ApiClient) -> None:
    assert api.request("POST", "/v1/sales", raw=b"{nope", headers=key()).status == 400
    assert api.request("POST", "/v1/sales", raw=b"[1, 2]", headers=key()).status == 400
    big = api.request("POST", "/v1/sales", raw=b'{"amount": "' + b"1" * 70000 + b'"}', headers=key())
    assert big.status == 413


def test_without_the_token_every_route_is_401(api: ApiClient) -> None:
    for method, path in (("GET", "/v1/status"), ("GET", "/v1/sales"), ("POST", "/v1/sales"),
                         ("GET", "/v1/events"), ("GET", "/v1/openapi.json")):
        got = api.request(method, path, auth=False, headers=key())
        assert got.status == 401, (method, path)
        assert got.headers["www-authenticate"].startswith("Bearer")
    wrong = ApiClient(api.node_dir, api.transport, token="x" * 43)
    try:
        assert wrong.request("GET", "/v1/status").status == 401
        assert wrong.request("POST", "/v1/sales", CASH, key()).status == 401
    finally:
        wrong.close()


def test_a_foreign_origin_cannot_change_anything(api: ApiClient) -> None:
    before = len(own_sales(api))
    got = api.request("POST", "/v1/sales", CASH, {**key(), "Origin": "http://evil.example"})
    assert got.status == 403 and got.body["error"]["code"] == "forbidden"
    sale = api.request("POST", "/v1/sales", CASH, key()).body
    assert api.request("POST", f"/v1/sales/{sale['id']}/void", headers={"Origin": "null"}).status == 403
    assert api.request("GET", f"/v1/sales/{sale['id']}").body["status"] == "paid"
    assert len(own_sales(api)) == before + 1
    # reading is allowed from anywhere that has the token (a page cannot read the answer anyway)
    assert api.request("GET", "/v1/status", headers={"Origin": "http://evil.example"}).status == 200
    if api.transport == "tcp":  # the API's own origin may post (the cashier app)
        own = api.request("POST", "/v1/sales", CASH, {**key(), "Origin": f"http://{api.host_port}"})
        assert own.status == 201


def test_a_foreign_host_is_refused_on_tcp(node: Path) -> None:
    api = ApiClient(node, "tcp")
    port = api.host_port.rsplit(":", 1)[1]
    try:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", f"192.168.1.1:{port}"):
            got = api.request("GET", "/v1/status", headers={"Host": host})
            assert got.status == 403 and "Host" in got.body["error"]["message"], host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
            assert api.request("GET", "/v1/status", headers={"Host": host}).status == 200
    finally:
        api.close()


def test_void_is_idempotent(api: ApiClient) -> None:
    sale = api.request("POST", "/v1/sales", VISA, key()).body
    first = api.request("POST", f"/v1/sales/{sale['id']}/void", {"reason": "wrong amount"})
    assert first.status == 200 and first.body["status"] == "voided"
    again = api.request("POST", f"/v1/sales/{sale['id']}/void")
    assert again.status == 200 and again.body == first.body
    assert api.request("POST", "/v1/sales/nope-1/void").status == 404
    bad = api.request("POST", f"/v1/sales/{api.request('POST', '/v1/sales', CASH, key()).body['id']}/void",
                      {"reason": "card 4111111111111111"})
    assert bad.status == 422 and "4111111111111111" not in bad.body["error"]["message"]


def test_listing_filters_and_pages(api: ApiClient) -> None:
    made = [api.request("POST", "/v1/sales", VISA if i % 2 else CASH, key()).body for i in range(5)]
    since = made[0]["created_at"]
    cards = api.request("GET", f"/v1/sales?method=card&since={since}").body["sales"]
    assert [s["id"] for s in cards] == [s["id"] for s in made if s["method"] == "card"]
    pages, cursor = [], None
    while True:
        page = api.request("GET", f"/v1/sales?since={made[0]['created_at_ms']}&limit=2"
                           + (f"&cursor={cursor}" if cursor else "")).body
        pages.append(page["sales"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [s["id"] for p in pages for s in p] == [s["id"] for s in made]
    assert all(len(p) <= 2 for p in pages)
    voided = api.request("GET", "/v1/sales?status=voided").body["sales"]
    assert voided and all(s["status"] == "voided" for s in voided)
    for bad in ("status=lost", "method=cheque", "limit=0", "limit=x", "since=yesterday", "cursor=zz", "foo=1"):
        assert api.request("GET", f"/v1/sales?{bad}").status == 400, bad


def test_receipt_without_a_printer_says_so(api: ApiClient) -> None:
    sale = api.request("POST", "/v1/sales", CASH, key()).body
    got = api.request("POST", f"/v1/sales/{sale['id']}/receipt", {"copy": "customer"})
    assert got.status == 422 and "printer" in got.body["error"]["message"]
    assert api.request("POST", "/v1/sales/nope-9/receipt").status == 404
    assert api.request("POST", f"/v1/sales/{sale['id']}/receipt", {"copy": "all"}).status == 400


def test_status_and_the_served_document(api: ApiClient) -> None:
    st = api.request("GET", "/v1/status").body
    assert st["summary"]["node_id"] == st["node"]["node_id"]
    assert st["node"]["api"]["socket"].endswith("api.sock") and st["node"]["api"]["error"] is None
    doc = api.request("GET", "/v1/openapi.json").body
    assert doc["openapi"].startswith("3.1") and "/v1/sales" in doc["paths"]
    shown = run_cli("status", str(api.node_dir), check=True).stdout  # where a person finds the API
    assert f'"url": "{api.url}"' in shown and "api.sock" in shown


def test_the_sale_created_event_carries_the_sale_as_answered(api: ApiClient) -> None:
    """The sale object is the same everywhere: the event of a new sale is the 201's body, with its
    idempotency key (the event was read before the key was stored, and carried none)."""
    stream = EventStream(api)
    k = key()
    sold = api.request("POST", "/v1/sales", VISA, k).body
    while True:
        ev = stream.next()
        if ev["event"] == "sale.created" and ev["data"]["id"] == sold["id"]:
            break
    stream.close()
    assert ev["data"]["idempotency_key"] == k["Idempotency-Key"]
    assert ev["data"] == sold


def test_events_resume_with_last_event_id_without_gaps_or_duplicates(api: ApiClient) -> None:
    stream = EventStream(api)
    made = [api.request("POST", "/v1/sales", CASH, key()).body["id"] for _ in range(3)]
    seen = []
    while len(seen) < 2:
        ev = stream.next()
        if ev["event"] == "sale.created":
            seen.append(ev)
    stream.close()
    assert [e["data"]["id"] for e in seen] == made[:2]
    voided = api.request("POST", f"/v1/sales/{made[0]}/void").body
    made.append(api.request("POST", "/v1/sales", CASH, key()).body["id"])
    again = EventStream(api, last_event_id=seen[-1]["id"])
    got = []
    while len(got) < 3:
        ev = again.next()
        if ev["event"].startswith("sale."):
            got.append(ev)
    again.close()
    assert [(e["event"], e["data"]["id"]) for e in got] == [
        ("sale.created", made[2]), ("sale.voided", made[0]), ("sale.created", made[3])]
    assert got[1]["data"] == voided
    seqs = [int(e["id"].split("-")[1]) for e in seen + got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    stale = EventStream(api, last_event_id="1-5")  # another run of the node
    assert stale.next()["event"] == "resync"
    stale.close()


def test_a_node_directory_without_a_token_gets_one_on_first_run(tmp_path: Path) -> None:
    make_site(tmp_path, "old")
    token_file = tmp_path / "old" / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # made at enrollment
    token_file.unlink()  # a node enrolled before the terminal API
    group = ProcessGroup(tmp_path / "logs")
    try:
        start(group, "old", tmp_path / "old")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        api = ApiClient(tmp_path / "old", "unix")
        assert api.request("GET", "/v1/status").status == 200
        api.close()
    finally:
        group.stop_all()


def test_after_sigkill_and_restart_the_same_key_finds_its_sale(tmp_path: Path) -> None:
    make_site(tmp_path, "t9")
    node = tmp_path / "t9"
    group = ProcessGroup(tmp_path / "logs")
    try:
        start(group, "t9", node)
        api = ApiClient(node, "tcp")
        keys = [key() for _ in range(5)]
        made = [api.request("POST", "/v1/sales", VISA, k).body for k in keys]
        api.close()
        group.kill("t9")  # SIGKILL right after the answers: they were durable
        start(group, "t9", node)
        for transport in TRANSPORTS:
            api = ApiClient(node, transport)
            for k, sale in zip(keys, made):
                again = api.request("POST", "/v1/sales", VISA, k)
                assert again.status == 200 and again.body["id"] == sale["id"]
            assert api.request("POST", "/v1/sales", CASH, keys[0]).status == 409
            assert len(own_sales(api)) == 5
            api.close()
    finally:
        group.stop_all()


def test_no_card_number_in_answers_events_logs_or_files(tmp_path: Path) -> None:
    make_site(tmp_path, "t3")
    node = tmp_path / "t3"
    group = ProcessGroup(tmp_path / "logs")
    try:
        start(group, "t3", node)
        api = ApiClient(node, "tcp")
        stream = EventStream(api)
        bodies = []
        for pan in TEST_PANS:
            sale = api.request("POST", "/v1/sales", {"amount": "2.00", "method": "card",
                                                      "card": {"pan": pan, "expiry": "1230"}}, key())
            bodies.append(sale.body)
            api.request("POST", "/v1/sales", {"amount": pan, "method": "cash"}, key())
            api.request("POST", "/v1/sales", {"amount": "1", "method": "cash", "description": pan}, key())
            api.request("POST", f"/v1/sales/{sale.body['id']}/void", {"reason": pan})
        events = [stream.next() for _ in range(len(TEST_PANS))]
        stream.close()
        api.close()
    finally:
        group.stop_all()
    assert all(b["card_last4"] and b["card_brand"] for b in bodies)
    text = repr(bodies) + repr(events)
    assert not [p for p in TEST_PANS if p in text]
    assert not scan_for(tmp_path, [p.encode() for p in TEST_PANS])


def test_off_loopback_the_api_is_https_only_with_the_nodes_certificate(tmp_path: Path) -> None:
    import http.client
    import json
    import ssl

    make_site(tmp_path)
    node = tmp_path / "gw"
    run_cli("enroll", str(tmp_path / "site"), str(node), "--role", "terminal", "--name", "gw",
            "--api", "0.0.0.0:0", check=True)
    group = ProcessGroup(tmp_path / "logs")
    try:
        start(group, "gw", node)
        url = client.running(node).status()["api"]["url"]
        assert url.startswith("https://")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        token = (node / "api-token").read_text().strip()
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/v1/status", headers={"Authorization": f"Bearer {token}"})
            plain.getresponse().read()
        plain.close()
        ctx = ssl.create_default_context(cafile=str(node / "ca.pem"))
        ctx.check_hostname = False  # the certificate names the node id; the chain is what is checked
        tls = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        tls.request("GET", "/v1/status", headers={"Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{port}"})
        resp = tls.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["summary"]["node_id"]
        tls.request("POST", "/v1/sales", body=json.dumps(CASH), headers={
            "Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{port}", "Idempotency-Key": "a",
            "Origin": f"http://127.0.0.1:{port}"})  # not the API's origin: that is https
        resp = tls.getresponse()
        assert resp.status == 403
        resp.read()
        tls.close()
    finally:
        group.stop_all()


def test_a_node_configured_with_a_reader_takes_the_card_from_it(tmp_path: Path) -> None:
    """config.json "reader": {"kind": "simulated", "card": NAME} gives the API (and the cashier
    app) a card reader: "reader": true reads NAME's card, sealed at the read. A reader setting the
    node cannot use is logged and leaves the node selling without one (422 for a reader sale)."""
    make_site(tmp_path, "t1", "t2")
    for name, reader in (("t1", {"kind": "simulated", "card": "mastercard-contactless"}),
                         ("t2", {"kind": "simulated", "card": "no-such-card"})):
        cfg_path = tmp_path / name / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["reader"] = reader
        cfg_path.write_text(json.dumps(cfg))
    group = ProcessGroup(tmp_path / "logs")
    try:
        start(group, "t1", tmp_path / "t1")
        start(group, "t2", tmp_path / "t2")
        api = ApiClient(tmp_path / "t1", "tcp")
        made = api.request("POST", "/v1/sales", {"amount": "7.00", "method": "card", "reader": True}, key())
        assert made.status == 201, made.body
        assert made.body["card_brand"] == "mastercard" and made.body["card_last4"] == "4444"
        assert made.body["status"] == "pending"
        api.close()
        other = ApiClient(tmp_path / "t2", "tcp")
        refused = other.request("POST", "/v1/sales", {"amount": "7.00", "method": "card", "reader": True}, key())
        assert refused.status == 422 and "no card reader" in refused.body["error"]["message"]
        assert other.request("POST", "/v1/sales", CASH, key()).status == 201  # it sells on
        other.close()
        assert "card reader not used: reader: card must be one of" in (group.log_dir / "t2.file.log").read_text()
    finally:
        group.stop_all()
