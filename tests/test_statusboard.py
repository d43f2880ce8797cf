"""Status gossip without sockets: the STATUS frame, the board's rules, the mesh view's warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from meshpos.domain import rules
from meshpos.wire import canonical, envelope
from meshpos.infra.clock import FakeClock
from meshpos.domain.errors import ProtocolError
from meshpos.wire.link import Hello, LinkConnection, Status
from meshpos.status.meshview import Known, MeshView, analyze, to_dot
from meshpos.node.core import NodeCore
from meshpos.site.sitedir import Site
from meshpos.status.board import StatusBoard
from meshpos.wire.status import StatusBody

SITE, A, B = "a" * 16, "b" * 16, "c" * 16
WINDOW, WARN = 24 * 3_600_000, 3 * 3_600_000


def view_of(statuses: dict[str, Any], known: dict[str, Known], **kwargs: Any) -> dict[str, Any]:
    """The mesh view of statuses given as the JSON a node signs (read as the board reads them), as
    its JSON (`meshpos inspect --json`)."""
    return typed_view_of(statuses, known, **kwargs).to_json()


def typed_view_of(statuses: dict[str, Any], known: dict[str, Known], **kwargs: Any) -> MeshView:
    return analyze({node: StatusBody.from_json(body) for node, body in statuses.items()}, known, **kwargs)


def pair(versions: tuple[int, ...] = (1, 2)) -> tuple[LinkConnection, LinkConnection]:
    left = LinkConnection(Hello(versions, SITE, A, "terminal"), 0.0)
    right = LinkConnection(Hello((1, 2), SITE, B, "terminal"), 0.0)
    right.receive_data(left.start(), 0.0)
    left.receive_data(right.start(), 0.0)
    left.events(), right.events()
    return left, right


def test_status_frames_only_on_version_2_links() -> None:
    left, right = pair()
    assert left.version == 2
    right.receive_data(left.send(Status(b"{}")), 1.0)
    assert right.events() == [Status(b"{}")]
    old, peer = pair(versions=(1,))
    assert old.version == 1
    with pytest.raises(ProtocolError):
        old.send(Status(b"{}"))
    from meshpos.wire.link import encode_event
    peer.receive_data(encode_event(Status(b"{}")), 1.0)
    assert peer.closed and "STATUS on a version-1 link" in (peer.close_reason or "")


def seal(core: NodeCore, at: int, **extra: Any) -> bytes:
    return envelope.seal("status", core.node_id, {"status": {"at": at, "role": core.identity.role,
                                                             "name": core.config.name, **extra}}, core.key)


def test_board_keeps_the_newest_verified_status_and_refuses_inspectors(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    t1, t2, insp = open_node(make_node("T1")), open_node(make_node("T2")), open_node(make_node("I", role="inspector"))
    board = StatusBoard(t1.roster, clock)
    now = clock.now_ms()
    assert board.offer(seal(t2, now), "x") is None  # T2's certificate is not known yet: parked
    t1.ingest(t2.ledger.raw(f"cert/{t2.node_id}"), "peer")
    board.retry_parked()
    assert board.statuses[t2.node_id].at == now
    assert board.offer(seal(t2, now - 1), "x") is None and board.statuses[t2.node_id].at == now
    assert board.offer(seal(t2, now + 5), "x") is not None
    obj = canonical.decode(seal(t2, now + 10))
    obj["body"]["status"]["at"] = now + 100  # newer, but the signature is of another body
    assert board.offer(canonical.encode(obj), "x") is None and board.rejected == 1
    assert board.offer(canonical.encode(obj), "y") is None and board.rejected == 1  # the same bytes again: known
    t1.ingest(insp.ledger.raw(f"cert/{insp.node_id}"), "peer")
    assert board.offer(seal(insp, now), "x") is None and insp.node_id not in board.statuses


def st(at: int, links: list[str], pending: int = 0, oldest: int | None = None, every: int = 2000) -> dict[str, Any]:
    return {"at": at, "role": "terminal", "links": [{"node": n, "role": "terminal"} for n in links],
            "pending": {"count": pending, "amount_minor": 100 * pending, "oldest_created_at": oldest},
            "ledger": {"entries": 10}, "every_ms": every}


def test_view_finds_stale_nodes_partitions_and_closing_windows() -> None:
    now = 10_000_000_000
    names = {n: Known(name=n.upper(), role="terminal") for n in ("n1", "n2", "n3", "n4")}
    fresh = {"n1": st(now, ["n2"]), "n2": st(now, ["n1", "n3"]), "n3": st(now, ["n2", "n4"]),
             "n4": st(now, ["n3"])}
    view = view_of(fresh, names, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)
    assert not view["partition"] and view["warnings"] == [] and len(view["groups"]) == 1

    # n4 falls silent: others still list their link to it, yet it is cut off
    silent = {**fresh, "n4": st(now - 20_000, ["n3"])}
    view = view_of(silent, names, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)
    nodes = {n["name"]: n for n in view["nodes"]}
    assert not nodes["N4"]["reachable"] and nodes["N3"]["reachable"]
    assert view["partition"] and view["groups"] == [["N1", "N2", "N3"], ["N4"]]
    assert any("N4 is unreachable" in w and "while others are fresh" in w for w in view["warnings"])

    # two fresh halves that no link joins (an inspector sees both): a partition too
    split = {"n1": st(now, ["n2"]), "n2": st(now, ["n1"]), "n3": st(now, ["n4"]), "n4": st(now, ["n3"])}
    view = view_of(split, names, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)
    assert view["partition"] and len(view["groups"]) == 2 and all(n["reachable"] for n in view["nodes"])

    # a pending sale 22 h old: its window closes within the warning time
    late = {**fresh, "n2": st(now, ["n1", "n3"], pending=2, oldest=now - 22 * 3_600_000)}
    view = view_of(late, names, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)
    assert any("offline window closes in 2 h" in w for w in view["warnings"]), view["warnings"]
    assert view["totals"]["pending"] == 2 and view["totals"]["window_left_s"] == 2 * 3600


def test_links_of_trusts_only_a_recent_status_and_survives_junk(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    t1, t2 = open_node(make_node("T1")), open_node(make_node("T2"))
    t1.ingest(t2.ledger.raw(f"cert/{t2.node_id}"), "peer")
    board = StatusBoard(t1.roster, clock)
    assert board.links_of(t2.node_id) == frozenset()
    raw = envelope.seal("status", t2.node_id, {"status": st(clock.now_ms(), [A, B], every=2000)}, t2.key)
    assert board.offer(raw, "x") is not None
    assert board.links_of(t2.node_id) == {A, B}
    clock.advance(6.0)  # 3 x every_ms: still fresh
    assert board.links_of(t2.node_id) == {A, B}
    clock.advance(0.5)
    assert board.links_of(t2.node_id) == frozenset()  # stale: forwarding must not rely on it
    junk = st(clock.now_ms(), [], every=2000)
    junk["links"], junk["every_ms"] = "everyone", "soon"
    assert board.offer(envelope.seal("status", t2.node_id, {"status": junk}, t2.key), "x") is not None
    assert board.links_of(t2.node_id) == frozenset()


DAY_MS = 24 * 3_600_000


def test_a_status_from_the_future_is_refused(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    t1, t2 = open_node(make_node("T1")), open_node(make_node("T2"))
    t1.ingest(t2.ledger.raw(f"cert/{t2.node_id}"), "peer")
    board = StatusBoard(t1.roster, clock)
    now = clock.now_ms()
    assert board.offer(seal(t2, now + 30 * DAY_MS), "x") is None  # would stay "fresh" for 30 days
    assert t2.node_id not in board.statuses and board.rejected == 1
    assert board.offer(seal(t2, now + rules.MAX_SKEW_MS + 1), "x") is None and board.rejected == 2
    assert board.offer(seal(t2, now + rules.MAX_SKEW_MS), "x") is not None  # within the skew: a clock a bit ahead


def test_a_revoked_nodes_status_is_dropped_and_refused(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock, site: Site) -> None:
    t1, t2 = open_node(make_node("T1")), open_node(make_node("T2"))
    board = StatusBoard(t1.roster, clock)
    t1.ledger.on_accept.append(board.on_accept)
    t1.ingest(t2.ledger.raw(f"cert/{t2.node_id}"), "peer")
    now = clock.now_ms()
    assert board.offer(seal(t2, now), "x") is not None and t2.node_id in board.current()
    t1.ingest(site.revoke(t2.node_id, "stolen"), "organizer")
    assert t2.node_id not in board.current() and t2.node_id not in board.statuses
    clock.advance(1.0)
    assert board.offer(seal(t2, clock.now_ms()), "x") is None and t2.node_id not in board.current()


def test_name_and_role_come_from_the_certificate_not_the_status() -> None:
    now = 10_000_000_000
    known = {"n1": Known(name="T1", role="terminal"), "n2": Known(name="T5", role="terminal"),
             "n5": Known(name="T5", role="gateway"), "n3": Known(name="T3", role="terminal")}
    liar = {**st(now, ["n1"]), "name": "T5", "role": "gateway"}  # n2 poses as the gateway T5
    hider = {**st(now, ["n1"]), "name": "nobody", "role": "inspector"}  # n3 tries to vanish
    view = view_of({"n1": st(now, ["n2", "n3"]), "n2": liar, "n3": hider}, known, now_ms=now,
                   offline_window_ms=WINDOW, warn_before_ms=WARN)
    nodes = {n["node_id"]: n for n in view["nodes"]}
    assert (nodes["n2"]["name"], nodes["n2"]["role"]) == ("T5", "terminal")
    assert (nodes["n3"]["name"], nodes["n3"]["role"]) == ("T3", "terminal")
    assert nodes["n5"]["role"] == "gateway" and not nodes["n5"]["reachable"]
    assert nodes["n1"]["links"] == ["n2", "n3"]


def test_a_terminal_whose_sales_the_site_refuses_is_warned_about_whatever_it_says() -> None:
    now = 10_000_000_000
    known = {"n1": Known(name="T1", role="terminal"), "h": Known(name="H", role="terminal")}
    honest = {**st(now, ["h"]), "refused": {"count": 3, "by_terminal": {"h": 3}}}
    liar = {**st(now, ["n1"]), "refused": {"count": 0, "by_terminal": {}}}  # H says nothing of itself
    view = view_of({"n1": honest, "h": liar}, known, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)
    nodes = {n["node_id"]: n for n in view["nodes"]}
    assert nodes["h"]["refused"] == 3 and nodes["n1"]["refused"] == 0
    assert any("H: 3 of its sales refused" in w for w in nodes["h"]["warnings"])
    junk = {**st(now, ["h"]), "refused": {"by_terminal": ["h"]}}  # malformed: ignored, no crash
    assert view_of({"n1": junk}, known, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)


def test_a_star_is_shown_as_such_and_a_mesh_or_a_line_is_not() -> None:
    now = 10_000_000_000
    ids = ("gw", "t1", "t2", "t3", "t4")
    known = {n: Known(name=n.upper(), role="gateway" if n == "gw" else "terminal") for n in ids}
    star = {"gw": st(now, ["t1", "t2", "t3", "t4"]), **{t: st(now, ["gw"]) for t in ids[1:]}}
    view = view_of(star, known, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)
    assert view["topology"] == {"shape": "star", "hub": "GW"} and not view["partition"]
    assert any(w.startswith("star: every link goes through GW") for w in view["warnings"]), view["warnings"]
    assert any(w.startswith("star:") for w in {n["name"]: n for n in view["nodes"]}["GW"]["warnings"])
    assert "hub of a star" in to_dot(typed_view_of(star, known, now_ms=now, offline_window_ms=WINDOW,
                                                   warn_before_ms=WARN))
    # one terminal-to-terminal link: no longer a star
    meshed = {**star, "t1": st(now, ["gw", "t2"]), "t2": st(now, ["gw", "t1"])}
    view = view_of(meshed, known, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)
    assert view["topology"] == {"shape": "mesh", "hub": None} and view["warnings"] == []
    # a hub with two leaves is a line; a star whose leaves went silent is a partition, not a star
    line = {"gw": st(now, ["t1", "t2"]), "t1": st(now, ["gw"]), "t2": st(now, ["gw"])}
    assert view_of(line, known, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)["topology"]["shape"] == "mesh"
    cut = {**star, "t3": st(now - 60_000, ["gw"]), "t4": st(now - 60_000, ["gw"])}
    view = view_of(cut, known, now_ms=now, offline_window_ms=WINDOW, warn_before_ms=WARN)
    assert view["topology"]["shape"] == "mesh" and view["partition"]
