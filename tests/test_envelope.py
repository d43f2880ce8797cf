"""The sale envelope against the vectors in protocols/, and its strict decoding."""

from __future__ import annotations

import json
from pathlib import Path

import nacl.signing
import pytest
from hypothesis import given, settings, strategies as st

from meshpos.wire import canonical, envelope
from meshpos.domain.errors import EncodingError, MeshposError, VerificationError
from meshpos.identity import keys

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "protocols/vectors/envelope.json").read_text("utf-8"))


@pytest.mark.parametrize("vec", VECTORS["vectors"], ids=lambda v: v["name"])
def test_vector_encodes_to_exact_bytes(vec: dict) -> None:
    key = nacl.signing.SigningKey(bytes.fromhex(vec["signer_seed_hex"]))
    assert bytes(key.verify_key).hex() == vec["signer_public_hex"]
    raw = envelope.seal(vec["type"], vec["signer"], vec["body"], key)
    assert raw == vec["envelope"].encode("utf-8")
    env = envelope.decode(raw)
    assert env.signed_bytes().hex() == vec["signed_bytes_hex"]
    assert env.sig.hex() == vec["signature_hex"]
    envelope.check_schema(env)
    if vec["signer"] == "switch":
        keys.verify_by_x25519(bytes.fromhex(VECTORS["switch_x25519_public_hex"]), env.signed_bytes(), env.sig)
    else:
        assert keys.node_id_of(bytes.fromhex(vec["signer_public_hex"])) == vec["signer"]
        envelope.check_signature(env, bytes.fromhex(vec["signer_public_hex"]))


def _verify(raw: bytes, public: bytes) -> None:
    env = envelope.decode(raw)
    envelope.check_schema(env)
    envelope.check_signature(env, public)


@pytest.mark.parametrize("vec", [v for v in VECTORS["vectors"] if v["type"] == "sale"], ids=lambda v: v["name"])
def test_flipping_any_byte_fails_verification(vec: dict) -> None:
    raw = vec["envelope"].encode("utf-8")
    public = bytes.fromhex(vec["signer_public_hex"])
    _verify(raw, public)
    for i in range(len(raw)):
        for bit in (0x01, 0x20):
            bad = bytearray(raw)
            bad[i] ^= bit
            with pytest.raises((EncodingError, VerificationError)):
                _verify(bytes(bad), public)


def test_non_canonical_encodings_are_refused() -> None:
    vec = VECTORS["vectors"][0]
    obj = json.loads(vec["envelope"])
    spaced = json.dumps(obj, separators=(", ", ": "), sort_keys=True, ensure_ascii=False).encode()
    with pytest.raises(EncodingError):
        envelope.decode(spaced)
    unsorted = json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":"), ensure_ascii=False).encode()
    with pytest.raises(EncodingError):
        envelope.decode(unsorted)
    with pytest.raises(EncodingError):
        canonical.decode(b'{"a":1.5}')


def test_unknown_fields_and_versions_are_refused() -> None:
    obj = json.loads(VECTORS["vectors"][0]["envelope"])
    for change in ({"v": 2}, {"extra": 1}, {"type": "refund"}):
        with pytest.raises(EncodingError):
            envelope.decode(canonical.encode({**obj, **change}))


def test_sale_id_must_match_terminal_and_sequence() -> None:
    vec = VECTORS["vectors"][0]
    key = nacl.signing.SigningKey(bytes.fromhex(vec["signer_seed_hex"]))
    body = {**vec["body"], "seq": 7}
    with pytest.raises(EncodingError):
        envelope.check_schema(envelope.decode(envelope.seal("sale", vec["signer"], body, key)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_decoder_only_raises_typed_errors(data: bytes) -> None:
    try:
        env = envelope.decode(data)
        envelope.check_schema(env)
    except MeshposError:
        pass
