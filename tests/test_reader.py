"""The simulated card reader seals the PAN at the read; the capture holds none."""

from __future__ import annotations

import dataclasses

import nacl.public
import pytest
import trio
import trio.testing

from meshpos.wire import canonical
from meshpos.wire.cards import CardCapture, open_card
from meshpos.devices.reader import TEST_CARDS, CardReader, SimulatedReader
from meshpos.domain.errors import DeviceError, InputError


@pytest.fixture
def switch_key() -> nacl.public.PrivateKey:
    return nacl.public.PrivateKey.generate()


def reader(key: nacl.public.PrivateKey, **kwargs: object) -> SimulatedReader:
    return SimulatedReader(bytes(key.public_key), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "pan", "brand", "entry_mode", "response_code"),
    [
        ("visa-contactless", "4111111111111111", "visa", "contactless", "00"),
        ("visa-chip", "4111111111111111", "visa", "chip", "00"),
        ("mastercard-chip", "5555555555554444", "mastercard", "chip", "00"),
        ("mastercard-contactless", "5555555555554444", "mastercard", "contactless", "00"),
        ("visa-declined", "4000000000000002", "visa", "chip", "05"),
        ("visa-insufficient-funds", "4000000000009995", "visa", "contactless", "51"),
    ],
)
async def test_capture_is_sealed_to_the_switch(switch_key: nacl.public.PrivateKey, name: str, pan: str, brand: str,
                                               entry_mode: str, response_code: str) -> None:
    r = reader(switch_key)
    r.present(name)
    capture = await r.read(1250, "EUR")
    assert isinstance(capture, CardCapture)
    assert (capture.brand, capture.last4, capture.entry_mode) == (brand, pan[-4:], entry_mode)
    assert TEST_CARDS[name].response_code == response_code
    # Opens with the switch's private key (plain nacl) to the right PAN...
    plaintext = nacl.public.SealedBox(switch_key).decrypt(capture.sealed)
    assert canonical.decode(plaintext)["pan"] == pan
    assert open_card(capture.sealed, bytes(switch_key)).pan == pan
    # ...and the capture itself holds no PAN.
    assert {f.name for f in dataclasses.fields(capture)} == {"brand", "last4", "entry_mode", "sealed"}
    assert not hasattr(capture, "pan")
    assert pan not in repr(capture) and pan.encode() not in capture.sealed


async def test_other_switch_cannot_open(switch_key: nacl.public.PrivateKey) -> None:
    capture = await reader(switch_key).read(100, "EUR")
    with pytest.raises(nacl.exceptions.CryptoError):
        nacl.public.SealedBox(nacl.public.PrivateKey.generate()).decrypt(capture.sealed)


async def test_queue_default_entry_mode_and_failures(switch_key: nacl.public.PrivateKey) -> None:
    r: CardReader = reader(switch_key, default_card=None)
    assert isinstance(r, SimulatedReader)
    with pytest.raises(DeviceError, match="no card presented"):
        await r.read(100, "EUR")
    r.present("mastercard-chip", entry_mode="contactless")
    r.fail_next()
    r.present("visa-declined")
    first = await r.read(100, "EUR")
    assert (first.last4, first.entry_mode) == ("4444", "contactless")
    with pytest.raises(DeviceError, match="card removed"):
        await r.read(100, "EUR")
    assert (await r.read(100, "EUR")).last4 == "0002"
    with pytest.raises(DeviceError, match="no test card named 'amex-gold'"):
        r.present("amex-gold")
    with pytest.raises(InputError):
        await r.read(0, "EUR")
    with pytest.raises(InputError):
        await r.read(100, "XYZ")


async def test_read_delay_runs_on_trio_time(switch_key: nacl.public.PrivateKey,
                                            autojump_clock: trio.testing.MockClock) -> None:
    r = reader(switch_key, delay=2.5)
    start = trio.current_time()
    await r.read(100, "EUR")
    assert trio.current_time() - start == pytest.approx(2.5)


async def test_a_card_past_its_expiry_is_refused_at_the_read(switch_key: nacl.public.PrivateKey) -> None:
    from meshpos.infra.clock import FakeClock
    january_2031 = 1924992000000  # the test cards expire 12/30
    with pytest.raises(InputError, match="expired"):
        await reader(switch_key, clock=FakeClock(now_ms=january_2031)).read(500, "EUR")
    capture = await reader(switch_key, clock=FakeClock(now_ms=january_2031 - 86_400_000)).read(500, "EUR")
    assert capture.last4 == "1111"
