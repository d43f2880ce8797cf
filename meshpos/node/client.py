"""Reach a node: through its running process's control socket, or, when no
node runs, by opening its directory directly (the same operations either way)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from meshpos.domain.errors import MeshposError, NodeNotRunningError
from meshpos.site.nodedir import NodeDir

MAX_REPLY = 64 * 1024 * 1024


def call_running(node_dir: Path, method: str, params: dict[str, Any], timeout: float = 30.0) -> Any:
    """One request over control.sock (newline-delimited JSON). NodeNotRunningError if nobody listens."""
    path = NodeDir(node_dir).control_path
    if not path.exists():
        raise NodeNotRunningError(f"{node_dir}: no running node")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise NodeNotRunningError(f"{node_dir}: no running node") from exc
        sock.sendall(json.dumps({"method": method, "params": params}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise MeshposError("control socket reply too large")
    except OSError as exc:
        raise MeshposError(f"{node_dir}: control socket failed: {exc}") from exc
    finally:
        sock.close()
    try:
        reply = json.loads(buf)
    except json.JSONDecodeError as exc:
        raise MeshposError(f"{node_dir}: control socket answered garbage") from exc
    if "error" in reply:
        err = reply["error"]
        exc_type = _error_types().get(err.get("type"), MeshposError)
        raise exc_type(err.get("message", "error"))
    return reply.get("result")


def _error_types() -> dict[str, type[MeshposError]]:
    from meshpos.domain import errors
    out: dict[str, type[MeshposError]] = {}
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, MeshposError):
            out[name] = obj
    return out


def call(node_dir: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    """Run one operation on a node, running or not."""
    params = params or {}
    try:
        return call_running(node_dir, method, params)
    except NodeNotRunningError:
        pass
    from meshpos.node.core import NodeCore
    from meshpos.node.ops import dispatch
    core = NodeCore.open(node_dir)
    try:
        return dispatch(core, method, params)
    finally:
        core.close()
