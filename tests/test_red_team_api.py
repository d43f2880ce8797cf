"""Red-team attacks on the terminal API (issue 14) from a hostile or careless POS app, against a
real node process over real HTTP on loopback (tests/api_harness.py validates every answer against
protocols/terminal-api.yaml)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from api_harness import ApiClient, EventStream, make_site, start
from helpers import TEST_PANS, scan_for
from meshpos.apps.procs import ProcessGroup, wait_for
from meshpos.node import client

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


@pytest.mark.parametrize("form", ["{pan}", "order-{pan}-retry", "{spaced}"])
def test_a_card_number_as_idempotency_key_is_refused_and_stored_nowhere(
        api: ApiClient, node: Path, form: str) -> None:
    """Attack (a careless POS app): the card number as the sale's Idempotency-Key. The node took
    it, stored it beside the sale in its SQLite file and echoed it in the sale object (API,
    events, `sales --json`) and the Idempotency-Key response header. Now such a key is a 400 that
    says why, and the number is nowhere on disk or in the answer."""
    for pan in TEST_PANS:
        spaced = " ".join(pan[i:i + 4] for i in range(0, len(pan), 4))
        answer = api.request("POST", "/v1/sales", CASH, {"Idempotency-Key": form.format(pan=pan, spaced=spaced)})
        assert answer.status == 400, answer.body
        assert "card number" in answer.body["error"]["message"]
        assert pan not in repr(answer.body) + repr(answer.headers)
    assert not scan_for(node, [p.encode() for p in TEST_PANS])


def test_keys_that_only_look_numeric_are_still_taken(api: ApiClient) -> None:
    """The refusal above must not catch real keys: UUIDs (whose groups hold at most 12 digits),
    millisecond timestamps and short order numbers."""
    for k in ("12345678-1234-4123-9123-123456789012", "pos1-1733115600123", "1733115600123",
              "order 000123 attempt 2"):
        assert api.request("POST", "/v1/sales", CASH, {"Idempotency-Key": k}).status == 201, k


def test_paging_with_a_status_filter_lists_every_sale(tmp_path: Path) -> None:
    """Found while attacking the listing: with a status filter, a page that filled up in the middle
    of a short last batch of rows was taken for the last page (next_cursor null), so the sales
    after it in that batch were never listed. Paid, paid, voided, paid, paid with
    ``status=paid&limit=3``: the fourth paid sale was missing."""
    make_site(tmp_path, "t2")
    node = tmp_path / "t2"
    group = ProcessGroup(tmp_path / "logs")
    try:
        start(group, "t2", node)
        api = ApiClient(node, "tcp")
        made = [api.request("POST", "/v1/sales", CASH, {"Idempotency-Key": str(uuid.uuid4())}).body["id"]
                for _ in range(5)]
        assert api.request("POST", f"/v1/sales/{made[2]}/void", {"reason": "wrong amount"}).status == 200
        listed, cursor = [], None
        for _ in range(10):
            page = api.request("GET", "/v1/sales?status=paid&limit=3" + (f"&cursor={cursor}" if cursor else "")).body
            listed += [s["id"] for s in page["sales"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        api.close()
    finally:
        group.stop_all()
    assert listed == [made[0], made[1], made[3], made[4]]


def test_a_sale_id_in_an_error_is_not_taken_for_a_card_number() -> None:
    """The 409 for a reused key names the first sale; when the node id ends in digits (1927dc40e0113749),
    its last digits and the sale number made a 15-digit run, and the message lost the sale id as a
    "card number" (tests/test_terminal_api.py's conflict test failed for such node ids). A sale id
    whose node id is all digits could be a card number, and is still blanked."""
    from meshpos.terminal.problems import redact

    message = "Idempotency-Key 'k' was used for another request (sale 1927dc40e0113749-00000003): use a new key"
    assert redact(message) == message
    assert "4111111111111111" not in redact("no sale '4111111111111111-00000001' on this node")
    assert "4111111111111111" not in redact("sale 1927dc40e0113749-00000003 card 4111111111111111")
    assert "1927dc40e0113749-00000003" in redact("sale 1927dc40e0113749-00000003 card 4111111111111111")


def test_a_lone_surrogate_in_free_text_is_a_422_not_a_500(api: ApiClient, node: Path) -> None:
    """Attack: JSON may spell a lone UTF-16 surrogate (``"\\ud800"``), which json.loads turns into
    a str that has no UTF-8 form. In a sale's description or a void's reason it passed every text
    rule and failed when the envelope was encoded for signing: 500 and a traceback in the log.
    Now the text rule refuses it (422, as any other bad description), and nothing is signed."""
    raw = b'{"amount": "1.00", "method": "cash", "description": "caf\\ud800"}'
    answer = api.request("POST", "/v1/sales", raw=raw, headers={"Idempotency-Key": str(uuid.uuid4()),
                                                                "Content-Type": "application/json"})
    assert answer.status == 422, answer.body
    assert "surrogate" in answer.body["error"]["message"]
    sale = api.request("POST", "/v1/sales", CASH, {"Idempotency-Key": str(uuid.uuid4())}).body
    answer = api.request("POST", f"/v1/sales/{sale['id']}/void", raw=b'{"reason": "\\udfff"}',
                         headers={"Content-Type": "application/json"})
    assert answer.status == 422, answer.body
    assert api.request("GET", f"/v1/sales/{sale['id']}").body["status"] == "paid"  # not voided
    log = b"".join(p.read_bytes() for p in (node.parent / "logs").glob("t1*"))
    assert b"UnicodeEncodeError" not in log and b"Traceback" not in log


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_and_half_sent_connections_are_bounded_and_closed(tmp_path: Path) -> None:
    """Attack (slowloris, from any local program: the loopback API needs no token to connect):
    600 connections that each send half a request and then nothing. Every one was held, open,
    for as long as the client liked (a file descriptor each: under systemd's default limit of
    1,024 the node could then open no link, file or database). So were connections that only
    ever got 401s. Now a connection with no request past the Guard is closed after a few
    seconds, at most a bounded number are held at once, and an authenticated event stream
    stays open for as long as the client reads it."""
    make_site(tmp_path, "t3")
    group = ProcessGroup(tmp_path / "logs")
    try:
        child = group.start_node("t3", tmp_path / "t3", "--no-mdns")
        assert child.proc is not None
        pid = child.proc.pid
        api = ApiClient(tmp_path / "t3", "tcp")
        stream = EventStream(api)  # authenticated: must outlive the attack
        before = _open_fds(pid)
        host, port = api.host_port.rsplit(":", 1)
        attackers = []
        for i in range(600):
            s = socket.create_connection((host, int(port)))
            if i % 2:
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: " + api.host_port.encode() + b"\r\nX-Slow: ")
            else:  # whole requests, without the token: each answered 401, never authenticated
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: " + api.host_port.encode() + b"\r\n\r\n")
            attackers.append(s)
        time.sleep(1.0)
        assert _open_fds(pid) < before + 100, (before, _open_fds(pid))
        wait_for(lambda: all(_closed(s) for s in attackers), 60, lambda: "half-sent connections stay open")
        for s in attackers:
            s.close()
        assert _open_fds(pid) < before + 10
        api.conn.close()
        api.conn = api._connect()
        sale = api.request("POST", "/v1/sales", CASH, {"Idempotency-Key": str(uuid.uuid4())})
        assert sale.status == 201
        events = [stream.next() for _ in range(1)]  # the stream was not cut with the attackers
        while not any(e["event"] == "sale.created" and e["data"]["id"] == sale.body["id"] for e in events):
            events.append(stream.next())
        stream.close()
        api.close()
        log = (tmp_path / "logs" / "t3.log").read_text()
        assert "refused terminal API connection" in log and "Traceback" not in log
    finally:
        group.stop_all()


def test_connections_the_client_closed_free_their_slot_at_once(tmp_path: Path) -> None:
    """Found by CI (the failover test polls a node's sales ten times a second): a connection the
    client closed after one request kept its slot until the keep-alive timer (75 s) ran out, so
    after 256 CLI calls in 75 s the node refused its own CLI ('256 connections held'). 400 calls,
    each on a new connection, over the UNIX socket the CLI uses and over TCP as a till would:
    every one is answered and the node holds no connection afterwards."""
    make_site(tmp_path, "t4")
    group = ProcessGroup(tmp_path / "logs")
    try:
        child = group.start_node("t4", tmp_path / "t4", "--no-mdns")
        assert child.proc is not None
        before = _open_fds(child.proc.pid)
        for _ in range(400):
            live = client.running(tmp_path / "t4")
            assert live.policy().site_id
        tcp = ApiClient(tmp_path / "t4", "tcp")
        for _ in range(400):
            tcp.conn.close()
            tcp.conn = tcp._connect()
            assert tcp.request("GET", "/v1/sales?limit=1").status == 200
        tcp.close()
        wait_for(lambda: _open_fds(child.proc.pid) < before + 5, 5,  # type: ignore[union-attr]
                 lambda: f"{_open_fds(child.proc.pid)} fds open, {before} before")  # type: ignore[union-attr]
        assert "connections held" not in (tmp_path / "logs" / "t4.log").read_text()
    finally:
        group.stop_all()


def _closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if data == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_an_event_stream_client_that_stops_reading_is_disconnected(tmp_path: Path) -> None:
    """Attack (or a till's tablet that goes to sleep with its event stream open): a client that
    subscribes to /v1/events and then never reads. Once its socket buffers were full, Hypercorn
    waited for it for ever, in a write that nothing could cancel: the connection was held for
    good (enough of them fill the connection cap), and the node did not stop on SIGTERM for as
    long as that client stayed. Now a client that takes no byte for WRITE_STALL_S is dropped;
    the node goes on selling meanwhile and stops when told."""
    make_site(tmp_path, "t4")
    group = ProcessGroup(tmp_path / "logs")
    try:
        child = group.start_node("t4", tmp_path / "t4", "--no-mdns")
        assert child.proc is not None
        api = ApiClient(tmp_path / "t4", "tcp")
        host, port = api.host_port.rsplit(":", 1)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        stuck.connect((host, int(port)))
        stuck.sendall(f"GET /v1/events HTTP/1.1\r\nHost: {api.host_port}\r\n"
                      f"Authorization: Bearer {api.token}\r\n\r\n".encode())
        assert stuck.recv(12) == b"HTTP/1.1 200"  # subscribed; from here on it reads nothing
        body = {"amount": "1.00", "method": "cash", "description": "x" * 190}
        for _ in range(300):  # ~250 kB of events: far more than the two socket buffers hold
            assert api.request("POST", "/v1/sales", body, {"Idempotency-Key": str(uuid.uuid4())}).status == 201
        api.close()
        wait_for(lambda: not _held_by_a_process(int(port), stuck.getsockname()[1]), 90,
                 "the node still holds the connection of a client that stopped reading")
        group.stop("t4", timeout=60)
        assert child.proc.returncode is not None and child.proc.returncode != -9, child.proc.returncode
        stuck.close()
        assert "Traceback" not in (tmp_path / "logs" / "t4.log").read_text()
    finally:
        group.stop_all()


def _held_by_a_process(server_port: int, client_port: int) -> bool:
    """Whether the server end of the loopback TCP connection between these ports is still a
    process's socket (an inode in /proc/net/tcp; 0 once the process closed it)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return inode != "0"
    return False
