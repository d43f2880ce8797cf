"""Card readers behind one tiny interface, and a simulated reader of test cards.

A reader hands back a :class:`meshpos.wire.cards.CardCapture`: brand, last 4 digits,
entry mode and the card data sealed to the switch's key. The PAN is sealed by
:func:`meshpos.wire.cards.seal_card` inside :meth:`CardReader.read`, the moment it
is read, so nothing after the reader (sale, ledger, receipts, peers, uplink)
ever holds it.

The simulated reader's catalogue uses the public test numbers of the card
schemes and processors; the acquirer simulator answers them as listed in
``TestCard.response_code`` ("00" approved, "05" do not honour, "51"
insufficient funds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.domain.currency import check_currency
from meshpos.domain.errors import ConfigError, DeviceError, InputError
from meshpos.wire.cards import CardCapture, seal_card


class CardReader(Protocol):
    async def read(self, amount_minor: int, currency: str) -> CardCapture:
        """Wait for a card, read it and return the sealed capture. DeviceError if it fails."""
        ...


@dataclass(frozen=True)
class TestCard:
    __test__ = False  # not a pytest test class

    name: str
    pan: str
    expiry: str  # MMYY
    entry_mode: str
    response_code: str  # what the acquirer simulator answers
    note: str


TEST_CARDS: dict[str, TestCard] = {
    c.name: c
    for c in (
        TestCard("visa-chip", "4111111111111111", "1230", "chip", "00", "Visa, approved"),
        TestCard("visa-contactless", "4111111111111111", "1230", "contactless", "00", "Visa, approved"),
        TestCard("mastercard-chip", "5555555555554444", "1230", "chip", "00", "Mastercard, approved"),
        TestCard("mastercard-contactless", "5555555555554444", "1230", "contactless", "00", "Mastercard, approved"),
        TestCard("visa-declined", "4000000000000002", "1230", "chip", "05", "Visa, declined: do not honour"),
        TestCard("visa-declined-contactless", "4000000000000002", "1230", "contactless", "05",
                 "Visa, declined: do not honour"),
        TestCard("visa-insufficient-funds", "4000000000009995", "1230", "contactless", "51",
                 "Visa, declined: insufficient funds"),
        TestCard("visa-insufficient-funds-chip", "4000000000009995", "1230", "chip", "51",
                 "Visa, declined: insufficient funds"),
    )
}
DEFAULT_TEST_CARD = "visa-contactless"


READER_KINDS = ("simulated",)


def reader_from_config(setting: dict[str, Any] | None, switch_key: bytes | None) -> "CardReader | None":
    """The card reader a node's config names (``config.json`` ``reader``, protocols/files.md), or
    None. ``{"kind": "simulated", "card": NAME}``: the simulated reader, which reads the test card
    NAME (default: DEFAULT_TEST_CARD) whenever asked; the only kind this version has. ConfigError
    for anything else, or when the site has no switch key to seal cards to."""
    if setting is None:
        return None
    kind = setting.get("kind")
    if kind not in READER_KINDS:
        raise ConfigError(f"reader: kind must be one of {', '.join(READER_KINDS)} (got {kind!r})")
    unknown = set(setting) - {"kind", "card"}
    if unknown:
        raise ConfigError(f"reader: unknown settings {sorted(unknown)}")
    if switch_key is None:
        raise ConfigError("reader: the site's policy has no switch key to seal cards to")
    card = setting.get("card", DEFAULT_TEST_CARD)
    if not isinstance(card, str) or card not in TEST_CARDS:
        raise ConfigError(f"reader: card must be one of {', '.join(sorted(TEST_CARDS))}")
    return SimulatedReader(switch_key, default_card=card)


class SimulatedReader:
    """A reader in memory: the cashier's "customer" presents test cards by name.

    ``present()`` queues what the next ``read()`` gets (a catalogue name, with
    an optional entry mode); with nothing queued the reader reads
    ``default_card``. ``fail_next()`` makes the next read fail as a real reader
    does (card removed, timeout). ``delay`` is the time a read takes, under
    trio's clock, so tests with ``MockClock`` stay instant.
    """

    def __init__(self, switch_key: bytes, *, default_card: str | None = DEFAULT_TEST_CARD,
                 delay: float = 0.0, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        if default_card is not None:
            self._card(default_card)
        self._switch_key = bytes(switch_key)
        self._default = default_card
        self._delay = delay
        self._queue: deque[tuple[str, str | None] | DeviceError] = deque()

    @staticmethod
    def _card(name: str) -> TestCard:
        try:
            return TEST_CARDS[name]
        except KeyError as exc:
            known = ", ".join(sorted(TEST_CARDS))
            raise DeviceError(f"no test card named {name!r} (test cards: {known})") from exc

    def present(self, name: str, entry_mode: str | None = None) -> None:
        self._card(name)
        self._queue.append((name, entry_mode))

    def fail_next(self, reason: str = "card removed before the read completed") -> None:
        self._queue.append(DeviceError(f"card reader: {reason}"))

    async def read(self, amount_minor: int, currency: str) -> CardCapture:
        if not isinstance(amount_minor, int) or isinstance(amount_minor, bool) or amount_minor <= 0:
            raise InputError("amount must be a positive number of minor units")
        check_currency(currency)
        await trio.sleep(self._delay)
        if self._queue:
            item = self._queue.popleft()
        elif self._default is not None:
            item = (self._default, None)
        else:
            raise DeviceError("card reader: no card presented")
        if isinstance(item, DeviceError):
            raise item
        card = self._card(item[0])
        # Sealed here, at the read: the capture carries brand, last 4 and the sealed box only.
        return seal_card(card.pan, card.expiry, item[1] or card.entry_mode, self._switch_key,
                         at_ms=self._clock.now_ms())  # an expired card is refused at the read
