"""A change encoded exactly as Automerge encodes it, but not fitting the shard's history, pushed by
an enrolled peer.

The red team's next finding after the canonical-encoding check (test_red_team_noncanonical): a
change whose predecessor names a put on another key passes that check, Automerge applies it, and
then every save of the shard fails to load ("mismatching heads"); a fresh node bootstrapping from
such a save cut the honest node off, and the honest node's own store broke. Now the ledger checks
every change a merge applied against the shard's history (meshpos.wire.amhistory): the hostile
link closes, naming why, the shard is read again from the store as it was, and fresh nodes still
join. Real nodes, real TLS on loopback, real SQLite stores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import automerge.core as am
import pytest
import trio

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.ledger.ledger import changes_message
from meshpos.node.memnode import SimNode, enroll, make_site
from meshpos.replication.link_driver import connect_link
from meshpos.replication.sync import SyncSession
from meshpos.wire import amcanon, amhistory

from test_amhistory import with_pred
from test_tls import FAST, endpoint, serve, wait_for


def overwrite_naming_another_key(node: SimNode, shard: str, key: str) -> bytes:
    """A change of ``node``'s copy of ``shard`` overwriting ``key``, its predecessor then made to
    name a put of the same actor on another key: canonically encoded."""
    doc = node.core.ledger._doc(shard).fork()
    before = doc.get_heads()
    with doc.transaction() as tx:
        tx.put(am.ROOT, key, am.ScalarType.Bytes, b"junk")
    [change] = doc.get_changes(before)
    [op] = amcanon.change_ops(change.raw_bytes)
    _, pred_actor = op.preds[0]
    history = amhistory.History(doc)
    for c in doc.get_changes([]):
        history.add(c)
    other = next(ctr for (ctr, a), k in history.put_key.items() if a == pred_actor and k != key)
    bad = with_pred(change.raw_bytes, other)
    amcanon.check_chunks(bad)
    return bad


@pytest.fixture
def site_nodes(tmp_path: Path) -> Any:
    site = make_site(tmp_path / "site")
    nodes = [SimNode.open(enroll(site, tmp_path / name, name), SYSTEM_CLOCK, FAST)
             for name in ("alpha", "hostile", "bravo")]
    yield nodes
    for node in nodes:
        node.close()


def test_the_crafted_change_would_break_the_save(tmp_path: Path) -> None:
    """Test of the test: Automerge applies it, and then no save of the shard loads."""
    site = make_site(tmp_path / "site")
    node = SimNode.open(enroll(site, tmp_path / "n", "n"), SYSTEM_CLOCK, FAST)
    try:
        sold = node.core.sell(100)["id"]
        shard = next(iter(node.core.ledger.docs))
        doc = node.core.ledger._doc(shard).fork()
        bad = overwrite_naming_another_key(node, shard, f"sale/{sold}")
        doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([bad])))
        with pytest.raises(Exception, match="mismatching heads"):
            am.Document.load(doc.save())
    finally:
        node.close()


async def test_a_push_that_does_not_fit_does_not_cut_new_nodes_off(site_nodes: Any, caplog: Any) -> None:
    """Over real TLS: H (enrolled, hostile) sells once, then pushes an overwrite of that sale
    whose predecessor names its certificate's put. Alpha closes H's link, naming why; a fresh
    node then joins alpha and gets every shard, H's included; alpha's saved copy of each shard
    loads, and alpha restarts from its store with every shard loading as it is."""
    caplog.set_level(logging.WARNING)
    alpha, hostile, bravo = site_nodes
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, alpha)
        closed: list[str] = []

        async def dial(node: SimNode, task_status: trio.TaskStatus[SyncSession | None] = trio.TASK_STATUS_IGNORED) -> None:
            closed.append(await connect_link(endpoint(node), "127.0.0.1", port, task_status=task_status))

        await nursery.start(dial, hostile)
        sold = hostile.core.sell(100)["id"]
        await wait_for(lambda: sold in alpha.sale_ids(), "the hostile node's honest first sale")
        shard = next(s for s in hostile.core.ledger.docs if s.startswith(hostile.core.node_id))
        bad = overwrite_naming_another_key(hostile, shard, f"sale/{sold}")
        heads = alpha.core.ledger.heads(shard)
        for callback in list(hostile.core.ledger.on_changes):  # H's links push it as a new change
            callback(shard, [bad])
        await wait_for(lambda: bool(closed) or alpha.core.ledger.heads(shard) != heads,
                       "alpha refuses the change (or, without the check, merges it)")
        own = alpha.core.sell(300)["id"]
        await nursery.start(dial, bravo)
        await wait_for(lambda: {own, sold} <= bravo.sale_ids(), "bravo gets every shard from alpha")
        await wait_for(lambda: alpha.entries() == bravo.entries(), "alpha and bravo converge")
        nursery.cancel_scope.cancel()
    assert closed  # the hostile link, closed by alpha
    assert any("peer sent bad replication data" in r.getMessage()
               and "predecessor does not name a put on the same key" in r.getMessage() for r in caplog.records)
    assert alpha.core.ledger.heads(shard) == heads  # nothing of the change stayed in the shard
    for name in alpha.core.ledger.shards():
        am.Document.load(alpha.core.ledger.snapshot(name))  # every save of alpha's loads
    entries = alpha.entries()
    caplog.clear()
    site_nodes[0] = alpha = alpha.reopen(SYSTEM_CLOCK)
    assert not [r for r in caplog.records if "does not load" in r.getMessage()]
    assert alpha.entries() == entries and {own, sold} <= alpha.sale_ids()
