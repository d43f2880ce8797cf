"""Mutate honest Automerge changes at random and sort what happens: refused by the canonical check
(meshpos.wire.amcanon) or not, applied by Automerge or not, and whether the document then still
saves and loads. The cases "passes the check, applied, save does not load" are what the check
does not catch; those that pass it then go through the history check (meshpos.wire.amhistory),
as the ledger does after Automerge applied them. The cases that pass both and break the save are
grouped by which decoded field the mutation changed (protocols/link.md, "Canonical changes").

    python tools/fuzz_amcanon.py --seed 1 --mutations 20000
"""

from __future__ import annotations

import argparse
import hashlib
import random
from collections import Counter

import automerge.core as am

from meshpos.ledger.ledger import changes_message
from meshpos.wire import amcanon, amhistory
from meshpos.wire.amcanon import _delta_decode, _rle_decode
from meshpos.wire.amchange import read_header
from meshpos.wire.leb128 import Reader as _Reader
from meshpos.wire.leb128 import uleb128 as _uleb


def body_of(raw: bytes) -> bytes:
    r = _Reader(raw)
    r.take(9)
    n = r.uleb()
    return raw[r.pos:r.pos + n]


def chunk_of(body: bytes) -> bytes:
    chunk = bytes([amcanon.CHANGE_CHUNK]) + _uleb(len(body)) + body
    return amcanon.MAGIC + hashlib.sha256(chunk).digest()[:4] + chunk


def fields(body: bytes) -> dict[str, object]:
    """The decoded fields of a change body (for sorting mutations; not a validator)."""
    r = _Reader(body)
    deps, actor, seq, start_op, time, message, others, specs = read_header(r)
    cols = {spec: r.take(size) for spec, size in specs}
    table = [actor, *others]
    actors = _rle_decode(cols.get(amcanon.PRED_ACTOR, b""), "uint")
    ctrs = _delta_decode(cols.get(amcanon.PRED_CTR, b""))
    preds = [(c, table[a] if isinstance(a, int) and a < len(table) else None) for a, c in zip(actors, ctrs)]
    return {"deps": deps, "actor": actor, "seq": seq, "startOp": start_op, "time": time, "message": message,
            "preds": preds, "keys": _rle_decode(cols.get(amcanon.KEY_STR, b""), "str"),
            "actions": _rle_decode(cols.get(amcanon.ACTION, b""), "uint"),
            "values": (_rle_decode(cols.get(amcanon.VAL_META, b""), "uint"), cols.get(amcanon.VAL_RAW, b""))}


def honest_cases(rng: random.Random, n: int) -> list[tuple[am.Document, bytes]]:
    """Documents written by two actors (a conflict on sale/0), and a change of puts and deletes
    made on one of them: the change to mutate and the document it is applied to."""
    cases = []
    for _ in range(n):
        a = am.Document(rng.randbytes(16))
        with a.transaction() as tx:
            for k in range(rng.randint(1, 4)):
                tx.put(am.ROOT, f"sale/{k}", am.ScalarType.Bytes, rng.randbytes(rng.choice([0, 3, 300])))
        b = a.fork()
        b.set_actor(rng.randbytes(16))
        with b.transaction() as tx:
            tx.put(am.ROOT, "sale/0", am.ScalarType.Bytes, b"b")
        with a.transaction() as tx:
            tx.put(am.ROOT, "sale/0", am.ScalarType.Bytes, b"a")
        a.merge(b)
        target, before = a.fork(), a.get_heads()
        with a.transaction() as tx:
            for k in rng.sample(range(5), rng.randint(1, 3)):
                if rng.random() < 0.4 and a.get(am.ROOT, f"sale/{k}") is not None:
                    tx.delete(am.ROOT, f"sale/{k}")
                else:
                    tx.put(am.ROOT, f"sale/{k}", am.ScalarType.Bytes, rng.randbytes(rng.choice([0, 2, 50])))
        for change in a.get_changes(before):  # none if every put wrote the value already there
            cases.append((target, change.raw_bytes))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--mutations", type=int, default=20000, help="mutated changes to try")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cases = honest_cases(rng, 30)
    outcome: Counter[str] = Counter()
    missed: Counter[tuple[str, ...]] = Counter()
    strict: Counter[tuple[str, ...]] = Counter()
    for _ in range(args.mutations):
        target, raw = rng.choice(cases)
        body = bytearray(body_of(raw))
        i, kind = rng.randrange(len(body)), rng.random()
        if kind < 0.5:
            body[i] = rng.randrange(256)
        elif kind < 0.75:
            body[i:i] = bytes([rng.randrange(256)])
        else:
            del body[i]
        bad = chunk_of(bytes(body))
        if bad == raw:
            continue
        try:
            amcanon.check_chunks(bad)
            passed = True
        except amcanon.NonCanonical:
            passed = False
        doc = target.fork()
        try:
            doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message([bad])))
            applied = doc.get_heads() != target.get_heads()
        except BaseException:  # an exception or a Rust panic: not applied
            applied = False
        if not applied:
            outcome[f"not applied, check {'passed' if passed else 'refused'}"] += 1
            continue
        fits = True
        if passed:  # the ledger checks the history of what passed the encoding check and applied
            try:
                amhistory.Histories().check_merge("s", doc, target.get_heads(), doc.get_changes(target.get_heads()))
            except amhistory.Unfit:
                fits = False
        try:
            am.Document.load(doc.save())
            loads = True
        except BaseException:
            loads = False
        check = "refused" if not passed else "passed, history check " + ("passed" if fits else "refused")
        outcome[f"applied, check {check}, save {'loads' if loads else 'BROKEN'}"] += 1
        if passed and fits != loads:
            before, after = fields(bytes(body_of(raw))), fields(bytes(body))
            (missed if fits else strict)[tuple(k for k in before if before[k] != after[k])] += 1
    for name, count in sorted(outcome.items()):
        print(f"{count:7d}  {name}")
    print("passed both checks, applied, save broken, by the fields the mutation changed:")
    for changed, count in missed.most_common():
        print(f"{count:7d}  {', '.join(changed) or '(none decoded)'}")
    print("refused by the history check though the save loads (Automerge never writes them), by field:")
    for changed, count in strict.most_common():
        print(f"{count:7d}  {', '.join(changed) or '(none decoded)'}")


if __name__ == "__main__":
    main()
