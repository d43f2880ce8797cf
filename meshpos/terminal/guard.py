"""The checks before any route (an ASGI middleware): Host, Origin, bearer token.

- ``Host`` must name the configured address (TCP only): a page whose DNS name was rebound to
  this device's address sends its own name, and gets 403.
- A state-changing request (POST, PUT, PATCH, DELETE) whose ``Origin`` is not the API's own
  gets 403: any page open in the terminal's browser could otherwise post a sale or a void.
  Requests without ``Origin`` (POS apps, curl) pass.
- ``Authorization: Bearer TOKEN`` with the token of ``NODE_DIR/api-token``, or the cashier app's
  session cookie (meshpos.terminal.cashier) where the policy has sessions, or 401. A
  state-changing request authorized by the cookie must carry an ``Origin`` (the API's own, as
  above): a browser always sends it on such requests, so one without it did not come from the
  page.
- ``public`` paths (the cashier app's page, its files, its login) need no token or cookie; the
  Host and Origin checks still apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from meshpos.infra.asgi import ASGIApp, Message, Receive, Scope, Send
from meshpos.site.apitoken import token_matches
from meshpos.terminal.problems import error_body

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class GuardPolicy:
    token: str
    hosts: frozenset[str] | None  # accepted Host values; None: any (the UNIX socket)
    origins: frozenset[str]  # accepted Origin values on a state-changing request
    public: frozenset[str] = frozenset()  # paths open without a token or a session
    session: Callable[[str | None], bool] | None = field(default=None)  # Cookie header -> a live session?


WILDCARDS = ("0.0.0.0", "::")


def host_names(host: str, port: int, tls: bool, local: Iterable[str] = ()) -> tuple[frozenset[str], frozenset[str]]:
    """(Host values, Origin values) that name a TCP listener on ``host``:``port``; a wildcard
    address is named by any of the ``local`` addresses of the device, or loopback."""
    names = {host} if host not in WILDCARDS else set(local) | {"127.0.0.1"}
    if names & {"127.0.0.1", "localhost", "::1"}:
        names |= {"127.0.0.1", "localhost", "[::1]"}
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    hosts = {f"{n}:{port}" for n in names}
    default = 443 if tls else 80
    if port == default:
        hosts |= names
    scheme = "https" if tls else "http"
    return frozenset(hosts), frozenset(f"{scheme}://{h}" for h in hosts)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


DRAIN_MAX = 64 * 1024  # the most of a refused request's body read before answering


async def _drain(receive: Receive) -> None:
    """Read what is left of a refused request's body (up to DRAIN_MAX bytes): an answer given while
    the body is still arriving makes Hypercorn close the connection (the request is not done), and
    a client still sending its body then gets a broken pipe instead of the 401 or 403. Past
    DRAIN_MAX the connection is closed after the answer, as before."""
    read = 0
    while read <= DRAIN_MAX:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class Guard:
    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.check(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, code, message = problem
        await _drain(receive)
        body = json.dumps(error_body(code, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="meshpos"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def check(self, scope: Scope) -> tuple[int, str, str] | None:
        p = self.policy
        if p.hosts is not None:
            host = _header(scope, b"host")
            if host is None or host.lower() not in p.hosts:
                return 403, "forbidden", "the Host header does not name this terminal API's address"
        origin = _header(scope, b"origin")
        if scope.get("method") in STATE_CHANGING and origin is not None and origin.lower() not in p.origins:
            return 403, "forbidden", "requests from another origin may not change anything here"
        if scope.get("path") in p.public:
            return None
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token_matches(p.token, token.strip()):
            return None
        if p.session is not None and p.session(_header(scope, b"cookie")):
            if scope.get("method") in STATE_CHANGING and origin is None:
                return 403, "forbidden", "a change authorized by the cashier session must carry its Origin"
            return None
        return 401, "unauthorized", "send Authorization: Bearer <the token in NODE_DIR/api-token>"
