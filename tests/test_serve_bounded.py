"""A fault in the handling of one accepted connection (a bug, or a library's exception that a
peer's bytes provoke) closes that connection and is logged; the listener, and the node whose
nursery it runs in, go on (meshpos.infra.netguard.serve_bounded: the terminal API, the dashboard,
links and the switch's HTTP all accept through it)."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import pytest
import trio

from meshpos.infra.netguard import InboundGate, InboundLimits, serve_bounded

LIMITS = InboundLimits(total=8, pending=8, per_source=8, proof_timeout=5.0)
SECRET = "4111111111111111"


@pytest.mark.connection_faults
async def test_a_failing_connection_is_closed_and_logged_and_the_next_one_is_served(
        caplog: pytest.LogCaptureFixture) -> None:
    served: list[int] = []

    async def handler(stream: Any, source: str, where: str, proved: Callable[[], None]) -> None:
        proved()
        first = await stream.receive_some(100)
        if first.startswith(b"boom"):
            raise ValueError(f"a bug that quotes the peer: {first!r} {SECRET}")
        served.append(len(first))
        await stream.send_all(b"ok")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10), caplog.at_level(logging.ERROR):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_bounded, handler, listeners, InboundGate(LIMITS),
                                                  what="test connection"))
            for _ in range(3):  # a few faults in a row: each closes only its own connection
                bad = await trio.open_tcp_stream("127.0.0.1", port)
                await bad.send_all(b"boom " + SECRET.encode())
                assert await bad.receive_some(100) == b""  # closed by the server
            good = await trio.open_tcp_stream("127.0.0.1", port)
            await good.send_all(b"hello")
            assert await good.receive_some(100) == b"ok"
            nursery.cancel_scope.cancel()
    assert served == [5]
    failures = [r for r in caplog.records if "failed (ValueError)" in r.getMessage()]
    assert failures and "the listener goes on" in failures[0].getMessage()
    assert SECRET not in caplog.text  # the frames are logged, not what the message quoted
