"""The terminal API's lane (meshpos.infra.asgi.Lane): ``POST /v1/sales`` answered by a plain h11 loop,
everything else, and everything after it on the same connection, by Hypercorn.

Two listeners serve the same terminal app (a real node's core, the real Guard), one with the lane
and one without; the same raw requests must get the same bytes back from both (but the Date
header), whichever loop answered. Then what the lane must keep of Hypercorn's rules: the
keep-alive timeout, the proof timeout, the count towards ``keep_alive_max_requests`` across the
hand-over, ``Connection: close``, a client that goes mid-body, TLS, a fault of its own."""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import ssl
import time
from pathlib import Path
from typing import Any, Callable

import h11
import pytest
import trio

from meshpos.acquirer.tls import self_signed
from meshpos.infra import asgi
from meshpos.infra.netguard import InboundLimits
from meshpos.node.core import NodeCore
from meshpos.node.service import NodeService
from meshpos.terminal.app import TerminalApi, make_app
from meshpos.terminal.events import EventJournal
from meshpos.terminal.guard import Guard, GuardPolicy, host_names
from meshpos.terminal.openapi import OpenApiDocument
from meshpos.terminal.sales import TerminalSales
from meshpos.terminal.server import API_LIMITS, sale_request, tls_context

TOKEN = "lane-token"
CASH = b'{"amount": "12.50", "method": "cash"}'


@pytest.fixture
def core(make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> NodeCore:
    return open_node(make_node("t1", api="127.0.0.1:0"))


class Served:
    """One listener of the terminal app on loopback TCP (a free port)."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.context = context

    async def connect(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        if self.context is not None:
            stream = trio.SSLStream(stream, self.context, server_hostname="127.0.0.1", https_compatible=True)
        return stream

    def head(self, key: str | None = "k1", *, length: int | None = None, extra: str = "",
             token: str = TOKEN, host: str | None = None) -> str:
        lines = [f"Host: {host or f'127.0.0.1:{self.port}'}", f"Authorization: Bearer {token}",
                 "Content-Type: application/json"]
        if key is not None:
            lines.append(f"Idempotency-Key: {key}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return "\r\n".join(lines) + ("\r\n" + extra if extra else "")

    def post(self, body: bytes = CASH, key: str | None = "k1", extra: str = "", **kw: Any) -> bytes:
        return (f"POST /v1/sales HTTP/1.1\r\n{self.head(key, length=len(body), extra=extra, **kw)}\r\n\r\n"
                ).encode() + body

    def get(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\n{self.head(None)}\r\n\r\n".encode()


def _tls_files(root: Path) -> tuple[Path, Path]:
    cert, key = self_signed(["127.0.0.1"], int(time.time() * 1000))
    (root / "cert.pem").write_bytes(cert)
    (root / "key.pem").write_bytes(key)
    return root / "cert.pem", root / "key.pem"


async def serve(nursery: trio.Nursery, core: NodeCore, *, lane: bool, keep_alive_s: float = 75,
                limits: InboundLimits = API_LIMITS, max_requests: int | None = None,
                tls_dir: Path | None = None,
                wanted: Callable[[bytes, bytes], bool] = sale_request) -> Served:
    journal = EventJournal(epoch=1)
    app = make_app(TerminalApi(NodeService(core), TerminalSales(core), journal, dict, dict, OpenApiDocument()))
    sock = asgi.bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server_ctx = client_ctx = None
    if tls_dir is not None:
        cert, key = _tls_files(tls_dir)
        server_ctx = tls_context(cert, key)
        client_ctx = ssl.create_default_context(cafile=str(cert))
    hosts, origins = host_names("127.0.0.1", port, server_ctx is not None)
    policy = GuardPolicy(TOKEN, hosts, origins)
    config = asgi.HypercornConfig(server_ctx, log_name="test.lane", keep_alive_s=keep_alive_s)
    if max_requests is not None:
        config.keep_alive_max_requests = max_requests
    await nursery.start(functools.partial(asgi.serve_gated, app, sock, server_ctx, limits, config=config,
                                          front=lambda inner: Guard(inner, policy),
                                          lane=wanted if lane else None))
    return Served(port, client_ctx)


async def exchange(served: Served, raw: bytes, n: int = 1) -> bytes:
    stream = await served.connect()
    try:
        return await raw_answers(stream, raw, n)
    finally:
        await stream.aclose()


async def raw_answers(stream: trio.abc.Stream, raw: bytes, n: int) -> bytes:
    """Send ``raw`` (requests), read ``n`` answers' bytes, counting them with an h11 client fed the
    same requests (so it knows each answer's length)."""
    await stream.send_all(raw)
    parser = h11.Connection(h11.CLIENT)
    requests = _split(raw)
    got = b""
    done = 0
    parser.send(requests[0][0])
    if requests[0][1]:
        parser.send(h11.Data(data=requests[0][1]))
    parser.send(h11.EndOfMessage())
    with trio.fail_after(10):
        while done < n:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                chunk = await stream.receive_some(65536)
                got += chunk
                if not chunk:
                    break
                parser.receive_data(chunk)
            elif isinstance(event, h11.EndOfMessage):
                done += 1
                if done == n or parser.their_state is not h11.DONE or parser.our_state is not h11.DONE:
                    break
                parser.start_next_cycle()
                request, body = requests[done]
                parser.send(request)
                if body:
                    parser.send(h11.Data(data=body))
                parser.send(h11.EndOfMessage())
            elif isinstance(event, h11.ConnectionClosed):
                break
    return got


def _split(raw: bytes) -> list[tuple[h11.Request, bytes]]:
    """Pipelined requests as an h11 client would send them (what the answers' parser needs)."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    out: list[tuple[h11.Request, bytes]] = []
    request: h11.Request | None = None
    body = b""
    while True:
        try:
            event = server.next_event()
        except h11.RemoteProtocolError:
            break
        if isinstance(event, h11.Request):
            request, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            headers = [(k, v) for k, v in request.headers if k not in (b"transfer-encoding", b"content-length")]
            if not any(k == b"host" for k, _ in headers):  # what the parser needs, not what was sent
                headers.append((b"host", b"x"))
            out.append((h11.Request(method=request.method, target=request.target,
                                    headers=headers + [(b"content-length", str(len(body)).encode())]), body))
            server.send(h11.Response(status_code=204, headers=[]))
            server.send(h11.EndOfMessage())
            if server.our_state is not h11.DONE or server.their_state is not h11.DONE:
                break
            server.start_next_cycle()
        else:
            break
    return out or [(h11.Request(method="GET", target="/", headers=[("host", "x")]), b"")]


def same(answer: bytes) -> bytes:
    """An answer without its Date (the only header that depends on the second it left)."""
    return re.sub(rb"\r\ndate: [^\r]*", b"", answer)


async def both(nursery: trio.Nursery, core: NodeCore, **kw: Any) -> tuple[Served, Served]:
    return await serve(nursery, core, lane=True, **kw), await serve(nursery, core, lane=False, **kw)


async def test_the_lane_answers_every_refusal_with_hypercorns_bytes(core: NodeCore) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane, plain = await both(nursery, core)
            assert (await exchange(lane, lane.post(key="made"))).startswith(b"HTTP/1.1 201 ")
            cases: list[Callable[[Served], bytes]] = [
                lambda s: s.post(key=None),  # 400: no key
                lambda s: s.post(token="wrong"),  # 401
                lambda s: s.post(extra="Origin: http://evil.example"),  # 403
                lambda s: s.post(host="evil.example:80"),  # 403 (DNS rebinding)
                lambda s: s.post(b"{not json"),  # 400
                lambda s: s.post(b'{"amount": "-3", "method": "cash"}'),  # 422: the rules refuse it
                lambda s: s.post(b'{"amount": "1.00", "method": "cash"}', key="made"),  # 409: another body
                lambda s: s.post(key="made"),  # 200: the replay
                lambda s: s.post(b"[" * 70_000),  # 413 (past the lane's size: Hypercorn's)
                lambda s: s.post(key="made", extra="Connection: close"),
                lambda s: s.post(key="made").replace(b"HTTP/1.1", b"HTTP/1.0"),
                lambda s: s.post(key="made").replace(f"Content-Length: {len(CASH)}".encode(), b"Transfer-Encoding: chunked")
                .replace(CASH, f"{len(CASH):x}\r\n".encode() + CASH + b"\r\n0\r\n\r\n"),
                lambda s: s.post(key="made", extra="Expect: 100-continue"),
                lambda s: b"POST /v1/sales HTTP/1.1\r\nHost \r\n\r\n",  # malformed: Hypercorn's 400
                lambda s: s.post(key="made", extra="X-Padding: " + "p" * 20_000),  # a head past 16 KiB: 431
                lambda s: s.get("/v1/sales/nonexistent"),  # 404, from Hypercorn and Starlette on both
            ]
            for i, case in enumerate(cases):
                a = await exchange(lane, case(lane))
                b = await exchange(plain, case(plain))
                assert a and same(a) == same(b).replace(str(plain.port).encode(), str(lane.port).encode()), (i, a, b)
            assert len(core.sales(core.node_id)) == 1  # only the first made a sale
            nursery.cancel_scope.cancel()


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(core: NodeCore) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane, plain = await both(nursery, core)
            made = await exchange(lane, lane.post(key="p"))
            sale_id = json.loads(made.split(b"\r\n\r\n", 1)[1])["id"]

            def batch(s: Served) -> bytes:  # lane, lane, then Hypercorn for the rest
                return (s.post(key="p") + s.post(key=None) + s.get(f"/v1/sales/{sale_id}")
                        + s.post(key="p") + s.post(token="wrong"))
            a = await exchange(lane, batch(lane), 5)
            b = await exchange(plain, batch(plain), 5)
            assert a.count(b"HTTP/1.1 ") == 5
            assert same(a) == same(b)
            statuses = re.findall(rb"HTTP/1.1 (\d+) ", a)
            assert statuses == [b"200", b"400", b"200", b"200", b"401"]
            nursery.cancel_scope.cancel()


async def test_a_sale_through_the_lane_runs_its_hooks_once_after_the_answer(core: NodeCore) -> None:
    sold: list[str] = []
    core.on_sold.append(lambda sale: sold.append(sale["id"]))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane = await serve(nursery, core, lane=True)
            stream = await lane.connect()
            for key in ("a", "b", "a", "c"):
                got = await raw_answers(stream, lane.post(key=key), 1)
                assert got.startswith(b"HTTP/1.1 20")
            assert len(sold) == 3 and len(set(sold)) == 3 and len(core.after_answer) == 0
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_the_keep_alive_timeout_closes_an_idle_connection_on_the_lane(core: NodeCore) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane = await serve(nursery, core, lane=True, keep_alive_s=0.5)
            stream = await lane.connect()
            assert (await raw_answers(stream, lane.post(key="ka"), 1)).startswith(b"HTTP/1.1 201 ")
            start = trio.current_time()
            await stream.send_all(lane.post(key="ka")[:20])  # a head that never ends keeps nothing alive
            assert await stream.receive_some(65536) == b""  # closed by the server
            assert 0.4 <= trio.current_time() - start < 5
            nursery.cancel_scope.cancel()


async def test_a_connection_that_never_passes_the_guard_is_closed_after_the_proof_timeout(core: NodeCore) -> None:
    limits = InboundLimits(total=16, pending=8, per_source=8, proof_timeout=0.8)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane = await serve(nursery, core, lane=True, limits=limits)
            stream = await lane.connect()
            start = trio.current_time()
            for _ in range(3):  # refused requests, answered, prove nothing
                assert (await raw_answers(stream, lane.post(token="wrong"), 1)).startswith(b"HTTP/1.1 401 ")
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    if await stream.receive_some(65536) == b"":
                        raise trio.BrokenResourceError
            assert 0.7 <= trio.current_time() - start < 5
            # one that proves itself stays past it
            stream = await lane.connect()
            assert (await raw_answers(stream, lane.post(key="proof"), 1)).startswith(b"HTTP/1.1 201 ")
            await trio.sleep(1.2)
            assert (await raw_answers(stream, lane.post(key="proof"), 1)).startswith(b"HTTP/1.1 200 ")
            nursery.cancel_scope.cancel()


async def test_the_request_count_carries_over_the_hand_over_to_hypercorn(core: NodeCore) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane, plain = await both(nursery, core, max_requests=3)
            for s in (lane, plain):
                got = await exchange(s, s.post(key="m") + s.post(key="m") + s.get("/v1/sales/none"), 3)
                heads = [h.lower() for h in re.findall(rb"HTTP/1.1 \d+ .*?\r\n\r\n", got, re.S)]
                assert [b"connection: close" in h for h in heads] == [False, False, True], got
            nursery.cancel_scope.cancel()


async def test_a_client_gone_in_the_middle_of_its_body_makes_no_sale_and_stops_nothing(core: NodeCore) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane = await serve(nursery, core, lane=True)
            stream = await lane.connect()
            await stream.send_all(lane.post(key="half")[:-10])
            await trio.sleep(0.2)
            await stream.aclose()
            got = await exchange(lane, lane.post(key="whole"))
            assert got.startswith(b"HTTP/1.1 201 ")
            assert [s["idempotency_key"] for s in core.sales(core.node_id)] == ["whole"]
            nursery.cancel_scope.cancel()


async def test_the_lane_over_tls(core: NodeCore, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane = await serve(nursery, core, lane=True, tls_dir=tmp_path)
            plain = await serve(nursery, core, lane=False, tls_dir=tmp_path)
            first = await exchange(lane, lane.post(key="tls"))
            assert first.startswith(b"HTTP/1.1 201 ")
            a = await exchange(lane, lane.post(key="tls") + lane.get("/v1/sales/x"), 2)
            b = await exchange(plain, plain.post(key="tls") + plain.get("/v1/sales/x"), 2)
            assert re.findall(rb"HTTP/1.1 (\d+) ", a) == [b"200", b"404"]
            assert same(a) == same(b)
            nursery.cancel_scope.cancel()


async def test_a_fault_of_the_lane_closes_its_connection_not_the_listener(core: NodeCore,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    def broken(method: bytes, target: bytes) -> bool:
        if target == b"/boom":
            raise RuntimeError("a bug in the lane")
        return sale_request(method, target)
    with trio.fail_after(30), caplog.at_level(logging.ERROR):
        async with trio.open_nursery() as nursery:
            lane = await serve(nursery, core, lane=True, wanted=broken)
            stream = await lane.connect()
            await stream.send_all(lane.get("/boom"))
            assert await stream.receive_some(65536) == b""
            assert (await exchange(lane, lane.post(key="after"))).startswith(b"HTTP/1.1 201 ")
            assert "the HTTP lane failed" in caplog.text
            nursery.cancel_scope.cancel()



async def test_sales_go_through_the_lane_and_hypercorn_takes_the_connection_at_the_first_other_request(
        core: NodeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[bytes] = []

    class Counted(asgi._Connection):
        def __init__(self, *args: Any, taken: bytes = b"", **kwargs: Any) -> None:
            handed.append(taken)
            super().__init__(*args, taken=taken, **kwargs)
    monkeypatch.setattr(asgi, "_Connection", Counted)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            lane = await serve(nursery, core, lane=True)
            stream = await lane.connect()
            for key in ("x", "y", "x"):
                assert (await raw_answers(stream, lane.post(key=key), 1)).startswith(b"HTTP/1.1 20")
            assert handed == []  # no Hypercorn connection handler so far
            got = await raw_answers(stream, lane.get("/v1/sales/none") + lane.post(key="z"), 2)
            assert re.findall(rb"HTTP/1.1 (\d+) ", got) == [b"404", b"201"]
            assert handed == [lane.get("/v1/sales/none") + lane.post(key="z")]  # every byte not yet answered
            nursery.cancel_scope.cancel()


def _variant(rng: random.Random, port: int, i: int) -> tuple[bytes, int]:
    """One made-up request (or two, pipelined) around ``POST /v1/sales``, and how many answers it
    gets; ``KEY`` stands for the idempotency key, made distinct per listener by the caller."""
    clean = rng.random() < 0.5  # the right method, target, Host and token: the sale's own path
    method = b"POST" if clean else rng.choice([b"POST"] * 8 + [b"post", b"PUT", b"GET"])
    target = b"/v1/sales" if clean else rng.choice([b"/v1/sales"] * 8 + [b"/v1/sales?x=1", b"/v1/sales/", b"//v1/sales", b"/v1/sale%73"])
    version = rng.choice([b"HTTP/1.1"] * 12 + [b"HTTP/1.0"])
    body = rng.choice([
        CASH, CASH, CASH, CASH, b'{"amount": "3.00", "method": "card", "card": {"pan": "4111111111111111", "expiry": "1230"}}',
        b'{"amount": "3.00", "method": "card", "card": {"pan": "4111111111111112", "expiry": "1230"}}',
        b'{"amount": "1.00", "method": "cash", "description": "caf\xc3\xa9"}',
        b'{"amount": "\xd9\xa1\xd9\xa2.50", "method": "cash"}',  # Arabic-Indic digits
        b'{"amount": "12.50", "method": "cash", "tip": 1}', b"", b"{", b"[]", b"[" * 3000,
        b'{"amount": "12.50", "method": "cheque"}', b'{"amount": 12.5, "method": "cash"}',
        b'{"amount": "99999999999999.99", "method": "cash"}',
    ])
    key = rng.choice([f"KEY{i}".encode()] * 4 + [b"KEYsame", b"KEYsame", b"", b"KEY" + b"k" * 300, b"KEY\xe9",
                                                b"4111111111111111"])
    headers: list[bytes] = []
    host = rng.choice([f"127.0.0.1:{port}".encode()] * 6 + [b"evil.example", b""])
    if clean:
        host = f"127.0.0.1:{port}".encode()
    if clean or rng.random() > 0.05:
        headers.append(rng.choice([b"Host", b"host", b"HOST"]) + b":" + rng.choice([b" ", b"", b"\t"]) + host)
    auth = rng.choice([f"Bearer {TOKEN}".encode()] * 6 + [f"bearer {TOKEN}".encode(), b"Bearer nope", b"Basic x"])
    if clean:
        auth = f"Bearer {TOKEN}".encode()
    if clean or rng.random() > 0.05:
        headers.append(b"Authorization: " + auth)
    if rng.random() > 0.1:
        headers.append(b"Idempotency-Key: " + key)
    if rng.random() < 0.1:
        headers.append(b"Idempotency-Key: KEYsecond")
    if rng.random() < 0.15:
        headers.append(b"Origin: " + rng.choice([b"http://evil.example", f"http://127.0.0.1:{port}".encode()]
                                                 if not clean else [f"http://127.0.0.1:{port}".encode()]))
    if rng.random() < 0.1:
        headers.append(b"Connection: close")
    if rng.random() < 0.1:
        headers.append(b"Cookie: meshpos_session=forged")
    chunked = rng.random() < 0.08
    if chunked:
        headers.append(b"Transfer-Encoding: chunked")
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        headers.append(b"Content-Length: " + str(len(body)).encode())
        if rng.random() < 0.05:
            headers.append(b"Content-Length: " + str(len(body)).encode())  # the same twice
        payload = body
    rng.shuffle(headers)
    request = method + b" " + target + b" " + version + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + payload
    if rng.random() < 0.15 and b"close" not in request and version == b"HTTP/1.1":
        second, n = _variant(rng, port, i + 100_000)
        return request + second, 1 + n
    return request, 1


def _normal(answer: bytes, node_id: str) -> bytes:
    """An answer with what differs by listener made the same: the date, the key's prefix, sale ids
    (their sequence numbers), times, and the lengths that follow from them."""
    answer = same(answer)
    answer = re.sub(rb"\b[LP]KEY", b"KEY", answer)
    answer = re.sub(re.escape(node_id).encode() + rb"-\d+", b"SALE", answer)
    answer = re.sub(rb'"(seq|created_at_ms|window_ends_at|created_at)":("[^"]*"|\d+)', rb'"\1":X', answer)
    return re.sub(rb"\r\ncontent-length: \d+", b"", answer)


async def test_made_up_requests_get_the_same_answers_from_the_lane_and_from_hypercorn(core: NodeCore) -> None:
    """Differential: 200 seeded, made-up requests (odd methods, targets, versions, header case and
    spacing, duplicate headers, chunked bodies, non-ASCII and malformed bodies and keys, pipelined
    pairs), each sent to the lane's listener and to the plain one with its own key prefix."""
    rng = random.Random(20261204)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            lane, plain = await both(nursery, core)
            for i in range(200):
                state = rng.getstate()
                raw, n = _variant(rng, lane.port, i)
                rng.setstate(state)
                raw_plain, _ = _variant(rng, plain.port, i)
                a = await exchange(lane, raw.replace(b"KEY", b"LKEY"), n)
                b = await exchange(plain, raw_plain.replace(b"KEY", b"PKEY"), n)
                assert a, raw
                assert _normal(a, core.node_id) == _normal(b, core.node_id).replace(
                    str(plain.port).encode(), str(lane.port).encode()), (i, raw, a, b)
            nursery.cancel_scope.cancel()
