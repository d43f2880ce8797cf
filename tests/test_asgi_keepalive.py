"""The keep-alive timer of meshpos.infra.asgi's connections (KeepAliveTimer): an idle connection
is closed after ``keep_alive_s``, a connection in use is not, and requests on a kept-alive
connection start no timer task each (Hypercorn's own started a task with a timer every time a
connection went idle and cancelled it at the next request)."""

from __future__ import annotations

import socket
from typing import Any

import trio
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshpos.infra.asgi import HypercornConfig, _Connection


async def _json(request: Request) -> Response:
    return JSONResponse({"sale": "t1-1"}, status_code=201)


APP = Starlette(routes=[Route("/json", _json)])


class Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def _serve(nursery: trio.Nursery, keep_alive_s: float) -> trio.SocketStream:
    a, b = socket.socketpair()
    client = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    server = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    config = HypercornConfig(None, log_name="test.asgi", keep_alive_s=keep_alive_s)
    conn = _Connection(wrap_app(APP, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                       config, WorkerContext(None), ConnectionState({}), server)  # type: ignore[arg-type]
    nursery.start_soon(conn.run)
    return client


async def _ask(client: trio.SocketStream) -> bytes:
    await client.send_all(b"GET /json HTTP/1.1\r\nHost: t\r\n\r\n")
    got = b""
    while b'"t1-1"}' not in got:
        chunk = await client.receive_some(65536)
        assert chunk, f"the connection closed: {got!r}"
        got += chunk
    return got


async def _closed(client: trio.SocketStream) -> bool:
    try:
        return await client.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


async def test_requests_on_a_kept_alive_connection_start_no_timer_task_each() -> None:
    spawns = Spawns()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            client = await _serve(nursery, keep_alive_s=60)
            await _ask(client)  # the connection's own tasks have started
            trio.lowlevel.add_instrument(spawns)
            try:
                for _ in range(20):
                    assert (await _ask(client)).startswith(b"HTTP/1.1 201 ")
            finally:
                trio.lowlevel.remove_instrument(spawns)
            nursery.cancel_scope.cancel()
    # one task per request (Hypercorn runs each request's app in a task of its own); the timer
    # added one more per request (a task started, and cancelled at the next request)
    assert spawns.count <= 20, spawns.count


async def test_an_idle_connection_is_closed_after_the_keep_alive_time_and_a_busy_one_is_not() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            busy = await _serve(nursery, keep_alive_s=0.5)
            idle = await _serve(nursery, keep_alive_s=0.5)
            await _ask(idle)
            # asking every 0.2 s for 2 s: each answer starts the time anew, none runs out
            for _ in range(10):
                assert (await _ask(busy)).startswith(b"HTTP/1.1 201 ")
                await trio.sleep(0.2)
            assert await _closed(idle)  # asked once, then left alone: closed by the server
            assert await _closed(busy)  # and the busy one once it is left alone too
            nursery.cancel_scope.cancel()


async def test_a_connection_the_client_closes_ends_with_its_timer() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client = await _serve(nursery, keep_alive_s=3600)
            await _ask(client)
            await client.aclose()
        # the nursery ended: the connection's task (and its keep-alive timer) did not wait an hour
