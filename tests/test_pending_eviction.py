"""Red team: connections that never prove themselves must not lock real clients out.

Before, a listener's gate (meshpos.infra.netguard.InboundGate) refused every new connection once
its caps on pending (not yet proved) connections were reached: a local program holding
``per_source`` idle connections to the terminal API, the dashboard, the link listener or an
infra.http server locked every client of its address out for ``proof_timeout``, again and again.
Now a newcomer closes the oldest pending connection that has waited ``evict_after``.
"""

from __future__ import annotations

import functools

import trio

from meshpos.infra.asgi import Receive, Scope, Send, bind_tcp
from meshpos.infra.clock import FakeClock
from meshpos.infra.http import HttpLimits, Request, Response, listener_port, serve_http
from meshpos.infra.netguard import InboundGate, InboundLimits
from meshpos.terminal import server
from meshpos.terminal.guard import GuardPolicy


def test_a_newcomer_closes_the_oldest_pending_connection_of_its_source() -> None:
    clock = FakeClock()
    gate = InboundGate(InboundLimits(total=6, pending=4, per_source=2, proof_timeout=10.0), now=clock.monotonic)
    assert gate.limits.grace == 2.0
    first, second = gate.admit("a"), gate.admit("a")
    assert first.ticket is not None and second.ticket is not None
    refused = gate.admit("a")  # both are younger than the grace: the newcomer is refused, nobody closed
    assert refused.ticket is None and "from a not yet authenticated" in refused.reason and gate.pending == {"a": 2}
    clock.advance(2.5)
    taken = gate.admit("a")
    assert taken.ticket is not None and taken.evict == (first.ticket,)
    assert gate.pending == {"a": 2} and gate.held == 2 and gate.evicted == 1
    gate.release(first.ticket, proved=False)  # the closed one ends: already uncounted
    assert gate.held == 2
    assert gate.proved(taken.ticket) and not gate.proved(first.ticket)
    gate.release(taken.ticket, proved=True)
    assert gate.held == 1 and gate.open == 0


def test_past_the_pending_cap_the_source_with_most_pending_gives_way() -> None:
    clock = FakeClock()
    gate = InboundGate(InboundLimits(total=10, pending=4, per_source=3, proof_timeout=5.0, evict_after=1.0), now=clock.monotonic)
    b = gate.admit("b").ticket
    flood = [gate.admit("x").ticket for _ in range(3)]
    assert b is not None and None not in flood and gate.pending_total == 4
    clock.advance(1.5)
    honest = gate.admit("c")
    assert honest.ticket is not None and honest.evict == (flood[0],)  # x's oldest, not b's older one
    assert gate.pending == {"b": 1, "x": 2, "c": 1}


def test_the_total_cap_holds_when_every_held_connection_proved_itself() -> None:
    clock = FakeClock()
    gate = InboundGate(InboundLimits(total=2, pending=2, per_source=2, proof_timeout=1.0), now=clock.monotonic)
    for _ in range(2):
        ticket = gate.admit("a").ticket
        assert ticket is not None and gate.proved(ticket)
    clock.advance(100.0)
    refused = gate.admit("b")
    assert refused.ticket is None and "2 connections held (limit 2)" in refused.reason and gate.held == 2
    third = InboundGate(InboundLimits(total=2, pending=2, per_source=2, proof_timeout=1.0), now=clock.monotonic)
    kept = third.admit("a").ticket
    assert kept is not None and third.proved(kept)
    old = third.admit("a").ticket
    clock.advance(100.0)
    newcomer = third.admit("b")  # one held connection is still pending: it makes room
    assert newcomer.evict == (old,) and third.held == 2


LIMITS = InboundLimits(total=16, pending=4, per_source=4, proof_timeout=5.0)  # grace: 1 s


async def idle_connections(port: int, n: int) -> list[trio.SocketStream]:
    return [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(n)]


async def ask(port: int, head: bytes) -> bytes:
    """One request on a new connection; the whole answer ('' if the server closed it unanswered)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head)
        answer = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in answer:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                answer += data
        return answer


async def closed_by_server(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(5):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_idle_connections_do_not_lock_the_terminal_api_out() -> None:
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    policy = GuardPolicy(token="secret", hosts=None, origins=frozenset())
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(server.serve, hello, policy, sock, None, limits=LIMITS))
        flood = await idle_connections(port, LIMITS.per_source)  # every pending slot of 127.0.0.1
        await trio.sleep(1.5)  # older than the grace, far from the proof timeout
        answer = await ask(port, b"GET /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert await closed_by_server(flood[0])  # the oldest idle one made room
        for stream in flood:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_idle_connections_do_not_lock_an_http_server_out() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, {}, b"ok")
    limits = HttpLimits(max_connections=16, max_pending=4, max_pending_per_source=4, handshake_timeout=5.0)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(serve_http, handler, ("127.0.0.1", 0, None),
                                                          limits=limits))
        port = listener_port(listeners[0])
        flood = await idle_connections(port, 4)
        await trio.sleep(1.5)
        answer = await ask(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert await closed_by_server(flood[0])
        for stream in flood:
            await stream.aclose()
        nursery.cancel_scope.cancel()

