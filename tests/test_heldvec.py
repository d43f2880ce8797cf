"""What a node holds of each terminal's sales (issue 14, part 3): the version vector kept
incrementally by the ledger and rebuilt from the store, and its compact encoding in the status
(protocols/link.md, "What a node holds")."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import pytest

from meshpos.domain.errors import EncodingError
from meshpos.infra.clock import FakeClock
from meshpos.ledger.holdings import Holdings
from meshpos.node.core import NodeCore
from meshpos.wire import envelope, heldvec


# -- the encoding ------------------------------------------------------------------------------

def tid(i: int) -> str:
    return f"{i:016x}"


def test_held_round_trips_sorted_and_compact() -> None:
    vector = {tid(3): 1, tid(1): 127, tid(2): 128, "f" * 16: 2**53}
    text = heldvec.encode(vector)
    assert heldvec.decode(text) == vector
    raw = envelope.b64d(text, "held")
    assert raw[:8] == bytes.fromhex(tid(1)) and raw[8] == 127  # sorted by id; 127 takes one byte
    assert raw[9:17] == bytes.fromhex(tid(2)) and raw[17:19] == b"\x80\x01"  # 128: two bytes, LEB128
    assert heldvec.encode({}) == "" and heldvec.decode("") == {}
    # the example of protocols/link.md, "What a node holds"
    example = {"00000000000000a1": 130, "4a1f09c2d3e4b5a6": 7}
    assert heldvec.encode(example) == "AAAAAAAAAKGCAUofCcLT5LWmBw"
    assert heldvec.decode("AAAAAAAAAKGCAUofCcLT5LWmBw") == example
    # ids that are no node id and marks outside 1..2^53 are left out, not sent
    assert heldvec.decode(heldvec.encode({"T1": 5, tid(9): 0, tid(8): 2**53 + 1, tid(7): 4})) == {tid(7): 4}


@pytest.mark.parametrize("raw, why", [
    (bytes.fromhex(tid(1))[:5], "cut short"),
    (bytes.fromhex(tid(1)), "cut short"),
    (bytes.fromhex(tid(1)) + b"\x85", "cut short"),
    (bytes.fromhex(tid(2)) + b"\x01" + bytes.fromhex(tid(1)) + b"\x01", "ascending"),
    (bytes.fromhex(tid(1)) + b"\x01" + bytes.fromhex(tid(1)) + b"\x02", "ascending"),
    (bytes.fromhex(tid(1)) + b"\x81\x00", "not minimal"),
    (bytes.fromhex(tid(1)) + b"\x00", "out of"),
    (bytes.fromhex(tid(1)) + b"\xff" * 8 + b"\x01", "too long"),
])
def test_held_decoder_refuses_what_the_encoder_never_makes(raw: bytes, why: str) -> None:
    with pytest.raises(EncodingError, match=why):
        heldvec.decode(envelope.b64e(raw))


def test_held_decoder_refuses_non_text_and_non_canonical_base64() -> None:
    for bad in (None, 5, ["x"], "AAAA=", "%%%%", "A" * 4000):
        with pytest.raises(EncodingError):
            heldvec.decode(bad)


def test_two_hundred_terminals_fit_in_a_status_with_everything_else(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore]) -> None:
    """The bound: 200 terminals with sequence numbers up to a million, beside 48 links and the rest of
    a status, in one envelope (at most 8192 bytes); a vector beyond MAX_HELD_BYTES keeps a prefix."""
    core = open_node(make_node("T1"))
    rng = random.Random(14)
    vector = {f"{rng.getrandbits(64):016x}": rng.randint(1, 1_000_000) for _ in range(200)}
    held = heldvec.encode(vector)
    assert heldvec.decode(held) == vector
    assert len(envelope.b64d(held, "held")) <= 200 * 11
    links = [{"node": f"{i:016x}", "role": "terminal", "rtt_ms": 1234} for i in range(48)]
    status = {"at": 1_800_000_000_000, "role": "terminal", "name": "x" * 40, "version": "0.0.0",
              "addresses": ["192.168.100.100"] * 8, "port": 65535, "links": links,
              "ledger": {"entries": 10**9, "shards": 10**6},
              "pending": {"count": 10**6, "amount_minor": 10**12, "oldest_created_at": 1_800_000_000_000},
              "site_pending": {"count": 10**6, "amount_minor": 10**12, "oldest_created_at": 1_800_000_000_000},
              "refused": {"count": 10**6, "by_terminal": {f"{i:016x}": 10**5 for i in range(16)}},
              "uplink": {"state": "forwarding", "last_forward_at": 1_800_000_000_000},
              "printer": {"state": "paper_out", "queued": 10**4}, "battery": 100, "every_ms": 10_000,
              "started_at": 1_800_000_000_000, "held": held}
    assert len(envelope.seal("status", core.node_id, {"status": status}, core.key)) <= envelope.MAX_ENVELOPE
    many = {f"{i:016x}": 2**40 for i in range(400)}
    kept = heldvec.decode(heldvec.encode(many))
    assert 0 < len(kept) < 400 and kept == {t: many[t] for t in sorted(many)[:len(kept)]}
    assert len(envelope.b64d(heldvec.encode(many), "held")) <= heldvec.MAX_HELD_BYTES


# -- the bookkeeping ---------------------------------------------------------------------------

def test_holdings_advance_only_over_a_run_without_gaps() -> None:
    h = Holdings()
    for seq in (1, 2, 4, 2):
        h.add("a", seq)
    assert h.vector() == {"a": 2} and h.holds("a", 4) and not h.holds("a", 3)
    h.add("a", 6)
    h.add("a", 3)  # closes the gap: 4 was waiting, 6 still waits for 5
    assert h.mark("a") == 4
    h.add("a", 5)
    assert h.mark("a") == 6
    h.add("b", 2)  # sale 1 missing: nothing held without a gap
    assert h.vector() == {"a": 6} and h.holds("b", 2)
    h.add("b", 1)
    assert h.vector() == {"a": 6, "b": 2}


def test_holdings_agree_with_a_fresh_count_whatever_the_order() -> None:
    rng = random.Random(5)
    for _ in range(50):
        seqs = list(range(1, rng.randint(1, 40)))
        rng.shuffle(seqs)
        held = seqs[:rng.randint(0, len(seqs))]
        h = Holdings()
        for seq in held:
            h.add("t", seq)
        expected = 0
        while expected + 1 in held:
            expected += 1
        assert h.mark("t") == expected


def test_the_vector_is_rebuilt_from_the_store_on_open_with_its_gaps(
        make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore], clock: FakeClock) -> None:
    seller, holder_path = open_node(make_node("S")), make_node("H")
    ids = [seller.sell(100 + i)["id"] for i in range(5)]
    holder = NodeCore.open(holder_path, clock)
    holder.ingest(seller.ledger.raw(f"cert/{seller.node_id}") or b"", "peer")
    for i in (0, 1, 3, 4):  # sale 3 (seq 3) has not arrived
        holder.ingest(seller.ledger.raw(f"sale/{ids[i]}") or b"", "peer")
    assert holder.ledger.holdings.mark(seller.node_id) == 2
    assert seller.ledger.holdings.vector() == {seller.node_id: 5}
    holder.close()
    holder = NodeCore.open(holder_path, clock)  # a restart: the same vector, read from the store
    assert holder.ledger.holdings.mark(seller.node_id) == 2
    assert holder.ledger.holdings.holds(seller.node_id, 4) and holder.ledger.holdings.holds(seller.node_id, 5)
    holder.ingest(seller.ledger.raw(f"sale/{ids[2]}") or b"", "peer")  # the gap closes
    assert holder.ledger.holdings.mark(seller.node_id) == 5
    holder.close()
    holder = NodeCore.open(holder_path, clock)
    try:
        assert holder.ledger.holdings.vector() == {seller.node_id: 5}
    finally:
        holder.close()
