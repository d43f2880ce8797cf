#!/usr/bin/env python3
"""The framework's floor for tools/bench_api.py: a bare Starlette app on Hypercorn's trio worker.

``python tools/bench_api_floor.py MODE PORTFILE`` serves, on 127.0.0.1 (a free port, written to
PORTFILE once it listens), one route ``POST /v1/sales`` that reads the body and answers 201 with a
constant JSON object of a sale's size; nothing else runs in the process. MODE:

- ``plain``: Hypercorn's own accept loop (meshpos.infra.asgi.serve), no Guard;
- ``gated``: the terminal API's transport (meshpos.infra.asgi.serve_gated with the connection
  limits and the stall guard of meshpos.terminal.server) behind the terminal API's Guard (bearer
  token ``floor``, Host checked), every request through Hypercorn;
- ``lane``: the same with the terminal API's lane for ``POST /v1/sales`` (meshpos.infra.asgi.Lane),
  as meshpos.terminal.server serves it.

What the node spends per request beyond this, at the same request rate, is ours: routing of the
real app, the idempotency key, the sale, the event journal.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshpos.infra import asgi  # noqa: E402
from meshpos.terminal.guard import Guard, GuardPolicy, host_names  # noqa: E402
from meshpos.terminal.server import API_LIMITS, KEEP_ALIVE_S, WRITE_STALL_S, sale_request  # noqa: E402

TOKEN = "floor"
# about the size of a sale object as the API answers it
SALE = json.dumps({"id": "0123456789abcdef-42", "terminal": "0123456789abcdef", "terminal_name": "T1", "seq": 42,
                   "amount_minor": 100, "amount": "1.00", "currency": "EUR", "method": "cash", "card_brand": None,
                   "card_last4": None, "entry_mode": None, "description": None, "status": "paid",
                   "auth_code": None, "response_code": None, "reason": None,
                   "created_at": "2026-12-02T10:00:00.000Z", "created_at_ms": 1796205600000, "deadline": None,
                   "voided_at": None, "settled_at": None, "held_by": 1, "window_ends_at": None,
                   "idempotency_key": "6f1c2a9e-7d35-4c1b-9a53-2b8f0e6d4c11"}).encode()


async def create(request: Request) -> Response:
    await request.body()
    return Response(SALE, status_code=201, media_type="application/json")


async def main(mode: str, portfile: Path) -> None:
    app = Starlette(routes=[Route("/v1/sales", create, methods=["POST"])])
    sock = asgi.bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = asgi.HypercornConfig(None, log_name="floor", keep_alive_s=KEEP_ALIVE_S)
    async with trio.open_nursery() as nursery:
        if mode == "plain":
            await nursery.start(functools.partial(asgi.serve, app, sock, None, config=config))
        else:
            hosts, origins = host_names("127.0.0.1", port, False)
            policy = GuardPolicy(TOKEN, hosts, origins)
            await nursery.start(functools.partial(
                asgi.serve_gated, app, sock, None, API_LIMITS, config=config,
                front=lambda inner: Guard(inner, policy), stall_s=WRITE_STALL_S,
                lane=sale_request if mode == "lane" else None))
        portfile.write_text(str(port))


if __name__ == "__main__":
    trio.run(main, sys.argv[1], Path(sys.argv[2]))
