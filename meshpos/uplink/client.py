"""The node's HTTPS client of the switch's forwarding API (protocols/forwarding.md).

The node presents its enrolled certificate (TLS client certificate) and pins the
switch: after the handshake the server certificate's Ed25519 key must be one of
the two whose X25519 form is the site policy's ``switch_key``
(:func:`meshpos.wire.pin.check_pin`). No CA is trusted for the switch.

Every failure (no route, TLS, pin, timeout, HTTP error, bad reply) is an
:class:`~meshpos.domain.errors.UplinkError`: :class:`NotSent` when the request never left this
node (nothing can be learnt about what it carried), :class:`SwitchRefused` (with the HTTP
status) when the switch answered but not 200, a plain UplinkError when the exchange broke
once the request was under way.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from meshpos.domain.errors import ConfigError, EncodingError, ProtocolError, UplinkError, VerificationError
from meshpos.infra.http import HttpClientConnection, Response, open_https, peer_cert_der
from meshpos.site.nodedir import NodeDir
from meshpos.domain.policy import SitePolicy
from meshpos.wire.forwarding import FORWARD_PATH, HEALTH_PATH, MAX_REPLY_BYTES, ForwardReply, decode_reply, encode_request
from meshpos.wire.forwarding_codings import (ANNOUNCE_HEADER, CODING_HEADER, GZIP, announces_gzip, compress, decode_body,
                                             encode_results_request)
from meshpos.wire.pin import check_pin

from meshpos.uplink.host import UplinkHost

FORWARD_TIMEOUT_S = 300.0  # a batch waits for the acquirer's answers to all of its sales
PROBE_TIMEOUT_S = 5.0


class NotSent(UplinkError):
    """The request never left this node: no route, TLS or pin failure, no switch configured."""


class SwitchRefused(UplinkError):
    """The switch answered, but not 200: ``status`` says why (400 malformed, 403 not allowed...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PinnedContext(ssl.SSLContext):
    """A client context that trusts no CA: the server's key is checked against ``switch_key``."""

    switch_key: bytes | None = None


def make_client_context(source: "UplinkHost | Path", policy: SitePolicy | None = None) -> PinnedContext:
    """TLS 1.3 client context with the node's certificate, pinned to the policy's switch key.

    ``source`` is the running node (its current policy is the default) or a node directory
    (then the enrolled policy.env, unless ``policy`` is given: pass the ledger's newest).
    """
    if isinstance(source, Path):
        nd = NodeDir(source)
        nd.check_exists()
        if policy is None:
            policy = nd.policy(nd.ca_cert())
    else:
        nd = source.dir
        if policy is None:
            policy = source.policy
    if policy.switch_key_bytes is None:
        raise ConfigError("the site policy names no switch key: nothing to pin, so nothing is forwarded")
    nd.key()  # refuses a key file readable by others
    ctx = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # replaced by the pin, checked on every connection
    try:
        ctx.load_cert_chain(nd.cert_path, nd.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{nd.path}: cannot load the node certificate and key for TLS: {exc}") from exc
    ctx.switch_key = policy.switch_key_bytes
    return ctx


def parse_switch_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"switch URL must be https://HOST:PORT, got {url!r}")
    try:
        port = parts.port or 443
    except ValueError as exc:
        raise ConfigError(f"switch URL has a bad port: {url!r}") from exc
    return parts.hostname, port


async def open_switch(switch_url: str, ssl_ctx: ssl.SSLContext) -> HttpClientConnection:
    """A TLS connection to the switch, its pin checked; UplinkError otherwise."""
    host, port = parse_switch_url(switch_url)
    try:
        stream = await open_https(host, port, ssl_ctx, server_hostname=host)
    except ProtocolError as exc:
        raise NotSent(f"cannot reach the switch at {switch_url}: {exc}") from exc
    pin = getattr(ssl_ctx, "switch_key", None)
    if pin is None and ssl_ctx.verify_mode == ssl.CERT_NONE:
        await trio.aclose_forcefully(stream)
        raise NotSent("refusing an unauthenticated switch: the TLS context neither pins nor verifies it")
    if pin is not None:
        try:
            check_pin(peer_cert_der(stream), pin)
        except VerificationError as exc:
            await trio.aclose_forcefully(stream)
            raise NotSent(f"{switch_url}: {exc}") from exc
    return HttpClientConnection(stream, max_body_bytes=MAX_REPLY_BYTES)


async def _exchange(switch_url: str, ssl_ctx: ssl.SSLContext, method: str, path: str, body: bytes,
                    timeout: float, gzip_body: bool = False, accept_gzip: bool = True) -> Response:
    host, port = parse_switch_url(switch_url)
    headers = {"host": f"{host}:{port}", "content-type": "application/json", "accept": "application/json"}
    if accept_gzip:
        headers[ANNOUNCE_HEADER] = GZIP
    if gzip_body:
        headers[CODING_HEADER] = GZIP
    conn: HttpClientConnection | None = None
    response: Response | None = None
    with trio.move_on_after(timeout):
        conn = await open_switch(switch_url, ssl_ctx)
        try:
            response = await conn.request(method, path, headers, body)
        except ProtocolError as exc:
            raise UplinkError(f"switch at {switch_url}: {exc}") from exc
        finally:
            await conn.aclose()
    if response is None:
        if conn is None:
            raise NotSent(f"switch at {switch_url} could not be reached within {timeout:g} s")
        raise UplinkError(f"switch at {switch_url} gave no answer within {timeout:g} s")
    try:
        body = decode_body(response.body, response.headers.get(CODING_HEADER), MAX_REPLY_BYTES)
    except EncodingError as exc:
        raise UplinkError(f"switch at {switch_url} answered an unusable body: {exc}") from exc
    return Response(response.status, response.headers, body)


def _refusal(response: Response) -> str:
    try:
        detail = response.json().get("error", "")
    except (ProtocolError, AttributeError):
        detail = response.body[:200].decode("utf-8", "replace")
    return str(detail)


@dataclass(frozen=True)
class Exchanged:
    """One answered POST: the reply, whether the switch announced gzip, the request's size on the wire."""

    reply: ForwardReply
    gzip_announced: bool
    body_bytes: int


async def post(switch_url: str, ssl_ctx: ssl.SSLContext, path: str, wire: bytes, *, gzip_body: bool = False,
               accept_gzip: bool = True, timeout: float = FORWARD_TIMEOUT_S) -> Exchanged:
    """POST ``wire`` (a body already gzip-compressed if ``gzip_body``, see :func:`coded`: only to a
    switch that announced it) to a path answered in the forward reply format (protocols/forwarding.md)."""
    response = await _exchange(switch_url, ssl_ctx, "POST", path, wire, timeout, gzip_body=gzip_body,
                               accept_gzip=accept_gzip)
    announced = announces_gzip(response.headers.get(ANNOUNCE_HEADER))
    if response.status != 200:
        raise SwitchRefused(response.status, f"switch refused the request to {path} (HTTP {response.status}): "
                                             f"{_refusal(response)}")
    try:
        return Exchanged(decode_reply(response.body), announced, len(wire))
    except EncodingError as exc:
        raise UplinkError(f"switch answered something unusable: {exc}") from exc


def coded(body: bytes, gzip_body: bool) -> bytes:
    return compress(body) if gzip_body else body


def forward_body(entries: list[bytes]) -> bytes:
    try:
        return encode_request(entries)
    except EncodingError as exc:  # this batch's content: splitting it finds the entry
        raise UplinkError(f"batch cannot be sent: {exc}") from exc


def results_body(sale_ids: list[str]) -> bytes:
    try:
        return encode_results_request(sale_ids)
    except EncodingError as exc:
        raise UplinkError(f"results lookup cannot be sent: {exc}") from exc


async def forward(switch_url: str, ssl_ctx: ssl.SSLContext, entries: list[bytes],
                  timeout: float = FORWARD_TIMEOUT_S) -> ForwardReply:
    """POST one batch, uncompressed; the full reply (results, pending, refused, reversed)."""
    return (await post(switch_url, ssl_ctx, FORWARD_PATH, forward_body(entries), timeout=timeout)).reply




async def forward_batch(switch_url: str, ssl_ctx: ssl.SSLContext, entries: list[bytes]) -> list[bytes]:
    """POST one batch; the signed result envelopes (one per settled sale)."""
    return list((await forward(switch_url, ssl_ctx, entries)).results)


async def health_reply(switch_url: str, ssl_ctx: ssl.SSLContext, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """The switch's health reply (its ``time_ms`` is the switch's clock,
    meshpos.wire.forwarding.health_time_ms); the errors of a POST: NotSent, SwitchRefused with the
    status when it answered but not 200 (403: it does not accept this node), else UplinkError."""
    try:
        response = await _exchange(switch_url, ssl_ctx, "GET", HEALTH_PATH, b"", timeout)
    except ConfigError as exc:
        raise NotSent(str(exc)) from exc
    except OSError as exc:
        raise UplinkError(f"switch at {switch_url}: {exc}") from exc
    if response.status != 200:
        raise SwitchRefused(response.status, f"switch refused the health probe (HTTP {response.status}): "
                                             f"{_refusal(response)}")
    try:
        body = response.json()
    except ProtocolError:
        return {}
    return body if isinstance(body, dict) else {}


async def health(switch_url: str, ssl_ctx: ssl.SSLContext, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any] | None:
    """The switch's health reply if it answers and accepts this node, else None. Never raises."""
    try:
        return await health_reply(switch_url, ssl_ctx, timeout)
    except UplinkError:
        return None


async def probe(switch_url: str, ssl_ctx: ssl.SSLContext, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can this node reach the switch, and does the switch accept it? Never raises."""
    return await health(switch_url, ssl_ctx, timeout) is not None
