"""Shard names bounded to shards that can exist (meshpos.replication.shardpark): a hostile enrolled peer's made-up
shard names never enter the shard table nor our HELLO, and a real node's shards that arrive before its
certificate are parked and taken in once it comes."""

from __future__ import annotations

import os
from pathlib import Path

import automerge.core as am

from meshpos.infra.clock import FakeClock
from meshpos.wire.link_frames import MAX_PAYLOAD
from meshpos.replication.memnet import MemNetwork
from meshpos.wire.link import Snapshot, Summary, Sync, encode_event
from meshpos.replication.shardpark import MAX_PARKED_PER_PEER
from tests.test_sync import _hostile_peer, _nodes


def test_made_up_shard_names_stay_out_of_the_shard_table(tmp_path: Path, clock: FakeClock) -> None:
    victim, hostile, honest = _nodes(tmp_path, clock, 3)
    net = MemNetwork()
    net.connect(victim.replicator, hostile.replicator)
    net.pump()  # the victim knows the hostile node's certificate: it is an enrolled terminal
    assert hostile.core.node_id in victim.core.roster.identities
    shards_before = set(victim.core.ledger.shards())
    conn, session = _hostile_peer(victim, hostile, clock, versions=(1, 2, 3))
    h, v = hostile.core.node_id, victim.core.node_id
    names = ([os.urandom(8).hex() + "/000000" for _ in range(1500)]  # nodes that do not exist
             + [f"{h}/{seg:06d}" for seg in range(100, 1100)]  # far past the hostile node's own log
             + [f"{v}/{seg:06d}" for seg in range(500, 1000)])  # far past the victim's log
    empty = am.Document()
    for i, shard in enumerate(names):  # frames that carry no entry at all: only the names are hostile
        if i % 2:
            frame = encode_event(Sync(shard, empty.generate_sync_message(am.SyncState()).encode()))
        else:
            frame = encode_event(Snapshot(shard, empty.save()))
        session.receive_data(frame)
        conn.receive_data(session.data_to_send(), clock.monotonic())
    # and a summary naming 20,000 more: what we pull from it is bounded too
    session.receive_data(encode_event(Summary({os.urandom(8).hex() + "/000001": b"\1" * 8 for _ in range(20_000)})))
    conn.receive_data(session.data_to_send(), clock.monotonic())
    assert not session.closed, session.close_reason
    assert set(victim.core.ledger.shards()) == shards_before
    park = victim.replicator.park
    assert len(park.shards) <= MAX_PARKED_PER_PEER and park.stats.dropped >= 2900
    hello = encode_event(victim.replicator.hello())
    assert len(hello) < 4096 < MAX_PAYLOAD  # the node's own HELLO did not grow

    # the victim still links and replicates with an honest node, both ways
    session.close("done")
    sold = {victim.core.sell(100)["id"], honest.core.sell(200)["id"]}
    net.connect(victim.replicator, honest.replicator)
    net.pump()
    assert sold <= victim.sale_ids() and sold <= honest.sale_ids()
    assert victim.core.ledger.summary() == honest.core.ledger.summary()


def test_a_real_nodes_shards_wait_for_its_certificate_then_enter(tmp_path: Path, clock: FakeClock) -> None:
    victim, relay, writer = _nodes(tmp_path, clock, 3)
    sold = {writer.core.sell(100 + i)["id"] for i in range(300)}  # two segments: 000000 (with its cert), 000001
    w = writer.core.node_id
    first, second = f"{w}/000000", f"{w}/000001"
    assert set(writer.core.ledger.shards()) == {first, second}
    net = MemNetwork()
    net.connect(victim.replicator, relay.replicator)
    net.pump()
    conn, session = _hostile_peer(victim, relay, clock, versions=(1, 2, 3))  # the relay, speaking by hand
    taken_before = victim.replicator.park.stats.taken_in  # the relay's own log, parked till its cert was seen
    session.receive_data(encode_event(Snapshot(second, writer.core.ledger.snapshot(second))))
    assert second not in victim.core.ledger.docs and victim.replicator.park.holds(second)
    assert not sold & victim.sale_ids()
    assert second not in victim.replicator.hello().summary
    session.receive_data(encode_event(Snapshot(first, writer.core.ledger.snapshot(first))))
    assert not session.closed, session.close_reason
    assert {first, second} <= set(victim.core.ledger.docs) and not victim.replicator.park.shards
    assert sold <= victim.sale_ids()
    assert victim.core.ledger.summary()[second] == writer.core.ledger.summary()[second]
    stats = victim.replicator.park.stats
    assert stats.taken_in - taken_before == 2 and stats.dropped == 0


def test_a_new_node_reaches_nodes_beyond_its_neighbour(tmp_path: Path, clock: FakeClock) -> None:
    """C is new: A has never seen its certificate, and learns C's log only through B."""
    a, b, c = _nodes(tmp_path, clock, 3)
    net = MemNetwork()
    net.connect(a.replicator, b.replicator)
    net.connect(b.replicator, c.replicator)
    net.pump()
    sold = {c.core.sell(300 + i)["id"] for i in range(3)}
    net.pump()
    assert sold <= a.sale_ids() and c.core.node_id in a.core.roster.identities
    assert a.core.ledger.summary() == c.core.ledger.summary()
