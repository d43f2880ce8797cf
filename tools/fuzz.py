#!/usr/bin/env python3
"""Long fuzzing run of every outside-facing decoder (the short run is tests/test_fuzz.py).

    python tools/fuzz.py [--seed N] [--per-target N | --seconds S] [--target NAME ...]

A seeded mutation loop over the targets of tests/fuzz_targets.py: each input is random bytes or
a mutation of a valid input (bit flips, truncations, insertions, splices), and for envelopes a
structural mutation re-encoded canonically, which must never verify. Only MeshposError
subclasses may come out. Prints the count of inputs tried per target and every finding (a
traceback and the input as hex, also saved under --out); exit 1 if anything was found.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_targets import TARGETS, mutate_bytes, mutate_envelope, run_target, world  # noqa: E402
from meshpos.wire import envelope  # noqa: E402
from meshpos.domain.errors import EncodingError, VerificationError  # noqa: E402


def envelope_property(raw: bytes, original: bytes) -> None:
    w = world()
    try:
        w.b.core.roster.verify(envelope.decode(raw), w.b.core.clock.now_ms())
    except (EncodingError, VerificationError):
        return
    if raw != original:
        raise AssertionError("a mutated envelope verified")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-target", type=int, default=20000, help="inputs per target (default 20000)")
    ap.add_argument("--seconds", type=float, help="time budget per target instead of a count")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS) + ["envelope_structure"])
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    args = ap.parse_args()
    names = args.target or sorted(TARGETS) + ["envelope_structure"]
    findings = 0
    total = 0
    try:
        for name in names:
            rnd = random.Random(f"{args.seed}/{name}")
            if name == "envelope_structure":
                target = None
                seeds = TARGETS["envelope"][1]()
            else:
                target, make = TARGETS[name]
                seeds = make()
            tried = 0
            errors: dict[str, int] = {}
            start = time.monotonic()
            while True:
                if args.seconds is not None:
                    if time.monotonic() - start >= args.seconds:
                        break
                elif tried >= args.per_target:
                    break
                tried += 1
                original = rnd.choice(seeds)
                if target is None:
                    data = mutate_envelope(original, rnd)
                elif rnd.random() < 0.15:
                    data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(256)))
                else:
                    data = mutate_bytes(original, rnd, seeds)
                try:
                    if target is None:
                        envelope_property(data, original)
                    else:
                        run_target(target, data)
                except BaseException as exc:  # a finding
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    kind = f"{type(exc).__name__}: {str(exc)[:120]}"
                    errors[kind] = errors.get(kind, 0) + 1
                    if errors[kind] == 1:
                        findings += 1
                        args.out.mkdir(exist_ok=True)
                        path = args.out / f"{name}-{findings}.json"
                        path.write_text(json.dumps({"target": name, "error": kind, "input_hex": data.hex(),
                                                    "traceback": traceback.format_exc()}, indent=1))
                        print(f"  FINDING in {name}: {kind} (input saved to {path})", flush=True)
            total += tried
            rate = tried / max(1e-9, time.monotonic() - start)
            print(f"{name:20s} {tried:8d} inputs  {rate:8.0f}/s  findings: {len(errors)}", flush=True)
    finally:
        world().close()
    print(f"total {total} inputs over {len(names)} targets, seed {args.seed}: {findings} finding(s)")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
