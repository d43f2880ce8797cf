"""The terminal API's sales logic on a real node directory and SQLite store, without HTTP:
a request whose key is being processed waits for it (no second sale); the key is stored in the
sale's own transaction; a store of schema 2 is migrated to 3; the stored hash is keyed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from api_harness import make_site
from meshpos.domain.errors import PolicyError
from meshpos.ledger.store import Store
from meshpos.node.core import NodeCore
from meshpos.terminal.sales import Conflict, TerminalSales
from meshpos.wire.cards import CardCapture, seal_card


class GatedReader:
    """A card reader that hands out a card only when the test opens the gate."""

    def __init__(self, switch_key: bytes) -> None:
        self.switch_key = switch_key
        self.gate = trio.Event()
        self.reads = 0

    async def read(self, amount_minor: int, currency: str) -> CardCapture:
        self.reads += 1
        await self.gate.wait()
        return seal_card("4111111111111111", "1230", "contactless", self.switch_key)


@pytest.fixture
def core(tmp_path: Path) -> NodeCore:
    make_site(tmp_path, "t1")
    c = NodeCore.open(tmp_path / "t1")
    yield c  # type: ignore[misc]
    c.close()


async def test_a_second_request_with_the_key_in_flight_waits_and_gets_the_same_sale(core: NodeCore) -> None:
    key = core.policy.switch_key_bytes
    assert key is not None
    reader = GatedReader(key)
    sales = TerminalSales(core, reader)
    body = {"amount": "4.00", "method": "card", "reader": True}
    results = []

    async def create() -> None:
        results.append(await sales.create("k-1", body))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create)
        nursery.start_soon(create)
        await trio.testing.wait_all_tasks_blocked()
        assert reader.reads == 1 and results == []  # the second waits; it did not start a second read
        reader.gate.set()
    assert sorted(r.replayed for r in results) == [False, True]
    assert results[0].sale == results[1].sale and results[0].sale["card_last4"] == "1111"
    assert len(core.sales(core.node_id)) == 1
    with pytest.raises(Conflict):
        await sales.create("k-1", {**body, "amount": "4.01"})


async def test_a_failed_request_leaves_nothing_and_its_retry_is_processed(core: NodeCore) -> None:
    sales = TerminalSales(core)
    with pytest.raises(PolicyError):  # over the per-sale cap
        await sales.create("k-2", {"amount": "999999", "method": "cash"})
    assert core.store.idempotency("k-2") is None
    made = await sales.create("k-2", {"amount": "5", "method": "cash"})
    assert not made.replayed and core.store.idempotency("k-2") is not None


def test_the_key_is_stored_with_the_sale_in_one_transaction(core: NodeCore) -> None:
    core.store.insert_idempotency("taken", "h", "someone-else-1", 0)  # a key row that will collide
    before = core.store.entry_count()
    with pytest.raises(sqlite3.IntegrityError):
        core.sell(500, idempotency=("taken", "h2"))
    assert core.store.entry_count() == before and core.sales(core.node_id) == []  # the sale rolled back too


def test_the_stored_hash_is_keyed_by_the_node(core: NodeCore, tmp_path: Path) -> None:
    import hashlib
    import json
    body = {"amount": "1", "method": "card", "card": {"pan": "4111111111111111", "expiry": "1230"}}
    digest = TerminalSales(core).hash_body(body)
    plain = hashlib.blake2b(json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), digest_size=32)
    assert digest != plain.hexdigest() and digest == TerminalSales(core).hash_body(dict(reversed(body.items())))


def test_a_schema_2_store_is_migrated_to_3(tmp_path: Path) -> None:
    path = tmp_path / "meshpos.db"
    Store.open(path, create=True).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TABLE idempotency")
    conn.execute("UPDATE meta SET value='2' WHERE key='schema'")
    conn.close()
    store = Store.open(path)
    try:
        assert store.get_meta("schema") == "3"
        with store.transaction():
            store.insert_idempotency("k", "h", "t-1", 1)
        assert store.idempotency("k") == ("h", "t-1")
    finally:
        store.close()


