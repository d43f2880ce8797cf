"""meshpos.replication.tlsstream over real TCP and TLS 1.3 on 127.0.0.1, with a node's credentials:
it talks to trio.SSLStream either way round (an older node's links), and one receive_some returns
every record already received, where trio.SSLStream returns one."""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio

from meshpos.node.memnode import enroll, make_site
from meshpos.replication import tls
from meshpos.replication.tlsstream import LinkTLSStream

Maker = Callable[[trio.SocketStream, ssl.SSLContext, bool], Any]


def ours(tcp: trio.SocketStream, ctx: ssl.SSLContext, server_side: bool) -> LinkTLSStream:
    return LinkTLSStream(tcp, ctx, server_side=server_side)


def trios(tcp: trio.SocketStream, ctx: ssl.SSLContext, server_side: bool) -> trio.SSLStream[trio.SocketStream]:
    return trio.SSLStream(tcp, ctx, server_side=server_side, server_hostname=None, https_compatible=False)


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    site = make_site(tmp_path / "site")
    a, b = enroll(site, tmp_path / "a", "alpha"), enroll(site, tmp_path / "b", "bravo")
    ca = (a / "ca.pem").read_bytes()
    return tls.server_context(a / "node.pem", a / "node.key", ca), tls.client_context(b / "node.pem", b / "node.key", ca)


async def _pair(contexts: tuple[ssl.SSLContext, ssl.SSLContext], server: Maker, client: Maker,
                body: Callable[[Any, Any], Awaitable[None]]) -> None:
    server_ctx, client_ctx = contexts
    accepted: list[trio.SocketStream] = []
    got = trio.Event()
    with trio.fail_after(20):  # a hang guard, not a timing assertion
        async with trio.open_nursery() as nursery:
            async def handler(tcp: trio.SocketStream) -> None:
                accepted.append(tcp)
                got.set()
                await trio.sleep_forever()
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            await got.wait()
            s, c = server(accepted[0], server_ctx, True), client(tcp, client_ctx, False)
            async with trio.open_nursery() as hs:
                hs.start_soon(s.do_handshake)
                hs.start_soon(c.do_handshake)
            await body(s, c)
            await c.aclose()
            await s.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("server,client", [(ours, ours), (ours, trios), (trios, ours)], ids=["ours-ours", "ours-trio", "trio-ours"])
async def test_links_talk_to_each_other_and_to_trio_ssl_streams(contexts: Any, server: Maker, client: Maker) -> None:
    async def body(s: Any, c: Any) -> None:
        assert s.getpeercert(binary_form=True) and c.getpeercert(binary_form=True)
        big = bytes(range(256)) * 1000  # several records
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.send_all, big)
            got = bytearray()
            while len(got) < len(big):
                got += await s.receive_some(65536)
        assert bytes(got) == big
        await s.send_all(b"pong")
        assert await c.receive_some(100) == b"pong"
        await s.aclose()
        assert await c.receive_some(100) == b""  # close_notify: a clean end, not an error

    await _pair(contexts, server, client, body)


async def _three_then_read(s: Any, c: Any) -> list[bytes]:
    for part in (b"one|", b"two|", b"three|"):  # three writes, three TLS records
        await c.send_all(part)
    reads = [bytes(await s.receive_some(65536))]
    while b"".join(reads) != b"one|two|three|":
        reads.append(bytes(await s.receive_some(65536)))
    return reads


async def test_one_receive_returns_every_record_already_received(contexts: Any) -> None:
    reads: list[list[bytes]] = []

    async def body(s: Any, c: Any) -> None:
        reads.append(await _three_then_read(s, c))
    await _pair(contexts, ours, trios, body)
    assert reads == [[b"one|two|three|"]]


async def test_trio_ssl_stream_returns_one_record_per_receive(contexts: Any) -> None:
    """What the test above would see with trio's stream (why the link has its own)."""
    reads: list[list[bytes]] = []

    async def body(s: Any, c: Any) -> None:
        reads.append(await _three_then_read(s, c))
    await _pair(contexts, trios, trios, body)
    assert reads == [[b"one|", b"two|", b"three|"]]


async def test_a_peer_that_is_not_tls_breaks_the_stream_with_the_reason(contexts: Any) -> None:
    server_ctx, _ = contexts
    a, b = trio.testing.memory_stream_pair()
    stream = LinkTLSStream(a, server_ctx, server_side=True)
    await b.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(trio.BrokenResourceError) as caught:
        await stream.do_handshake()
    assert isinstance(caught.value.__cause__, ssl.SSLError)
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some(10)
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
