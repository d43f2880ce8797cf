"""Reach a node: its running process through the terminal API on ``NODE_DIR/api.sock`` (HTTP/1.1
over the UNIX socket, protocols/terminal-api.yaml), or, when no node runs, its directory opened
directly; the same typed operations either way (meshpos.node.ops).

Errors come back as the error they were on the node: an answer's ``error.type`` names the class
of meshpos.domain.errors, so a command's message and exit code are the same whether the node
runs or not.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from meshpos.domain import errors
from meshpos.domain.errors import ConfigError, InputError, MeshposError, NodeNotRunningError
from meshpos.domain.jsonable import from_jsonable, json_object
from meshpos.node.ops import (
    IngestRequest, Ingested, PeerStatuses, PolicyView, Reprinted, SaleList, SealedCard, SellRequest,
    UplinkRequest, UplinkState,
)
from meshpos.site.apitoken import read_api_token
from meshpos.site.nodedir import NodeDir

MAX_REPLY = 64 * 1024 * 1024
LEGACY_CONTROL_SOCKET = "control.sock"  # the newline-JSON socket of meshpos before the terminal API took it over
IDLE_RECONNECT_S = 5.0  # well under the node's keep-alive timeout (meshpos.terminal.server.KEEP_ALIVE_S) and the 10 s in which a new connection must send a request (API_LIMITS.proof_timeout)

# the error of an answer without ``error.type`` (another server), by its ``error.code``
_BY_CODE: dict[str, type[MeshposError]] = {
    "bad_request": errors.InputError, "not_found": errors.InputError, "conflict": errors.InputError,
    "unprocessable": errors.PolicyError, "disk_full": errors.DiskFullError, "unavailable": errors.StoreError,
}


class Node(Protocol):
    """What the CLI and the tools do with a node, running or not."""

    def status(self) -> dict[str, Any]: ...
    def policy(self) -> PolicyView: ...
    def sell(self, amount_minor: int, card: SealedCard | None = None,
             description: str | None = None) -> dict[str, Any]: ...
    def sales(self, terminal: str | None = None) -> list[dict[str, Any]]: ...
    def sale(self, sale_id: str) -> dict[str, Any]: ...
    def void(self, sale_id: str, reason: str | None = None) -> dict[str, Any]: ...
    def ingest(self, raw: bytes) -> Ingested: ...
    def uplink(self, on: bool) -> UplinkState: ...


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class RunningNode:
    """A running node's terminal API over its UNIX socket, with the bearer token of
    ``NODE_DIR/api-token``. Inside ``with``: one keep-alive connection, made on first use;
    outside: a connection per request (``running(node_dir).status()``)."""

    def __init__(self, node_dir: Path, timeout: float = 30.0) -> None:
        self.node_dir = node_dir
        self.dir = NodeDir(node_dir)
        self.timeout = timeout
        self._conn: _UnixConnection | None = None
        self._used = 0.0  # time.monotonic() of the last answer on self._conn
        self._token: str | None = None
        self._keep = False
        self._headers: dict[str, str] = {}  # of the last answer

    def __enter__(self) -> "RunningNode":
        self._keep = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._keep = False
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def connect(self) -> None:
        """Reach the node now: NodeNotRunningError if nobody listens, ConfigError if an older
        meshpos runs there."""
        if self._conn is not None:
            return
        path = self.dir.api_socket_path
        conn = _UnixConnection(path, self.timeout)
        try:
            conn.connect()
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            self._refuse_older_node()
            raise NodeNotRunningError(f"{self.node_dir}: no running node") from exc
        except OSError as exc:
            raise MeshposError(f"{self.node_dir}: cannot reach the node's API socket: {exc.strerror or exc}") from exc
        self._conn = conn
        self._used = time.monotonic()

    def _refuse_older_node(self) -> None:
        legacy = self.node_dir / LEGACY_CONTROL_SOCKET
        if not legacy.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2.0)
            probe.connect(str(legacy))
        except OSError:
            return  # a socket file left by an older node that stopped: nobody runs
        finally:
            probe.close()
        raise ConfigError(older_node_message(self.node_dir))

    # -- the operations ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The node's whole status, as ``meshpos status --json`` prints it."""
        answer = self.request("GET", "/v1/status")
        node: dict[str, Any] = answer["node"]
        return node

    def policy(self) -> PolicyView:
        return from_jsonable(PolicyView, self.request("GET", "/v1/node/policy"), "policy")

    def sell(self, amount_minor: int, card: SealedCard | None = None,
             description: str | None = None) -> dict[str, Any]:
        sale: dict[str, Any] = self.request("POST", "/v1/node/sales", SellRequest(amount_minor, card, description))
        return sale

    def sales(self, terminal: str | None = None) -> list[dict[str, Any]]:
        query = "" if terminal is None else "?" + urllib.parse.urlencode({"terminal": terminal})
        return from_jsonable(SaleList, self.request("GET", "/v1/node/sales" + query), "sales").sales

    def sale(self, sale_id: str) -> dict[str, Any]:
        sale: dict[str, Any] = self.request("GET", f"/v1/sales/{_segment(sale_id)}")
        return sale

    def void(self, sale_id: str, reason: str | None = None) -> dict[str, Any]:
        """As NodeCore.void: a sale voided before is an InputError (the API's void answers it)."""
        body = {} if reason is None else {"reason": reason}
        sale: dict[str, Any] = self.request("POST", f"/v1/sales/{_segment(sale_id)}/void", body)
        if self._headers.get("void-outcome") == "already-voided":
            raise InputError(f"sale {sale_id} is voided already")
        return sale

    def reprint(self, sale_id: str, copy: str = "customer") -> Reprinted:
        answer = self.request("POST", f"/v1/sales/{_segment(sale_id)}/receipt", {"copy": copy})
        return from_jsonable(Reprinted, answer, "receipt")

    def ingest(self, raw: bytes) -> Ingested:
        return from_jsonable(Ingested, self.request("POST", "/v1/node/ingest", IngestRequest(raw.decode())), "ingest")

    def uplink(self, on: bool) -> UplinkState:
        return from_jsonable(UplinkState, self.request("PUT", "/v1/node/uplink", UplinkRequest(on)), "uplink")

    def report(self) -> dict[str, Any]:
        """What ``meshpos report`` summarizes (meshpos.node.report.collect)."""
        data: dict[str, Any] = self.request("GET", "/v1/node/report")
        return data

    def statuses(self) -> list[dict[str, Any]]:
        return from_jsonable(PeerStatuses, self.request("GET", "/v1/node/statuses"), "statuses").statuses

    # -- HTTP ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: object = None) -> Any:
        """One request; the decoded answer, or the node's error raised as its class. No request
        is sent twice: a connection idle for long is replaced before it is used, not after the
        node has closed it (a sale must not be retried blindly)."""
        if self._conn is not None and time.monotonic() - self._used > IDLE_RECONNECT_S:
            self.close()
        self.connect()
        assert self._conn is not None
        if self._token is None:
            self._token = read_api_token(self.dir.api_token_path)
        data = None if body is None else json.dumps(body if isinstance(body, dict) else json_object(body)).encode()
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            self._conn.request(method, path, body=data, headers=headers)
            response = self._conn.getresponse()
            raw = response.read(MAX_REPLY + 1)
            self._headers = {k.lower(): v for k, v in response.getheaders()}
            self._used = time.monotonic()
            if not self._keep:
                self.close()
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            self.close()
            raise NodeNotRunningError(f"{self.node_dir}: no running node") from exc
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise MeshposError(f"{self.node_dir}: the node's API socket failed: {exc}") from exc
        if len(raw) > MAX_REPLY:
            self.close()
            raise MeshposError(f"{self.node_dir}: the node's answer is too large")
        try:
            answer = json.loads(raw) if raw else None
        except ValueError as exc:
            raise MeshposError(f"{self.node_dir}: the node answered something that is not JSON") from exc
        if response.status >= 400:
            raise self._error(response.status, path, answer)
        if answer is None and response.status != 204:
            # a node stopped (killed) while answering: whether it acted is not known
            raise MeshposError(f"{self.node_dir}: the node's answer was cut off (did it stop?); "
                               "look before trying again")
        return answer

    def _error(self, status: int, path: str, answer: Any) -> MeshposError:
        err = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(err, dict):
            return MeshposError(f"{self.node_dir}: the node answered HTTP {status}")
        code, message = str(err.get("code")), str(err.get("message", "error"))
        if status == 404 and path.startswith("/v1/node/"):
            return ConfigError(older_node_message(self.node_dir))
        if status == 401:
            return ConfigError(f"{self.node_dir}: the running node refused the token in "
                               f"{self.dir.api_token_path.name}: {message}")
        kind = getattr(errors, str(err.get("type")), None)
        if not (isinstance(kind, type) and issubclass(kind, MeshposError)):
            kind = _BY_CODE.get(code, MeshposError)
        return kind(message)


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def older_node_message(node_dir: Path) -> str:
    return (f"{node_dir}: the node running there is an older meshpos that does not serve this command "
            "over its API socket (api.sock, /v1/node/...): stop it and start it again with this version")


def running(node_dir: Path, timeout: float = 30.0) -> RunningNode:
    """The running node of ``node_dir`` (connected on first use)."""
    return RunningNode(node_dir, timeout)


class StoppedNode:
    """A node directory opened directly (no node runs there): the same operations as
    :class:`RunningNode` where they need no running part."""

    def __init__(self, node_dir: Path) -> None:
        from meshpos.node.core import NodeCore
        self.core = NodeCore.open(node_dir)

    def close(self) -> None:
        self.core.close()

    def status(self) -> dict[str, Any]:
        return self.core.status().to_json()

    def policy(self) -> PolicyView:
        from meshpos.node import ops
        return ops.policy(self.core)

    def sell(self, amount_minor: int, card: SealedCard | None = None,
             description: str | None = None) -> dict[str, Any]:
        from meshpos.node import ops
        return ops.sell(self.core, SellRequest(amount_minor, card, description))

    def sales(self, terminal: str | None = None) -> list[dict[str, Any]]:
        return self.core.sales(terminal)

    def sale(self, sale_id: str) -> dict[str, Any]:
        return self.core.sale(sale_id)

    def void(self, sale_id: str, reason: str | None = None) -> dict[str, Any]:
        return self.core.void(sale_id, reason)

    def ingest(self, raw: bytes) -> Ingested:
        from meshpos.node import ops
        return ops.ingest(self.core, IngestRequest(raw.decode()))

    def uplink(self, on: bool) -> UplinkState:
        from meshpos.node import ops
        return ops.set_uplink(self.core, UplinkRequest(on))


@contextlib.contextmanager
def open_node(node_dir: Path, timeout: float = 30.0) -> Iterator[Node]:
    """The node of ``node_dir``: its running process if one answers, else the directory itself."""
    live = RunningNode(node_dir, timeout)
    try:
        live.connect()  # kept: ``with live`` below
    except NodeNotRunningError:
        stopped = StoppedNode(node_dir)
        try:
            yield stopped
        finally:
            stopped.close()
        return
    with live:
        yield live
