"""The node's own operations (``/v1/node/...``): what the CLI and a technician do that a till does
not: a sale whose card the caller sealed, the whole ledger's sales, the policy, pushing a signed
envelope, turning the uplink on or off, the report, the peers' statuses.

Served only on ``NODE_DIR/api.sock`` (mode 0600 in the 0700 node directory: the file permissions
are its authentication, with the bearer token besides), never on TCP: the TCP app has no such
routes and answers 404. Bodies are the dataclasses of meshpos.node.ops, read with ``from_jsonable``
and written with the one encoder; protocols/terminal-api.yaml documents them (``x-socket-only``).
"""

from __future__ import annotations

from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meshpos.domain.errors import InputError
from meshpos.domain.jsonable import from_jsonable, json_object
from meshpos.node import ops
from meshpos.node.report import collect
from meshpos.node.runner import RunningNode
from meshpos.terminal.app import handled, read_body, respond

PREFIX = "/v1/node"


def admin_routes(node: RunningNode) -> list[Route]:
    core = node.core

    async def sell(request: Request) -> Response:
        req = from_jsonable(ops.SellRequest, await read_body(request, required=True))
        sale = ops.sell(core, req)
        node.service.print_receipts(sale)
        return respond(201, sale, {"Location": f"/v1/sales/{sale['id']}"})

    async def sales(request: Request) -> Response:
        unknown = set(request.query_params) - {"terminal"}
        if unknown:
            raise InputError(f"unknown query parameters {sorted(unknown)}")
        return respond(200, json_object(ops.SaleList(core.sales(request.query_params.get("terminal")))))

    async def policy(request: Request) -> Response:
        return respond(200, json_object(ops.policy(core)))

    async def ingest(request: Request) -> Response:
        req = from_jsonable(ops.IngestRequest, await read_body(request, required=True))
        return respond(200, json_object(ops.ingest(core, req)))

    async def uplink(request: Request) -> Response:
        req = from_jsonable(ops.UplinkRequest, await read_body(request, required=True))
        return respond(200, json_object(node.uplink.set_uplink(req)))

    async def report(request: Request) -> Response:
        return respond(200, collect(core))

    async def statuses(request: Request) -> Response:
        return respond(200, json_object(ops.PeerStatuses(node.publisher.statuses_json())))

    table: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("/sales", sell, "POST"), ("/sales", sales, "GET"), ("/policy", policy, "GET"),
        ("/ingest", ingest, "POST"), ("/uplink", uplink, "PUT"), ("/report", report, "GET"),
        ("/statuses", statuses, "GET"),
    ]
    return [Route(PREFIX + path, handled(route), methods=[method]) for path, route, method in table]
