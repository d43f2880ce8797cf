"""Short ids in the signed status (issue 15, the gateway's status): a gateway under client
isolation links to every terminal, and its status must carry all of them (and what it holds of
each) within the 8 KiB bound; readers turn the short ids back into node ids against their roster
(protocols/link.md, "Short ids (status format 3)")."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import nacl.signing
import pytest

from meshpos.apps.inspector import Inspector
from meshpos.cli.inspect_cmd import render
from meshpos.domain.clockskew import ClockSkew
from meshpos.identity import certs, keys
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.node.dashboard import Dashboard
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock
from meshpos.node.status_pub import StatusPublisher
from meshpos.site.sitedir import Site
from meshpos.replication.memnet import MemNetwork
from meshpos.status.board import StatusBoard
from meshpos.status.shortids import ShortIds
from meshpos.wire import canonical, envelope, heldvec, shortids
from meshpos.wire.shortids import HELD, LINKS, ShortTable
from meshpos.wire.status import (ClockSeen, LedgerSize, LinkSeen, PendingCount, PrinterSeen, RefusedCount,
                                 StatusBody, UplinkSeen)

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors" / "status-short.json"


# -- a site of many members, cheaply: certificates in a roster, no node directory each ---------

class Member:
    def __init__(self, site: Site, name: str, role: str, now_ms: int, seed: int) -> None:
        self.key = nacl.signing.SigningKey(random.Random(seed).randbytes(32))
        public = bytes(self.key.verify_key)
        self.node_id = keys.node_id_of(public)
        self.name = name
        self.der = certs.to_der(certs.issue(site.ca_cert, site.ca_key, public, role, name, now_ms, 30))

    def seal(self, body: StatusBody) -> bytes:
        return envelope.seal("status", self.node_id, {"status": body.to_json()}, self.key)


def members(site: Site, n: int, clock: FakeClock, role: str = "terminal", prefix: str = "T") -> list[Member]:
    return [Member(site, f"{prefix}{i:03d}", role, clock.now_ms(), 1000 + i) for i in range(n)]


def know(core: NodeCore, *groups: list[Member]) -> None:
    for group in groups:
        for m in group:
            core.roster.add_cert_der(m.der)


class LinkedPublisher(StatusPublisher):
    """The real publisher, its links given (a gateway's 256 TLS links are more than a unit test
    should open): what it signs is what a node signs."""

    def __init__(self, core: NodeCore, board: StatusBoard, links: tuple[LinkSeen, ...]) -> None:
        super().__init__(core, board, None, listen_port=lambda: 7300, printer=lambda: PrinterSeen("ok", 0),
                         uplink=lambda: UplinkSeen("up", None, None), started_at=core.clock.now_ms(),
                         skew=ClockSkew())
        self._links = links

    def links(self) -> tuple[LinkSeen, ...]:
        return self._links


def big_vector(terminals: list[Member], rng: random.Random) -> dict[str, int]:
    """What a busy day's gateway holds: sequence numbers up to a million (three LEB128 bytes)."""
    return {t.node_id: rng.randint(20_000, 1_000_000) for t in terminals}


# -- the encoding ------------------------------------------------------------------------------

def test_the_vectors_of_the_protocol_read_and_write_as_written() -> None:
    doc = json.loads(VECTORS.read_text())
    roster = {node: SimpleNamespace(role="terminal") for node in doc["roster"]}
    ids = ShortIds(SimpleNamespace(identities=roster))  # type: ignore[arg-type]
    assert ids.width() == doc["roster_width"]
    for case in doc["tables"]:
        fmt = {"links_short": LINKS, "held_short": HELD}[case["field"]]
        table = ShortTable.of(case["width"], case["values"])
        assert fmt.encode(table) == case["text"], case["name"]
        if case["text"]:
            assert envelope.b64d(case["text"], "vector").hex() == case["bytes_hex"], case["name"]
        problems: list[str] = []
        assert ids.names(fmt.decode(case["text"]), problems) == case["reads"], case["name"]
        assert len(problems) == case["problems"], (case["name"], problems)
    for case in doc["invalid"]:
        fmt = {"links_short": LINKS, "held_short": HELD}[case["field"]]
        text = envelope.b64e(bytes.fromhex(case["bytes_hex"])) if "bytes_hex" in case else case["text"]
        table = fmt.decode(text)
        assert table is not None and not table.records and case["why"] in (table.problem or ""), case["name"]


def test_a_table_round_trips_sorted_at_its_width_and_keeps_what_fits() -> None:
    rng = random.Random(15)
    values = {f"{rng.getrandbits(64):016x}": rng.randint(2**14, 2**21 - 1) for _ in range(400)}  # 7 bytes each
    table = ShortTable.of(4, values)
    text = HELD.encode(table)
    assert text is not None
    raw = envelope.b64d(text, "held_short")
    assert raw[0] == 4 and len(raw) <= 1 + HELD.max_bytes
    back = HELD.decode(text)
    assert back is not None and back.width == 4 and back.problem is None
    kept = sorted(values)[:len(back.records)]  # past the bound: the lowest ids are kept
    assert back.records == {bytes.fromhex(node)[:4]: values[node] for node in kept} and len(kept) == 365
    # a link's RTT: value = ms + 1, 0 = not measured yet
    assert [shortids.rtt_of(shortids.rtt_value(v)) for v in (None, 0, 7, 10**20)] == [None, 0, 7, 10**15]
    assert LINKS.encode(ShortTable(4, {})) == "" and LINKS.decode("") == ShortTable(0)
    assert LINKS.encode(None) is None and LINKS.decode(None) is None


@pytest.mark.parametrize("raw, why", [
    (bytes([3]) + b"\x00" * 4, "width 3"),
    (bytes([9]) + b"\x00" * 10, "width 9"),
    (bytes([4]), "a width and no record"),
    (bytes([4]) + b"\x00\x00\x00", "cut short"),
    (bytes([4]) + b"\x00\x00\x00\x01\x85", "cut short"),
    (bytes([4]) + b"\x00\x00\x00\x02\x01" + b"\x00\x00\x00\x01\x01", "ascending"),
    (bytes([4]) + b"\x00\x00\x00\x01\x01" + b"\x00\x00\x00\x01\x02", "ascending"),  # two links, one short id
    (bytes([4]) + b"\x00\x00\x00\x01\x81\x00", "not minimal"),
    (bytes([4]) + b"\x00\x00\x00\x01\x00", "out of"),  # held: 0 is no mark
    (bytes([4]) + b"\x00\x00\x00\x01" + b"\xff" * 8 + b"\x01", "too long"),
    (bytes([4]) + b"\x00\x00\x00\x01\x01" * (HELD.max_bytes // 5 + 1), "longer than"),
])
def test_a_table_that_the_encoder_never_makes_reads_as_no_record_with_its_reason(raw: bytes, why: str) -> None:
    table = HELD.decode(envelope.b64e(raw))
    assert table is not None and table.records == {} and why in (table.problem or ""), table


def test_no_text_breaks_the_table_decoder() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        raw = rng.randbytes(rng.randint(0, 40))
        for text in (envelope.b64e(raw), raw.hex(), rng.choice([5, None, [], {}, True, "=", "AA=="])):
            table = LINKS.decode(text)
            assert table is None or isinstance(table, ShortTable)


def test_the_width_is_the_narrowest_at_which_the_roster_has_no_shared_prefix() -> None:
    def ids_of(*nodes: str) -> ShortIds:
        return ShortIds(SimpleNamespace(identities={n: SimpleNamespace(role="terminal") for n in nodes}))  # type: ignore[arg-type]
    assert ids_of("0123456789abcdef", "fedcba9876543210").width() == 4
    # two members sharing 4 bytes (made on purpose: 2^32 tries): the whole site goes to 5
    pair = ids_of("0123456789abcdef", "0123456700000000", "fedcba9876543210")
    assert pair.width() == 5
    problems: list[str] = []
    table = ShortTable.of(4, {"0123456789abcdef": 3, "fedcba9876543210": 4})  # from a node that knew only one
    assert pair.names(table, problems) == {"fedcba9876543210": 4}
    assert problems == ["1 record(s) of width 4 name several members of our roster (left out)"]
    assert ids_of("0123456789abcdef", "0123456789ab0000").width() == 7
    assert ids_of("0123456789abcdef", "0123456789abcd00").width() == 8  # full ids
    assert ids_of().width() == 4


# -- a gateway's status: every link of a 256-terminal site, and what it holds -------------------

def test_a_gateway_status_with_256_links_and_256_terminals_held_fits_and_round_trips(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], site: Site, clock: FakeClock) -> None:
    gw, t1 = open_node(make_node("GW", role="gateway")), open_node(make_node("T1"))
    terminals = members(site, 256, clock)
    know(gw, terminals)
    know(t1, terminals)
    t1.ingest(gw.ledger.raw(f"cert/{gw.node_id}") or b"", "peer")
    rng = random.Random(256)
    links = tuple(sorted((LinkSeen(t.node_id, "terminal", rng.randint(1, 400)) for t in terminals),
                         key=lambda link: link.node))
    vector = big_vector(terminals, rng)
    gw.ledger.holdings.rebuild(vector.items(), ())
    gw_board = StatusBoard(gw.roster, clock)
    pub = LinkedPublisher(gw, gw_board, links)
    raw = envelope.seal("status", gw.node_id, {"status": pub.body().to_json()}, gw.key)
    assert len(raw) <= envelope.MAX_ENVELOPE  # 8 KiB, with every link and every terminal's mark
    sent = canonical.decode(raw)["body"]["status"]
    assert sent["links"] == [] and sent["held"] == ""  # format 3: the long forms stay empty

    board = StatusBoard(t1.roster, clock)
    got = board.offer(raw, "gw")
    assert got is not None
    assert got.body.links == links  # node ids, roles from the certificates, RTTs: all 256
    assert dict(got.body.held) == vector
    assert got.links == {t.node_id for t in terminals} and board.links_of(gw.node_id) == got.links
    # the node's own board reads its own status the same way
    pub.publish()
    assert gw_board.statuses[gw.node_id].body.links == links


def test_both_tables_full_at_the_widest_ids_still_fit_beside_every_other_field_at_its_largest(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> None:
    """The bounds of the two tables leave room for the rest: a sender with more links or marks
    than fit loses the highest ids, never its whole status (seal refuses past 8192 bytes)."""
    core = open_node(make_node("T1"))
    full = {(i * 0x0101010101).to_bytes(8, "big"): 2**53 for i in range(1, 2000)}
    status = StatusBody(
        at=10**15, role="terminal", name="x" * 40, version="0.0.0+" + "v" * 35,
        addresses=tuple("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" for _ in range(8)), port=65535,
        ledger=LedgerSize(10**15, 10**15), pending=PendingCount(10**15, 10**15, 10**15),
        site_pending=PendingCount(10**15, 10**15, 10**15),
        refused=RefusedCount(10**15, {f"{i:016x}": 10**15 for i in range(16)}),
        uplink=UplinkSeen("forwarding", 10**15, "x" * 40), printer=PrinterSeen("paper_out", 10**15),
        battery=100, battery_low=False, clock=ClockSeen(-10**15, "switch", 10**15), every_ms=60_000,
        started_at=10**15, links_short=ShortTable(8, {k: 10**15 + 1 for k in full}),
        held_short=ShortTable(8, full))
    raw = envelope.seal("status", core.node_id, {"status": status.to_json()}, core.key)
    assert len(raw) <= envelope.MAX_ENVELOPE
    sent = canonical.decode(raw)["body"]["status"]
    assert len(sent["links_short"]) > LINKS.max_text - 24 and len(sent["held_short"]) > HELD.max_text - 24  # full


def test_old_statuses_are_read_as_before_and_the_short_form_wins_over_the_long(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    t1, t2, t3 = open_node(make_node("T1")), open_node(make_node("T2")), open_node(make_node("T3"))
    for other in (t2, t3):
        t1.ingest(other.ledger.raw(f"cert/{other.node_id}") or b"", "peer")
    board = StatusBoard(t1.roster, clock)
    old = {"at": clock.now_ms(), "links": [{"node": t3.node_id, "role": "terminal", "rtt_ms": 4}],
           "held": heldvec.encode({t3.node_id: 9})}  # what a node of today's release signs
    got = board.offer(envelope.seal("status", t2.node_id, {"status": old}, t2.key), "x")
    assert got is not None and got.wire is None
    assert got.body.links == (LinkSeen(t3.node_id, "terminal", 4),) and dict(got.body.held) == {t3.node_id: 9}
    clock.advance(1.0)
    both = {**old, "at": clock.now_ms(), "links_short": LINKS.encode(ShortTable.of(4, {t1.node_id: 0})),
            "held_short": LINKS.encode(ShortTable(4, {}))}
    got = board.offer(envelope.seal("status", t2.node_id, {"status": both}, t2.key), "x")
    assert got is not None and got.body.links == (LinkSeen(t1.node_id, "terminal", None),)
    assert dict(got.body.held) == {}  # an empty short table says "nothing", over the long form


def test_an_older_node_reads_a_new_status_without_its_links_and_holdings_but_takes_the_rest(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], site: Site, clock: FakeClock) -> None:
    """An older node decodes field by field and ignores the members it does not know (its
    decoder is this one without the short fields): it sees no links and nothing held, every other
    field as sent, and does not refuse the status."""
    gw = open_node(make_node("GW", role="gateway"))
    terminals = members(site, 20, clock)
    know(gw, terminals)
    gw.ledger.holdings.rebuild([(t.node_id, 5) for t in terminals], ())
    pub = LinkedPublisher(gw, StatusBoard(gw.roster, clock), tuple(LinkSeen(t.node_id, "terminal", 3) for t in terminals))
    sent = pub.body().to_json()
    as_old = StatusBody.from_json({k: v for k, v in sent.items() if k not in ("links_short", "held_short")})
    assert as_old.links == () and dict(as_old.held) == {}
    assert (as_old.uplink.state, as_old.printer.state, as_old.port, as_old.at) == ("up", "ok", 7300, sent["at"])


# -- the inspector: a 200-terminal star, with names -----------------------------------------

def test_the_inspector_shows_a_200_terminal_star_by_name(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], site: Site, clock: FakeClock) -> None:
    gw, insp = open_node(make_node("GW", role="gateway")), open_node(make_node("I", role="inspector"))
    terminals = members(site, 200, clock)
    know(gw, terminals)
    know(insp, terminals)
    insp.ingest(gw.ledger.raw(f"cert/{gw.node_id}") or b"", "peer")
    gw_board = StatusBoard(gw.roster, clock)
    gw_pub = LinkedPublisher(gw, gw_board, tuple(sorted((LinkSeen(t.node_id, "terminal", 2) for t in terminals),
                                                        key=lambda link: link.node)))
    inspector = Inspector(insp, [], mdns=False)
    assert inspector.board.offer(envelope.seal("status", gw.node_id, {"status": gw_pub.body().to_json()}, gw.key),
                                 "gw") is not None
    to_gw = ShortIds(gw.roster).table({gw.node_id: 3})  # each terminal reaches the gateway only
    for t in terminals:
        body = StatusBody(at=clock.now_ms(), role="terminal", every_ms=10_000, links_short=to_gw,
                          held_short=ShortIds(gw.roster).table({t.node_id: 1}))
        assert inspector.board.offer(t.seal(body), "gw") is not None
        assert gw_board.offer(t.seal(body), "t") is not None
    view = inspector.view()
    assert view.mesh.topology.shape == "star" and view.mesh.topology.hub == "GW"
    assert view.mesh.totals.reachable == 201 and not view.mesh.partition
    assert sorted(view.mesh.edges) == sorted(["GW", t.name] for t in terminals)
    gw_row = next(n for n in view.mesh.nodes if n.name == "GW")
    assert sorted(gw_row.links) == sorted(t.node_id for t in terminals)
    assert any(w.startswith("star: every link goes through GW") for w in view.mesh.warnings)
    text = render(view)
    assert "topology: a star through GW" in text and "T199" in text
    # the gateway's dashboard draws the same star from its own board (its own status included)
    gw_pub.publish()
    state = Dashboard(gw, None, gw_board, "").state()
    assert any(a.startswith("star: every link goes through GW") for a in state["alerts"]), state["alerts"]
    assert state["mesh_groups"] == [["GW", *(t.name for t in terminals)]]
    assert "T199" in state["mesh_svg"] and state["mesh_svg"].count("<line") >= 200


# -- hostile statuses: the bad part is left out, with a logged reason; never a crash -------------

def test_a_short_id_that_names_nobody_waits_for_its_certificate(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], site: Site, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    t1, t2 = open_node(make_node("T1")), open_node(make_node("T2"))
    t1.ingest(t2.ledger.raw(f"cert/{t2.node_id}") or b"", "peer")
    late, = members(site, 1, clock, prefix="LATE")
    board = StatusBoard(t1.roster, clock)
    t1.ledger.on_accept.append(board.on_accept)
    seen: list[dict[str, int]] = []
    board.on_new.append(lambda s: seen.append(dict(s.body.held)))
    body = StatusBody(at=clock.now_ms(), links_short=ShortTable.of(4, {t1.node_id: 5, late.node_id: 6}),
                      held_short=ShortTable.of(4, {late.node_id: 40}), battery=50)
    with caplog.at_level(logging.INFO, logger="meshpos.status.board"):
        got = board.offer(envelope.seal("status", t2.node_id, {"status": body.to_json()}, t2.key), "x")
    assert got is not None and got.body.battery == 50  # the status is taken: only the record is left out
    assert got.links == {t1.node_id} and dict(got.body.held) == {}
    assert "name no member of our roster" in caplog.text
    # the certificate arrives (through the ledger): the status reads again, holders see it again
    t1.ingest(envelope.seal("cert", late.node_id, {"cert": envelope.b64e(late.der)}, late.key), "peer")
    assert board.statuses[t2.node_id].links == {t1.node_id, late.node_id}
    assert seen[-1] == {late.node_id: 40}


def test_hostile_tables_are_left_out_with_a_reason_and_the_status_still_counts(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    t1, t2 = open_node(make_node("T1")), open_node(make_node("T2"))
    t1.ingest(t2.ledger.raw(f"cert/{t2.node_id}") or b"", "peer")
    board = StatusBoard(t1.roster, clock)
    prefix = bytes.fromhex(t1.node_id)[:4]
    twice = envelope.b64e(bytes([4]) + prefix + b"\x01" + prefix + b"\x02")  # two links, one short id
    huge = envelope.b64e(bytes([4]) + b"".join((i * 7919).to_bytes(4, "big") + b"\x01" for i in range(1, 700)))
    for links_short, held_short, why in [
            (twice, "", "not strictly ascending"),
            ("", huge, "longer than 2560 bytes"),
            ({"a": 1}, "", "not a base64url string"),
            ("!!!", "", "base64url")]:
        clock.advance(1.0)
        status = {"at": clock.now_ms(), "links_short": links_short, "held_short": held_short, "battery": 7}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="meshpos.status.board"):
            got = board.offer(envelope.seal("status", t2.node_id, {"status": status}, t2.key), "x")
        assert got is not None and got.body.battery == 7 and got.links == frozenset() and not got.body.held
        assert why in caplog.text, (why, caplog.text)
    # past the envelope's 8 KiB, the whole status is refused before any signature check
    clock.advance(1.0)
    obj = canonical.decode(envelope.seal("status", t2.node_id, {"status": {"at": clock.now_ms()}}, t2.key))
    obj["body"]["status"]["held_short"] = "A" * 9000
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meshpos.status.board"):
        assert board.offer(canonical.encode(obj), "x") is None
    assert "exceeds 8192" in caplog.text and board.statuses[t2.node_id].body.battery == 7


# -- real nodes: the star drawn from the statuses they sign, carried over their own links -------

def _settle(net: MemNetwork, clock: FakeClock, seconds: float, step: float = 0.1) -> None:
    """Time passes on the test's clock: every session's timers run, bytes move until quiet."""
    net.pump()
    for _ in range(int(seconds / step)):
        clock.advance(step)
        for link in list(net.links):
            for session in (link.a, link.b):
                if not session.closed and session.next_deadline() <= clock.monotonic():
                    session.tick()
        net.pump()


def test_real_nodes_under_client_isolation_show_the_inspector_their_star(tmp_path: Path) -> None:
    """A gateway and 50 terminals (real stores, ledgers, link sessions, status publishers and
    boards, joined in memory), every terminal linked to the gateway only, and an inspector linked
    to the gateway: the statuses they sign flood through the gateway, and the inspector reads the
    star with every name. Before short ids the gateway's status listed 48 of its 50 links, and the
    inspector saw no star (a link counts where both ends list it). 200 terminals this way cost
    too much CPU for the suite (50 take ~10 s); the unit test above draws a 200-terminal star
    from statuses built by the same publisher."""
    clock = wall_clock()
    site = make_site(tmp_path / "site")
    gw = SimNode.open(enroll(site, tmp_path / "gw", "GW", "gateway"), clock)
    terminals = [SimNode.open(enroll(site, tmp_path / f"t{i}", f"T{i:02d}"), clock) for i in range(50)]
    inspector = Inspector(NodeCore.open(enroll(site, tmp_path / "insp", "Insp", "inspector"), clock), [], mdns=False)
    nodes = [gw, *terminals]
    try:
        publishers = []
        for node in nodes:
            board = StatusBoard(node.core.roster, clock)
            board.attach(node.replicator)
            node.core.ledger.on_accept.append(board.on_accept)
            publishers.append(StatusPublisher(
                node.core, board, node.replicator, listen_port=lambda: None, printer=lambda: PrinterSeen("ok", 0),
                uplink=lambda: UplinkSeen("off", None, None), started_at=clock.now_ms(), skew=ClockSkew()))
        net = MemNetwork()
        for t in terminals:
            net.connect(t.replicator, gw.replicator)
        net.connect(inspector.replicator, gw.replicator)
        _settle(net, clock, 3.0)  # links up, every certificate everywhere
        for pub in publishers:
            pub.publish()
        _settle(net, clock, 1.0)
        gw_status = canonical.decode(inspector.board.statuses[gw.core.node_id].raw)["body"]["status"]
        assert gw_status["links"] == [] and gw_status["links_short"]  # format 3 on the wire
        view = inspector.view()
        assert view.mesh.topology.shape == "star" and view.mesh.topology.hub == "GW", view.mesh.edges
        assert sorted(view.mesh.edges) == [["GW", f"T{i:02d}"] for i in range(50)]
        assert view.mesh.totals.reachable == 51 and not view.mesh.partition
        assert "topology: a star through GW" in render(view)
    finally:
        for node in nodes:
            node.close()
        inspector.core.close()
