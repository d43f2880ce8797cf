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


def test_a_leaf_that_claims_links_it_does_not_have_cannot_hide_a_star() -> None:
    """Attack: under client isolation every link goes through the gateway, and the inspector says so
    (a star). One leaf signs statuses that list links to every other leaf. A link counted when
    either end listed it, so the view showed a mesh and the warning that all hangs on the gateway
    went away. The star check now counts a link between two fresh nodes only when both list it."""
    from meshpos.status.meshview import Known, analyze
    from meshpos.wire.status import StatusBody

    now = 10_000_000_000
    ids = ("gw", "t1", "t2", "t3", "t4")
    known = {n: Known(name=n.upper(), role="gateway" if n == "gw" else "terminal") for n in ids}

    def st(links: list[str]) -> StatusBody:
        return StatusBody.from_json({"at": now, "every_ms": 2000, "links": [{"node": n} for n in links]})

    statuses = {"gw": st(["t1", "t2", "t3", "t4"]), **{t: st(["gw"]) for t in ids[1:]}}
    statuses["t4"] = st(["gw", "t1", "t2", "t3"])  # the liar
    view = analyze(statuses, known, now_ms=now, offline_window_ms=3_600_000, warn_before_ms=60_000).to_json()
    assert view["topology"] == {"shape": "star", "hub": "GW"}
    assert any(w.startswith("star: every link goes through GW") for w in view["warnings"])
    assert not view["partition"]
    # links both ends list are a mesh, as before
    statuses["t1"], statuses["t2"] = st(["gw", "t2", "t4"]), st(["gw", "t1", "t4"])
    view = analyze(statuses, known, now_ms=now, offline_window_ms=3_600_000, warn_before_ms=60_000).to_json()
    assert view["topology"]["shape"] == "mesh"


def test_a_status_flood_from_one_node_is_not_verified_or_relayed_past_its_rate(mesh: Mesh) -> None:
    """Attack: H signs 300 statuses with ``at`` one millisecond apart and sends them all at
    once. Each was newer than the last, so each was verified by A and B and relayed on every
    other link (C got them all through B): one enrolled node made every node of the site check
    and forward as many signatures as it could sign. Now a signer's statuses are taken at most
    one a second on average (bursts of a few, as a stalled link delivers them); the rest are
    dropped before any signature check, and H's statuses are taken again once it slows down."""
    boards = {}
    taken: dict[str, list[int]] = {name: [] for name in "abc"}
    h_id = mesh.h.core.node_id
    for name, node in mesh.nodes.items():
        boards[name] = StatusBoard(node.core.roster, mesh.clock)
        boards[name].attach(node.replicator)
        if name in taken:
            boards[name].on_new.append(
                lambda status, name=name: taken[name].append(status.at) if status.node_id == h_id else None)
    mesh.pump()
    start = mesh.clock.now_ms()
    for i in range(300):
        raw = envelope.seal("status", h_id, {"status": {"at": start + i}}, mesh.h.core.key)
        for session in list(mesh.h.replicator.sessions):
            session.send_status(raw)
    mesh.pump()
    for name in "abc":
        assert 1 <= len(taken[name]) <= 4, (name, len(taken[name]))
    assert boards["a"].throttled >= 290 and boards["b"].throttled >= 290
    mesh.clock.advance(10)
    later = envelope.seal("status", h_id, {"status": {"at": mesh.clock.now_ms()}}, mesh.h.core.key)
    for session in list(mesh.h.replicator.sessions):
        session.send_status(later)
    mesh.pump()
    for name in "abc":
        assert boards[name].statuses[h_id].at == mesh.clock.now_ms(), name  # a node that slowed down is heard
    mesh.sell("a", 2)
    mesh.pump()
    mesh.check()
