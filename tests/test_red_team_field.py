"""Red-team attacks on issues 14-16 (held vector, peer exchange, terminal API, switch instances).

Each test is an attack that got through when it was written; the fix is in the module that owns
the rule. H is an enrolled terminal with hostile code signing with its own real key; A, B and C
are honest (tests/test_hostile.py's Mesh, links in memory running the real link protocol).
"""

from __future__ import annotations

import pytest

from meshpos.status.board import StatusBoard
from meshpos.wire import envelope
from meshpos.wire.link import SUPPORTED_VERSIONS
from test_hostile import Mesh


@pytest.fixture
def mesh(make_node, site, switch_key):
    m = Mesh(make_node, site, switch_key, SUPPORTED_VERSIONS)
    yield m
    m.close()


def test_a_status_with_an_enormous_time_is_refused_and_the_links_live_on(mesh: Mesh) -> None:
    """Attack: H signs a status whose ``at`` is an integer past the status counts' bound (10**15
    ms). It passed the ``at`` check, then the typed decoder dropped ``at`` as an out-of-range
    count and raised an internal exception that no receiver caught: every honest node that got
    the frame failed in its link task. Now it is a refused status like any other."""
    boards = {}
    for name, node in mesh.nodes.items():
        boards[name] = StatusBoard(node.core.roster, mesh.clock)
        boards[name].attach(node.replicator)
    mesh.pump()
    raw = envelope.seal("status", mesh.h.core.node_id, {"status": {"at": 10**15 + 1}}, mesh.h.core.key)
    for session in list(mesh.h.replicator.sessions):
        session.send_status(raw)
    mesh.pump()
    assert mesh.open("ha") and mesh.open("hb") and mesh.open("ab") and mesh.open("bc")
    mesh.sell("a", 2)
    mesh.pump()
    mesh.check()
    for name in "abc":
        assert mesh.h.core.node_id not in boards[name].statuses
    assert boards["a"].rejected >= 1 and boards["b"].rejected >= 1  # C hears H only through B
