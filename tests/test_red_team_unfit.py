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

from pathlib import Path
from typing import Any

import automerge.core as am
import pytest

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.ledger.ledger import changes_message
from meshpos.node.memnode import SimNode, enroll, make_site
from meshpos.wire import amcanon, amhistory

from test_amhistory import with_pred
from hostile_change import a_hostile_push_does_not_cut_new_nodes_off, site_nodes  # noqa: F401 (a fixture)
from test_tls import FAST


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
    await a_hostile_push_does_not_cut_new_nodes_off(site_nodes, caplog, overwrite_naming_another_key,
                                                    "predecessor does not name a put on the same key")
