"""The acquirer simulator: rules, counters, the stats file, the CLI, and the JSON/HTTPS adapter."""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from test_http import client_context, make_self_signed, server_context

from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.acquirer.base import UnsendableRequest, advise_until_answered
from meshpos.cli.acquirer_cmd import main_acquirer_sim
from meshpos.acquirer.iso8583_link import open_iso8583_link
from meshpos.acquirer.json_https import JsonHttpsLink, open_json_link, request_to_json, result_from_json
from meshpos.acquirer.simulator import Action, CardRule, Decider, SimRules, Simulator, serve_simulator
from meshpos.domain.errors import AcquirerError, ConfigError, ProtocolError
from meshpos.infra.http import open_https, request

ROOT = Path(__file__).parent.parent
EXAMPLE_RULES = ROOT / "devices" / "acquirer-rules.example.json"
VISA, MASTERCARD = "4111111111111111", "5555555555554444"
DECLINE_05, DECLINE_51 = "4000000000000002", "4000000000009995"
ALL_PANS = (VISA, MASTERCARD, DECLINE_05, DECLINE_51)


def sale(n: int, pan: str = VISA, amount: int = 1250) -> AcquirerRequest:
    return AcquirerRequest(
        sale_id=f"01JSALE{n:06d}", pan=pan, expiry="1228", amount_minor=amount, currency="EUR",
        created_at_ms=1767268245000, entry_mode="chip", terminal_id="TERM0001",
        merchant_id="MERCHANT0000001", stan=n, rrn=f"{n:012d}",
    )


async def no_sleep(_: float) -> None:
    await trio.lowlevel.checkpoint()


async def nothing() -> None:
    pass


# --- rules -------------------------------------------------------------------


def test_example_rules_file() -> None:
    rules = SimRules.load(EXAMPLE_RULES)
    assert {c.prefix: c.response_code for c in rules.cards} == {DECLINE_05: "05", DECLINE_51: "51"}
    assert rules.decline_above_minor is not None


@pytest.mark.parametrize("bad", [
    [], {"drop_rate": 2}, {"delay_ms": -1}, {"cards": [{"response_code": "05"}]},
    {"cards": [{"prefix": "41x"}]}, {"cards": [{"prefix": "4", "response_code": "5"}]},
])
def test_malformed_rules_are_config_errors(bad: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SimRules.from_json(bad)
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(ConfigError):
        SimRules.load(tmp_path / "r.json")


def test_randomness_comes_from_the_seed() -> None:
    def run(seed: int) -> list[Action]:
        decider = Decider(SimRules(seed=seed, drop_rate=0.3, close_rate=0.2))
        return [decider.decide(sale=str(i), pan=VISA, amount_minor=1, reversal=False).action for i in range(200)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert {Action.ANSWER, Action.DROP, Action.CLOSE} <= set(run(1))


# --- ISO 8583 simulator: stats file and logs never hold a PAN ----------------


async def test_stats_file_after_every_message_and_no_pan_anywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stats_path = tmp_path / "stats.json"
    rules = SimRules.load(EXAMPLE_RULES)
    async with trio.open_nursery() as nursery:
        sim: Simulator = await nursery.start(lambda task_status: serve_simulator(
            rules, "127.0.0.1", 0, stats_path=stats_path, task_status=task_status))
        async with open_iso8583_link("127.0.0.1", sim.port) as link:
            for n, pan in enumerate(ALL_PANS, start=1):
                await link.advise(sale(n, pan), repeat=False)
                on_disk = json.loads(stats_path.read_text())  # already written when the answer arrives
                assert on_disk["totals"]["0220"] == n
                assert on_disk["by_sale"][f"{n:012d}"] == {"0220": 1}
            await link.advise(sale(1), repeat=True)
            await link.reverse(sale(2, MASTERCARD))
        nursery.cancel_scope.cancel()
    final = json.loads(stats_path.read_text())
    assert final["totals"]["0221"] == 1 and final["totals"]["0420"] == 1
    assert final["totals"]["charged"] == 2 and final["charged"] == ["000000000001", "000000000002"]
    assert final["reversed"] == ["000000000002"]
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]  # no temp files left behind
    text = stats_path.read_text() + caplog.text
    assert "************1111" in caplog.text
    for pan in ALL_PANS:
        assert pan not in text


# --- the CLI -----------------------------------------------------------------


def test_help_describes_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main_acquirer_sim(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--listen", "--rules", "--stats", "--format", "0221", "drop_rate"):
        assert word in out


def test_bad_arguments_exit_non_zero(tmp_path: Path) -> None:
    assert main_acquirer_sim(["--listen", "127.0.0.1:0", "--rules", str(tmp_path / "missing.json")]) == 4
    assert main_acquirer_sim(["--listen", "127.0.0.1:0", "--format", "json"]) == 4
    with pytest.raises(SystemExit):
        main_acquirer_sim(["--listen", "nowhere"])


async def test_cli_serves_counts_and_stops_on_sigterm(tmp_path: Path) -> None:
    stats_path = tmp_path / "stats.json"
    code = "import sys; from meshpos.cli.acquirer_cmd import main_acquirer_sim; sys.exit(main_acquirer_sim(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ca = tmp_path / "acquirer-ca.pem"  # TLS by default: the certificate it makes for itself
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", code, "--listen", "127.0.0.1:0", "--rules", str(EXAMPLE_RULES),
         "--stats", str(stats_path), "--tls-cert-out", str(ca)],
        stdout=subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "simulator exited before listening"
                line += chunk
        port = int(line.decode().rsplit(":", 1)[1])
        assert "TLS" in line.decode()
        trusting = ssl.create_default_context(cafile=str(ca))
        async with open_iso8583_link("127.0.0.1", port, ssl_context=trusting) as link:
            declined = await link.advise(sale(1, DECLINE_51), repeat=False)
        assert (declined.approved, declined.response_code) == (False, "51")
        assert json.loads(stats_path.read_text())["by_sale"]["000000000001"] == {"0220": 1}
        # plain TCP to it, or TLS trusting another CA: nothing is advised
        async with open_iso8583_link("127.0.0.1", port, timeout=2) as plain:
            with pytest.raises(AcquirerError):
                await plain.advise(sale(2, DECLINE_51), repeat=False)
        async with open_iso8583_link("127.0.0.1", port, ssl_context=ssl.create_default_context()) as untrusted:
            with pytest.raises(AcquirerError, match="TLS handshake"):
                await untrusted.advise(sale(3, DECLINE_51), repeat=False)
        assert set(json.loads(stats_path.read_text())["by_sale"]) == {"000000000001"}
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- JSON over HTTPS ---------------------------------------------------------


@asynccontextmanager
async def json_host(rules: SimRules, tmp_path: Path, *, timeout: float = 5.0) -> AsyncIterator[tuple[Simulator, JsonHttpsLink]]:
    cert = make_self_signed("localhost")
    async with trio.open_nursery() as nursery:
        sim: Simulator = await nursery.start(lambda task_status: serve_simulator(
            rules, "127.0.0.1", 0, format="json", ssl_context=server_context(cert, tmp_path),
            task_status=task_status))
        link = open_json_link("127.0.0.1", sim.port, client_context(cert, tmp_path),
                              server_hostname="localhost", timeout=timeout)
        try:
            yield sim, link
        finally:
            await link.aclose()
            nursery.cancel_scope.cancel()


async def test_json_adapter_answers_by_the_same_rules(tmp_path: Path) -> None:
    async with json_host(SimRules.load(EXAMPLE_RULES), tmp_path) as (sim, link):
        results = [await link.advise(sale(n, pan), repeat=False) for n, pan in enumerate(ALL_PANS, start=1)]
        big = await link.advise(sale(9, VISA, amount=5_000_000), repeat=False)
        reversal = await link.reverse(sale(1))
    assert [(r.approved, r.response_code) for r in results] == [(True, "00"), (True, "00"), (False, "05"), (False, "51")]
    assert results[0].auth_code and len(results[0].auth_code) == 6 and results[2].auth_code is None
    assert (big.approved, big.response_code) == (False, "61")
    assert reversal == AcquirerResult(True, "00", None)
    assert sim.stats.snapshot()["charged"] == ["01JSALE000001", "01JSALE000002"]
    assert sim.stats.snapshot()["reversed"] == ["01JSALE000001"]


async def test_json_idempotency_same_key_same_answer_charged_once(tmp_path: Path) -> None:
    # the host books the sale but the answer is lost (the connection is cut); the retry with the
    # same Idempotency-Key must get the very same answer and must not charge again
    rules = SimRules(cards=(CardRule(VISA, drop_first=1),))
    async with json_host(rules, tmp_path) as (sim, link):
        req = sale(5)
        result = await advise_until_answered(link, req, already_sent=False, on_sent=nothing, max_attempts=3,
                                             backoff=lambda attempt: 0.0, sleep=no_sleep)
        again = await link.advise(req, repeat=True)
    assert result.approved and again == result
    assert sim.stats.of(req.sale_id, "advice") == 3
    assert sim.stats.snapshot()["totals"]["charged"] == 1
    assert sim.stats.totals["replayed"] == 2


async def test_json_key_reused_for_another_request_is_refused(tmp_path: Path) -> None:
    async with json_host(SimRules(), tmp_path) as (sim, link):
        await link.advise(sale(5), repeat=False)
        other = sale(5, amount=9999)  # same sale_id, different amount
        with pytest.raises(UnsendableRequest, match="HTTP 422") as info:  # final: no retry can help
            await link.advise(other, repeat=False)
    assert VISA not in str(info.value)
    assert sim.stats.snapshot()["totals"]["charged"] == 1


async def test_json_closed_before_booking_is_retried_and_charged_once(tmp_path: Path) -> None:
    rules = SimRules(cards=(CardRule(MASTERCARD, close_first=1),))
    async with json_host(rules, tmp_path) as (sim, link):
        with pytest.raises(AcquirerError):
            await link.advise(sale(3, MASTERCARD), repeat=False)
        assert sim.stats.snapshot()["totals"]["charged"] == 0
        result = await link.advise(sale(3, MASTERCARD), repeat=True)
    assert result.approved and sim.stats.snapshot()["totals"]["charged"] == 1


async def test_json_timeout_is_an_acquirer_error(tmp_path: Path) -> None:
    async with json_host(SimRules(delay_ms=2000), tmp_path, timeout=0.2) as (_, link):
        with pytest.raises(AcquirerError, match="no answer within"):
            await link.advise(sale(1), repeat=False)


async def test_json_host_rejects_malformed_requests(tmp_path: Path) -> None:
    cert = make_self_signed("localhost")
    async with trio.open_nursery() as nursery:
        sim: Simulator = await nursery.start(lambda task_status: serve_simulator(
            SimRules(), "127.0.0.1", 0, format="json", ssl_context=server_context(cert, tmp_path),
            task_status=task_status))
        stream = await open_https("127.0.0.1", sim.port, client_context(cert, tmp_path), "localhost")
        no_key = await request(stream, "POST", "/v1/advices", {}, b"{}")
        bad_body = await request(stream, "POST", "/v1/advices", {"idempotency-key": "k"}, b"[1]")
        bad_pan = await request(stream, "POST", "/v1/advices", {"idempotency-key": "k"},
                                json.dumps({**_json_body(), "pan": "4111111111111112"}).encode())
        missing = await request(stream, "GET", "/v2/nothing", {})
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert (no_key.status, bad_body.status, bad_pan.status, missing.status) == (400, 400, 400, 404)
    assert b"4111111111111112" not in bad_pan.body


def _json_body() -> dict[str, Any]:
    return request_to_json(sale(1), repeat=False)


async def test_answer_queue_sends_by_due_time_and_stops_at_a_close() -> None:
    """One connection's answers leave by due time (an answer with a shorter delay queued later
    goes first), those due together in one piece, and nothing due after a CLOSE goes out."""
    from meshpos.acquirer.simulator import _AnswerQueue

    queue = _AnswerQueue()
    now = trio.current_time()
    queue.put(now + 0.05, Action.ANSWER, b"slow")
    queue.put(now + 0.01, Action.ANSWER, b"fast1")
    queue.put(now + 0.01, Action.ANSWER, b"fast2")
    queue.put(now + 0.01, Action.DROP, b"")
    with trio.fail_after(5):
        await queue.wait_due()
    assert trio.current_time() >= now + 0.01
    assert queue.take_due(trio.current_time()) == (b"fast1fast2", False)
    queue.put(now + 0.06, Action.CLOSE, b"")
    queue.put(now + 0.07, Action.ANSWER, b"after the close")
    with trio.fail_after(5):
        await queue.wait_due()
    assert queue.take_due(trio.current_time()) == (b"slow", False)
    await trio.sleep_until(now + 0.08)
    assert queue.take_due(trio.current_time()) == (b"", True)


def test_a_json_answer_is_read_as_protocols_acquirer_json_says() -> None:
    assert result_from_json({"approved": True, "response_code": "00", "auth_code": "A1B2C3"}) == \
        AcquirerResult(True, "00", "A1B2C3")
    assert result_from_json({"approved": True, "response_code": "00", "auth_code": ""}).auth_code is None
    assert result_from_json({"approved": False, "response_code": "05", "auth_code": "X"}) == AcquirerResult(False, "05", None)
    # a response code of other digits than ASCII's (str.isalnum takes them) or of the wrong length is unusable
    for code in ("\u0660\u0665", "\uff10\uff15", "5", "005", "0\n"):
        with pytest.raises(ProtocolError, match="response_code"):
            result_from_json({"approved": False, "response_code": code, "auth_code": None})
    with pytest.raises(ProtocolError, match="response_code"):
        result_from_json({"approved": True, "response_code": "05", "auth_code": "A1"})
