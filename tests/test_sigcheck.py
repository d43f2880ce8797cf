"""The signature helper process: its answers, and the ledger going on without it."""

from __future__ import annotations

import signal

import automerge.core as am
import nacl.signing
import pytest
from pathlib import Path

from meshpos.wire import envelope
from meshpos.identity import sigcheck


def _jobs(n: int) -> list[tuple[bytes, bytes, bytes]]:
    key = nacl.signing.SigningKey(bytes(range(32)))
    jobs = []
    for i in range(n):
        msg = b"message %d" % i
        jobs.append((bytes(key.verify_key), msg, key.sign(msg).signature))
    return jobs


def test_helper_answers_each_batch_in_order() -> None:
    helper = sigcheck.SigChecker()
    try:
        good = _jobs(5)
        pk, msg, sig = good[2]
        bad = good[:2] + [(pk, msg + b"!", sig), (pk, msg, bytes(64))] + good[4:]
        first, second = helper.submit(good), helper.submit(bad)
        assert [second.valid(i) for i in range(5)] == [True, True, False, False, True]
        assert all(first.valid(i) for i in range(5))
        assert not first.valid(5)
    finally:
        helper.close()


def test_a_helper_that_cannot_start_or_dies_answers_nothing_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    helper = sigcheck.SigChecker()
    monkeypatch.setattr(sigcheck.sys, "executable", "/nonexistent/python")
    assert not helper.submit(_jobs(3)).valid(0)
    monkeypatch.undo()
    helper = sigcheck.SigChecker()
    try:
        helper.submit(_jobs(3)).valid(0)
        assert helper._proc is not None
        helper._proc.kill()
        helper._proc.wait()
        batch = helper.submit(_jobs(3))
        assert not batch.valid(0) and not helper.submit(_jobs(3)).valid(0)
    finally:
        helper.close()


def test_bulk_merge_without_the_helper_still_verifies_every_entry(make_node, open_node, monkeypatch) -> None:
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    sales = [t1.sell(100 + i)["id"] for i in range(40)]
    shard = t1.ledger.shards()[0]
    doc = am.Document.load(t1.ledger.snapshot(shard))
    forged_body = {**envelope.decode(t1.ledger.raw(f"sale/{sales[0]}")).body, "seq": 41,
                   "sale_id": envelope.sale_id(t1.node_id, 41)}
    with doc.transaction() as tx:
        tx.put(am.ROOT, f"sale/{forged_body['sale_id']}", am.ScalarType.Bytes,
               envelope.seal("sale", t1.node_id, forged_body, t2.key))
    broken = sigcheck.SigChecker()
    broken._failed = True
    monkeypatch.setattr(sigcheck.POOL, "helpers", [broken])
    report = t2.ledger.receive_snapshot(shard, doc.save(), "hostile")
    assert [k for k, _ in report.rejected] == [f"sale/{forged_body['sale_id']}"]
    assert sorted(s["id"] for s in t2.sales()) == sorted(sales)


def test_a_helper_that_stops_answering_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    helper = sigcheck.SigChecker()
    try:
        assert helper.submit(_jobs(2)).valid(0)  # started and answering (at its own pace: a busy host)
        assert helper._proc is not None
        monkeypatch.setattr(sigcheck, "ANSWER_TIMEOUT", 0.2)
        helper._proc.send_signal(signal.SIGSTOP)
        assert not helper.submit(_jobs(2)).valid(0)
        assert not helper.submit(_jobs(2)).valid(0)  # not asked again
    finally:
        helper.close()


def test_every_roster_of_a_process_shares_one_pool_of_helpers(make_node, open_node) -> None:
    """Why the pool is process-wide: nodes held in one process (simulations, the benchmarks) must
    not start helpers each; three nodes merging each other's sales use the same helpers."""
    nodes = [open_node(make_node(f"t{i}")) for i in range(3)]
    for node in nodes:
        for i in range(40):  # a merge of 32 or more entries has them checked by the helpers
            node.sell(100 + i)
    for a in nodes:
        for b in nodes:
            if a is not b:
                a.ingest(b.ledger.raw(f"cert/{b.node_id}"), "peer")  # its signer known: checked ahead
                for shard in b.ledger.shards():
                    a.ledger.receive_snapshot(shard, b.ledger.snapshot(shard), "peer")
    assert 1 <= _helper_processes() <= sigcheck.HELPERS


def _helper_processes() -> int:
    """Live signature helper processes started by this process."""
    import os
    children: list[str] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children += (task / "children").read_text().split()
    count = 0
    for pid in children:
        try:
            if b"meshpos.identity.sigcheck" in Path(f"/proc/{pid}/cmdline").read_bytes():
                count += 1
        except OSError:
            pass
    return count
    assert all(len(n.sales()) == 3 * 40 for n in nodes)


def _shard_with_forgery(t1, t2, n: int):  # type: ignore[no-untyped-def]
    """t1's shard of ``n`` sales and a forgery among them; t2 knows t1's certificate already."""
    t2.ingest(t1.ledger.raw(f"cert/{t1.node_id}"), "peer")
    sales = [t1.sell(100 + i)["id"] for i in range(n)]
    shard = t1.ledger.shards()[0]
    doc = am.Document.load(t1.ledger.snapshot(shard))
    forged_body = {**envelope.decode(t1.ledger.raw(f"sale/{sales[0]}")).body, "seq": n + 1,
                   "sale_id": envelope.sale_id(t1.node_id, n + 1)}
    with doc.transaction() as tx:
        tx.put(am.ROOT, f"sale/{forged_body['sale_id']}", am.ScalarType.Bytes,
               envelope.seal("sale", t1.node_id, forged_body, t2.key))
    return sales, shard, doc.save(), f"sale/{forged_body['sale_id']}"


def test_a_big_merge_never_waits_for_a_helper_that_is_behind(make_node, open_node, monkeypatch) -> None:
    """Signatures the helper has not answered yet are checked in this process instead of waited
    for (here the helper is stopped): the forgery is still refused, every good sale taken, and the
    helper, sent its batches, is not given up as hung."""
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    sales, shard, data, forged = _shard_with_forgery(t1, t2, 80)
    helper = sigcheck.SigChecker()
    monkeypatch.setattr(sigcheck.POOL, "helpers", [helper])
    monkeypatch.setattr(sigcheck, "ANSWER_TIMEOUT", 5.0)  # waiting would give it up after this
    try:
        assert helper.submit(_jobs(2)).valid(0)  # started
        assert helper._proc is not None
        helper._proc.send_signal(signal.SIGSTOP)
        report = t2.ledger.receive_snapshot(shard, data, "hostile")
        assert [k for k, _ in report.rejected] == [forged]
        assert sorted(s["id"] for s in t2.sales()) == sorted(sales)
        assert helper.outstanding() >= 64 and not helper._failed
    finally:
        if helper._proc is not None:
            helper._proc.send_signal(signal.SIGCONT)
        helper.close()


def test_a_big_merge_hands_the_helper_its_last_entries_first(make_node, open_node, monkeypatch) -> None:
    """The helper works from the far end of a merge while this process checks from the front."""
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    sales, shard, data, forged = _shard_with_forgery(t1, t2, 100)
    handed: list[list[bytes]] = []
    real = t2.roster.presign
    monkeypatch.setattr(t2.roster, "presign", lambda envs: (handed.append([e.raw for e in envs]), real(envs))[1])
    report = t2.ledger.receive_snapshot(shard, data, "hostile")
    assert [k for k, _ in report.rejected] == [forged]
    keys = [envelope.decode(raw).body["sale_id"] for batch in reversed(handed) for raw in batch]
    assert len(handed) >= 3 and all(len(batch) <= 32 for batch in handed)
    assert len(keys) == 101 and keys == sorted(keys)  # the batches, last handed first, are the merge in order
