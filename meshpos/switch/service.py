"""The switch as a service: the HTTPS forwarding API in front of :class:`~.processor.Switch`.

``meshpos switch init`` -> :func:`init_switch`, ``switch add-site`` -> :func:`add_site`,
``switch run`` -> :func:`run_switch`. Tests and tools build the pieces themselves:
:class:`SwitchService` around a :class:`Switch` with any acquirer link, served by
:func:`serve_switch` on listeners they choose.
"""

from __future__ import annotations

import logging
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..acquirer.base import AcquirerLink
from ..acquirer.iso8583_link import open_iso8583_link
from ..acquirer.json_https import open_json_link
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ConfigError, EncodingError, InputError, VerificationError
from ..http import HttpLimits, Request, Response, json_response, listener_port, serve_http
from ..identity import keys
from ..node.nodedir import parse_hostport
from .api import decode_request, encode_reply
from .const import FORWARD_PATH, HEALTH_PATH, MAX_BODY_BYTES
from .processor import Switch
from .store import SiteRow
from .switchdir import SwitchConfig, SwitchDir, add_site, init_switch
from .tls import server_context, trust_sites

log = logging.getLogger(__name__)

LIMITS = HttpLimits(max_body_bytes=MAX_BODY_BYTES, read_timeout=60.0)


class SwitchService:
    """The HTTP handler of the forwarding API (protocols/forwarding.md)."""

    def __init__(self, switch: Switch, tls_context: ssl.SSLContext | None = None) -> None:
        self.switch = switch
        self.tls_context = tls_context
        self.requests = 0

    def register_site(self, row: SiteRow) -> None:
        """Take a site registered while running: its forwarders may connect at once."""
        self.switch.add_site(row)
        if self.tls_context is not None:
            trust_sites(self.tls_context, [row.ca_pem])

    async def handle(self, request: Request) -> Response:
        self.requests += 1
        if request.path not in (FORWARD_PATH, HEALTH_PATH):
            return json_response(404, {"error": f"no such path {request.path[:80]!r}"})
        try:
            site, ident = self.switch.identify_client(request.peer_cert_der)
        except VerificationError as exc:
            log.warning("refused a forwarder: %s", exc)
            return json_response(403, {"error": str(exc)})
        if request.path == HEALTH_PATH:
            if request.method != "GET":
                return json_response(405, {"error": "use GET"}, {"allow": "GET"})
            return json_response(200, {"ok": True, "site": site.site_id,
                                       "switch_key": self.switch.x25519_public.hex()})
        if request.method != "POST":
            return json_response(405, {"error": "use POST"}, {"allow": "POST"})
        try:
            entries = decode_request(request.body)
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
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the forwarding API over HTTPS until cancelled; ``task_status.started`` gets the port."""
    if service.tls_context is None:
        raise ConfigError("the forwarding API is served over TLS only")
    async with trio.open_nursery() as nursery:
        listeners: list[Any] = await nursery.start(
            lambda task_status: serve_http(service.handle, (host, port, service.tls_context), limits=LIMITS,
                                           task_status=task_status))
        task_status.started(listener_port(listeners[0]))


def acquirer_tls_context(cfg: SwitchConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cfg.acquirer_ca:
        try:
            ctx.load_verify_locations(cfg.acquirer_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the acquirer CA {cfg.acquirer_ca}: {exc}") from exc
    return ctx


@asynccontextmanager
async def open_acquirer_link(cfg: SwitchConfig, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[AcquirerLink]:
    host, port = parse_hostport(cfg.acquirer, "acquirer")
    if cfg.acquirer_format == "iso8583":
        async with open_iso8583_link(host, port, timeout=cfg.acquirer_timeout_s, clock=clock) as link:
            yield link
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


async def run_switch(
    path: Path,
    *,
    clock: Clock = SYSTEM_CLOCK,
    listen: str | None = None,
    task_status: trio.TaskStatus[RunningSwitch] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the switch of SWITCH_DIR until cancelled (the CLI cancels on SIGINT / SIGTERM)."""
    sd = SwitchDir(path)
    cfg = sd.config()
    host, port = parse_hostport(listen or cfg.listen, "listen")
    key = sd.key()
    sd.lock()
    store = sd.open_store()
    try:
        sites = store.sites()
        if not sites:
            log.warning("no site is registered at this switch yet: `meshpos switch add-site %s SITE_DIR`", path)
        ctx = server_context(sd.tls_path, sd.key_path, [s.ca_pem for s in sites])
        async with open_acquirer_link(cfg, clock) as link:
            switch = Switch(store, key, link, clock, in_flight=cfg.in_flight)
            service = SwitchService(switch, ctx)
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(serve_switch, service, host, port)
                log.info("switch %s... serving on %s:%d for %d site(s)", keys.x25519_public_of(key).hex()[:16],
                         host, bound, len(sites))
                task_status.started(RunningSwitch(service, bound))
    finally:
        store.close()
        sd.unlock()


async def run_until_signalled(path: Path, listen: str | None = None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningSwitch = await nursery.start(lambda task_status: run_switch(
                path, listen=listen, task_status=task_status))
            print(f"switch listening on port {running.port} (Ctrl-C to stop)", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


__all__ = ["SwitchService", "serve_switch", "run_switch", "run_until_signalled", "open_acquirer_link",
           "init_switch", "add_site", "RunningSwitch"]
