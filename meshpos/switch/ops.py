"""What operators and orchestrators ask a running instance, on its own plain-HTTP listener
(``meshpos switch run --metrics HOST:PORT``), apart from the forwarding API:

  GET /healthz   200 while the process serves (liveness: restart it when this fails)
  GET /readyz    200 when the database answers and the acquirer link can connect, else 503
                 with the reason (readiness: send it no traffic meanwhile); JSON either way
  GET /metrics   Prometheus text exposition (:mod:`.metrics`)

No card data and no sale data is served here; bind it to an address only the monitoring can reach.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshpos.domain.errors import AcquirerError, MeshposError
from meshpos.infra.http import Request, Response, json_response, listener_port, serve_http
from meshpos.switch.const import READY_CHECK_TIMEOUT_S, SITE_RELOAD_S
from meshpos.switch.metrics import CONTENT_TYPE, SwitchMetrics
from meshpos.switch.processor import Switch
from meshpos.switch.store import SwitchStore

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]


class Readiness:
    """Runs the checks (database ping, acquirer link) and says what is wrong, if anything."""

    def __init__(self, store: SwitchStore, acquirer_check: Check, metrics: SwitchMetrics,
                 timeout: float = READY_CHECK_TIMEOUT_S) -> None:
        self.store = store
        self.acquirer_check = acquirer_check
        self.metrics = metrics
        self.timeout = timeout

    async def problems(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        with trio.move_on_after(self.timeout) as scope:
            try:
                with self.metrics.timed_db("ping"):
                    await trio.to_thread.run_sync(self.store.ping, abandon_on_cancel=True)
            except MeshposError as exc:
                problems["database"] = str(exc)
        if scope.cancelled_caught:
            problems["database"] = f"no answer within {self.timeout:g} s"
        with trio.move_on_after(self.timeout) as scope:
            try:
                await self.acquirer_check()
            except AcquirerError as exc:
                problems["acquirer"] = str(exc)
        if scope.cancelled_caught:
            problems["acquirer"] = f"no connection within {self.timeout:g} s"
        self.metrics.ready.set(0 if problems else 1)
        return problems


class OpsService:
    def __init__(self, readiness: Readiness, metrics: SwitchMetrics, instance: str) -> None:
        self.readiness = readiness
        self.metrics = metrics
        self.instance = instance

    async def handle(self, request: Request) -> Response:
        if request.method != "GET":
            return json_response(405, {"error": "use GET"}, {"allow": "GET"})
        if request.path == "/healthz":
            return json_response(200, {"ok": True, "instance": self.instance})
        if request.path == "/readyz":
            problems = await self.readiness.problems()
            if problems:
                log.warning("not ready: %s", "; ".join(f"{k}: {v}" for k, v in problems.items()))
            return json_response(503 if problems else 200,
                                 {"ready": not problems, "instance": self.instance, "problems": problems})
        if request.path == "/metrics":
            return Response(200, {"content-type": CONTENT_TYPE}, self.metrics.exposition())
        return json_response(404, {"error": "try /healthz, /readyz or /metrics"})


async def serve_ops(service: OpsService, host: str, port: int, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve /healthz, /readyz and /metrics over plain HTTP until cancelled."""
    listeners: list[Any] = list(await trio.open_tcp_listeners(port, host=host))
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_http(service.handle, listeners, task_status=task_status))
        task_status.started(listener_port(listeners[0]))


async def watch_sites(switch: Switch, trust: Callable[[bytes], None], interval: float = SITE_RELOAD_S) -> None:
    """Take sites added or changed by another process (``switch add-site``, another instance) every
    ``interval`` seconds, until cancelled: new sites' CAs are trusted for TLS at once."""
    while True:
        await trio.sleep(interval)
        try:
            for row in await switch.reload_sites_if_changed():
                trust(row.ca_pem)
                log.info("site %s (%s) now served, without a restart", row.name, row.site_id)
        except MeshposError as exc:
            log.warning("sites not reloaded now: %s", exc)


__all__ = ["OpsService", "Readiness", "serve_ops", "watch_sites"]
