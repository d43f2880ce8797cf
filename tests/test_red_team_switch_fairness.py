"""Red team: per-client fairness at the switch (meshpos.switch.connlimit) for a fair behind one NAT.

A whole fair reaches the switch from one address, so the address cannot tell a gateway from anyone
else on the fair's Wi-Fi. What tells them apart is the TLS client certificate: a connection whose
certificate names a forwarder of a registered site is *authenticated*; every other connection is
anonymous. Anonymous connections share their address's cap and are closed for a newcomer once
they are ``grace`` old, whatever they are doing; authenticated ones are bounded per forwarder and
are never closed for anyone else. Real sockets and real TLS on loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from meshpos.domain.errors import ProtocolError
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.switch.connlimit import ConnectionLimits
from meshpos.uplink.client import forward, forward_body, make_client_context, open_switch
from meshpos.uplink.forwarder import Forwarder
from meshpos.wire import envelope
from meshpos.wire.forwarding import FORWARD_PATH, HEALTH_PATH
from switch_harness import switch_dir  # noqa: F401 -- fixture
from test_switch_hardening import closed_by_peer, switch_with

pytestmark = pytest.mark.usefixtures("switch_backend_env")

# a TLS record header announcing a 16 KiB handshake record, whose body then comes a byte at a time
RECORD_HEAD = b"\x16\x03\x01\x40\x00"


async def trickle(n: int, port: int, source: str, nursery: trio.Nursery, every: float = 0.2) -> list[
        trio.socket.SocketType]:
    """``n`` anonymous connections from ``source`` that send one byte of a TLS handshake every
    ``every`` seconds: never idle, never done."""
    socks = []
    for _ in range(n):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        await sock.send(RECORD_HEAD)
        socks.append(sock)

    async def drip(sock: trio.socket.SocketType) -> None:
        try:
            while True:
                await trio.sleep(every)
                await sock.send(b"\x01")
        except OSError:
            return  # closed by the switch
    for sock in socks:
        nursery.start_soon(drip, sock)
    return socks


async def test_a_trickled_handshake_does_not_hold_the_fairs_address_against_its_gateway(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],  # noqa: F811
        clock: FakeClock) -> None:
    core = open_node(make_node("gw", "gateway"))
    sale = str(core.sell(500)["id"])
    limits = ConnectionLimits(total=64, per_source=4, idle_s=60.0, handshake_s=5.0)  # grace: 1 s
    async with switch_with(switch_dir, clock, limits) as (service, port), trio.open_nursery() as nursery:
        socks = await trickle(4, port, "127.0.0.1", nursery)  # the gateway's own address (one NAT)
        await trio.sleep(1.5)  # older than the grace, far from the 5 s handshake deadline
        assert service.gate.by_source["127.0.0.1"] == 4
        reply = await forward(f"https://127.0.0.1:{port}", make_client_context(core),
                              Forwarder(core, clock).entries_for([sale]))
        assert envelope.decode(reply.results[0]).body["status"] == "approved"
        assert service.gate.evicted >= 1 and await closed_by_peer(socks[0])
        nursery.cancel_scope.cancel()
        for s in socks:
            s.close()


async def test_a_node_the_switch_does_not_accept_cannot_hold_connections_with_live_requests(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],  # noqa: F811
        clock: FakeClock) -> None:
    """An enrolled inspector (a site certificate, but not a role that forwards) asks for /v1/health
    over and over on keep-alive connections. Each answer is 403 and closes its connection."""
    gateway = open_node(make_node("gw", "gateway"))
    sale = str(gateway.sell(500)["id"])
    spy = make_client_context(make_node("spy", "inspector"))
    limits = ConnectionLimits(total=64, per_source=4, idle_s=60.0, handshake_s=5.0)
    async with switch_with(switch_dir, clock, limits) as (service, port), trio.open_nursery() as nursery:
        url = f"https://127.0.0.1:{port}"
        conns = [await open_switch(url, spy) for _ in range(4)]
        answers: list[int] = []

        async def keep_busy(conn: object) -> None:
            try:
                while True:
                    answers.append((await conn.request("GET", HEALTH_PATH, {})).status)  # type: ignore[attr-defined]
                    await trio.sleep(0.2)
            except ProtocolError:
                return  # the switch closed it
        for conn in conns:
            nursery.start_soon(keep_busy, conn)
        await trio.sleep(1.5)
        reply = await forward(url, make_client_context(gateway), Forwarder(gateway, clock).entries_for([sale]))
        assert envelope.decode(reply.results[0]).body["status"] == "approved"
        assert answers and set(answers) == {403}
        assert len(answers) == 4  # one answer per connection, then closed: no keep-alive without a forwarder
        nursery.cancel_scope.cancel()
        for conn in conns:
            await conn.aclose()


async def test_an_authenticated_gateways_slow_upload_is_not_closed_for_anonymous_newcomers(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],  # noqa: F811
        clock: FakeClock) -> None:
    """A gateway on a weak SIM sends its batch slowly. Anonymous connections from other addresses
    (and from its own) arrive meanwhile; they may close each other, never the gateway's."""
    gateway = open_node(make_node("gw", "gateway"))
    sale = str(gateway.sell(500)["id"])
    body = forward_body(Forwarder(gateway, clock).entries_for([sale]))
    limits = ConnectionLimits(total=256, per_source=4, idle_s=60.0, handshake_s=5.0)
    async with switch_with(switch_dir, clock, limits) as (service, port), trio.open_nursery() as nursery:
        conn = await open_switch(f"https://127.0.0.1:{port}", make_client_context(gateway))
        head = (f"POST {FORWARD_PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        await conn.stream.send_all(head + body[:10])
        await trio.sleep(1.2)  # the upload has taken longer than the grace
        socks = []
        for i in range(2, 19):  # 17 addresses x 4: more anonymous connections than any cap holds
            socks += await trickle(4, port, f"127.0.0.{i}", nursery)
        socks += await trickle(4, port, "127.0.0.1", nursery)  # and the gateway's own address
        await trio.sleep(0.2)
        await conn.stream.send_all(body[10:])
        answer = b""
        with trio.fail_after(20):
            while b"\r\n\r\n" not in answer:
                chunk = await conn.stream.receive_some(65536)
                assert chunk, "the switch closed the gateway's connection mid-upload"
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
        await conn.aclose()
        for s in socks:
            s.close()


async def test_a_forwarder_holds_at_most_per_client_authenticated_connections(
        switch_dir: Path, make_node: Callable[..., Path], clock: FakeClock) -> None:  # noqa: F811
    """A gateway gone bad cannot hold the switch with authenticated connections: past
    ``per_client`` its further connections are anonymous (its address's cap, closed for others)."""
    ctx = make_client_context(make_node("gw", "gateway"))
    limits = ConnectionLimits(total=64, per_source=4, per_client=2, idle_s=60.0, handshake_s=5.0)
    async with switch_with(switch_dir, clock, limits) as (service, port):
        conns = [await open_switch(f"https://127.0.0.1:{port}", ctx) for _ in range(3)]
        with trio.fail_after(10):
            while sum(service.gate.by_client.values()) + sum(service.gate.by_source.values()) < 3:
                await trio.sleep(0.01)
        assert list(service.gate.by_client.values()) == [2] and service.gate.by_source["127.0.0.1"] == 1
        for conn in conns:  # all three are served
            assert (await conn.request("GET", HEALTH_PATH, {})).status == 200
            await conn.aclose()


async def test_a_refused_client_cannot_fill_the_switchs_log(
        switch_dir: Path, make_node: Callable[..., Path], clock: FakeClock,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """Each refusal costs the client a TLS handshake, and the switch one log line per reason a minute."""
    spy = make_client_context(make_node("spy", "inspector"))
    async with switch_with(switch_dir, clock, ConnectionLimits()) as (service, port):
        for _ in range(30):
            conn = await open_switch(f"https://127.0.0.1:{port}", spy)
            assert (await conn.request("GET", HEALTH_PATH, {})).status == 403
            await conn.aclose()
    lines = [r for r in caplog.records if "refused a forwarder" in r.getMessage()]
    assert len(lines) == 1 and "role inspector" in lines[0].getMessage()
