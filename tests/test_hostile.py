"""A hostile enrolled node: a valid terminal certificate, malicious code.

H writes straight into its Automerge shards (no verification, no re-assertion of its own) and
pushes the changes over its links: it deletes and overwrites other terminals' entries, forges
sales and settlement results, replays old envelopes and results under other keys, floods
garbage and oversize values, and opens links it never finishes. The honest nodes A, B, C (C
reaches H only through B) must keep every honest sale, show no forged one, keep replicating on
their other links (B, relaying for C, is never cut off for what H wrote), log H as the offender;
the organizer's revocation then cuts H off everywhere.

Test of the test: a ledger that skips verification lets the forged sale in, and the check fails.
"""

from __future__ import annotations

import logging
from typing import Any

import automerge.core as am
import nacl.signing
import pytest

from meshpos.wire import envelope
from meshpos.domain.errors import VerificationError
from meshpos.identity import certs
from meshpos.ledger.ledger import IngestReport, Ledger
from meshpos.replication import tls
from meshpos.replication.memnet import MemLink, MemNetwork
from meshpos.wire.link import SUPPORTED_VERSIONS
from meshpos.node.memnode import SimNode, wall_clock
from meshpos.site.roster import Roster, Verified, entry_key
from meshpos.replication.sync import SyncConfig


class Mesh:
    def __init__(self, make_node: Any, site: Any, switch_key: nacl.signing.SigningKey,
                 versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> None:
        self.clock = wall_clock()
        self.site = site
        self.switch_key = switch_key
        config = SyncConfig(versions=versions)
        self.nodes = {n: SimNode.open(make_node(n), self.clock, config) for n in ("a", "b", "c", "h")}
        self.h = self.nodes["h"]
        # H's code is hostile: it takes whatever arrives and never re-asserts or strips anything
        self.h.core.ledger._after_merge = lambda *args, **kwargs: IngestReport()  # type: ignore[method-assign]
        self.net = MemNetwork()
        self.links: dict[str, MemLink] = {}
        self.acked: set[str] = set()
        for pair in ("ha", "hb", "ab", "bc"):
            self.link(pair)

    @property
    def honest(self) -> list[SimNode]:
        return [self.nodes[n] for n in "abc"]

    def link(self, pair: str) -> MemLink:
        x, y = self.nodes[pair[0]], self.nodes[pair[1]]
        self.links[pair] = self.net.connect(x.replicator, y.replicator)
        return self.links[pair]

    def open(self, pair: str) -> bool:
        link = self.links[pair]
        return not (link.closed or link.a.closed or link.b.closed)

    def sell(self, name: str, n: int = 3) -> None:
        for i in range(n):
            self.acked.add(self.nodes[name].core.sell(100 + i)["id"])

    def pump(self) -> None:
        self.net.pump()

    def hostile_write(self, shard: str, items: dict[str, bytes | None]) -> None:
        """H changes a shard of its copy (None deletes) and lets its links carry the change."""
        doc = self.h.core.ledger._doc(shard)
        before = doc.get_heads()
        with doc.transaction() as tx:
            for key, value in items.items():
                if value is None:
                    tx.delete(am.ROOT, key)
                else:
                    tx.put(am.ROOT, key, am.ScalarType.Bytes, value)
        changes = [c.bytes for c in doc.get_changes(before)]
        for callback in list(self.h.core.ledger.on_changes):
            callback(shard, changes)
        self.pump()

    def shard_of(self, node: str) -> str:
        return f"{self.nodes[node].core.node_id}/000000"

    def check(self) -> None:
        """Every honest node holds every honest sale and no sale id but acknowledged ones;
        the honest ledgers are identical."""
        first = self.honest[0].entries()
        for node in self.honest:
            held = node.sale_ids()
            assert self.acked <= held, (node.core.node_id, sorted(self.acked - held)[:3])
            assert held <= self.acked, f"forged sale in the view of {node.core.node_id}: {held - self.acked}"
            assert node.entries() == first, "honest ledgers differ"
            for sale in node.core.sales():
                assert sale["status"] == "paid", f"{sale['id']} settled by a forged result"  # cash: unsettled

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


@pytest.fixture(params=[SUPPORTED_VERSIONS, (1, 2)], ids=["push", "sync"])
def mesh(request, make_node, site, switch_key):
    """Links that carry changes in PUSH frames (version 3), and links that only sync (version 2)."""
    m = Mesh(make_node, site, switch_key, request.param)
    yield m
    m.close()


def forged_sale(mesh: Mesh, victim: str, seq: int, amount: int = 99_00) -> bytes:
    """A sale in ``victim``'s name, signed with H's own key (the only key H has)."""
    v = mesh.nodes[victim].core
    body = {"sale_id": envelope.sale_id(v.node_id, seq), "site": v.policy.site_id, "terminal": v.node_id,
            "seq": seq, "created_at": mesh.clock.now_ms(), "amount_minor": amount, "currency": v.policy.currency,
            "method": "cash", "description": None, "items": [], "card": None}
    return envelope.seal("sale", v.node_id, body, mesh.h.core.key)


def result(mesh: Mesh, sale_id: str, key: nacl.signing.SigningKey, status: str = "approved") -> bytes:
    body = {"sale_id": sale_id, "site": mesh.h.core.policy.site_id, "status": status, "auth_code": "X1",
            "response_code": "00", "reason": None, "settled_at": mesh.clock.now_ms(), "reversed": False}
    return envelope.seal("result", "switch", body, key)


def test_hostile_node_cannot_delete_forge_replay_or_flood(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    h_id = mesh.h.core.node_id
    for name in "abc":
        mesh.sell(name)
    mesh.sell("h", 2)  # H's own sales are genuine: they stay
    mesh.pump()
    mesh.check()
    a_sales = sorted(s for s in mesh.acked if s.startswith(mesh.nodes["a"].core.node_id))
    b_sales = sorted(s for s in mesh.acked if s.startswith(mesh.nodes["b"].core.node_id))
    b_raw = mesh.nodes["b"].core.ledger.raw(f"sale/{b_sales[0]}")

    # 1. delete A's sales and overwrite B's in their home shards
    mesh.hostile_write(mesh.shard_of("a"), {f"sale/{s}": None for s in a_sales})
    mesh.hostile_write(mesh.shard_of("b"), {f"sale/{b_sales[0]}": b"garbage",
                                            f"sale/{b_sales[1]}": b_raw})
    mesh.check()
    assert "re-asserting" in caplog.text

    # 2. forgeries: a sale in A's name, results it has no key for, a genuine envelope replayed
    #    under another key, old envelopes replayed
    own = f"{h_id}/000000"
    mesh.hostile_write(own, {f"sale/{envelope.sale_id(mesh.nodes['a'].core.node_id, 50)}": forged_sale(mesh, "a", 50)})
    mesh.hostile_write(mesh.shard_of("a"), {f"sale/{envelope.sale_id(mesh.nodes['a'].core.node_id, 51)}":
                                            forged_sale(mesh, "a", 51)})
    mesh.hostile_write(own, {f"result/{a_sales[0]}": result(mesh, a_sales[0], mesh.h.core.key)})
    mesh.hostile_write(own, {f"result/{a_sales[1]}": result(mesh, b_sales[0], mesh.switch_key)})  # genuine, wrong key
    mesh.hostile_write(own, {f"sale/{b_sales[2]}": b_raw})  # B's sale replayed under another of its keys
    mesh.hostile_write(own, {f"sale/{a_sales[0]}": mesh.nodes["a"].core.ledger.raw(f"sale/{a_sales[0]}")})
    mesh.check()
    assert mesh.open("ab") and mesh.open("bc")

    # 3. flood: many garbage entries and oversize values; H is cut off, B (relay for C) is not
    garbage = {f"sale/{h_id}-9{i:07d}": b"x" * 64 for i in range(200)}
    garbage.update({f"status/{h_id}x{i}": b"y" * 300_000 for i in range(3)})
    mesh.hostile_write(own, garbage)
    assert not mesh.open("ha") and not mesh.open("hb"), "a flooding peer must be cut off"
    assert f"cutting off peer" in caplog.text and h_id in caplog.text
    assert mesh.open("ab") and mesh.open("bc"), "honest links must survive a flood they relay"
    # H reconnects and floods the very same garbage again (bytes the honest nodes saw already)
    mesh.link("ha")
    mesh.link("hb")
    mesh.pump()
    mesh.hostile_write(own, {k: v for k, v in list(garbage.items())[:50]})
    mesh.hostile_write(own, {f"sale/{h_id}-8{i:07d}": b"z" for i in range(20)})
    assert mesh.open("ab") and mesh.open("bc")
    mesh.sell("c", 1)  # the honest mesh keeps replicating
    mesh.pump()
    mesh.check()
    for node in mesh.honest:
        shard_keys = set(node.core.ledger.docs[own].keys(am.ROOT)) if own in node.core.ledger.docs else set()
        assert not shard_keys & set(garbage), "garbage kept in an honest node's shard"


def test_links_that_never_finish_do_not_stall_a_node(mesh: Mesh) -> None:
    a = mesh.nodes["a"]
    half = [a.replicator.open_session(label=f"half-{i}") for i in range(20)]  # TCP up, nothing more
    mid_frame = a.replicator.open_session(label="mid-frame")
    mid_frame.receive_data(b"\x00\x00\x10\x00")  # a frame header, then silence
    mesh.sell("c", 2)
    mesh.pump()
    mesh.check()  # the other links kept replicating
    mesh.clock.advance(11.0)
    for s in half + [mid_frame]:
        s.tick()
    assert all(s.closed for s in half + [mid_frame])
    assert all(s not in a.replicator.sessions for s in half + [mid_frame]), "dead sessions are forgotten"
    assert mesh.open("ab")


class FakeSSL:
    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


def test_revocation_cuts_the_hostile_node_off_everywhere(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    h = mesh.h
    h_id = h.core.node_id
    mesh.sell("a", 2)
    mesh.sell("h", 2)
    mesh.pump()
    for node in mesh.honest:
        tls.peer_identity(FakeSSL(certs.to_der(h.core.cert)), node.core.ca_cert, node.core.roster,
                          mesh.clock.now_ms())  # accepted while enrolled
    raw = mesh.site.revoke(h_id, "hostile", mesh.clock)
    mesh.nodes["c"].core.ingest(raw, "organizer")  # handed to C, the node farthest from H
    mesh.pump()
    for node in mesh.honest:
        assert h_id in node.core.roster.revoked
        with pytest.raises(VerificationError, match="revoked"):
            tls.peer_identity(FakeSSL(certs.to_der(h.core.cert)), node.core.ca_cert, node.core.roster,
                              mesh.clock.now_ms())
    assert not mesh.open("ha") and not mesh.open("hb"), "open links to a revoked node must be cut"
    assert "is revoked" in caplog.text
    # what H writes later is refused everywhere, even relayed by an honest-looking path
    mesh.h.core.ledger._after_merge = Ledger._after_merge.__get__(mesh.h.core.ledger)  # type: ignore[method-assign]
    mesh.clock.advance(1)  # a revocation without a sequence cut keeps what is dated up to its time
    late = h.core.sell(555)["id"]
    mesh.link("ha")  # a link the TLS layer would refuse; in memory it opens: the ledger must still refuse
    mesh.pump()
    for node in mesh.honest:
        assert late not in node.sale_ids()
    assert mesh.open("ab") and mesh.open("bc")


def test_hostile_check_catches_a_ledger_that_skips_verification(mesh: Mesh, monkeypatch) -> None:
    """Test of the test: with verification off, the forged sale enters the honest views and the
    check fails."""
    def trusting(self: Roster, env: envelope.Envelope, now_ms: int, key: str | None = None) -> Verified:
        return Verified(env=env, key=entry_key(env))

    monkeypatch.setattr(Roster, "verify", trusting)
    mesh.sell("a", 1)
    mesh.pump()
    own = f"{mesh.h.core.node_id}/000000"
    mesh.hostile_write(own, {f"sale/{envelope.sale_id(mesh.nodes['a'].core.node_id, 50)}": forged_sale(mesh, "a", 50)})
    with pytest.raises(AssertionError, match="forged sale"):
        mesh.check()


def test_flood_check_catches_a_ledger_that_relays_what_it_refused(mesh: Mesh, caplog, monkeypatch) -> None:
    """Test of the test: a ledger that keeps refused entries in its shards relays H's flood, and
    C cuts B off for entries B never wrote: the "honest links survive" check fails."""
    monkeypatch.setattr(Ledger, "_strip", lambda self, shard, report: None)
    with pytest.raises(AssertionError, match="honest links must survive|garbage kept"):
        test_hostile_node_cannot_delete_forge_replay_or_flood(mesh, caplog)


def test_made_up_shards_and_lying_statuses_do_not_spread(mesh: Mesh) -> None:
    """H writes into hundreds of shards no node can have written (unknown node ids, segments far past
    any log) and signs statuses that lie about who it is or what time it is."""
    import os

    from meshpos.domain import rules
    from meshpos.status.meshview import Known, analyze
    from meshpos.status.board import StatusBoard

    mesh.pump()
    tables = {n.core.node_id: set(n.core.ledger.shards()) for n in mesh.honest}
    h_id, a_id = mesh.h.core.node_id, mesh.nodes["a"].core.node_id
    names = ([f"{os.urandom(8).hex()}/000000" for _ in range(150)]
             + [f"{h_id}/{seg:06d}" for seg in range(200, 300)] + [f"{a_id}/{seg:06d}" for seg in range(900, 950)])
    for i, shard in enumerate(names):
        mesh.hostile_write(shard, {f"note/{i}": b"made up"})
    mesh.sell("c", 2)
    mesh.pump()
    mesh.check()  # honest sales everywhere, the links kept replicating
    for node in mesh.honest:
        assert set(node.core.ledger.shards()) == tables[node.core.node_id]
        assert len(node.replicator.park.shards) <= node.replicator.park.limits.max_per_peer
    assert mesh.open("ab") and mesh.open("bc")

    board = StatusBoard(mesh.nodes["a"].core.roster, mesh.clock)
    now = mesh.clock.now_ms()
    liar = envelope.seal("status", h_id, {"status": {"at": now, "role": "gateway", "name": "A"}}, mesh.h.core.key)
    ahead = envelope.seal("status", h_id, {"status": {"at": now + rules.MAX_SKEW_MS + 60_000, "role": "terminal"}},
                          mesh.h.core.key)
    assert board.offer(ahead, "h") is None and h_id not in board.statuses
    assert board.offer(liar, "h") is not None
    roster = mesh.nodes["a"].core.roster
    known = {n: Known(name=i.name, role=i.role) for n, i in roster.identities.items()}
    view = analyze({s.node_id: s.body for s in board.current().values()}, known, now_ms=now,
                   offline_window_ms=3_600_000, warn_before_ms=60_000)
    shown = {n.node_id: (n.name, n.role) for n in view.nodes}
    assert shown[h_id] == (roster.identities[h_id].name, "terminal")
