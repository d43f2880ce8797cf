"""The routes of the terminal API (``/v1``) as one Starlette app; protocols/terminal-api.yaml is
their contract. Transports and the Guard are the server's business (meshpos.terminal.server)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from meshpos.domain.errors import InputError, MeshposError
from meshpos.domain.jsonable import json_object
from meshpos.node.after_answer import AfterAnswer
from meshpos.node.ops import RECEIPT_COPIES
from meshpos.node.service import NodeService
from meshpos.terminal.events import EventJournal
from meshpos.terminal.openapi import OpenApiDocument
from meshpos.terminal.problems import error_body, translate
from meshpos.terminal.sales import DEFAULT_PAGE, TerminalSales, parse_since
from meshpos.terminal.stream import EventStreamResponse, Readers

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


class TerminalApi:
    """What the routes need: the node service, its sales, the event journal, the summary."""

    def __init__(self, service: NodeService, sales: TerminalSales, journal: EventJournal,
                 summary: Callable[[], dict[str, Any]], node_status: Callable[[], dict[str, Any]],
                 openapi: OpenApiDocument) -> None:
        self.service = service
        self.sales = sales
        self.journal = journal
        self.summary = summary
        self.node_status = node_status  # the node's whole status, as `meshpos status --json`
        self.openapi = openapi
        self.readers = Readers()  # the connected event streams


def respond(status: int, value: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(value, status_code=status, headers=headers)


class AnswerFirst(JSONResponse):
    """An answer after which the node's deferred work runs (meshpos.node.after_answer): right
    after its bytes were written, and in a ``finally``, so also when the client went away."""

    def __init__(self, after: AfterAnswer, status: int, value: Any, headers: dict[str, str]) -> None:
        super().__init__(value, status_code=status, headers=headers)
        self.after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.after.run()


async def read_body(request: Request, required: bool) -> Any:
    return parse_body(await collect_body(request.headers.get("content-length"), request.stream()), required)


async def collect_body(content_length: str | None, chunks: AsyncIterator[bytes]) -> bytes:
    if int(content_length or 0) > MAX_BODY:
        raise TooLarge()
    raw = b""
    async for chunk in chunks:
        raw += chunk
        if len(raw) > MAX_BODY:
            raise TooLarge()
    return raw


def parse_body(raw: bytes, required: bool) -> Any:
    if not raw.strip():
        if required:
            raise InputError("the request needs a JSON body")
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InputError("the body is not JSON (or nested too deep)") from exc


class TooLarge(Exception):
    pass


async def new_sale(api: TerminalApi, key: str | None, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``POST /v1/sales``: (status, sale, headers). What does not decide the answer is left on
    ``core.after_answer`` for the caller to run once the answer is written."""
    after = api.sales.core.after_answer
    try:
        created = await api.sales.create(key, body, defer=True)
    except BaseException:
        after.run()
        raise
    if not created.replayed:  # queued once the answer is out, as the sale.created event
        after.defer(api.service.print_receipts, created.sale)
    return (200 if created.replayed else 201, created.sale,
            {"Location": f"/v1/sales/{created.sale['id']}", "Idempotency-Key": key or ""})


def answer_bytes(status: int, value: Any, headers: dict[str, str] | None = None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The head and body ``respond`` (Starlette's JSONResponse) gives, made without it."""
    body = json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    raw += [(b"content-length", str(len(body)).encode("latin-1")), (b"content-type", b"application/json")]
    return raw, body


class LeanSales:
    """``POST /v1/sales`` answered without Starlette's routing, Request and Response (the API's
    most frequent call; ~0.1 ms per request, BENCHMARKS.md), with the same answers, headers and
    errors; every other request goes to ``app``. The sale's deferred work runs once the answer
    is written, or failed to be (meshpos.node.after_answer)."""

    def __init__(self, api: TerminalApi, app: Starlette) -> None:
        self.api = api
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/sales":
            await self.app(scope, receive, send)
            return
        started = False
        try:
            try:
                key = length = None
                for name, value in scope["headers"]:
                    if name == b"idempotency-key" and key is None:
                        key = value.decode("latin-1")
                    elif name == b"content-length" and length is None:
                        length = value.decode("latin-1")
                body = parse_body(await collect_body(length, _chunks(receive)), required=True)
                status, value, headers = await new_sale(self.api, key, body)
            except MeshposError as exc:
                (status, value), headers = translate(exc), None
            except TooLarge:
                status, value, headers = 413, error_body("too_large", f"the body is larger than {MAX_BODY} bytes"), None
            raw, payload = answer_bytes(status, value, headers)
            started = True
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": payload})
        except Exception as exc:  # as Starlette's ServerErrorMiddleware with the app's handler
            log.error("terminal API: %s %s failed: %s", "POST", "/v1/sales", type(exc).__name__)
            if not started:
                raw, payload = answer_bytes(500, error_body("internal", f"internal error ({type(exc).__name__})"))
                await send({"type": "http.response.start", "status": 500, "headers": raw})
                await send({"type": "http.response.body", "body": payload})
            raise
        finally:
            self.api.sales.core.after_answer.run()


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as Starlette's ``Request.stream`` reads it."""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


def handled(route: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """A route whose typed errors become their HTTP answers (meshpos.terminal.problems)."""
    async def endpoint(request: Request) -> Response:
        try:
            response: Response = await route(request)
            return response
        except MeshposError as exc:
            status, body = translate(exc)
            return respond(status, body)
        except TooLarge:
            return respond(413, error_body("too_large", f"the body is larger than {MAX_BODY} bytes"))
    return endpoint


def make_app(api: TerminalApi, more: Sequence[BaseRoute] = ()) -> LeanSales:
    """The routes of ``/v1``; ``more``: routes only this transport serves (the cashier app's page
    and login on TCP, meshpos.terminal.cashier_app; the node's own operations on the UNIX socket,
    meshpos.terminal.admin)."""

    async def create_sale(request: Request) -> Response:  # what LeanSales answers, through Starlette
        status, sale, headers = await new_sale(api, request.headers.get("idempotency-key"),
                                               await read_body(request, required=True))
        return AnswerFirst(api.sales.core.after_answer, status, sale, headers)

    async def list_sales(request: Request) -> Response:
        q = request.query_params
        unknown = set(q) - {"status", "method", "since", "cursor", "limit"}
        if unknown:
            raise InputError(f"unknown query parameters {sorted(unknown)}")
        limit_text = q.get("limit", str(DEFAULT_PAGE))
        if not limit_text.isascii() or not limit_text.isdigit() or len(limit_text) > 6:
            raise InputError("limit must be a whole number")
        sales, cursor = api.sales.page(status=q.get("status"), method=q.get("method"),
                                       since_ms=parse_since(q.get("since")), cursor=q.get("cursor"),
                                       limit=int(limit_text))
        return respond(200, {"sales": sales, "next_cursor": cursor})

    async def get_sale(request: Request) -> Response:
        return respond(200, api.sales.get(request.path_params["sale_id"]))

    async def void_sale(request: Request) -> Response:
        body = await read_body(request, required=False)
        if not isinstance(body, dict) or set(body) - {"reason"}:
            raise InputError("the body may hold only {\"reason\": \"...\"}")
        sale, now = api.sales.void(request.path_params["sale_id"], body.get("reason"))
        return respond(200, sale, {"Void-Outcome": "voided" if now else "already-voided"})

    async def print_receipt(request: Request) -> Response:
        body = await read_body(request, required=False)
        if not isinstance(body, dict) or set(body) - {"copy"}:
            raise InputError("the body may hold only {\"copy\": \"customer\" | \"merchant\" | \"outcome\"}")
        copy = body.get("copy", "customer")
        if copy not in RECEIPT_COPIES:
            raise InputError("copy must be customer, merchant or outcome")
        sale = api.sales.get(request.path_params["sale_id"])
        return respond(202, json_object(api.service.reprint(sale["id"], copy)))

    async def status(request: Request) -> Response:
        return respond(200, {"summary": api.summary(), "node": api.node_status(),
                           "events": {"last_id": api.journal.last_id}})

    async def openapi(request: Request) -> Response:
        return respond(200, api.openapi.get())

    async def events(request: Request) -> Response:
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        return EventStreamResponse(api.journal, api.readers, api.journal.resume(last),
                                   headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return respond(exc.status_code, error_body(code, str(exc.detail)), dict(exc.headers or {}))

    async def crashed(request: Request, exc: Exception) -> Response:
        log.error("terminal API: %s %s failed: %s", request.method, request.url.path, type(exc).__name__)
        return respond(500, error_body("internal", f"internal error ({type(exc).__name__})"))

    routes = [
        Route("/v1/sales", handled(create_sale), methods=["POST"]),
        Route("/v1/sales", handled(list_sales), methods=["GET"]),
        Route("/v1/sales/{sale_id}", handled(get_sale), methods=["GET"]),
        Route("/v1/sales/{sale_id}/void", handled(void_sale), methods=["POST"]),
        Route("/v1/sales/{sale_id}/receipt", handled(print_receipt), methods=["POST"]),
        Route("/v1/status", handled(status), methods=["GET"]),
        Route("/v1/events", handled(events), methods=["GET"]),
        Route("/v1/openapi.json", handled(openapi), methods=["GET"]),
        *more,
    ]
    return LeanSales(api, Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: crashed}))
