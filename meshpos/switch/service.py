"""The switch as a service: the HTTPS forwarding API in front of :class:`~.processor.Switch`.

``meshpos switch init`` -> :func:`init_switch`, ``switch add-site`` -> :func:`add_site`,
``switch run`` -> :func:`run_switch`. Tests and tools build the pieces themselves:
:class:`SwitchService` around a :class:`Switch` with any acquirer link, served by
:func:`serve_switch` on listeners they choose.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import trio

from meshpos.acquirer.base import AcquirerLink
from meshpos.acquirer.base import LateAnswer
from meshpos.acquirer.iso8583_link import LateAnswerSink, open_iso8583_link
from meshpos.acquirer.json_https import open_json_link
from meshpos.acquirer.pool import AcquirerPool, CheckableLink
from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.domain.errors import ConfigError, EncodingError, InputError, VerificationError
from meshpos.domain.hostport import parse_hostport
from meshpos.infra.netguard import LogLimiter
from meshpos.infra.http import HttpLimits, Request, Response, json_response, listener_port, peer_cert_der, serve_http
from meshpos.identity import keys
from meshpos.wire.forwarding import (FORWARD_PATH, HEALTH_PATH, HEALTH_TIME_FIELD, MAX_BODY_BYTES, decode_request,
                                     encode_reply)
from meshpos.wire.forwarding_codings import (ANNOUNCE_HEADER, CODING_HEADER, COMPRESS_REPLY_FROM, GZIP, RESULTS_PATH,
                                             UnsupportedCoding, announces_gzip, compress, decode_body,
                                             decode_results_request)
from meshpos.switch.lookup import results_for
from meshpos.switch.connlimit import ConnectionGate, ConnectionLimits
from meshpos.switch.gcpolicy import settle_gc
from meshpos.switch.hardening import disable_core_dumps
from meshpos.switch.metrics import SwitchMetrics
from meshpos.switch.ops import OpsService, Readiness, serve_ops, watch_sites
from meshpos.switch.processor import Switch
from meshpos.switch.store import SiteRow
from meshpos.switch.switchdir import SwitchConfig, SwitchDir, add_site, init_switch
from meshpos.switch.tls import server_context, trust_sites

log = logging.getLogger(__name__)

LIMITS = HttpLimits(max_body_bytes=MAX_BODY_BYTES, read_timeout=60.0)
CONNECTIONS = ConnectionLimits()


class SwitchService:
    """The HTTP handler of the forwarding API (protocols/forwarding.md)."""

    def __init__(self, switch: Switch, tls_context: ssl.SSLContext | None = None,
                 limits: ConnectionLimits = CONNECTIONS) -> None:
        self.switch = switch
        self.tls_context = tls_context
        self.gate = ConnectionGate(limits)
        self.requests = 0
        self.refusal_log = LogLimiter()  # one line per reason a minute: a client the switch refuses writes no more

    def register_site(self, row: SiteRow) -> None:
        """Take a site registered while running: its forwarders may connect at once."""
        self.switch.add_site(row)
        if self.tls_context is not None:
            trust_sites(self.tls_context, [row.ca_pem])

    async def handle(self, request: Request) -> Response:
        """Every answer announces the request codings taken (protocols/forwarding.md, "Compression")."""
        response = await self._handle(request)
        headers = {**response.headers, ANNOUNCE_HEADER: GZIP}
        body = response.body
        if len(body) >= COMPRESS_REPLY_FROM and announces_gzip(request.headers.get(ANNOUNCE_HEADER)):
            body = compress(body)
            headers[CODING_HEADER] = GZIP
        return Response(response.status, headers, body)

    def authenticate(self, stream: trio.SSLStream[Any]) -> bool:
        """Right after the TLS handshake: does the client certificate name a forwarder of a
        registered site? Then its connection no longer counts against its address (:mod:`.connlimit`)."""
        try:
            _, ident = self.switch.identify_client(peer_cert_der(stream))
        except VerificationError:
            return False  # the request handler answers 403 and closes the connection
        return self.gate.authenticate(stream.transport_stream, ident.node_id)

    async def _handle(self, request: Request) -> Response:
        self.requests += 1
        try:
            site, ident = self.switch.identify_client(request.peer_cert_der)
        except VerificationError as exc:
            ok, suppressed = self.refusal_log.allow(str(exc))
            if ok:
                log.warning("refused a forwarder from %s: %s%s", request.peer_addr, exc,
                            f" ({suppressed} more refusals for this since the last line)" if suppressed else "")
            return json_response(403, {"error": str(exc)}, {"connection": "close"})  # no keep-alive for it
        if request.path not in (FORWARD_PATH, HEALTH_PATH, RESULTS_PATH):
            return json_response(404, {"error": f"no such path {request.path[:80]!r}"})
        if request.path == HEALTH_PATH:
            if request.method != "GET":
                return json_response(405, {"error": "use GET"}, {"allow": "GET"})
            return json_response(200, {"ok": True, "site": site.site_id,
                                       "switch_key": self.switch.x25519_public.hex(), "request_codings": [GZIP],
                                       HEALTH_TIME_FIELD: self.switch.clock.now_ms()})
        if request.method != "POST":
            return json_response(405, {"error": "use POST"}, {"allow": "POST"})
        try:
            body = decode_body(request.body, request.headers.get(CODING_HEADER))
        except UnsupportedCoding as exc:
            return json_response(415, {"error": str(exc)})
        except EncodingError as exc:
            log.warning("undecodable request body from %s (%s): %s", ident.name, ident.node_id, exc)
            return json_response(400, {"error": str(exc)})
        if request.path == RESULTS_PATH:
            try:
                sale_ids = decode_results_request(body)
            except EncodingError as exc:
                return json_response(400, {"error": str(exc)})
            lookup = results_for(self.switch.store, site.site_id, sale_ids)
            return Response(200, {"content-type": "application/json"}, encode_reply(lookup))
        try:
            entries = decode_request(body)
            reply = await self.switch.forward(site, entries)
        except (EncodingError, InputError) as exc:
            log.warning("malformed batch from %s (%s): %s", ident.name, ident.node_id, exc)
            return json_response(400, {"error": str(exc)})
        log.info("batch of %d entries from %s (%s): %d results, %d pending, %d refused", len(entries),
                 ident.name, ident.node_id, len(reply.results), len(reply.pending), len(reply.refused))
        return Response(200, {"content-type": "application/json"}, encode_reply(reply))


async def serve_switch(
    service: SwitchService,
    host: str,
    port: int,
    *,
    limits: ConnectionLimits = CONNECTIONS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the forwarding API over HTTPS until cancelled; ``task_status.started`` gets the port.

    Connections are bounded (:mod:`.connlimit`): in total, per source address, and in how long
    one may hold its slot without sending (its TLS handshake included)."""
    if service.tls_context is None:
        raise ConfigError("the forwarding API is served over TLS only")
    tcp = await trio.open_tcp_listeners(port, host=host)
    listeners: list[Any] = [trio.SSLListener(service.gate.wrap(t), service.tls_context, https_compatible=True)
                            for t in tcp]
    http_limits = dataclasses.replace(LIMITS, handshake_timeout=limits.handshake_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_http(service.handle, listeners, limits=http_limits,
                                                           authenticate=service.authenticate,
                                                           task_status=task_status))
        task_status.started(listener_port(listeners[0]))


def acquirer_tls_context(cfg: SwitchConfig) -> ssl.SSLContext:
    """The client context of both acquirer links: the configured CA (default: the system's), host
    name checked, and the switch's client certificate when configured (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.acquirer_ca:
        try:
            ctx.load_verify_locations(cfg.acquirer_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the acquirer CA {cfg.acquirer_ca}: {exc}") from exc
    if cfg.acquirer_cert and cfg.acquirer_key:
        try:
            ctx.load_cert_chain(cfg.acquirer_cert, cfg.acquirer_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the acquirer client certificate {cfg.acquirer_cert}: {exc}") from exc
    return ctx


@asynccontextmanager
async def open_acquirer_link(cfg: SwitchConfig, clock: Clock = SYSTEM_CLOCK, *,
                             on_late_answer: LateAnswerSink | None = None) -> AsyncIterator[CheckableLink]:
    """The configured acquirer link: ISO 8583 over TLS (plain TCP only with ``acquirer_plain``), a
    pool of ``acquirer_connections`` of them, or the JSON adapter over HTTPS (its own keep-alive
    pool). ``on_late_answer`` takes ISO 8583 answers nobody waits for any more."""
    host, port = parse_hostport(cfg.acquirer, "acquirer")
    if cfg.acquirer_format == "iso8583":
        ctx = None if cfg.acquirer_plain else acquirer_tls_context(cfg)
        if ctx is None:
            log.warning("the ISO 8583 link to %s is plain TCP (acquirer_plain): card numbers cross it in the clear",
                        cfg.acquirer)
        async with AsyncExitStack() as stack:
            links = [await stack.enter_async_context(open_iso8583_link(
                host, port, timeout=cfg.acquirer_timeout_s, clock=clock, ssl_context=ctx,
                on_late_answer=on_late_answer)) for _ in range(cfg.acquirer_connections)]
            yield links[0] if len(links) == 1 else AcquirerPool(links)
        return
    json_link = open_json_link(host, port, acquirer_tls_context(cfg), timeout=cfg.acquirer_timeout_s)
    try:
        yield json_link
    finally:
        await json_link.aclose()


@dataclass(frozen=True)
class RunningSwitch:
    service: SwitchService
    port: int
    metrics_port: int | None = None


async def run_switch(
    path: Path,
    *,
    clock: Clock = SYSTEM_CLOCK,
    listen: str | None = None,
    metrics: str | None = None,
    task_status: trio.TaskStatus[RunningSwitch] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the switch of SWITCH_DIR until cancelled (the CLI cancels on SIGINT / SIGTERM); with
    ``metrics`` (HOST:PORT), also /healthz, /readyz and /metrics there (:mod:`.ops`)."""
    sd = SwitchDir(path)
    cfg = sd.config()
    host, port = parse_hostport(listen or cfg.listen, "listen")
    ops_at = parse_hostport(metrics, "metrics") if metrics else None
    key = sd.key()
    sd.lock()
    store = sd.open_store()
    try:
        sites = store.sites()
        if not sites:
            log.warning("no site is registered at this switch yet: `meshpos switch add-site %s SITE_DIR`", path)
        ctx = server_context(sd.tls_path, sd.key_path, [s.ca_pem for s in sites])
        # answers that arrive after their request gave up: one per request sent, never dropped
        late_in, late_out = trio.open_memory_channel[LateAnswer](math.inf)
        meters = SwitchMetrics()
        async with open_acquirer_link(cfg, clock, on_late_answer=late_in.send_nowait) as link:
            switch = Switch(store, key, link, clock, in_flight=cfg.in_flight, instance=cfg.instance, metrics=meters,
                            claim_lease_s=cfg.claim_lease_s)
            service = SwitchService(switch, ctx)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(switch.take_late_answers, late_out)
                nursery.start_soon(switch.keep_claims)
                nursery.start_soon(watch_sites, switch, lambda pem: trust_sites(ctx, [pem]))
                bound = await nursery.start(serve_switch, service, host, port)
                ops_port: int | None = None
                if ops_at is not None:
                    ops = OpsService(Readiness(store, link.check, meters), meters, cfg.instance)
                    ops_port = await nursery.start(serve_ops, ops, *ops_at)
                log.info("switch %s... instance %s serving on %s:%d for %d site(s), database %s%s",
                         keys.x25519_public_of(key).hex()[:16], cfg.instance, host, bound, len(sites),
                         store.location, f", metrics on {ops_at[0]}:{ops_port}" if ops_at else "")
                task_status.started(RunningSwitch(service, bound, ops_port))
    finally:
        store.close()
        sd.unlock()


async def run_until_signalled(path: Path, listen: str | None = None, metrics: str | None = None,
                              on_listening: Callable[[int, int | None], None] = lambda port, metrics: None) -> None:
    """``meshpos switch run``: no core dumps (it will hold opened card numbers), then serve;
    ``on_listening(port, metrics_port)`` once the ports are bound (the CLI tells the user)."""
    disable_core_dumps()
    log.info("core dumps disabled: RLIMIT_CORE 0, process not dumpable")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningSwitch = await nursery.start(lambda task_status: run_switch(
                path, listen=listen, metrics=metrics, task_status=task_status))
            on_listening(running.port, running.metrics_port)
            settle_gc()  # started: what it holds now is never garbage (meshpos/switch/gcpolicy.py)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


__all__ = ["SwitchService", "serve_switch", "run_switch", "run_until_signalled", "open_acquirer_link",
           "init_switch", "add_site", "RunningSwitch"]
