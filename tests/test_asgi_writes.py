"""The terminal API's connections, below the routes.

- meshpos.infra.asgi's connection handler writes a small answer in one piece: Hypercorn writes a
  response's head and body separately (two sends, and on loopback two wake-ups of the client, per
  answer); the head now waits for the next piece. Streamed answers still flow piece by piece.
- The Guard (meshpos.terminal.guard) reads a refused request's body before answering: a client
  whose body was still on its way got a broken pipe instead of its 401, and lost the connection."""

from __future__ import annotations

import functools
import socket
from typing import Any

import trio
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meshpos.infra import asgi
from meshpos.infra.asgi import HypercornConfig, _Connection
from meshpos.terminal.guard import Guard, GuardPolicy, host_names
from meshpos.terminal.server import API_LIMITS


class Recorder:
    """A real socket stream that notes every write."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)


async def _json(request: Request) -> Response:
    return JSONResponse({"sale": "t1-1", "amount": "1.00"}, status_code=201)


async def _empty(request: Request) -> Response:
    return Response(status_code=204)


async def _stream(request: Request) -> Response:
    async def chunks() -> Any:
        yield b"retry: 2000\n\n"
        await trio.sleep(0.2)  # a later event: it must not wait for anything else
        yield b"data: 1\n\n"
        await trio.sleep(3600)
    return StreamingResponse(chunks(), media_type="text/event-stream")


APP = Starlette(routes=[Route("/json", _json), Route("/empty", _empty), Route("/events", _stream)])


async def _serve(nursery: trio.Nursery) -> tuple[trio.SocketStream, Recorder]:
    a, b = socket.socketpair()
    client = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    server = Recorder(trio.SocketStream(trio.socket.from_stdlib_socket(b)))
    config = HypercornConfig(None, log_name="test.asgi", keep_alive_s=5)
    conn = _Connection(wrap_app(APP, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                       config, WorkerContext(None), ConnectionState({}), server)  # type: ignore[arg-type]
    nursery.start_soon(conn.run)
    return client, server


async def _read_until(client: trio.SocketStream, marker: bytes, have: bytes = b"") -> bytes:
    while marker not in have:
        chunk = await client.receive_some(65536)
        assert chunk, f"the connection closed before {marker!r}: {have!r}"
        have += chunk
    return have


async def test_a_small_answer_leaves_in_one_write() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client, server = await _serve(nursery)
            for _ in range(2):  # keep-alive: the second answer too
                before = len(server.writes)
                await client.send_all(b"GET /json HTTP/1.1\r\nHost: t\r\n\r\n")
                got = await _read_until(client, b'"1.00"}')
                assert got.startswith(b"HTTP/1.1 201 ")
                answer = [w for w in server.writes[before:] if w]
                assert len(answer) == 1 and answer[0] == got
            await client.send_all(b"GET /empty HTTP/1.1\r\nHost: t\r\n\r\n")  # a head and no body
            got = await _read_until(client, b"\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 204 ")
            nursery.cancel_scope.cancel()


async def test_a_streamed_answer_flows_piece_by_piece() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client, server = await _serve(nursery)
            await client.send_all(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
            got = await _read_until(client, b"retry: 2000")
            assert got.startswith(b"HTTP/1.1 200 ")  # the head came with the first chunk
            assert len([w for w in server.writes if w]) == 1
            got = await _read_until(client, b"data: 1", got)  # the later chunk arrives by itself
            assert len([w for w in server.writes if w]) == 2
            nursery.cancel_scope.cancel()


async def test_a_refused_request_whose_body_comes_late_gets_its_401_and_keeps_the_connection() -> None:
    sock = asgi.bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    hosts, origins = host_names("127.0.0.1", port, False)
    policy = GuardPolicy("right-token", hosts, origins)
    config = HypercornConfig(None, log_name="test.asgi", keep_alive_s=5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(asgi.serve_gated, APP, sock, None, API_LIMITS, config=config,
                                                  front=lambda inner: Guard(inner, policy)))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            body = b'{"amount": "1.00", "method": "cash"}'
            head = (f"POST /json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer wrong\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            await client.send_all(head)
            await trio.sleep(0.3)  # the body is still on its way when the Guard has decided
            await client.send_all(body)
            got = await _read_until(client, b"}")
            assert got.startswith(b"HTTP/1.1 401 ")
            # the same connection answers the next request (authorized this time)
            await client.send_all(f"GET /json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                  "Authorization: Bearer right-token\r\n\r\n".encode())
            got = await _read_until(client, b'"1.00"}')
            assert got.startswith(b"HTTP/1.1 201 ")
            nursery.cancel_scope.cancel()


async def test_a_write_the_client_takes_nothing_of_fails_after_the_stall_time(
        autojump_clock: trio.testing.MockClock) -> None:
    """StallGuard: a write to a client that reads nothing fails (BrokenResourceError, which
    Hypercorn takes for a closed connection) once it waited ``stall_s`` (at most a quarter more:
    the watchdog's period); a client that reads slowly, but reads, is never cut off."""
    import trio.testing

    ours, theirs = trio.testing.lockstep_stream_pair()  # a write waits until the other side reads
    guarded = asgi.StallGuard(ours, stall_s=20.0, piece=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guarded.watch)

        async def slow_reader() -> None:
            for _ in range(4):
                await trio.sleep(15.0)  # within the stall time each time
                assert await theirs.receive_some(4) == b"data"

        nursery.start_soon(slow_reader)
        await guarded.send_all(b"data" * 4)  # 60 s in all, but no piece waited 20 s
        start = trio.current_time()
        try:
            await guarded.send_all(b"more")  # nobody reads any more
        except trio.BrokenResourceError as exc:
            assert "took nothing for 20 s" in str(exc)
        else:
            raise AssertionError("a write that nobody took did not fail")
        assert 20.0 <= trio.current_time() - start <= 25.0
        nursery.cancel_scope.cancel()
