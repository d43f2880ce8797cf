"""The running node's local control socket: newline-delimited JSON over a Unix socket.

Request ``{"method": str, "params": {...}}``, reply ``{"result": ...}`` or
``{"error": {"type": ErrorClassName, "message": str}}``. The socket lives in the
node directory (mode 0700), so only the node's own user reaches it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from meshpos.domain.errors import InputError, MeshposError

log = logging.getLogger(__name__)

MAX_REQUEST = 1024 * 1024
Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def serve_control(path: Path, handler: Handler, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()  # stale: we hold the node lock, so no live node owns it
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    try:
        task_status.started()
        async def serve(stream: trio.SocketStream) -> None:
            await _serve_one(stream, handler)

        await trio.serve_listeners(serve, [listener])
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _serve_one(stream: trio.abc.Stream, handler: Handler) -> None:
    async with stream:
        buf = bytearray()
        with trio.move_on_after(30):
            while b"\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                if len(buf) > MAX_REQUEST:
                    await _reply(stream, {"error": {"type": "InputError", "message": "request too large"}})
                    return
        if b"\n" not in buf:
            return
        line = bytes(buf.split(b"\n", 1)[0])
        try:
            request = json.loads(line)
            method, params = request["method"], request.get("params") or {}
            if not isinstance(method, str) or not isinstance(params, dict):
                raise InputError("bad request")
            reply: dict[str, Any] = {"result": await handler(method, params)}
        except MeshposError as exc:
            reply = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"error": {"type": "InputError", "message": f"malformed control request: {exc}"}}
        except Exception as exc:  # a bug must not take the node down with it
            log.exception("control request %r failed", line[:200])
            reply = {"error": {"type": "MeshposError", "message": f"internal error: {type(exc).__name__}"}}
        try:
            await _reply(stream, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _reply(stream: trio.abc.Stream, reply: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(reply, default=str).encode() + b"\n")
