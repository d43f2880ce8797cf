"""The ISO 8583 link: real TCP on 127.0.0.1 against the simulator, and a scripted host in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from meshpos.wire.acquirer import AcquirerRequest, AcquirerResult
from meshpos.acquirer.base import advise_until_answered
from meshpos.wire.iso8583 import (DEFAULT_SPEC, NEED_DATA, LengthHeader, RequestReceived, ServerConnection, build_answer,
                                  encode_message, frame)
from meshpos.acquirer.iso8583_link import Iso8583Link, open_iso8583_link
from meshpos.acquirer.simulator import CardRule, SimRules, Simulator, auth_code, serve_simulator
from meshpos.domain.errors import AcquirerError

EXAMPLE_RULES = Path(__file__).parent.parent / "devices" / "acquirer-rules.example.json"
VISA, MASTERCARD = "4111111111111111", "5555555555554444"
DECLINE_05, DECLINE_51 = "4000000000000002", "4000000000009995"


def sale(n: int, pan: str = VISA, amount: int = 1250) -> AcquirerRequest:
    return AcquirerRequest(
        sale_id=f"sale-{n}", pan=pan, expiry="1228", amount_minor=amount, currency="EUR",
        created_at_ms=1767268245000, entry_mode="contactless", terminal_id="TERM0001",
        merchant_id="MERCHANT0000001", stan=n, rrn=f"{n:012d}",
    )


@asynccontextmanager
async def simulator(rules: SimRules, **kw: Any) -> AsyncIterator[Simulator]:
    async with trio.open_nursery() as nursery:
        sim: Simulator = await nursery.start(lambda task_status: serve_simulator(
            rules, "127.0.0.1", 0, task_status=task_status, **kw))
        yield sim
        nursery.cancel_scope.cancel()


async def no_sleep(_: float) -> None:
    await trio.lowlevel.checkpoint()


# --- against the simulator over TCP ------------------------------------------


async def test_many_outstanding_on_one_connection_answered_out_of_order() -> None:
    rules = SimRules(cards=(
        CardRule(MASTERCARD, delay_ms=300),
        CardRule(DECLINE_05, response_code="05", delay_ms=150),
        CardRule(VISA, delay_ms=0),
    ))
    finished: list[str] = []
    results: dict[str, AcquirerResult] = {}
    async with simulator(rules) as sim, open_iso8583_link("127.0.0.1", sim.port, timeout=10) as link:

        async def one(req: AcquirerRequest) -> None:
            results[req.rrn] = await link.advise(req, repeat=False)
            finished.append(req.rrn)

        reqs = [sale(1, MASTERCARD), sale(2, DECLINE_05), sale(3, VISA)]
        async with trio.open_nursery() as nursery:
            for req in reqs:
                nursery.start_soon(one, req)
                await trio.sleep(0.01)  # send in this order
        assert link.connections_opened == 1
    assert results == {
        "000000000001": AcquirerResult(True, "00", auth_code(0, "000000000001", 1250)),
        "000000000002": AcquirerResult(False, "05", None),
        "000000000003": AcquirerResult(True, "00", auth_code(0, "000000000003", 1250)),
    }
    assert finished == ["000000000003", "000000000002", "000000000001"]
    assert sim.stats.totals["0220"] == 3


async def test_example_rules_decline_by_prefix_and_amount() -> None:
    rules = SimRules.load(EXAMPLE_RULES)
    async with simulator(rules) as sim, open_iso8583_link("127.0.0.1", sim.port) as link:
        ok = await link.advise(sale(1, VISA), repeat=False)
        ok_mc = await link.advise(sale(2, MASTERCARD), repeat=False)
        dnh = await link.advise(sale(3, DECLINE_05), repeat=False)
        nsf = await link.advise(sale(4, DECLINE_51), repeat=False)
        big = await link.advise(sale(5, VISA, amount=1_000_001), repeat=False)
        again = await link.advise(sale(1, VISA), repeat=True)
    assert ok.approved and ok_mc.approved and ok.auth_code and len(ok.auth_code) == 6
    assert again == ok  # a repeat gets the same answer, auth code included
    assert (dnh.approved, dnh.response_code, dnh.auth_code) == (False, "05", None)
    assert (nsf.approved, nsf.response_code) == (False, "51")
    assert (big.approved, big.response_code) == (False, "61")
    assert sim.stats.of("000000000001", "0221") == 1
    assert sim.stats.snapshot()["charged"] == ["000000000001", "000000000002"]


async def test_dropped_advice_is_repeated_as_0221_never_a_second_0220() -> None:
    rules = SimRules(cards=(CardRule(VISA, drop_first=2),))
    async with simulator(rules) as sim, open_iso8583_link("127.0.0.1", sim.port, timeout=0.3) as link:
        req = sale(7)
        seen_at_on_sent: list[int] = []

        async def on_sent() -> None:
            seen_at_on_sent.append(sim.stats.totals["0220"])

        result = await advise_until_answered(
            link, req, already_sent=False, on_sent=on_sent, max_attempts=5,
            backoff=lambda attempt: 0.0, sleep=no_sleep,
        )
    assert result.approved
    assert seen_at_on_sent == [0]  # called once, before the host had seen anything
    assert dict(sim.stats.by_sale[req.rrn]) == {"0220": 1, "0221": 2}


async def test_after_a_crash_only_repeats_go_out() -> None:
    async with simulator(SimRules()) as sim, open_iso8583_link("127.0.0.1", sim.port) as link:
        calls: list[str] = []

        async def on_sent() -> None:
            calls.append("sent")

        result = await advise_until_answered(link, sale(8), already_sent=True, on_sent=on_sent, max_attempts=3)
    assert result.approved and calls == []
    assert dict(sim.stats.by_sale["000000000008"]) == {"0221": 1}


async def test_retries_give_up_with_acquirer_error() -> None:
    rules = SimRules(drop_rate=1.0)
    async with simulator(rules) as sim, open_iso8583_link("127.0.0.1", sim.port, timeout=0.2) as link:
        delays: list[float] = []

        async def record(seconds: float) -> None:
            delays.append(seconds)

        async def on_sent() -> None:
            pass

        with pytest.raises(AcquirerError) as info:
            await advise_until_answered(link, sale(9), already_sent=False, on_sent=on_sent, max_attempts=3,
                                        backoff=lambda attempt: attempt * 10.0, sleep=record)
    assert VISA not in str(info.value) and "1111" in str(info.value)
    assert delays == [10.0, 20.0]
    assert dict(sim.stats.by_sale["000000000009"]) == {"0220": 1, "0221": 2}


async def test_connection_closed_mid_flight_fails_outstanding_and_retries_reconnect() -> None:
    # the host closes the connection (instead of answering) the first time it sees the Mastercard
    # sale, 100 ms in, while the four Visa advices (300 ms each) are still waiting for answers
    rules = SimRules(cards=(CardRule(MASTERCARD, close_first=1, delay_ms=100), CardRule(VISA, delay_ms=300)))
    sent: list[str] = []
    results: dict[str, AcquirerResult] = {}
    async with simulator(rules) as sim, open_iso8583_link("127.0.0.1", sim.port, timeout=5) as link:

        async def one(req: AcquirerRequest) -> None:
            async def on_sent() -> None:
                sent.append(req.rrn)

            results[req.rrn] = await advise_until_answered(
                link, req, already_sent=False, on_sent=on_sent, max_attempts=4,
                backoff=lambda attempt: 0.0, sleep=no_sleep)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, sale(1, MASTERCARD))
            for n in range(2, 6):
                nursery.start_soon(one, sale(n, VISA))
        assert link.connections_opened == 2
    assert all(r.approved for r in results.values()) and len(results) == 5
    assert sorted(sent) == sorted(results)  # on_sent once per sale
    for rrn, counts in sim.stats.by_sale.items():
        assert counts["0220"] == 1, rrn
        assert counts["0221"] == 1, rrn
    assert sim.stats.totals["closed"] == 1


async def test_reversal_is_0420_and_books_a_reversal() -> None:
    async with simulator(SimRules()) as sim, open_iso8583_link("127.0.0.1", sim.port) as link:
        await link.advise(sale(3), repeat=False)
        result = await link.reverse(sale(3))
    assert result == AcquirerResult(True, "00", None)
    assert dict(sim.stats.by_sale["000000000003"]) == {"0220": 1, "0420": 1}
    assert sim.stats.snapshot()["reversed"] == ["000000000003"]


async def test_nothing_listening_is_an_acquirer_error() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    async with open_iso8583_link("127.0.0.1", port, timeout=5) as link:
        with pytest.raises(AcquirerError, match="cannot connect"):
            await link.advise(sale(1), repeat=False)


# --- against a scripted host on a memory stream (virtual time) ----------------

Script = Callable[[trio.abc.Stream, list[RequestReceived]], Awaitable[None]]


@asynccontextmanager
async def scripted_link(script: Script, *, timeout: float = 5.0) -> AsyncIterator[tuple[Iso8583Link, list[Any]]]:
    """A link whose every connection is a memory stream served by ``script``."""
    hosts: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            client, host = trio.testing.memory_stream_pair()
            seen: list[RequestReceived] = []
            hosts.append(seen)
            nursery.start_soon(script, host, seen)
            return client

        link = Iso8583Link(nursery, connect, timeout=timeout)
        try:
            yield link, hosts
        finally:  # a failing test fails, instead of waiting for the scripted hosts forever
            await link.aclose()
            nursery.cancel_scope.cancel()


async def read_requests(stream: trio.abc.Stream, proto: ServerConnection, want: int) -> list[RequestReceived]:
    got: list[RequestReceived] = []
    while len(got) < want:
        data = await stream.receive_some(65536)
        if not data:  # the link closed this connection: nothing more comes on it (no busy loop)
            await trio.sleep_forever()
        proto.receive_data(data)
        while (event := proto.next_event()) is not NEED_DATA:
            got.append(event)
    return got


async def test_reverse_order_answers_from_a_scripted_host(autojump_clock: trio.testing.MockClock) -> None:
    async def host(stream: trio.abc.Stream, seen: list[RequestReceived]) -> None:
        proto = ServerConnection()
        seen += await read_requests(stream, proto, 20)
        for req in reversed(seen):
            await stream.send_all(proto.send_answer(req, "00" if int(req.key.stan) % 2 else "05", "AUTH01"))
        await trio.sleep_forever()

    results: dict[int, AcquirerResult] = {}
    async with scripted_link(host) as (link, hosts):
        async def one(n: int) -> None:
            results[n] = await link.advise(sale(n), repeat=False)

        async with trio.open_nursery() as nursery:
            for n in range(1, 21):
                nursery.start_soon(one, n)
    assert len(hosts) == 1
    for n, result in results.items():
        assert result.approved == bool(n % 2)
        assert result.response_code == ("00" if n % 2 else "05")
    assert len(results) == 20


async def test_timeout_then_late_answer_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    async def host(stream: trio.abc.Stream, seen: list[RequestReceived]) -> None:
        proto = ServerConnection()
        [first] = await read_requests(stream, proto, 1)
        seen.append(first)
        await trio.sleep(60)  # far past the link's timeout
        await stream.send_all(proto.send_answer(first, "00", "LATE01"))
        [second] = await read_requests(stream, proto, 1)
        seen.append(second)
        await stream.send_all(proto.send_answer(second, "00", "SECOND"))
        await trio.sleep_forever()

    async with scripted_link(host, timeout=10) as (link, hosts):
        with pytest.raises(AcquirerError, match="no answer within 10 s") as info:
            await link.advise(sale(1, MASTERCARD), repeat=False)
        assert MASTERCARD not in str(info.value) and "************4444" in str(info.value)
        await trio.sleep(100)  # the late answer arrives, matches nothing, is dropped
        result = await link.advise(sale(1, MASTERCARD), repeat=True)
    assert result.auth_code == "SECOND"
    assert len(hosts) == 1 and [r.kind.mti for r in hosts[0]] == ["0220", "0221"]


async def test_a_bad_length_header_fails_outstanding_and_reconnects(autojump_clock: trio.testing.MockClock) -> None:
    """The stream itself cannot be read on: every request on the connection fails, and is retried."""
    async def host(stream: trio.abc.Stream, seen: list[RequestReceived]) -> None:
        proto = ServerConnection()
        seen += await read_requests(stream, proto, 2)
        if len(hosts) == 1:
            await stream.send_all(b"\x00\x00")  # a length of 0
        else:
            for req in seen:
                await stream.send_all(proto.send_answer(req, "00", "FINE00"))
        await trio.sleep_forever()

    failures: list[str] = []
    async with scripted_link(host) as (link, hosts):
        async def one(n: int) -> None:
            try:
                await link.advise(sale(n), repeat=False)
            except AcquirerError as exc:
                failures.append(str(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 1)
            nursery.start_soon(one, 2)
        assert len(failures) == 2 and all("unusable answer" in f for f in failures)
        answers: list[AcquirerResult] = []

        async def again(n: int) -> None:
            answers.append(await link.advise(sale(n), repeat=True))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(again, 1)
            nursery.start_soon(again, 2)
    assert len(hosts) == 2 and [a.auth_code for a in answers] == ["FINE00", "FINE00"]


async def test_one_unusable_answer_fails_its_request_alone(autojump_clock: trio.testing.MockClock) -> None:
    """An answer with a field 39 that is no response code fails the request it names, and only it;
    a well-framed message that does not decode is dropped (the request it answered times out
    alone). The connection reads on: the other requests are answered on it."""
    async def host(stream: trio.abc.Stream, seen: list[RequestReceived]) -> None:
        proto = ServerConnection()
        seen += await read_requests(stream, proto, 3)
        by_stan = {int(r.key.stan): r for r in seen}
        await stream.send_all(b"\x00\x05junk!")  # framed, does not decode
        bad = build_answer(by_stan[1], "00", "AUTH01")
        bad["39"] = "0-"
        await stream.send_all(frame(encode_message(bad, DEFAULT_SPEC), LengthHeader.BINARY2))
        await stream.send_all(proto.send_answer(by_stan[2], "00", "FINE02"))  # the junk was for 3: no answer
        while True:  # the repeats of 1 and 3, one at a time
            [req] = await read_requests(stream, proto, 1)
            seen.append(req)
            await stream.send_all(proto.send_answer(req, "00", f"AGAIN{int(req.key.stan)}"))

    outcome: dict[int, str] = {}
    async with scripted_link(host, timeout=10) as (link, hosts):
        async def one(n: int) -> None:
            try:
                outcome[n] = str((await link.advise(sale(n), repeat=False)).auth_code)
            except AcquirerError as exc:
                outcome[n] = str(exc)

        async with trio.open_nursery() as nursery:
            for n in (1, 2, 3):
                nursery.start_soon(one, n)
                await trio.sleep(0.01)  # in order, so the host's stans are 1, 2, 3
        assert outcome[2] == "FINE02"
        assert "unusable answer" in outcome[1] and "field 39" in outcome[1]
        assert "no answer within 10 s" in outcome[3]
        again = {n: (await link.advise(sale(n), repeat=True)).auth_code for n in (1, 3)}
    assert again == {1: "AGAIN1", 3: "AGAIN3"}
    assert len(hosts) == 1 and link.connections_opened == 1  # never reconnected


async def test_closed_link_refuses_work(autojump_clock: trio.testing.MockClock) -> None:
    async def host(stream: trio.abc.Stream, seen: list[RequestReceived]) -> None:
        await trio.sleep_forever()

    async with scripted_link(host) as (link, _):
        waiter_error: list[AcquirerError] = []

        async def waiter() -> None:
            try:
                await link.advise(sale(1), repeat=False)
            except AcquirerError as exc:
                waiter_error.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(1)
            await link.aclose()
        assert len(waiter_error) == 1
        with pytest.raises(AcquirerError, match="closed"):
            await link.advise(sale(2), repeat=False)


class BrokenOnSend(trio.abc.Stream):
    """A stream whose peer vanished: writing fails, reading waits forever."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BrokenResourceError("peer vanished")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_failed_write_fails_the_request_not_the_link(autojump_clock: trio.testing.MockClock) -> None:
    opened: list[int] = []
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            opened.append(1)
            return BrokenOnSend()

        link = Iso8583Link(nursery, connect, timeout=5)
        for n in (1, 2):
            with pytest.raises(AcquirerError, match="connection to the acquirer lost"):
                await link.advise(sale(n), repeat=False)
        await link.aclose()
    assert len(opened) == 2  # each attempt got a fresh connection
