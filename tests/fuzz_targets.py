"""Fuzz targets for every decoder that reads bytes from outside, shared by tests/test_fuzz.py
(Hypothesis, short) and tools/fuzz.py (seeded mutation loop, long).

A target takes bytes and must either succeed or raise a ``MeshposError`` subclass; anything
else (KeyError, IndexError, a panic from a native library...) is a finding. Each target also
has a corpus of valid inputs, so mutations start from structure, not only from noise.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import automerge.core as am

from meshpos.domain import rules
from meshpos.wire import canonical, envelope
from meshpos.wire.cards import check_expiry, check_pan
from meshpos.domain.currency import parse_amount
from meshpos.wire.acquirer import AcquirerRequest
from meshpos.wire.iso8583 import (NEED_DATA, ClientConnection, FrameDecoder as IsoFrameDecoder, LengthHeader,
                                  RequestKind, ServerConnection, build_answer, decode_message, encode_message,
                                  frame as iso_frame, parse_answer, parse_request)
from meshpos.domain.errors import MeshposError
from meshpos.wire.link_frames import FrameDecoder, FrameType, encode_frame
from meshpos.wire.link import Hello, LinkConnection, Summary, encode_event
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock
from meshpos.wire.forwarding import ForwardReply, Pending, Refusal, decode_reply, decode_request, encode_reply, encode_request

Target = Callable[[bytes], None]


@dataclass
class World:
    """A site with two enrolled nodes (in a temp dir), opened once per process."""

    root: Path
    a: SimNode
    b: SimNode
    site: Any

    def close(self) -> None:
        self.a.close()
        self.b.close()
        shutil.rmtree(self.root, ignore_errors=True)


_WORLD: World | None = None


def world() -> World:
    global _WORLD
    if _WORLD is None:
        root = Path(tempfile.mkdtemp(prefix="meshpos-fuzz-"))
        atexit.register(shutil.rmtree, root, True)  # kept for the whole run, removed at its end
        site = make_site(root / "site")
        enroll(site, root / "a", "A")
        enroll(site, root / "b", "B")
        clock = wall_clock()
        a, b = SimNode.open(root / "a", clock), SimNode.open(root / "b", clock)
        for amount in (100, 250, 999):
            a.core.sell(amount)
        b.core.ingest(a.core.ledger.raw(f"cert/{a.core.node_id}") or b"", "fuzz set-up")
        _WORLD = World(root, a, b, site)
    return _WORLD


# -- corpora -------------------------------------------------------------------------------


def envelope_corpus() -> list[bytes]:
    w = world()
    return [raw for (raw,) in w.a.core.store.conn.execute("SELECT raw FROM entries ORDER BY rowid")]


def snapshot_corpus() -> list[bytes]:
    w = world()
    return [w.a.core.ledger.snapshot(s) for s in w.a.core.ledger.shards()]


def sync_corpus() -> list[bytes]:
    w = world()
    out = []
    for shard in w.a.core.ledger.shards():
        state = am.SyncState()
        msg = w.a.core.ledger.generate_sync(shard, state)
        if msg:
            out.append(msg)
    return out


def link_corpus() -> list[bytes]:
    w = world()
    hello = Hello((1,), w.a.core.identity.site_id, w.a.core.node_id, "terminal", w.a.core.ledger.summary())
    shard = w.a.core.ledger.shards()[0]
    frames = [encode_event(hello), encode_event(Summary(w.a.core.ledger.summary())),
              encode_frame(FrameType.PING, (7).to_bytes(8, "big")), encode_frame(FrameType.GOODBYE, b"bye")]
    name = shard.encode()
    for data in snapshot_corpus()[:1] + sync_corpus()[:1]:
        frames.append(encode_frame(FrameType.SNAPSHOT, bytes([len(name)]) + name + data))
        frames.append(encode_frame(FrameType.SYNC, bytes([len(name)]) + name + data))
    return [frames[0] + f for f in frames[1:]] + [b"".join(frames)]


def iso_request() -> AcquirerRequest:
    return AcquirerRequest(sale_id="sale-1", pan="4111111111111111", expiry="1228", amount_minor=1250,
                           currency="EUR", created_at_ms=1767268245000, entry_mode="chip", terminal_id="TERM0001",
                           merchant_id="MERCHANT0000001", stan=1, rrn="600101000001")


def iso_corpus() -> list[bytes]:
    client = ClientConnection()
    out = []
    for kind in (RequestKind.ADVICE, RequestKind.ADVICE_REPEAT, RequestKind.REVERSAL):
        _, data = ClientConnection().send_request(iso_request(), kind, now_ms=1767268245000)
        server = ServerConnection()
        server.receive_data(data)
        req = server.next_event()
        assert req is not NEED_DATA
        out.append(server.send_answer(req, "00", "ABC123"))
        out.append(data)
    del client
    return out


def forwarding_corpus() -> list[bytes]:
    raws = envelope_corpus()
    reply = ForwardReply(results=tuple(raws[:2]), pending=(Pending("x-00000001", "later"),),
                         refused=(Refusal(1, "sale", "y-00000002", "bad"),), reversed=("z-00000003",))
    return [encode_request(raws), encode_reply(reply)]


# -- targets -------------------------------------------------------------------------------


def t_link_frames(data: bytes) -> None:
    dec = FrameDecoder(max_payload=1 << 16)
    for cut in (len(data) // 3, len(data)):
        dec.receive_data(data[:cut] if cut < len(data) else data[len(data) // 3:])
        while dec.next_frame() is not None:
            pass


def t_link_protocol(data: bytes) -> None:
    """The connection state machine never raises for anything a peer sends."""
    w = world()
    hello = Hello((1,), w.b.core.identity.site_id, w.b.core.node_id, "terminal", {})
    conn = LinkConnection(hello, 0.0, expect_node=None, max_payload=1 << 16)
    conn.start()
    conn.receive_data(data, 1.0)
    conn.events()
    conn.tick(1000.0)
    if conn.state.name != "CLOSED":
        conn.send(Summary({}))


def t_sync_session(data: bytes) -> None:
    """A whole replication session over a real ledger: ``receive_data`` must never raise."""
    w = world()
    session = w.b.replicator.open_session(label="fuzz")
    try:
        session.receive_data(data)
        session.data_to_send()
        session.tick()
    finally:
        session.receive_data(b"")
        session.data_to_send()


def t_envelope(data: bytes) -> None:
    w = world()
    env = envelope.decode(data)
    w.b.core.roster.verify(env, w.b.core.clock.now_ms())


def t_sale_rules(data: bytes) -> None:
    """The content rules on whatever passes the envelope schema: a verdict, never a crash."""
    w = world()
    env = envelope.decode(data)
    envelope.check_schema(env)
    if env.type == "sale":
        roster = w.b.core.roster
        problem = rules.sale_problem(env.body, roster.policy_at(env.body["created_at"]))
        assert problem is None or isinstance(problem, str)
        rules.check_sale(env.body, roster.policy, w.b.core.clock.now_ms())


def t_typed_input(data: bytes) -> None:
    """What a cashier types: card number, expiry, amount, description. InputError or a value."""
    text = data.decode("utf-8", errors="replace")
    for check in (check_pan, lambda t: check_expiry(t[:8], 1767225600000), lambda t: parse_amount(t, "EUR"),
                  lambda t: parse_amount(t, "JPY")):
        try:
            check(text)
        except MeshposError:
            pass
    problem = rules.description_problem(text)
    assert problem is None or isinstance(problem, str)


def typed_input_corpus() -> list[bytes]:
    return [t.encode() for t in ("4111111111111111", "4111 1111 1111 1111", "1230", "12.50", "٤١١١", "１２.５０",
                                 "paid 4111-1111-1111-1111", "1e2", "+5", "0000000000000000")]


def t_canonical(data: bytes) -> None:
    canonical.decode(data)


def _shard_of(data: bytes) -> str:
    w = world()
    shards = w.a.core.ledger.shards()
    return shards[data[0] % len(shards)] if data else shards[0]


def t_ledger_snapshot(data: bytes) -> None:
    w = world()
    w.b.core.ledger.receive_snapshot(_shard_of(data[-1:]), data, "fuzz")


def t_ledger_sync(data: bytes) -> None:
    w = world()
    w.b.core.ledger.receive_sync(_shard_of(data[-1:]), am.SyncState(), data, "fuzz")


def t_forward_request(data: bytes) -> None:
    for raw in decode_request(data):
        try:
            envelope.decode(raw)
        except MeshposError:
            pass


def t_forward_reply(data: bytes) -> None:
    decode_reply(data)


def t_iso_answer(data: bytes) -> None:
    for header in LengthHeader:
        client = ClientConnection(header=header)
        client.send_request(iso_request(), RequestKind.ADVICE, now_ms=1767268245000)
        client.receive_data(data)
        for _ in range(64):
            if client.next_event() is NEED_DATA:
                break


def t_iso_message(data: bytes) -> None:
    doc = decode_message(data)
    try:
        parse_answer(doc)
    except MeshposError:
        pass
    parse_request(doc)


def t_iso_request(data: bytes) -> None:
    server = ServerConnection()
    server.receive_data(data)
    for _ in range(64):
        req = server.next_event()
        if req is NEED_DATA:
            break
        build_answer(req, "00", "ABC123")


def t_iso_frames(data: bytes) -> None:
    for header in LengthHeader:
        dec = IsoFrameDecoder(header, max_frame=4096)
        dec.receive_data(data)
        for _ in range(64):
            if dec.next_frame() is NEED_DATA:
                break


TARGETS: dict[str, tuple[Target, Callable[[], list[bytes]]]] = {
    "link_frames": (t_link_frames, link_corpus),
    "link_protocol": (t_link_protocol, link_corpus),
    "sync_session": (t_sync_session, link_corpus),
    "envelope": (t_envelope, envelope_corpus),
    "canonical": (t_canonical, envelope_corpus),
    "sale_rules": (t_sale_rules, envelope_corpus),
    "typed_input": (t_typed_input, typed_input_corpus),
    "ledger_snapshot": (t_ledger_snapshot, snapshot_corpus),
    "ledger_sync": (t_ledger_sync, sync_corpus),
    "forward_request": (t_forward_request, lambda: forwarding_corpus()[:1]),
    "forward_reply": (t_forward_reply, lambda: forwarding_corpus()[1:]),
    "iso_answer": (t_iso_answer, iso_corpus),
    "iso_message": (t_iso_message, lambda: [d[2:] for d in iso_corpus()]),
    "iso_request": (t_iso_request, iso_corpus),
    "iso_frames": (t_iso_frames, iso_corpus),
}


def run_target(target: Target, data: bytes) -> None:
    """Run one input; an error that is not a MeshposError propagates (a finding)."""
    try:
        target(data)
    except MeshposError:
        pass


# -- structured mutations ------------------------------------------------------------------


INTERESTING = [0, 1, -1, 2**53, 2**53 + 1, -(2**63), "", "x" * 300, None, True, [], {}, "sale", 1.5, "\u0000",
               "é", "0" * 16]


def mutate_json(value: Any, rnd: random.Random, depth: int = 0) -> Any:
    """One random structural change somewhere inside a JSON value."""
    if isinstance(value, dict) and value and depth < 6 and rnd.random() < 0.7:
        key = rnd.choice(sorted(value))
        out = dict(value)
        choice = rnd.random()
        if choice < 0.15:
            del out[key]
        elif choice < 0.25:
            out[key + rnd.choice(["", "_", "x"])] = rnd.choice(INTERESTING)
        else:
            out[key] = mutate_json(value[key], rnd, depth + 1)
        return out
    if isinstance(value, list) and value and depth < 6 and rnd.random() < 0.7:
        out_l = list(value)
        i = rnd.randrange(len(out_l))
        choice = rnd.random()
        if choice < 0.2:
            del out_l[i]
        elif choice < 0.35:
            out_l.insert(i, out_l[i])
        else:
            out_l[i] = mutate_json(out_l[i], rnd, depth + 1)
        return out_l
    if isinstance(value, str) and value and rnd.random() < 0.6:
        chars = list(value)
        chars[rnd.randrange(len(chars))] = rnd.choice("0aZ-_/=é\u0000\"\\")
        return "".join(chars)
    if isinstance(value, int) and not isinstance(value, bool) and rnd.random() < 0.6:
        return value + rnd.choice([-1, 1, 1000, -(10**12), 2**53])
    return rnd.choice(INTERESTING)


def mutate_envelope(raw: bytes, rnd: random.Random) -> bytes:
    """A structural change of a valid envelope: a field of the body, the signer, the type, the
    signature, re-encoded canonically (so it reaches the checks behind the decoder) or not."""
    obj = json.loads(raw)
    mutated = mutate_json(obj, rnd)
    if rnd.random() < 0.8:
        try:
            return canonical.encode(mutated)
        except MeshposError:
            pass
    return json.dumps(mutated, ensure_ascii=rnd.random() < 0.5).encode()


def mutate_bytes(data: bytes, rnd: random.Random, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(7)
        if op == 0 and buf:
            i = rnd.randrange(len(buf))
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and buf:
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        elif op == 2 and buf:
            del buf[rnd.randrange(len(buf)):]
        elif op == 3:
            i = rnd.randrange(len(buf) + 1)
            buf[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif op == 4 and buf:
            i = rnd.randrange(len(buf))
            j = min(len(buf), i + rnd.randint(1, 64))
            buf[i:j] = b""
        elif op == 5 and corpus:
            other = rnd.choice(corpus)
            i = rnd.randrange(len(buf) + 1)
            j = rnd.randrange(len(other) + 1)
            buf = buf[:i] + bytearray(other[j:])
        elif op == 6 and buf:
            i = rnd.randrange(len(buf))
            buf[i:i] = buf[i:i + rnd.randint(1, 32)]
    return bytes(buf)
