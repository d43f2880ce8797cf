"""The JSON-over-HTTPS acquirer adapter (protocols/acquirer-json.md is normative).

``POST /v1/advices`` and ``POST /v1/reversals`` with ``Idempotency-Key: <sale_id>``
and a JSON body; the host answers ``{"approved": bool, "response_code": "00",
"auth_code": "..." | null}``. The same key always gets the same answer and is
charged at most once, which is what makes a retry safe. A 4xx answer other than
408 and 429 says the host refused this request as it is: UnsendableRequest (the
sale is settled, not retried); other failures are AcquirerError (retried).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from meshpos.domain.errors import AcquirerError, InputError, ProtocolError
from meshpos.infra.http import HttpClientConnection, Response, open_https
from meshpos.wire.acquirer import RESPONSE_CODE, AcquirerRequest, AcquirerResult
from meshpos.acquirer.base import BeforeSend, UnsendableRequest

ADVICES_PATH: Final = "/v1/advices"
REVERSALS_PATH: Final = "/v1/reversals"
DEFAULT_TIMEOUT: Final = 10.0
MAX_IDLE: Final = 8
#: 4xx answers that are worth another attempt (timeout, rate limit); every other 4xx is final
RETRYABLE_4XX: Final = frozenset({408, 425, 429})

Connector = Callable[[], Awaitable[trio.abc.Stream]]

_FIELDS: Final = (
    "sale_id", "pan", "expiry", "amount_minor", "currency", "created_at_ms",
    "entry_mode", "terminal_id", "merchant_id", "stan", "rrn",
)


def request_to_json(req: AcquirerRequest, *, repeat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(req, name) for name in _FIELDS}
    body["repeat"] = repeat
    return body


def request_from_json(value: Any) -> tuple[AcquirerRequest, bool]:
    """The host side of :func:`request_to_json`; InputError if the body is not one."""
    if not isinstance(value, dict):
        raise InputError("request body must be a JSON object")
    missing = [name for name in _FIELDS if name not in value]
    if missing:
        raise InputError(f"request body lacks {', '.join(missing)}")
    repeat = value.get("repeat", False)
    if not isinstance(repeat, bool):
        raise InputError("repeat must be true or false")
    try:
        return AcquirerRequest(**{name: value[name] for name in _FIELDS}), repeat
    except (TypeError, ValueError) as exc:
        raise InputError("request body has a field of the wrong type") from exc


def result_to_json(result: AcquirerResult) -> dict[str, Any]:
    return {"approved": result.approved, "response_code": result.response_code, "auth_code": result.auth_code}


def result_from_json(value: Any) -> AcquirerResult:
    if not isinstance(value, dict):
        raise ProtocolError("acquirer answer is not a JSON object")
    approved, code, auth = value.get("approved"), value.get("response_code"), value.get("auth_code")
    if not isinstance(approved, bool) or not isinstance(code, str) or not (auth is None or isinstance(auth, str)):
        raise ProtocolError("acquirer answer lacks approved / response_code / auth_code")
    if not RESPONSE_CODE.fullmatch(code) or approved != (code == "00"):
        raise ProtocolError("acquirer answer has an inconsistent response_code")
    return AcquirerResult(approved, code, (auth or None) if approved else None)


class JsonHttpsLink:
    """An :class:`~meshpos.acquirer.base.AcquirerLink` over HTTPS with a small keep-alive pool."""

    def __init__(
        self,
        connect: Connector,
        *,
        host_header: str,
        timeout: float = DEFAULT_TIMEOUT,
        headers: dict[str, str] | None = None,
        max_idle: int = MAX_IDLE,
    ) -> None:
        self._connect = connect
        self._host = host_header
        self._timeout = timeout
        self._extra = dict(headers or {})
        self._max_idle = max_idle
        self._idle: list[HttpClientConnection] = []
        self._closed = False

    async def advise(self, req: AcquirerRequest, *, repeat: bool,
                     before_send: BeforeSend | None = None) -> AcquirerResult:
        return await self._post(ADVICES_PATH, req, repeat=repeat, before_send=before_send)

    async def reverse(self, req: AcquirerRequest) -> AcquirerResult:
        return await self._post(REVERSALS_PATH, req, repeat=False)

    async def check(self) -> None:
        """Raise AcquirerError unless a connection is idle in the pool or one opens now (readiness)."""
        if self._idle:
            return
        with trio.move_on_after(self._timeout) as scope:
            try:
                conn = HttpClientConnection(await self._connect())
            except (ProtocolError, OSError, trio.BrokenResourceError) as exc:
                raise AcquirerError(f"readiness check: cannot connect to the acquirer: {exc}") from exc
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
            else:
                await conn.aclose()
        if scope.cancelled_caught:
            raise AcquirerError(f"readiness check: no connection to the acquirer within {self._timeout:g} s")

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()

    async def _post(self, path: str, req: AcquirerRequest, *, repeat: bool,
                    before_send: BeforeSend | None = None) -> AcquirerResult:
        what = f"POST {path} for {req.describe()}"
        if self._closed:
            raise AcquirerError(f"{what}: the acquirer link is closed")
        try:
            body = json.dumps(request_to_json(req, repeat=repeat), separators=(",", ":"),
                              ensure_ascii=True).encode("ascii")
        except (TypeError, ValueError) as exc:
            raise UnsendableRequest(f"{what}: the request does not encode as JSON") from exc
        if before_send is not None:
            with trio.CancelScope(shield=True):
                await before_send()
        headers = {
            **self._extra,
            "host": self._host,
            "content-type": "application/json",
            "accept": "application/json",
            "idempotency-key": req.sale_id,
        }
        conn: HttpClientConnection | None = None
        response: Response | None = None
        with trio.move_on_after(self._timeout):
            try:
                conn = self._idle.pop() if self._idle else HttpClientConnection(await self._connect())
                response = await conn.request("POST", path, headers, body)
            except (ProtocolError, OSError) as exc:
                if conn is not None:
                    await conn.aclose()
                raise AcquirerError(f"{what}: {exc}") from exc
        if response is None:
            if conn is not None:
                await conn.aclose()
            raise AcquirerError(f"{what}: no answer within {self._timeout:g} s")
        assert conn is not None
        if conn.reusable and response.headers.get("connection", "").lower() != "close" and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            await conn.aclose()
        if 400 <= response.status < 500 and response.status not in RETRYABLE_4XX:
            raise UnsendableRequest(f"{what}: the acquirer refused the request (HTTP {response.status})")
        if response.status != 200:
            raise AcquirerError(f"{what}: HTTP {response.status}")
        try:
            return result_from_json(response.json())
        except ProtocolError as exc:
            raise AcquirerError(f"{what}: {exc}") from exc


def open_json_link(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> JsonHttpsLink:
    """A :class:`JsonHttpsLink` to ``https://host:port`` (client certificate from the context)."""

    async def connect() -> trio.abc.Stream:
        return await open_https(host, port, ssl_context, server_hostname)

    host_header = server_hostname or host
    return JsonHttpsLink(connect, host_header=host_header if port == 443 else f"{host_header}:{port}", timeout=timeout)
