"""meshpos.infra.http: the h11 server and client on loopback, plain and with TLS client certificates."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshpos.domain.errors import ProtocolError
from meshpos.infra.http import (
    AbortConnection,
    HttpClientConnection,
    HttpLimits,
    Request,
    Response,
    json_response,
    listener_port,
    open_https,
    request,
    serve_http,
)


@dataclass(frozen=True)
class SelfSignedCert:
    cert_pem: bytes
    key_pem: bytes
    der: bytes

    def files(self, directory: Path, name: str) -> tuple[Path, Path]:
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


def make_self_signed(common_name: str = "localhost") -> SelfSignedCert:
    """A throw-away self-signed certificate for localhost / 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return SelfSignedCert(cert.public_bytes(serialization.Encoding.PEM), key_pem,
                    cert.public_bytes(serialization.Encoding.DER))


def server_context(server: SelfSignedCert, tmp: Path, client_ca: SelfSignedCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*server.files(tmp, "server"))
    if client_ca is not None:
        ctx.load_verify_locations(cadata=client_ca.cert_pem.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(trust: SelfSignedCert, tmp: Path, client: SelfSignedCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=trust.cert_pem.decode())
    if client is not None:
        ctx.load_cert_chain(*client.files(tmp, "client"))
    return ctx


async def echo(req: Request) -> Response:
    if req.path == "/boom":
        raise RuntimeError("handler bug")
    if req.path == "/abort":
        raise AbortConnection
    cert = hashlib.sha256(req.peer_cert_der).hexdigest() if req.peer_cert_der else None
    return json_response(200, {
        "method": req.method, "path": req.path, "query": req.query, "params": req.params(),
        "x": req.headers.get("x-test"), "len": len(req.body), "cert": cert,
    })


@asynccontextmanager
async def server(ctx: ssl.SSLContext | None = None, limits: HttpLimits = HttpLimits()) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners: list[Any] = await nursery.start(
            lambda task_status: serve_http(echo, ("127.0.0.1", 0, ctx), limits=limits, task_status=task_status))
        yield listener_port(listeners[0])
        nursery.cancel_scope.cancel()


async def test_keep_alive_query_headers_and_body() -> None:
    async with server() as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = HttpClientConnection(stream)
        first = await conn.request("GET", "/a/b?x=1&y=&x=2", {"X-Test": "Hi"})
        assert conn.reusable
        second = await conn.request("POST", "/post", {"host": "h"}, b"z" * 1000)
        await conn.aclose()
    assert first.status == 200 and first.headers["content-type"] == "application/json"
    assert first.json() == {"method": "GET", "path": "/a/b", "query": "x=1&y=&x=2",
                            "params": {"x": ["1", "2"], "y": [""]}, "x": "Hi", "len": 0, "cert": None}
    assert second.json()["len"] == 1000 and second.json()["method"] == "POST"


async def test_handler_error_is_a_500_and_the_server_lives_on() -> None:
    async with server() as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = HttpClientConnection(stream)
        boom = await conn.request("GET", "/boom", {})
        after = await conn.request("GET", "/fine", {})  # same connection still serves
        await conn.aclose()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        fresh = await request(stream, "GET", "/fresh", {})
        await stream.aclose()
    assert boom.status == 500 and b"handler bug" not in boom.body
    assert after.status == 200 and fresh.status == 200


async def test_too_large_body_and_headers_are_refused() -> None:
    limits = HttpLimits(max_body_bytes=100, max_header_bytes=1024)
    async with server(limits=limits) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        big_body = await request(stream, "POST", "/x", {}, b"a" * 101)
        await stream.aclose()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ok = await request(stream, "POST", "/x", {}, b"a" * 100)
        await stream.aclose()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"50\r\n" + b"a" * 80 + b"\r\n50\r\n" + b"a" * 80 + b"\r\n0\r\n\r\n")
        chunked = await read_all(stream)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        big_head = await request(stream, "GET", "/x", {"x-pad": "p" * 2000})
        await stream.aclose()
    assert big_body.status == 413 and big_body.headers["connection"] == "close"
    assert ok.status == 200
    assert chunked.startswith(b"HTTP/1.1 413 ")
    assert big_head.status == 431


async def read_all(stream: trio.abc.Stream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    await stream.aclose()
    return out


async def test_slow_or_idle_clients_are_cut_off() -> None:
    async with server(limits=HttpLimits(read_timeout=0.2)) as port:
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        assert await read_all(idle) == b""  # idle keep-alive: closed without a word
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n")
        assert (await read_all(slow)).startswith(b"HTTP/1.1 408 ")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        assert (await request(stream, "GET", "/", {})).status == 200
        await stream.aclose()


async def test_malformed_request_is_a_400() -> None:
    async with server() as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        assert (await read_all(stream)).startswith(b"HTTP/1.1 400 ")


async def test_abort_connection_gives_the_client_a_protocol_error() -> None:
    async with server() as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with pytest.raises(ProtocolError, match="connection lost during GET /abort: closed before the whole answer"):
            await request(stream, "GET", "/abort", {})
        await stream.aclose()


async def test_tls_with_client_certificate_reaches_the_handler(tmp_path: Path) -> None:
    server_cert, client_cert = make_self_signed("localhost"), make_self_signed("terminal-1")
    async with server(server_context(server_cert, tmp_path, client_ca=client_cert)) as port:
        stream = await open_https("127.0.0.1", port, client_context(server_cert, tmp_path, client_cert), "localhost")
        answer = await request(stream, "GET", "/who", {})
        await stream.aclose()
        # without a client certificate the handshake (or the first exchange) fails
        with pytest.raises(ProtocolError):
            bare = await open_https("127.0.0.1", port, client_context(server_cert, tmp_path), "localhost")
            await request(bare, "GET", "/who", {})
    assert answer.json()["cert"] == hashlib.sha256(client_cert.der).hexdigest()


async def test_https_refuses_an_untrusted_server(tmp_path: Path) -> None:
    server_cert, other = make_self_signed(), make_self_signed()
    async with server(server_context(server_cert, tmp_path)) as port:
        with pytest.raises(ProtocolError, match="TLS handshake"):
            await open_https("127.0.0.1", port, client_context(other, tmp_path), "localhost")
        stream = await open_https("127.0.0.1", port, client_context(server_cert, tmp_path))
        assert (await request(stream, "GET", "/", {})).json()["cert"] is None
        await stream.aclose()


def test_json_nested_too_deep_is_a_protocol_error_not_a_crash(tmp_path: Path) -> None:
    """json.loads raises RecursionError (not a ValueError) on a body nested some thousands deep: an
    acquirer's answer, a request to the simulator, a config file are each refused clearly."""
    from meshpos.acquirer.simulator import SimRules
    from meshpos.domain.errors import ConfigError
    from meshpos.infra.jsonfile import read_json

    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ProtocolError, match="nested too deep"):
        Response(200, {}, deep).json()
    with pytest.raises(ProtocolError, match="nested too deep"):
        Request("POST", "/v1/advices", "", {}, deep).json()
    (tmp_path / "config.json").write_bytes(deep)
    with pytest.raises(ConfigError, match="nested too deep"):
        read_json(tmp_path / "config.json", "node config")
    with pytest.raises(ConfigError, match="not JSON"):
        SimRules.load(tmp_path / "config.json")
