"""`meshpos` commands against a running node go over the terminal API on NODE_DIR/api.sock:
the same `--json` shapes and exit codes as with the newline-JSON control socket they replace
(recorded from that code: tests/data/cli_outputs_control_socket.json, see tests/cli_scenario.py);
the node's own operations (/v1/node/...) only on the socket, never on TCP; clear errors for a node
that is not running and for a node of an older layout."""

from __future__ import annotations

import http.server
import json
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from api_harness import DOC, ApiClient, start, validate
from cli_scenario import enroll, meshpos, run_scenario, same_shape, shape, wait_running
from meshpos.apps.procs import ProcessGroup
from meshpos.node import client

RECORDED = Path(__file__).parent / "data" / "cli_outputs_control_socket.json"
NODE_PATHS = [("GET", "/v1/node/policy", None), ("GET", "/v1/node/sales", None),
              ("POST", "/v1/node/sales", {"amount_minor": 100}), ("PUT", "/v1/node/uplink", {"on": True}),
              ("POST", "/v1/node/ingest", {"raw": "x"}), ("GET", "/v1/node/report", None),
              ("GET", "/v1/node/statuses", None)]


# members of `--json` outputs added after the recording (a script reading the old ones is unaffected)
DOCUMENTED_ADDITIONS = [
    "status.uplink.switch_url",  # the switch instance reached (protocols/forwarding.md, "Switch instances")
    "status.uplink.instances",   # every instance with its failures and back-off (same)
]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One node process for the tests of this module (each starts a new Python: slow on a loaded host)."""
    root = tmp_path_factory.mktemp("cli")
    node = enroll(root)
    group = ProcessGroup(root / "logs")
    try:
        start(group, "t1", node)
        wait_running(node)
        yield node
    finally:
        group.stop_all()


def test_cli_over_the_socket_keeps_json_shapes_and_exit_codes(running: Path) -> None:
    recorded = json.loads(RECORDED.read_text())
    result = run_scenario(running)
    assert result["exit"] == recorded["exit"]
    changes = [d for name, old in recorded["json"].items() for d in same_shape(old, shape(result["json"][name]), name)]
    # members added since the recording, each documented where it is defined; nothing else changes
    assert sorted(changes) == sorted(f"{m}: new" for m in DOCUMENTED_ADDITIONS)
    assert not (running / "control.sock").exists()  # the old socket is gone
    st = result["json"]["status"]
    assert st["running"]["pid"] != 0 and st["api"]["socket"].endswith("api.sock")
    made = [result["json"]["sell_cash"]["id"], result["json"]["sell_card"]["id"]]
    assert [s["id"] for s in result["json"]["sales"] if s["id"] in made] == made
    assert result["json"]["void"]["status"] == "voided"


def test_commands_reach_the_running_process_not_the_directory(running: Path) -> None:
    """`uplink on` changes the running node at once (its status says so), and a `sell` lands in
    the running node's ledger: both answered by the process through the socket."""
    assert meshpos("uplink", str(running), "on").returncode == 0
    assert client.running(running).status()["uplink"]["allowed"] is True
    assert json.loads((running / "config.json").read_text())["uplink"] is True
    sale = json.loads(meshpos("sell", str(running), "--amount", "1.00", "--cash", "--json").stdout)
    held = client.running(running).sales()
    assert sale["id"] in {s["id"] for s in held}


def test_node_operations_are_served_on_the_socket_only(running: Path) -> None:
    tcp = ApiClient(running, "tcp")
    unix = ApiClient(running, "unix")
    try:
        for method, path, body in NODE_PATHS:
            answer = tcp.request(method, path, body, check=False)
            assert answer.status == 404, (method, path, answer.status)
            assert answer.body["error"]["code"] == "not_found"
        for method, path, body in NODE_PATHS:
            answer = unix.request(method, path, body)  # validated against the document
            assert answer.status in (200, 201, 400), (method, path, answer.status, answer.body)
        assert unix.request("POST", "/v1/node/ingest", {"raw": "x"}).status == 400
        assert unix.request("GET", "/v1/node/policy", auth=False).status == 401  # the token, besides the mode
    finally:
        tcp.close()
        unix.close()
    node_ops = [op for path, item in DOC["paths"].items() if path.startswith("/v1/node/") for op in item.values()]
    assert node_ops and all(op.get("x-socket-only") is True for op in node_ops)
    assert not any(op.get("x-socket-only") for path, item in DOC["paths"].items()
                   if not path.startswith("/v1/node/") for op in item.values() if isinstance(op, dict))


def test_a_void_through_the_api_says_whether_it_voided(running: Path) -> None:
    unix = ApiClient(running, "unix")
    try:
        sale = client.running(running).sell(250)
        first = unix.request("POST", f"/v1/sales/{sale['id']}/void", {})
        again = unix.request("POST", f"/v1/sales/{sale['id']}/void", {})
        assert (first.status, again.status) == (200, 200)
        assert (first.headers["void-outcome"], again.headers["void-outcome"]) == ("voided", "already-voided")
    finally:
        unix.close()


def test_a_node_that_is_not_running(tmp_path: Path) -> None:
    node = enroll(tmp_path)
    proc = meshpos("receipt", str(node), "x")
    assert proc.returncode == 10 and proc.stderr == f"meshpos: error: {node}: no running node\n"
    # commands that work on a stopped node open its directory, as before
    assert meshpos("sell", str(node), "--amount", "1.00", "--cash").returncode == 0
    assert "1 sale(s)" in meshpos("sales", str(node)).stdout


def test_a_node_of_the_older_layout_that_only_has_the_control_socket(tmp_path: Path) -> None:
    """An older meshpos runs there: it listens on NODE_DIR/control.sock, and has no api.sock."""
    node = enroll(tmp_path)
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(node / "control.sock"))
    old.listen(8)
    try:
        for args in (["status", str(node)], ["sales", str(node)], ["uplink", str(node), "on"]):
            proc = meshpos(*args)
            assert proc.returncode == 4, proc.stderr
            assert "older meshpos" in proc.stderr and "start it again with this version" in proc.stderr
            assert "Traceback" not in proc.stderr
    finally:
        old.close()
    # a control.sock left behind by an older node that stopped: nobody runs, the directory is used
    assert meshpos("status", str(node)).returncode == 0


class _OlderApi(http.server.BaseHTTPRequestHandler):
    """What a node of the version before /v1/node answered there: Starlette's 404."""

    def do_GET(self) -> None:
        if self.path == "/v1/status":
            self._answer(200, {"summary": {}, "node": {"node_id": "x"}, "events": {"last_id": "1-0"}})
        else:
            self._answer(404, {"error": {"code": "not_found", "message": "Not Found"}})

    do_POST = do_PUT = do_GET

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *args: Any) -> None:
        pass


class _UnixHttp(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def test_a_node_of_the_version_before_the_node_operations(tmp_path: Path) -> None:
    node = enroll(tmp_path)
    server = _UnixHttp(str(node / "api.sock"), _OlderApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proc = meshpos("sales", str(node))
        assert proc.returncode == 4 and "older meshpos" in proc.stderr, proc.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_the_document_describes_every_node_answer(running: Path) -> None:
    """The CLI's own answers are the document's: the sale list and the policy validate."""
    unix = ApiClient(running, "unix")
    try:
        made = client.running(running).sell(300)
        answer = unix.request("GET", "/v1/node/sales")
        validate("GET", "/v1/node/sales", answer.status, "application/json", answer.body)
        assert answer.body["sales"][-1]["id"] == made["id"]
        assert unix.request("GET", "/v1/node/policy").body["currency"] == "EUR"
    finally:
        unix.close()


class _CutOff(_OlderApi):
    """A node killed while answering: the status line and headers left, the body never did."""

    def do_POST(self) -> None:
        # the whole request is read first: a node that dies while answering has read it (closing
        # with it unread made the client's write fail first, now and then: another case)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True


def test_an_answer_cut_off_by_a_dying_node_is_an_error_not_an_empty_sale(tmp_path: Path) -> None:
    """The crash matrix kills nodes while they answer; a sale whose answer was cut off came back
    as None and broke its caller. It is an error that says the outcome is unknown."""
    node = enroll(tmp_path)
    server = _UnixHttp(str(node / "api.sock"), _CutOff)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(client.MeshposError, match="answer was cut off"):
            client.running(node).sell(100)
    finally:
        server.shutdown()
        server.server_close()
