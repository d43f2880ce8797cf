"""Change bytes and sync messages on which Automerge's Rust code panics, sent by an enrolled peer.

A change whose predecessor names an actor index past the change's actor table passes Automerge's
parsing and checksum, then panics inside ``apply_change`` (automerge 0.5.7: "index out of
bounds"). pyo3 raises that as ``PanicException``, which derives from ``BaseException``, not
``Exception``: it passed every ``except Exception`` between the ledger and the link driver and
stopped the node's link server (the whole node, under the runner) at the first such PUSH. And
the panic leaves the document's lock poisoned: every later use of that shard raised "poisoned
lock", so even a caught panic would have stopped the shard for good.

Now it is one bad PUSH: the link to that peer closes as for any bad replication data, the shard
is reloaded from the store as it was before the merge, and the node keeps selling and
replicating, over real TLS on loopback with real SQLite stores.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import automerge.core as am
import pytest
import trio

from meshpos.domain.errors import EncodingError
from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.ledger.ledger import changes_message
from meshpos.node.memnode import SimNode, enroll, make_site
from meshpos.replication.link_driver import connect_link
from meshpos.replication.sync import SyncSession
from meshpos.wire import amcanon as amcanon_mod
from meshpos.wire import amchange
from meshpos.wire import link as lp
from meshpos.wire.leb128 import Reader
from meshpos.wire.leb128 import uleb128 as _uleb

from hostile_change import a_hostile_push_does_not_cut_new_nodes_off, site_nodes  # noqa: F401 (a fixture)
from test_tls import FAST, endpoint, serve, wait_for

PRED_ACTOR = 113  # column spec of predActor (id 7, actor type)
VALUE_META = 86  # column spec of valMeta (id 5, value metadata: length << 4 | type)


def with_column(raw: bytes, spec: int, data: bytes) -> bytes:
    """The change chunk ``raw`` with column ``spec`` replaced by ``data``, the checksum made anew:
    bytes Automerge parses and accepts."""
    reader = Reader(raw)
    reader.take(9)
    length = reader.uleb()
    body_at = reader.pos
    reader.end = body_at + length
    reader.take(32 * reader.uleb())  # deps
    reader.take(reader.uleb())  # actor
    reader.uleb()  # seq
    reader.uleb()  # start op
    reader.sleb()  # time
    reader.take(reader.uleb())  # message
    for _ in range(reader.uleb()):  # other actors
        reader.take(reader.uleb())
    header = raw[body_at:reader.pos]
    specs = [(reader.uleb(), reader.uleb()) for _ in range(reader.uleb())]
    columns = [(column, reader.take(size)) for column, size in specs]
    columns = [(column, data if column == spec else old) for column, old in columns]
    assert spec in {column for column, _ in columns}
    meta = _uleb(len(columns)) + b"".join(_uleb(column) + _uleb(len(d)) for column, d in columns)
    body = header + meta + b"".join(d for _, d in columns)
    chunk = bytes([amchange.CHANGE_CHUNK]) + _uleb(len(body)) + body
    return amchange.MAGIC + hashlib.sha256(chunk).digest()[:4] + chunk


def with_pred_actor(raw: bytes, actor_index: int) -> bytes:
    """``raw`` (one operation, which overwrites a value) with its predecessor naming actor
    ``actor_index``: Automerge panics applying it ("index out of bounds")."""
    return with_column(raw, PRED_ACTOR, b"\x7f" + _uleb(actor_index))


def with_unknown_value_type(raw: bytes) -> bytes:
    """``raw`` (one operation, which puts a one-byte value) with that value's type 15, which no
    version of Automerge defines: Automerge applies it, and panics when the value is read ("not
    yet implemented")."""
    return with_column(raw, VALUE_META, b"\x7f" + _uleb(1 << 4 | 15))


def panicking_overwrite(node: SimNode, shard: str, key: str) -> bytes:
    """A change of ``node``'s copy of ``shard`` that overwrites ``key``, made to panic Automerge."""
    doc = node.core.ledger._doc(shard).fork()
    before = doc.get_heads()
    with doc.transaction() as tx:
        tx.put(am.ROOT, key, am.ScalarType.Bytes, b"overwritten")
    [change] = doc.get_changes(before)
    return with_pred_actor(change.raw_bytes, 38)


def unreadable_put(node: SimNode, shard: str, key: str) -> bytes:
    """A change of ``node``'s copy of ``shard`` that puts at ``key`` a value Automerge cannot read."""
    doc = node.core.ledger._doc(shard).fork()
    before = doc.get_heads()
    with doc.transaction() as tx:
        tx.put(am.ROOT, key, am.ScalarType.Bytes, b"x")
    [change] = doc.get_changes(before)
    return with_unknown_value_type(change.raw_bytes)


def test_the_crafted_change_does_panic_automerge(tmp_path: Path, monkeypatch: Any) -> None:
    """Test of the test: the bytes are what the module's docstring says (Automerge takes the
    change through its checks and panics applying it), and the ledger refuses them: first as not
    in Automerge's own encoding (meshpos.wire.amcanon), and, were that check to let them through,
    as an Automerge failure that leaves the shard usable."""
    site = make_site(tmp_path / "site")
    node = SimNode.open(enroll(site, tmp_path / "n", "n"), SYSTEM_CLOCK, FAST)
    try:
        sold = node.core.sell(100)["id"]
        shard = next(iter(node.core.ledger.docs))
        key = next(k for k in node.core.ledger._doc(shard).keys(am.ROOT) if sold in k)
        bad = panicking_overwrite(node, shard, key)
        for crafted in (bad, unreadable_put(node, shard, "sale/unreadable")):
            with pytest.raises(amcanon_mod.NonCanonical):
                node.core.ledger.receive_push(shard, [crafted], "peer")
        monkeypatch.setattr(amcanon_mod, "check_chunks", lambda data: None)  # what lies behind the check
        monkeypatch.setattr(amcanon_mod, "check_sync_message", lambda data: None)
        doc = node.core.ledger._doc(shard).fork()
        with pytest.raises(BaseException) as raised:
            doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([bad])))
        assert not isinstance(raised.value, Exception)  # pyo3's PanicException
        with pytest.raises(EncodingError, match="Automerge failed"):
            node.core.ledger.receive_push(shard, [bad], "peer")
        with pytest.raises(EncodingError, match="Automerge failed"):  # the same change in a sync message
            node.core.ledger.receive_sync(shard, am.SyncState(), changes_message([bad]), "peer")
        with pytest.raises(EncodingError, match="Automerge failed inside reading"):
            node.core.ledger.receive_push(shard, [unreadable_put(node, shard, "sale/unreadable")], "peer")
        assert "sale/unreadable" not in node.core.ledger._doc(shard).keys(am.ROOT)  # the merge is undone
        assert node.core.ledger._doc(shard).get(am.ROOT, key) is not None  # usable, and unchanged
        assert sold in node.sale_ids()
        assert node.core.sell(200)["status"]  # the node sells on, in the very shard
    finally:
        node.close()


@pytest.mark.parametrize("hostile_change", ["overwrite", "unreadable"])
async def test_a_push_that_panics_automerge_costs_one_link_not_the_node(site_nodes: Any, caplog: Any,
                                                                         hostile_change: str) -> None:
    """Over real TLS: H (enrolled, hostile) sells once, then pushes the panicking overwrite of that
    sale, or a new key whose value Automerge cannot read. Alpha closes H's link, naming why, keeps
    H's sale as verified, sells on, and a new honest peer then gets everything from alpha."""
    def bad(node: SimNode, shard: str, sold_key: str) -> bytes:
        key = next(k for k in node.core.ledger._doc(shard).keys(am.ROOT) if k == sold_key)
        return (panicking_overwrite(node, shard, key) if hostile_change == "overwrite"
                else unreadable_put(node, shard, "sale/unreadable"))

    await a_hostile_push_does_not_cut_new_nodes_off(  # refused before Automerge panics
        site_nodes, caplog, bad, ("which meshpos never writes", "past the change's actor table"))


# A sync message whose one "have" carries a Bloom filter of 1 entry, 0 bits per entry and 1
# probe: Automerge takes it in, then panics (a remainder by zero) building its answer from that state.
ZERO_BIT_BLOOM = b"\x01\x00\x01"
ZERO_BIT_BLOOM_SYNC = b"\x42\x00\x00\x01\x00" + bytes([len(ZERO_BIT_BLOOM)]) + ZERO_BIT_BLOOM + b"\x00"


def test_a_sync_state_automerge_cannot_answer_from_is_an_encoding_error(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    node = SimNode.open(enroll(site, tmp_path / "n", "n"), SYSTEM_CLOCK, FAST)
    try:
        node.core.sell(100)
        shard = next(iter(node.core.ledger.docs))
        state = am.SyncState()
        node.core.ledger.receive_sync(shard, state, ZERO_BIT_BLOOM_SYNC, "peer")
        with pytest.raises(EncodingError, match="Automerge failed inside"):
            node.core.ledger.generate_sync(shard, state)
        assert node.core.ledger.generate_sync(shard, am.SyncState()) is not None  # a fresh state works
        assert node.core.sell(200)["status"]
    finally:
        node.close()


async def test_a_sync_message_that_panics_automerge_later_does_not_stop_the_node(site_nodes: Any) -> None:
    """Over real TLS: once linked, H sends a SYNC of alpha's shard with the zero-bit filter.
    Alpha restarts the sync of that shard instead of stopping, sells on, and a new honest peer
    gets everything."""
    alpha, hostile, bravo = site_nodes
    sold = alpha.core.sell(100)["id"]
    shard = next(iter(alpha.core.ledger.docs))
    received: list[bytes] = []
    real_receive = alpha.core.ledger.receive_sync

    def receive_sync(shard: str, state: am.SyncState, data: bytes, peer: str) -> Any:
        received.append(data)
        return real_receive(shard, state, data, peer)

    alpha.core.ledger.receive_sync = receive_sync  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, alpha)

        async def dial(node: SimNode, task_status: trio.TaskStatus[SyncSession | None] = trio.TASK_STATUS_IGNORED) -> None:
            await connect_link(endpoint(node), "127.0.0.1", port, task_status=task_status)

        await nursery.start(dial, hostile)
        await wait_for(lambda: sold in hostile.sale_ids(), "the link is up and synced")
        [link] = hostile.replicator.sessions
        link._out += link.conn.send(lp.Sync(shard, ZERO_BIT_BLOOM_SYNC))  # H's code is hostile
        assert link.wakeup is not None
        link.wakeup()
        await wait_for(lambda: ZERO_BIT_BLOOM_SYNC in received, "alpha reads the SYNC")
        await nursery.start(dial, bravo)
        own = alpha.core.sell(200)["id"]
        await wait_for(lambda: {sold, own} <= bravo.sale_ids(), "bravo syncs from alpha")
        await wait_for(lambda: alpha.entries() == bravo.entries(), "alpha and bravo converge")
        nursery.cancel_scope.cancel()


def test_a_parked_shard_whose_certificate_automerge_cannot_read_is_forgotten(tmp_path: Path) -> None:
    """A shard of a node this one does not know yet waits in the shard park until its log's first
    entry, the node's certificate, verifies: a value there that Automerge cannot read is no
    certificate, and the parked shard is dropped (the park read it with doc.get, and the panic
    stopped the node)."""
    site = make_site(tmp_path / "site")
    node = SimNode.open(enroll(site, tmp_path / "n", "n"), SYSTEM_CLOCK, FAST)
    try:
        stranger = "00000000000000aa"
        doc = am.Document()
        with doc.transaction() as tx:
            tx.put(am.ROOT, f"cert/{stranger}", am.ScalarType.Bytes, b"x")
        [change] = doc.get_changes([])
        park = node.replicator.park
        shard = f"{stranger}/000000"
        assert park.receive_push(shard, [with_unknown_value_type(change.raw_bytes)], "peer")
        assert park.holds(shard)
        assert park.take_in() == []
        assert not park.holds(shard)
        assert node.core.sell(100)["status"]
    finally:
        node.close()
