"""Sealing a card to the switch: a fresh one-time key per card at a till, a given one in the
site simulation (the same seed must give the same bytes); the switch opens both alike."""

from __future__ import annotations

import nacl.public
import pytest

from meshpos.domain.errors import CryptoError
from meshpos.wire.cards import open_card, seal_card

PAN = "4111111111111111"


@pytest.fixture(scope="module")
def switch() -> nacl.public.PrivateKey:
    return nacl.public.PrivateKey.generate()


def test_a_till_seals_each_card_with_a_fresh_key(switch: nacl.public.PrivateKey) -> None:
    key = bytes(switch.public_key)
    one, two = seal_card(PAN, "1230", "chip", key), seal_card(PAN, "1230", "chip", key)
    assert one.sealed != two.sealed
    assert open_card(one.sealed, switch).pan == open_card(two.sealed, switch).pan == PAN


def test_a_given_one_time_key_seals_the_same_bytes_that_the_switch_opens(switch: nacl.public.PrivateKey) -> None:
    key = bytes(switch.public_key)
    first = seal_card(PAN, "1230", "contactless", key, ephemeral=b"\x01" * 32)
    again = seal_card(PAN, "1230", "contactless", key, ephemeral=b"\x01" * 32)
    other = seal_card(PAN, "1230", "contactless", key, ephemeral=b"\x02" * 32)
    assert first.sealed == again.sealed != other.sealed
    assert first.sealed[:32] == bytes(nacl.public.PrivateKey(b"\x01" * 32).public_key)
    for capture in (first, other):  # opened by libsodium's own sealed-box code, as any card
        assert nacl.public.SealedBox(switch).decrypt(capture.sealed) == b'{"expiry":"1230","pan":"4111111111111111"}'
        opened = open_card(capture.sealed, switch)
        assert (opened.pan, opened.expiry) == (PAN, "1230")
    assert (first.brand, first.last4, first.entry_mode) == ("visa", "1111", "contactless")


def test_a_box_sealed_with_a_given_key_opens_only_for_its_switch(switch: nacl.public.PrivateKey) -> None:
    sealed = seal_card(PAN, None, "manual", bytes(switch.public_key), ephemeral=b"\x03" * 32).sealed
    with pytest.raises(CryptoError):
        open_card(sealed, nacl.public.PrivateKey.generate())
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(CryptoError):
        open_card(tampered, switch)
