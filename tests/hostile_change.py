"""One scenario for the red team's harmful Automerge changes (test_red_team_noncanonical,
test_red_team_unfit): an enrolled, hostile node H links to alpha over real TLS on loopback, sells
once, then pushes a crafted change. Alpha must close H's link naming why, keep nothing of the
change, and still give every shard to a fresh node (bravo) that joins it; every save of alpha's
loads, and alpha restarts from its store with every shard loading as it is (no rebuild)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trio
import automerge.core as am

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.node.memnode import SimNode, enroll, make_site
from meshpos.replication.link_driver import connect_link
from meshpos.replication.sync import SyncSession

from test_tls import FAST, endpoint, serve, wait_for


@pytest.fixture
def site_nodes(tmp_path: Path) -> Iterator[list[SimNode]]:
    """alpha, hostile and bravo: three enrolled nodes of one site, real SQLite stores."""
    site = make_site(tmp_path / "site")
    nodes = [SimNode.open(enroll(site, tmp_path / name, name), SYSTEM_CLOCK, FAST)
             for name in ("alpha", "hostile", "bravo")]
    yield nodes
    for node in nodes:
        node.close()


async def a_hostile_push_does_not_cut_new_nodes_off(
        site_nodes: list[SimNode], caplog: Any, make_bad: Callable[[SimNode, str, str], bytes],
        why: str | tuple[str, ...]) -> None:
    """``make_bad(hostile, shard, sold_key)``: the crafted change; ``why``: what alpha's log line
    about closing the link must say (one of them, for a tuple)."""
    reasons = (why,) if isinstance(why, str) else why
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
        bad = make_bad(hostile, shard, f"sale/{sold}")
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
    assert any("peer sent bad replication data" in r.getMessage() and any(w in r.getMessage() for w in reasons)
               for r in caplog.records)
    assert alpha.core.ledger.heads(shard) == heads  # nothing of the change stayed in the shard
    for name in alpha.core.ledger.shards():
        am.Document.load(alpha.core.ledger.snapshot(name))  # every save of alpha's loads
    entries = alpha.entries()
    caplog.clear()
    site_nodes[0] = alpha = alpha.reopen(SYSTEM_CLOCK)
    assert not [r for r in caplog.records if "does not load" in r.getMessage()]
    assert alpha.entries() == entries and {own, sold} <= alpha.sale_ids()
