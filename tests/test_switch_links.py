"""The switch's acquirer links as ``meshpos switch run`` builds them from its config (run_switch):
ISO 8583 over TLS by default (optionally mutual), plain TCP only when configured so, and the
JSON acquirer over HTTPS, end to end from a node's batch to the acquirer host and back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from meshpos.wire import envelope
from meshpos.acquirer.simulator import SimRules, Simulator, serve_simulator
from meshpos.acquirer.tls import self_signed, server_context
from meshpos.infra.clock import FakeClock
from meshpos.domain.errors import ConfigError
from meshpos.infra.http import Request, Response, json_response, listener_port, serve_http
from meshpos.node.core import NodeCore
from meshpos.site.sitedir import Site
from meshpos.cli.switch_cmd import main_switch
from meshpos.switch.service import RunningSwitch, run_switch
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch
from meshpos.uplink.client import forward, make_client_context
from meshpos.uplink.forwarder import Forwarder

from switch_harness import card_sale

# every switch these tests make runs on each backend in turn (tests/pg.py)
pytestmark = pytest.mark.usefixtures("switch_backend_env")


def pem_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = self_signed(["127.0.0.1", "localhost"], FakeClock().now_ms())
    (tmp_path / f"{name}.pem").write_bytes(cert)
    (tmp_path / f"{name}.key").write_bytes(key)
    return tmp_path / f"{name}.pem", tmp_path / f"{name}.key"


@asynccontextmanager
async def acquirer_host(fmt: str = "iso8583", ssl_context: Any = None) -> AsyncIterator[Simulator]:
    async with trio.open_nursery() as nursery:
        sim: Simulator = await nursery.start(lambda task_status: serve_simulator(
            SimRules(seed=1), "127.0.0.1", 0, format=fmt, ssl_context=ssl_context, task_status=task_status))
        yield sim
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def switch_running(path: Path, clock: FakeClock) -> AsyncIterator[RunningSwitch]:
    async with trio.open_nursery() as nursery:
        running: RunningSwitch = await nursery.start(lambda task_status: run_switch(
            path, clock=clock, listen="127.0.0.1:0", task_status=task_status))
        yield running
        nursery.cancel_scope.cancel()


def make_switch(tmp_path: Path, site: Site, key: nacl.signing.SigningKey, port: int, **options: Any) -> Path:
    path = tmp_path / "switch"
    init_switch(path, "127.0.0.1:0", f"127.0.0.1:{port}", key=key, **options)
    add_site(path, site.path)
    return path


async def forward_one(core: NodeCore, clock: FakeClock, port: int) -> dict[str, Any]:
    """One card sale forwarded from a node to the running switch; its result body, or "pending"."""
    sale = card_sale(core)
    reply = await forward(f"https://127.0.0.1:{port}", make_client_context(core),
                          Forwarder(core, clock).entries_for([sale]))
    if reply.pending:
        return {"status": "pending", "reason": reply.pending[0].reason}
    [raw] = reply.results
    return dict(envelope.decode(raw).body)


async def test_iso8583_over_tls_by_default_to_a_host_trusted_by_its_ca(
        tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey, make_node: Callable[..., Path],
        open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    cert, key = pem_pair(tmp_path, "acquirer")
    core = open_node(make_node("t"))
    async with acquirer_host(ssl_context=server_context(cert, key)) as sim:
        path = make_switch(tmp_path, site, switch_key, sim.port, acquirer_ca=cert)
        assert SwitchDir(path).config().acquirer_plain is False
        async with switch_running(path, clock) as running:
            assert (await forward_one(core, clock, running.port))["status"] == "approved"
    assert sim.stats.totals["0220"] == 1


async def test_no_plain_tcp_unless_configured_so(
        tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey, make_node: Callable[..., Path],
        open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    async with acquirer_host() as plain_host:  # a host without TLS
        path = make_switch(tmp_path, site, switch_key, plain_host.port)  # the default: TLS
        async with switch_running(path, clock) as running:
            result = await forward_one(core, clock, running.port)
            assert result["status"] == "pending" and "did not answer" in result["reason"]
        assert plain_host.stats.totals["0220"] == 0  # no card number crossed in the clear
        # configured explicitly: plain TCP is used
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "acquirer_plain": True}))
        async with switch_running(path, clock) as running:
            assert (await forward_one(core, clock, running.port))["status"] == "approved"
        assert plain_host.stats.totals["0220"] == 1


async def test_mutual_tls_presents_the_configured_client_certificate(
        tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey, make_node: Callable[..., Path],
        open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    cert, key = pem_pair(tmp_path, "acquirer")
    client_cert, client_key = pem_pair(tmp_path, "switch-client")
    core = open_node(make_node("t"))
    async with acquirer_host(ssl_context=server_context(cert, key, client_ca=client_cert)) as sim:
        without = make_switch(tmp_path / "a", site, switch_key, sim.port, acquirer_ca=cert)
        async with switch_running(without, clock) as running:
            assert (await forward_one(core, clock, running.port))["status"] == "pending"
        assert sim.stats.totals["0220"] == 0
        with_cert = make_switch(tmp_path / "b", site, switch_key, sim.port, acquirer_ca=cert,
                                acquirer_cert=client_cert, acquirer_key=client_key)
        async with switch_running(with_cert, clock) as running:
            assert (await forward_one(core, clock, running.port))["status"] == "approved"
        assert sim.stats.totals["0220"] == 1


async def test_the_json_acquirer_end_to_end_through_the_switch(
        tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey, make_node: Callable[..., Path],
        open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    cert, key = pem_pair(tmp_path, "acquirer")
    core = open_node(make_node("t"))
    async with acquirer_host("json", server_context(cert, key)) as sim:
        path = make_switch(tmp_path, site, switch_key, sim.port, acquirer_format="json", acquirer_ca=cert)
        async with switch_running(path, clock) as running:
            result = await forward_one(core, clock, running.port)
            assert result["status"] == "approved" and result["auth_code"] and result["response_code"] == "00"
    [sale_id] = list(sim.stats.by_sale)
    assert sim.stats.by_sale[sale_id] == {"advice": 1} and sim.stats.snapshot()["charged"] == [sale_id]
    assert sale_id == result["sale_id"]  # the Idempotency-Key is the sale id


def test_init_options_for_the_acquirer_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = pem_pair(tmp_path, "acquirer")
    base = ["--listen", "127.0.0.1:0", "--acquirer", "127.0.0.1:1"]
    assert main_switch(["init", str(tmp_path / "plain"), *base, "--acquirer-plain"]) == 0
    assert SwitchDir(tmp_path / "plain").config().acquirer_plain is True
    assert main_switch(["init", str(tmp_path / "mtls"), *base, "--acquirer-ca", str(cert),
                        "--acquirer-cert", str(cert), "--acquirer-key", str(key)]) == 0
    cfg = SwitchDir(tmp_path / "mtls").config()
    assert (cfg.acquirer_plain, cfg.acquirer_ca, cfg.acquirer_cert) == (False, str(cert), str(cert))
    capsys.readouterr()
    assert main_switch(["init", str(tmp_path / "x"), *base, "--acquirer-ca", str(tmp_path / "missing.pem")]) == 4
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="both"):
        init_switch(tmp_path / "y", "127.0.0.1:0", "127.0.0.1:1", acquirer_cert=cert)
    with pytest.raises(ConfigError, match="ISO 8583 acquirer only"):
        init_switch(tmp_path / "z", "127.0.0.1:0", "127.0.0.1:1", acquirer_format="json", acquirer_plain=True)


async def test_a_json_acquirer_refusing_one_sale_rejects_that_sale_alone(
        tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey, make_node: Callable[..., Path],
        open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    """A stub HTTPS host that answers 422 for one amount: that sale is rejected (final, no retry),
    the others of the batch are approved."""
    cert, key = pem_pair(tmp_path, "acquirer")
    seen: list[int] = []

    async def host(request: Request) -> Response:
        amount = request.json()["amount_minor"]
        seen.append(amount)
        if amount == 666:
            return json_response(422, {"error": "refused"})
        return json_response(200, {"approved": True, "response_code": "00", "auth_code": "OK0001"})

    core = open_node(make_node("t"))
    ids = [card_sale(core, 500), card_sale(core, 666), card_sale(core, 700)]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http, host, ("127.0.0.1", 0, server_context(cert, key)))
        path = make_switch(tmp_path, site, switch_key, listener_port(listeners[0]), acquirer_format="json",
                           acquirer_ca=cert)
        async with switch_running(path, clock) as running:
            reply = await forward(f"https://127.0.0.1:{running.port}", make_client_context(core),
                                  Forwarder(core, clock).entries_for(ids))
        nursery.cancel_scope.cancel()
    results = {envelope.decode(r).body["sale_id"]: envelope.decode(r).body for r in reply.results}
    assert results[ids[1]]["status"] == "rejected" and "HTTP 422" in results[ids[1]]["reason"]
    assert results[ids[0]]["status"] == results[ids[2]]["status"] == "approved"
    assert sorted(seen) == [500, 666, 700]  # asked once each: a refusal is not retried
