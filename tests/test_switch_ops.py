"""An instance's operations side: /healthz, /readyz and /metrics on their own listener (both
backends), and the pool of acquirer connections (one slow connection does not hold the rest)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from meshpos.acquirer.iso8583_link import open_iso8583_link
from meshpos.acquirer.pool import AcquirerPool
from meshpos.domain.errors import AcquirerError
from meshpos.acquirer.simulator import SimRules, Simulator, serve_simulator
from meshpos.switch.service import RunningSwitch, run_switch
from meshpos.wire.acquirer import AcquirerRequest

from switch_harness import switch_dir

assert switch_dir  # a fixture, used by name


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


async def test_healthz_readyz_and_metrics_on_their_own_listener(switch_dir: Path) -> None:
    """The fixture's switch names an acquirer nobody listens at (127.0.0.1:1): alive, not ready,
    and the reason says so; /metrics is Prometheus text with every series the docs name."""
    async with trio.open_nursery() as nursery:
        running: RunningSwitch = await nursery.start(lambda task_status: run_switch(
            switch_dir, listen="127.0.0.1:0", metrics="127.0.0.1:0", task_status=task_status))
        assert running.metrics_port is not None and running.metrics_port != running.port
        status, body = await trio.to_thread.run_sync(get, running.metrics_port, "/healthz")
        assert status == 200 and json.loads(body)["ok"] is True
        status, body = await trio.to_thread.run_sync(get, running.metrics_port, "/readyz")
        ready = json.loads(body)
        assert status == 503 and ready["ready"] is False
        assert set(ready["problems"]) == {"acquirer"}  # the database is fine, on either backend
        status, body = await trio.to_thread.run_sync(get, running.metrics_port, "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        for name in ("meshpos_switch_forwarded_sales", "meshpos_switch_advices", "meshpos_switch_results",
                     "meshpos_switch_refusals", "meshpos_switch_pending", "meshpos_switch_acquirer_round_trip_seconds",
                     "meshpos_switch_db_seconds", "meshpos_switch_batches_in_flight", "meshpos_switch_ready"):
            assert name in families, name
        assert {s.labels["mti"] for s in families["meshpos_switch_advices"].samples} == {"0220", "0221", "0420"}
        assert [s.value for s in families["meshpos_switch_ready"].samples] == [0.0]
        assert (await trio.to_thread.run_sync(get, running.metrics_port, "/nope"))[0] == 404
        nursery.cancel_scope.cancel()


def request(n: int) -> AcquirerRequest:
    return AcquirerRequest(sale_id=f"sale-{n}", pan="4111111111111111", expiry="1228", amount_minor=100 + n,
                           currency="EUR", created_at_ms=1767268245000, entry_mode="contactless",
                           terminal_id="TERM0001", merchant_id="MERCHANT0000001", stan=n, rrn=f"{n:012d}")


async def test_a_slow_connection_of_the_pool_does_not_hold_the_others() -> None:
    """Two connections, one to a host that answers after a minute: the requests that went to it
    wait, every later request goes to the connection that answers, and is answered."""
    async with trio.open_nursery() as nursery:
        slow: Simulator = await nursery.start(lambda task_status: serve_simulator(
            SimRules(seed=1, delay_ms=60_000), "127.0.0.1", 0, task_status=task_status))
        fast: Simulator = await nursery.start(lambda task_status: serve_simulator(
            SimRules(seed=1), "127.0.0.1", 0, task_status=task_status))
        async with open_iso8583_link("127.0.0.1", slow.port, timeout=120) as slow_link, \
                open_iso8583_link("127.0.0.1", fast.port, timeout=120) as fast_link:
            pool = AcquirerPool([slow_link, fast_link])
            stuck = trio.Event()

            async def held() -> None:
                try:
                    await pool.advise(request(1), repeat=False)
                    stuck.set()
                except AcquirerError:  # the link closes at the end of the test, its answer still away
                    pass

            nursery.start_soon(held)
            while slow.stats.totals["0220"] == 0:
                await trio.sleep(0.01)
            with trio.fail_after(30):  # (a round-robin pool would wait a minute on every other request)
                answers = [await pool.advise(request(n), repeat=False) for n in range(2, 22)]
            assert all(a.approved for a in answers)
            assert fast.stats.totals["0220"] == 20 and slow.stats.totals["0220"] == 1
            assert not stuck.is_set() and pool.outstanding == [1, 0]
            await pool.check()  # usable: one member reaches its host
        nursery.cancel_scope.cancel()
