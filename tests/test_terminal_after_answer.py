"""A new sale's answer goes out before the work that does not decide it (meshpos.node.after_answer):
the ``on_sold`` hooks (the ``sale.created`` event) and the receipt copies run right after the
answer's bytes were written, in order, once each, also when the client went away."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from meshpos.node.after_answer import AfterAnswer
from meshpos.node.core import NodeCore
from meshpos.node.service import NodeService
from meshpos.terminal.app import TerminalApi, make_app
from meshpos.terminal.events import EventJournal
from meshpos.terminal.feed import EventFeed
from meshpos.terminal.openapi import OpenApiDocument
from meshpos.terminal.sales import TerminalSales

CASH = {"amount": "12.50", "method": "cash"}


def test_the_queue_runs_in_order_once_and_a_failing_item_stops_no_other(caplog: pytest.LogCaptureFixture) -> None:
    after = AfterAnswer()
    ran: list[str] = []

    def fail() -> None:
        raise RuntimeError("printer on fire")
    after.defer(ran.append, "a")
    after.defer(fail)
    after.defer(lambda: after.defer(ran.append, "queued while running"))
    after.defer(ran.append, "b")
    with caplog.at_level(logging.ERROR):
        after.run()
    assert ran == ["a", "b", "queued while running"] and len(after) == 0
    assert "printer on fire" in caplog.text
    after.run()
    assert ran == ["a", "b", "queued while running"]


@pytest.fixture
def core(make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> NodeCore:
    return open_node(make_node("t1", api="127.0.0.1:0"))


def test_a_deferred_sales_hooks_run_before_a_later_sales(core: NodeCore) -> None:
    sold: list[str] = []
    core.on_sold.append(lambda sale: sold.append(sale["id"]))
    first = core.sell(500, defer=True)
    assert sold == [] and len(core.after_answer) == 1  # durable and answered, its hook waiting
    second = core.sell(700)
    assert sold == [first["id"], second["id"]]


class Node:  # what EventFeed reads of a running node
    def __init__(self, core: NodeCore) -> None:
        self.core = core


def test_no_event_of_a_sale_comes_before_its_sale_created(core: NodeCore) -> None:
    journal = EventJournal(epoch=1)
    EventFeed(Node(core), journal)  # type: ignore[arg-type]
    sale = core.sell(500, defer=True)
    core.void(sale["id"], "wrong amount")  # before the deferred work ran: the feed runs it first
    assert [(e.type, e.data["id"]) for e in journal.after(1)] == [
        ("sale.created", sale["id"]), ("sale.voided", sale["id"])]
    assert journal.after(1)[0].data["idempotency_key"] is None and len(core.after_answer) == 0


def app_of(core: NodeCore) -> Any:
    journal = EventJournal(epoch=1)
    api = TerminalApi(NodeService(core), TerminalSales(core), journal, dict, dict, OpenApiDocument())
    return make_app(api)


async def post(app: Any, key: str | None, body: dict[str, Any] | bytes, on_send: Callable[[dict[str, Any]], Any],
               length: str | None = None) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [(b"host", b"127.0.0.1:7480"), (b"content-type", b"application/json"),
               (b"content-length", (length or str(len(raw))).encode())]
    if key is not None:
        headers.append((b"idempotency-key", key.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/sales", "raw_path": b"/v1/sales", "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 7480), "client": ("127.0.0.1", 5000),
             "headers": headers}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await trio.sleep_forever()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        result = on_send(message)
        if result is not None:
            await result
    await app(scope, receive, send)


async def test_the_answer_is_written_before_the_sale_created_hook_runs(core: NodeCore) -> None:
    app = app_of(core)
    order: list[str] = []
    core.on_sold.append(lambda sale: order.append(f"sold {sale['id']}"))
    answered: dict[str, Any] = {}

    def on_send(message: dict[str, Any]) -> None:
        order.append(message["type"])
        if message["type"] == "http.response.start":
            answered["status"] = message["status"]
            answered["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            answered["body"] = json.loads(message["body"])
    await post(app, "key-1", CASH, on_send)
    sale = answered["body"]
    assert answered["status"] == 201 and sale["idempotency_key"] == "key-1"
    assert answered["headers"]["location"] == f"/v1/sales/{sale['id']}"
    assert answered["headers"]["idempotency-key"] == "key-1"
    assert answered["headers"]["content-type"] == "application/json"
    assert order == ["http.response.start", "http.response.body", f"sold {sale['id']}"]


async def test_the_hooks_run_when_the_client_went_away_before_the_answer(core: NodeCore) -> None:
    app = app_of(core)
    sold: list[str] = []
    core.on_sold.append(lambda sale: sold.append(sale["id"]))

    def gone(message: dict[str, Any]) -> None:
        raise OSError("connection reset by peer")
    with pytest.raises(OSError):
        await post(app, "key-2", CASH, gone)
    assert len(sold) == 1 and core.sale(sold[0])["idempotency_key"] == "key-2"
    assert len(core.after_answer) == 0


async def test_a_replay_while_the_first_answer_is_being_sent_answers_the_same_sale_once(core: NodeCore) -> None:
    app = app_of(core)
    sold: list[str] = []
    core.on_sold.append(lambda sale: sold.append(sale["id"]))
    replay: dict[str, Any] = {}

    async def first_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not replay:
            replay["first"] = json.loads(message["body"])

            def second_send(msg: dict[str, Any]) -> None:
                if msg["type"] == "http.response.start":
                    replay["status"] = msg["status"]
                else:
                    replay["body"] = json.loads(msg["body"])
            await post(app, "key-3", CASH, second_send)  # the first answer's hook has not run yet
    await post(app, "key-3", CASH, first_send)
    assert replay["status"] == 200 and replay["body"] == replay["first"]
    assert sold == [replay["first"]["id"]]


async def answer(app: Any, key: str | None, body: dict[str, Any] | bytes, length: str | None = None) -> list[Any]:
    got: list[Any] = []

    def on_send(message: dict[str, Any]) -> None:
        got.append((message["status"], message["headers"]) if message["type"] == "http.response.start"
                   else message["body"])
    await post(app, key, body, on_send, length)
    return got


CASES: list[tuple[str | None, Any, str | None]] = [
    (None, CASH, None),  # no key: 400
    ("k", b"{not json", None),
    ("k", b"", None),
    ("k", {"amount": "12.50", "method": "cheque"}, None),
    ("k", {"amount": "12.50", "method": "card", "card": {"pan": "4111111111111111", "expiry": "0101"}}, None),
    ("k", {"amount": "-3", "method": "cash"}, None),  # well-formed, refused by the rules
    ("k", b"{}", str(70 * 1024)),  # too large by its Content-Length
    ("k", b"[" * 70_000, None),  # too large as it arrives
    ("4111 1111 1111 1111", CASH, None),
]


@pytest.mark.parametrize("key,body,length", CASES)
async def test_the_lean_path_answers_errors_as_starlette_did(core: NodeCore, key: str | None, body: Any,
                                                            length: str | None) -> None:
    app = app_of(core)
    lean = await answer(app, key, body, length)
    assert lean == await answer(app.app, key, body, length)  # the Starlette routes behind it
    assert lean[0][0] >= 400 and len(core.sales(core.node_id)) == 0


async def test_the_lean_path_answers_sales_and_replays_as_starlette_did(core: NodeCore) -> None:
    app = app_of(core)
    for key in ("lean", "starlette"):
        made = await answer(app if key == "lean" else app.app, key, CASH)
        again = await answer(app if key == "lean" else app.app, key, CASH)
        conflict = await answer(app if key == "lean" else app.app, key, {"amount": "1.00", "method": "cash"})
        sale = json.loads(made[1])
        assert made[0] == (201, [(b"location", f"/v1/sales/{sale['id']}".encode()), (b"idempotency-key", key.encode()),
                                 (b"content-length", str(len(made[1])).encode()), (b"content-type", b"application/json")])
        assert again[0][0] == 200 and again[1] == made[1] and [h for h, _ in again[0][1]] == [h for h, _ in made[0][1]]
        assert conflict[0][0] == 409
    assert len(core.sales(core.node_id)) == 2


async def test_other_requests_go_to_the_routes(core: NodeCore) -> None:
    app = app_of(core)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PUT", "scheme": "http",
             "path": "/v1/sales", "raw_path": b"/v1/sales", "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 7480), "client": ("127.0.0.1", 5000), "headers": [(b"host", b"127.0.0.1:7480")]}
    await app(scope, receive, send)
    assert sent[0]["status"] == 405 and any(name == b"allow" for name, _ in sent[0]["headers"])
