"""The terminal API in tests: a node enrolled with ``--api 127.0.0.1:0`` run as a real process,
a small HTTP client for both transports (TCP and the UNIX socket), and the OpenAPI document's
schemas, against which every response a test receives is validated."""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from helpers import run_cli
from meshpos.apps.procs import ProcessGroup
from meshpos.node import client

ROOT = Path(__file__).resolve().parents[1]
DOC: dict[str, Any] = yaml.safe_load((ROOT / "protocols" / "terminal-api.yaml").read_text())


def make_site(root: Path, *names: str) -> Path:
    import nacl.signing

    from meshpos.identity import keys
    key = nacl.signing.SigningKey.generate()
    (root / "switch.pub").write_text(keys.x25519_public_of(key).hex() + "\n")
    run_cli("site", "init", str(root / "site"), "--name", "Sagra", "--switch-key", str(root / "switch.pub"),
            "--switch-url", "https://127.0.0.1:9", check=True)
    for name in names:
        run_cli("enroll", str(root / "site"), str(root / name), "--role", "terminal", "--name", name,
                "--api", "127.0.0.1:0", check=True)
    return root


def _template(path: str) -> str:
    parts = path.split("?")[0].split("/")
    for template in DOC["paths"]:
        t = template.split("/")
        if len(t) == len(parts) and all(a == b or a.startswith("{") for a, b in zip(t, parts)):
            return template
    raise AssertionError(f"{path} is not in the OpenAPI document")


def validate(method: str, path: str, status: int, content_type: str, body: Any) -> None:
    """The response matches what protocols/terminal-api.yaml says for it."""
    op = DOC["paths"][_template(path)][method.lower()]
    assert str(status) in op["responses"], f"{method} {path}: status {status} is not documented"
    response = op["responses"][str(status)]
    if "$ref" in response:
        response = DOC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    media = response["content"]
    kind = content_type.split(";")[0].strip()
    assert kind in media, f"{method} {path} {status}: content type {kind} not documented"
    if kind == "application/json":
        schema = {**DOC, **media[kind]["schema"]}  # $refs resolve against the whole document
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(body)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


class ApiClient:
    """One keep-alive connection to the API; every answer is validated against the document."""

    def __init__(self, node_dir: Path, transport: str, token: str | None = None, check: bool = True) -> None:
        self.node_dir = node_dir
        self.transport = transport
        self.check = check  # validate every answer against the document (benchmarks turn it off)
        self.token = token if token is not None else (node_dir / "api-token").read_text().strip()
        st = client.running(node_dir).status()
        self.url = st["api"]["url"]
        self.host_port = self.url.split("//", 1)[1].split("/", 1)[0]
        self.conn = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        if self.transport == "unix":
            return UnixHTTPConnection(str(self.node_dir / "api.sock"))
        host, port = self.host_port.rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=30)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                auth: bool = True, raw: bytes | None = None, check: bool = True) -> Answer:
        h = {"Host": self.host_port if self.transport == "tcp" else "localhost"}
        if auth:
            h["Authorization"] = f"Bearer {self.token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        try:
            self.conn.request(method, path, body=data, headers=h)
            resp = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = self._connect()
            self.conn.request(method, path, body=data, headers=h)
            resp = self.conn.getresponse()
        payload = resp.read()
        ctype = resp.getheader("content-type", "")
        value = json.loads(payload) if ctype.startswith("application/json") else payload
        if check and self.check:
            validate(method, path, resp.status, ctype, value)
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, value)

    def close(self) -> None:
        self.conn.close()


def start(group: ProcessGroup, name: str, node_dir: Path) -> None:
    group.start_node(name, node_dir, "--no-mdns", "--log-file", str(group.log_dir / f"{name}.file.log"))


class EventStream:
    """A client of GET /v1/events: reads SSE messages one by one."""

    def __init__(self, api: ApiClient, last_event_id: str | None = None, patience: float = 120.0,
                 check: bool = True) -> None:
        self.check = check
        self.deadline = time.monotonic() + patience  # the stream never ends: a missing event fails here
        self.conn = api._connect()
        headers = {"Host": api.host_port if api.transport == "tcp" else "localhost",
                   "Authorization": f"Bearer {api.token}", "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", "/v1/events", headers=headers)
        self.resp = self.conn.getresponse()
        validate("GET", "/v1/events", self.resp.status, self.resp.getheader("content-type", ""), None)
        first = self._message()
        assert first.get("comment", "").startswith("connected"), first

    def _message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {}
        while True:
            if time.monotonic() > self.deadline:
                raise AssertionError(f"the expected event did not come; last message so far: {msg}")
            line = self.resp.readline().decode()
            if line == "":
                raise EOFError("the event stream ended")
            line = line.rstrip("\n")
            if line == "":
                if msg:
                    return msg
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                msg.setdefault("comment", value)
            else:
                msg[field] = value

    def next(self) -> dict[str, Any]:
        """The next event (comments skipped): {"id", "event", "data" (parsed)}."""
        while True:
            msg = self._message()
            if "event" in msg or "data" in msg:
                msg["data"] = json.loads(msg["data"])
                if not self.check:
                    pass
                elif msg["event"].startswith("sale."):
                    validate_schema("Sale", msg["data"])
                elif msg["event"] == "node.status":
                    validate_schema("NodeSummary", msg["data"])
                return msg

    def close(self) -> None:
        self.conn.close()


def validate_schema(name: str, value: Any) -> None:
    schema = {**DOC, "$ref": f"#/components/schemas/{name}"}
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(value)


class SocketRelay:
    """A loopback TCP port whose connections are piped, byte for byte, to the node's UNIX socket:
    for a client that speaks only TCP (schemathesis) to reach what only the socket serves."""

    def __init__(self, unix_path: Path) -> None:
        import socketserver
        import threading

        target = str(unix_path)

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                up.connect(target)
                down: socket.socket = self.request

                def pump(src: socket.socket, dst: socket.socket) -> None:
                    try:
                        while data := src.recv(65536):
                            dst.sendall(data)
                    except OSError:
                        pass
                    finally:
                        for s in (src, dst):
                            try:
                                s.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                back = threading.Thread(target=pump, args=(up, down), daemon=True)
                back.start()
                pump(down, up)
                back.join()
                up.close()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Pipe)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
