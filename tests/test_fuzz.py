"""Fuzzing of every decoder that reads bytes from outside (Hypothesis, short run).

Targets and structured mutators live in ``fuzz_targets.py`` (shared with ``tools/fuzz.py``, the
long seeded run). For every target: random bytes, and mutations of valid inputs (bit flips,
truncations, insertions, splices with other valid inputs). Only ``MeshposError`` subclasses may
come out. Envelopes are also mutated structurally (a field of the body, the signer, the type,
the signature, re-encoded canonically): no mutation may verify, whatever it is.
"""

from __future__ import annotations

import base64
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import TARGETS, mutate_bytes, mutate_envelope, run_target, world
from meshpos.identity import certs
from meshpos.wire import envelope, pin
from meshpos.domain.errors import CryptoError, EncodingError, MeshposError, VerificationError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_CORPUS: dict[str, list[bytes]] = {}


def corpus(name: str) -> list[bytes]:
    if name not in _CORPUS:
        _CORPUS[name] = TARGETS[name][1]()
    return _CORPUS[name]


@pytest.fixture(scope="module", autouse=True)
def _world():
    yield world()


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(FUZZ)
@given(raw=st.binary(max_size=2048), pick=st.integers(0, 1000), seed=st.integers(0, 2**32 - 1),
       mode=st.sampled_from(["random", "mutate", "mutate", "mutate"]))
def test_decoder_raises_only_typed_errors(name: str, raw: bytes, pick: int, seed: int, mode: str) -> None:
    target, _ = TARGETS[name]
    if mode == "mutate":
        seeds = corpus(name)
        raw = mutate_bytes(seeds[pick % len(seeds)], random.Random(seed), seeds)
    run_target(target, raw)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_valid_inputs_pass(name: str) -> None:
    """The corpora are valid: the targets accept them (so mutations start from real structure)."""
    target, _ = TARGETS[name]
    for data in corpus(name):
        if name in ("link_protocol", "sync_session", "iso_message", "iso_request", "iso_answer",
                    "iso_frames"):  # one input meets every length-header kind
            run_target(target, data)  # these may meet an answer where a request is due, or a GOODBYE
        else:
            target(data)


@settings(FUZZ, max_examples=150)
@given(pick=st.integers(0, 1000), seed=st.integers(0, 2**32 - 1))
def test_no_structural_mutation_of_an_envelope_verifies(pick: int, seed: int) -> None:
    w = world()
    seeds = corpus("envelope")
    original = seeds[pick % len(seeds)]
    mutated = mutate_envelope(original, random.Random(seed))
    try:
        env = envelope.decode(mutated)
        w.b.core.roster.verify(env, w.b.core.clock.now_ms())
    except (EncodingError, VerificationError):
        return
    except MeshposError as exc:  # pragma: no cover - any other typed error is a wrong category
        pytest.fail(f"{type(exc).__name__} for a mutated envelope: {exc}")
    # it verified: then it must be the original envelope, byte for byte (a mutation that re-encodes
    # to the same bytes), never a changed body under the old signature
    assert mutated == original, json.loads(mutated)


def test_fuzzer_catches_an_untyped_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test of the test: a decoder that lets a KeyError out is caught by the harness."""
    from meshpos.wire import forwarding as api

    def broken(body: bytes) -> list[bytes]:
        return json.loads(body)["entriez"]  # KeyError on every real request

    monkeypatch.setattr(api, "decode_request", broken)
    import fuzz_targets
    monkeypatch.setattr(fuzz_targets, "decode_request", broken)
    with pytest.raises(KeyError):
        run_target(TARGETS["forward_request"][0], corpus("forward_request")[0])


def test_envelope_check_catches_a_verifier_that_ignores_the_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test of the test: with signature checks off, a mutated body verifies and the property fails."""
    monkeypatch.setattr(envelope, "check_signature", lambda env, key: None)
    w = world()
    raw = next(r for r in corpus("envelope") if b'"type":"sale"' in r)
    obj = json.loads(raw)
    obj["body"]["amount_minor"] += 1
    from meshpos.wire import canonical
    forged = canonical.encode(obj)
    w.b.core.roster.verify(envelope.decode(forged), w.b.core.clock.now_ms())  # goes through: the bug
    assert forged != raw


# -- regressions: what the long run (tools/fuzz.py) found ----------------------------------


def test_version_true_is_not_a_second_encoding_of_an_envelope() -> None:
    """Found by tools/fuzz.py: ``"v":true`` passed ``obj["v"] != 1`` (True == 1 in Python), so any
    relay could re-encode a signed envelope into other bytes that still verified (the switch
    de-duplicates on bytes: a malleated copy forwarded first made the real sale a "conflict")."""
    raw = next(r for r in corpus("envelope") if b'"type":"sale"' in r)
    assert raw.endswith(b'"v":1}')
    with pytest.raises(EncodingError):
        envelope.decode(raw[:-3] + b"true}")


def test_a_certificate_with_a_malformed_issuer_is_a_verification_error() -> None:
    """Found by tools/fuzz.py: a cert entry whose DER parses lazily raised a bare ValueError out of
    Roster.verify (and so out of a ledger merge): one hostile entry could stop an honest link."""
    w = world()
    raw = next(r for r in corpus("envelope") if b'"type":"cert"' in r)
    obj = json.loads(raw)
    der = envelope.b64d(obj["body"]["cert"], "cert")
    issuer_at = der.find(b"\x06\x03\x55\x04\x03")  # first CN attribute: inside the issuer name
    bad = der[:issuer_at + 5] + b"\x0c\x04\xff\xfe\xfd\xfc" + der[issuer_at + 5 + 2 + der[issuer_at + 6]:]
    obj["body"]["cert"] = envelope.b64e(bad)
    from meshpos.wire import canonical
    with pytest.raises((EncodingError, VerificationError)):
        w.b.core.roster.verify(envelope.decode(canonical.encode(obj)), w.b.core.clock.now_ms())


@pytest.mark.parametrize("version", [0x03, 0x0A, 0x42])
def test_a_certificate_of_an_unknown_x509_version_is_a_verification_error(version: int) -> None:
    """Found by tools/fuzz.py (seed 20261204): a cert entry whose DER names an X.509 version other
    than v1 or v3 raised cryptography's ``InvalidVersion`` (not a ValueError) out of
    Roster.verify; the ledger's catch-all kept the node up but logged a traceback per entry, and
    the switch's pin check and the PEM loader had no such net."""
    w = world()
    raw = next(r for r in corpus("envelope") if b'"type":"cert"' in r)
    obj = json.loads(raw)
    der = envelope.b64d(obj["body"]["cert"], "cert")
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2: version v3, at the start of the TBS
    assert der.count(v3) == 1
    bad = der.replace(v3, v3[:-1] + bytes([version]))
    obj["body"]["cert"] = envelope.b64e(bad)
    from meshpos.wire import canonical
    with pytest.raises(VerificationError, match="not a DER certificate"):
        w.b.core.roster.verify(envelope.decode(canonical.encode(obj)), w.b.core.clock.now_ms())
    with pytest.raises(VerificationError, match="no usable certificate"):
        pin.certificate_key(bad)
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    with pytest.raises(CryptoError, match="not a PEM certificate"):
        certs.load_pem(pem, "test")
