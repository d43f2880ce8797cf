"""A change Automerge applies but would encode differently itself, pushed by an enrolled peer.

The red team's finding: Automerge keeps such a change's bytes and hash, but saves the document as
columns of operations and, loading a save, encodes each change anew: the hashes no longer match
the heads ("mismatching heads"). One PUSH of a junk entry (rejected and stripped by the ledger, but
its change stays in the shard's history) made every save of the shard unloadable: a fresh node
joining the honest node got that snapshot and cut the honest node off as "peer sent bad
replication data", so it never got the shard. Now the ledger refuses the change before Automerge
sees it (meshpos.wire.amcanon): the hostile link closes, naming why, and nothing of it enters the
shard. Real nodes, real TLS on loopback, real SQLite stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import automerge.core as am
import pytest

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.ledger.ledger import changes_message
from meshpos.node.memnode import SimNode, enroll, make_site
from meshpos.wire import amcanon

from test_red_team_automerge_panic import with_column
from hostile_change import a_hostile_push_does_not_cut_new_nodes_off, site_nodes  # noqa: F401 (a fixture)
from test_tls import FAST

PRED_NUM = 112  # column spec of predNum (id 7, group)
ZERO_IN_TWO_BYTES = b"\x7f\x80\x00"  # a literal run of one value: 0, as a two-byte LEB128


def non_canonical_put(node: SimNode, shard: str, key: str) -> bytes:
    """A change of ``node``'s copy of ``shard`` putting the new ``key``, its predecessor count (0)
    written in two bytes where Automerge writes one."""
    doc = node.core.ledger._doc(shard).fork()
    before = doc.get_heads()
    with doc.transaction() as tx:
        tx.put(am.ROOT, key, am.ScalarType.Bytes, b"junk")
    [change] = doc.get_changes(before)
    return with_column(change.raw_bytes, PRED_NUM, ZERO_IN_TWO_BYTES)


def test_the_crafted_change_breaks_a_save_and_is_refused() -> None:
    """Test of the test: Automerge applies the bytes, and a save of the document no longer loads;
    the check refuses them."""
    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "cert/x", am.ScalarType.Bytes, b"x")
    target = doc.fork()
    before = doc.get_heads()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "sale/junk", am.ScalarType.Bytes, b"junk")
    [change] = doc.get_changes(before)
    bad = with_column(change.raw_bytes, PRED_NUM, ZERO_IN_TWO_BYTES)
    target.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([bad])))
    assert "sale/junk" in target.keys(am.ROOT)
    with pytest.raises(Exception, match="mismatching heads"):
        am.Document.load(target.save())
    amcanon.check_chunks(change.raw_bytes)  # the honest one passes
    with pytest.raises(amcanon.NonCanonical, match="not encoded as Automerge encodes it"):
        amcanon.check_chunks(bad)


async def test_a_non_canonical_push_does_not_cut_new_nodes_off(site_nodes: Any, caplog: Any) -> None:
    """Over real TLS: H (enrolled, hostile) sells once, then pushes a junk entry in a non-canonical
    change. Alpha closes H's link, naming why; a fresh node then joins alpha and gets every shard,
    H's included; alpha's saved copy of each shard loads, and alpha restarts from its store with
    every shard loading as it is (no rebuild)."""
    await a_hostile_push_does_not_cut_new_nodes_off(site_nodes, caplog, lambda node, shard, _sold: non_canonical_put(node, shard, "sale/junk"),
                                                    "not encoded as Automerge encodes it")


def test_a_non_canonical_change_in_a_sync_message_is_refused(tmp_path: Path) -> None:
    """The same change inside a sync message (what a peer sends on SYNC): refused before
    Automerge applies it, the shard unchanged and still saving."""
    site = make_site(tmp_path / "site")
    node = SimNode.open(enroll(site, tmp_path / "n", "n"), SYSTEM_CLOCK, FAST)
    try:
        node.core.sell(100)
        shard = next(iter(node.core.ledger.docs))
        heads = node.core.ledger.heads(shard)
        bad = non_canonical_put(node, shard, "sale/junk")
        with pytest.raises(amcanon.NonCanonical):
            node.core.ledger.receive_sync(shard, am.SyncState(), changes_message([bad]), "peer")
        with pytest.raises(amcanon.NonCanonical):
            node.core.ledger.receive_push(shard, [bad], "peer")
        assert node.core.ledger.heads(shard) == heads
        am.Document.load(node.core.ledger.snapshot(shard))
    finally:
        node.close()
