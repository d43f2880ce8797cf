"""The per-sale path does no work twice (issue 15, part 6: CPU per received sale).

Each test counts the work a received sale costs (signature checks, Automerge calls, frames,
timer runs) and fails if the redundant step comes back; the CPU figures themselves are in
BENCHMARKS.md (``tools/bench_mesh.py``), not asserted here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import automerge.core as am
import nacl.signing
import pytest
import trio
import trio.testing

from meshpos.identity import keys
from meshpos.ledger.ledger import Ledger
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock
from meshpos.replication.link_driver import run_link
from meshpos.replication.memnet import MemLink, MemNetwork
from meshpos.replication.pushtree import ANNOUNCE_DELAY, GRAFT_TIMEOUT
from meshpos.replication.sync import SyncSession
from meshpos.domain.errors import VerificationError
from meshpos.wire import amcanon
from meshpos.wire import link as lp
from meshpos.wire.link_frames import FrameDecoder, FrameType


# -- switch results: one Ed25519 check each -------------------------------------------------

def _key_whose_pin_lists_it_second() -> nacl.signing.SigningKey:
    """A switch key whose X25519 pin maps to two Ed25519 candidates, its own the second."""
    while True:
        key = keys.generate()
        pin = keys.x25519_public_of(key)
        if keys.montgomery_to_edwards_candidates(pin)[1] == bytes(key.verify_key):
            return key


def test_a_switch_result_costs_one_signature_check_once_its_candidate_is_known(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = _key_whose_pin_lists_it_second()
    pin = keys.x25519_public_of(key)
    checks: list[bytes] = []
    real_verify = keys.verify

    def counting(public_key: bytes, message: bytes, signature: bytes) -> None:
        checks.append(public_key)
        real_verify(public_key, message, signature)

    monkeypatch.setattr(keys, "verify", counting)
    results = [b"result %d" % i for i in range(5)]
    for message in results:
        keys.verify_by_x25519(pin, message, keys.sign(key, message))
    assert len(checks) == 2 + 4  # the wrong candidate is tried once, for the first result only
    # still exactly as strict: another key's signature, or a bad one, is refused
    other = keys.generate()
    with pytest.raises(VerificationError):
        keys.verify_by_x25519(pin, b"result", keys.sign(other, b"result"))
    with pytest.raises(VerificationError):
        keys.verify_by_x25519(pin, b"result 0", keys.sign(key, b"result 1"))
    keys.verify_by_x25519(pin, b"result 9", keys.sign(key, b"result 9"))


# -- a pushed change: one get_changes, no second encoding -------------------------------------

class _CountingDoc:
    """An Automerge document that counts its ``get_changes`` calls (everything else passes)."""

    def __init__(self, doc: am.Document) -> None:
        self.doc = doc
        self.get_changes_calls = 0

    def get_changes(self, heads: list[bytes]) -> Any:
        self.get_changes_calls += 1
        return self.doc.get_changes(heads)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.doc, name)


def _seller_and_receivers(tmp_path: Path, n: int) -> tuple[SimNode, list[SimNode]]:
    clock = wall_clock()
    site = make_site(tmp_path / "site")
    seller = SimNode.open(enroll(site, tmp_path / "seller", "seller"), clock)
    receivers = [SimNode.open(enroll(site, tmp_path / f"r{i}", f"r{i}"), clock) for i in range(n)]
    for node in receivers:  # the seller's certificate first, as a link's set-up brings it
        for shard in seller.core.ledger.shards():
            node.core.ledger.receive_snapshot(shard, seller.core.ledger.snapshot(shard), "seller")
    return seller, receivers


def _pushes_of(ledger: Ledger) -> list[tuple[str, list[bytes]]]:
    out: list[tuple[str, list[bytes]]] = []
    ledger.on_changes.append(lambda shard, changes: out.append((shard, list(changes))) if changes else None)
    return out


def test_a_pushed_sale_costs_one_get_changes_and_goes_on_as_the_bytes_that_came(tmp_path: Path) -> None:
    seller, (relay, last) = _seller_and_receivers(tmp_path, 2)
    sold = _pushes_of(seller.core.ledger)
    forwarded = _pushes_of(relay.core.ledger)
    for i in range(3):
        seller.core.sell(100 + i)
    shard = sold[-1][0]
    counting = _CountingDoc(relay.core.ledger.docs[shard])
    relay.core.ledger.docs[shard] = counting  # type: ignore[assignment]
    # the first merge into a shard builds what later merges are checked against (its history,
    # meshpos.wire.amhistory) from the whole document: once per shard, not per sale
    relay.core.ledger.receive_push(*sold[0], "seller")
    counting.get_changes_calls = 0
    for pushed_shard, changes in sold[1:]:
        relay.core.ledger.receive_push(pushed_shard, changes, "seller")
    assert counting.get_changes_calls == 2  # one per merge: its keys, its chunk and its push onward
    assert len(forwarded) == 3
    for (_, came), (_, went) in zip(sold, forwarded):
        assert len(came) == len(went) == 1 and went[0] is came[0]  # not encoded again
    relay.core.ledger.docs[shard] = counting.doc
    # what the relay stored and pushed on is the same sales: a third node takes them, and the
    # relay's own store reloads them
    for pushed_shard, changes in forwarded:
        last.core.ledger.receive_push(pushed_shard, changes, "relay")
    assert last.sale_ids() == relay.sale_ids() == seller.sale_ids()
    reopened = relay.reopen(wall_clock())
    assert reopened.sale_ids() == seller.sale_ids()
    assert reopened.core.ledger.heads(shard) == seller.core.ledger.heads(shard)


def test_a_pushed_sale_is_decoded_and_checked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The canonical check (before Automerge), the history check and the merge's keys (after it)
    read the same change: its operations are decoded once, and a refusal is not remembered."""
    seller, (relay,) = _seller_and_receivers(tmp_path, 1)
    sold = _pushes_of(seller.core.ledger)
    for i in range(4):
        seller.core.sell(100 + i)
    relay.core.ledger.receive_push(*sold[0], "seller")  # the shard's first merge reads its history
    decoded: list[bytes] = []
    real = amcanon._decode_body

    def counting(body: bytes) -> tuple[amcanon.Op, ...]:
        decoded.append(body)
        return real(body)

    monkeypatch.setattr(amcanon, "_decode_body", counting)
    chunks: list[int] = []  # a change chunk's checksum is computed once as pushed, once as applied
    real_chunk = amcanon._check_change_chunk

    def counting_chunks(chunk_type: int, checksum: bytes, body: bytes) -> tuple[amcanon.Op, ...]:
        chunks.append(chunk_type)
        return real_chunk(chunk_type, checksum, body)

    monkeypatch.setattr(amcanon, "_check_change_chunk", counting_chunks)
    for shard, changes in sold[1:]:
        relay.core.ledger.receive_push(shard, changes, "seller")
    assert len(decoded) == 3 == len(set(decoded))
    assert sorted(chunks) == [amcanon.CHANGE_CHUNK] * 3 + [amcanon.COMPRESSED_CHUNK] * 3
    assert relay.sale_ids() == seller.sale_ids()
    # a change refused is refused again, each time it comes: nothing of it was remembered
    body = decoded[0] + b"\x00"  # extra bytes after the columns
    for _ in range(2):
        with pytest.raises(amcanon.NonCanonical):
            amcanon._check_body(body)
    assert len(decoded) == 5


def test_a_push_that_unblocks_a_waiting_change_pushes_on_both(tmp_path: Path) -> None:
    """Two new changes from one pushed change: each is encoded from Automerge's own, none lost."""
    seller, (relay, last) = _seller_and_receivers(tmp_path, 2)
    sold = _pushes_of(seller.core.ledger)
    forwarded = _pushes_of(relay.core.ledger)
    seller.core.sell(100)
    seller.core.sell(101)
    (shard, first), (_, second) = sold
    relay.core.ledger.receive_push(shard, second, "seller")  # waits inside Automerge for its dependency
    assert forwarded == []
    relay.core.ledger.receive_push(shard, first, "seller")
    assert len(forwarded) == 1 and sorted(forwarded[0][1]) == sorted(first + second)
    last.core.ledger.receive_push(*forwarded[0], "relay")
    assert last.sale_ids() == seller.sale_ids()


# -- announcements: not back to a peer that announced the hash -------------------------------

def _ihave_hashes(link: MemLink, of: SyncSession, into: list[bytes]) -> None:
    """Record every change hash ``of`` announces on ``link``."""
    send = of.data_to_send

    def record(budget: int | None = None) -> bytes:
        data = send(budget)
        dec = FrameDecoder()
        dec.receive_data(data)
        while (frame := dec.next_frame()) is not None:
            if frame.type is FrameType.IHAVE:
                event = lp.decode_frame(frame)
                assert isinstance(event, lp.Ihave)
                for _, hashes in event.entries:
                    into.extend(hashes)
        return data

    of.data_to_send = record  # type: ignore[method-assign]


def _run(net: MemNetwork, clock: Any, seconds: float, step: float = 0.05) -> None:
    net.pump()
    for _ in range(int(seconds / step)):
        clock.advance(step)
        for link in list(net.links):
            for s in (link.a, link.b):
                if not s.closed and s.next_deadline() <= clock.monotonic():
                    s.tick()
        net.pump()


def test_a_hash_the_peer_announced_is_not_announced_back_to_it(tmp_path: Path) -> None:
    clock = wall_clock()
    site = make_site(tmp_path / "site")
    a, b = (SimNode.open(enroll(site, tmp_path / name, name), clock) for name in ("a", "b"))
    net = MemNetwork()
    link = net.connect(a.replicator, b.replicator)
    _run(net, clock, 1.0)
    a.core.sell(100)
    _run(net, clock, 1.0)
    shard = [s for s in a.core.ledger.shards() if s.startswith(a.core.node_id + "/")][-1]
    at_a = link.a if link.a.replicator is a.replicator else link.b
    at_b = link.b if at_a is link.a else link.a
    announced_by_a: list[bytes] = []
    _ihave_hashes(link, at_a, announced_by_a)
    queued, later, control = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    at_b.announce(shard, [queued, later])  # b's announcement is due first
    _run(net, clock, ANNOUNCE_DELAY / 2)
    at_a.announce(shard, [queued, control])  # queued at a, due after b's has come
    _run(net, clock, ANNOUNCE_DELAY + 0.1)
    at_a.announce(shard, [later])  # a gets it after b announced it
    _run(net, clock, ANNOUNCE_DELAY + GRAFT_TIMEOUT + 0.5)
    assert control in announced_by_a  # announcements go as before
    assert queued not in announced_by_a and later not in announced_by_a


# -- the link driver: timers when due, not at every wake-up ----------------------------------

class _TrioClock:
    def now_ms(self) -> int:
        return int(trio.current_time() * 1000)

    def monotonic(self) -> float:
        return trio.current_time()


class _Session:
    """What ``run_link`` drives: frames to write on demand, one timer, counted ticks."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.ticks = 0
        self.queued = bytearray()
        self.closed = False
        self.close_reason: str | None = None
        self.label = "fake"
        self.peer_node: str | None = "peer"
        self.wakeup: Callable[[], None] | None = None

    def receive_data(self, data: bytes) -> None:
        if not data:
            self.close("peer closed")

    @property
    def wants_write(self) -> bool:
        return bool(self.queued)

    def data_to_send(self) -> bytes:
        out, self.queued = bytes(self.queued), bytearray()
        return out

    def next_deadline(self) -> float:
        return self.deadline if not self.closed else math.inf

    def tick(self) -> None:
        self.ticks += 1
        self.deadline = math.inf

    def close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        if self.wakeup is not None:
            self.wakeup()

    def write(self, data: bytes) -> None:
        self.queued += data
        assert self.wakeup is not None
        self.wakeup()


def test_the_link_driver_runs_the_timers_when_due_not_at_every_wake_up() -> None:
    async def main() -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        session = _Session(deadline=trio.current_time() + 10.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_link, ours, session, _TrioClock())  # type: ignore[arg-type]
            await trio.sleep(0.01)
            received = bytearray()
            for i in range(5):
                session.write(b"frame %d;" % i)
                while not received.endswith(b"frame %d;" % i):
                    received += await theirs.receive_some()
            assert session.ticks == 0  # five wake-ups to write, no timer due
            await trio.sleep(10.0)
            assert session.ticks == 1  # the timer, at its time
            session.close("test over")
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
