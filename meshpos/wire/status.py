"""The status a node signs and gossips every few seconds (protocols/link.md, "Status gossip"),
as one typed value with one encoder and one decoder.

A status is signed by its node, but the signature says only who wrote it: every field is whatever
that node wrote. ``StatusBody.from_json`` therefore reads any JSON object without failing, field by
field, by these rules: a field of the wrong type counts as absent (its default); a count is a
non-negative integer of at most 10**15 (booleans are not counts; a signed field such as a clock
offset lies within +-10**15); a flag is a JSON boolean; a text is cut to 40 characters
and stripped of every non-printable character (so no status breaks a view or a terminal); a list
or a map keeps at most its bound of well-formed items. Only ``at`` is required (the board refuses a
status without it, see ``require_at``).

``to_json`` writes the object a node signs: every field, absent values as ``null``. Adding a field
to the status is adding it to one dataclass here (with its default); the publisher fills it in
(meshpos/node/status_pub.py) and the views that show it read it (meshpos/status/meshview.py).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshpos.domain.errors import EncodingError
from meshpos.domain.jsonable import dataclass_layout, json_object
from meshpos.wire import heldvec
from meshpos.wire.shortids import HELD, LINKS, ShortTable

MAX_COUNT = 10**15
MAX_TEXT = 40
T = TypeVar("T")


def count(value: object) -> int | None:
    """A non-negative integer count, or None for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT else None


def label(value: object, limit: int = MAX_TEXT) -> str | None:
    """A short printable text, or None."""
    if not isinstance(value, str):
        return None
    value = value[:limit]
    if value.isprintable():  # nearly always: no character to drop
        return value or None
    return "".join(ch for ch in value if ch.isprintable()) or None


@dataclass(frozen=True)
class LinkSeen:
    """One link of the node, as it sees it: the peer, the peer's role, the last round-trip time."""

    node: str
    role: str | None = None
    rtt_ms: int | None = None


@dataclass(frozen=True)
class LedgerSize:
    entries: int | None = None
    shards: int | None = None


@dataclass(frozen=True)
class PendingCount:
    """Sales awaiting a result: how many, their amount, the oldest card sale's ``created_at``."""

    count: int | None = None
    amount_minor: int | None = None
    oldest_created_at: int | None = None


@dataclass(frozen=True)
class RefusedCount:
    """Sales of the site this node holds as refused by the content rules, per terminal."""

    count: int | None = None
    by_terminal: Mapping[str, int] = field(default_factory=dict, metadata={"max": 16})


@dataclass(frozen=True)
class UplinkSeen:
    state: str | None = None
    last_forward_at: int | None = None
    switch: str | None = None  # HOST:PORT of the switch instance the node last reached (cut to 40)


@dataclass(frozen=True)
class PrinterSeen:
    state: str | None = None
    queued: int | None = None


@dataclass(frozen=True)
class ClockSeen:
    """The node's estimate of its own clock's offset (protocols/clocks.md): positive, ahead."""

    offset_ms: int | None = field(default=None, metadata={"signed": True})
    source: str | None = None  # peers | switch
    peers: int | None = None


@dataclass(frozen=True)
class StatusBody:
    """``body["status"]`` of a signed ``status`` envelope."""

    at: int  # the signer's clock, ms
    role: str | None = None  # what the node says; views take name and role from its certificate
    name: str | None = None
    version: str | None = None
    addresses: tuple[str, ...] = field(default=(), metadata={"max": 8})
    port: int | None = None
    links: tuple[LinkSeen, ...] = field(default=(), metadata={"max": 64})
    ledger: LedgerSize = LedgerSize()
    pending: PendingCount = PendingCount()  # the node's own sales
    site_pending: PendingCount = PendingCount()  # every sale it holds
    refused: RefusedCount = RefusedCount()
    # terminal -> the highest sale number held with no gap before it; on the wire the compact text
    # of wire/heldvec.py (a malformed one reads as nothing held)
    held: Mapping[str, int] = field(default_factory=dict, metadata={"encode": heldvec.encode,
                                                                      "decode": heldvec.decode})
    # Status format 3 (protocols/link.md, "Short ids"): the links (value: RTT ms + 1, 0 unknown) and
    # ``held``, keyed by short node ids. A reader resolves them against its roster
    # (meshpos.status.shortids) and they then stand for ``links`` and ``held``; a format-3 sender
    # writes ``links`` empty and ``held`` "" (an older reader sees no links and nothing held).
    links_short: ShortTable | None = field(default=None, metadata={"encode": LINKS.encode,
                                                                   "decode": LINKS.decode})
    held_short: ShortTable | None = field(default=None, metadata={"encode": HELD.encode,
                                                                  "decode": HELD.decode})
    uplink: UplinkSeen = UplinkSeen()
    printer: PrinterSeen = PrinterSeen()
    battery: int | None = None  # percent, when the OS reports it
    battery_low: bool | None = None  # below 15 % and not charging (None: an older node says nothing)
    clock: ClockSeen | None = None
    every_ms: int | None = None  # the period the node publishes at
    started_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        return json_object(self)

    @classmethod
    def from_json(cls, value: object) -> "StatusBody":
        """Any JSON value -> a StatusBody (see the module's rules); EncodingError without ``at``."""
        obj = value if isinstance(value, dict) else {}
        require_at(obj)
        try:
            return _decode_dataclass(cls, obj)
        except _Unusable as exc:  # a required field the decoder could not read
            raise EncodingError("status envelope: status is unusable") from exc


def require_at(status: Mapping[str, Any]) -> int:
    at = count(status.get("at"))  # the decoder reads ``at`` as a count: the same bound, or it is lost there
    if at is None:
        raise EncodingError(f"status envelope: status.at must be an integer of 0..{MAX_COUNT} (ms)")
    return at


# -- the decoder, driven by the dataclasses' type hints (the encoder is domain.jsonable) ---------


def _decode_dataclass(cls: type[T], obj: Mapping[str, Any]) -> T:
    kwargs: dict[str, Any] = {}
    for name, decode in _field_decoders(typing.cast(type, cls)):  # a class is hashable; mypy cannot tell of type[T]
        if name in obj:
            decoded = decode(obj[name])
            if decoded is not _ABSENT:
                kwargs[name] = decoded
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field (such as LinkSeen.node) absent or unusable
        raise _Unusable from exc


class _Unusable(Exception):
    """An item that cannot be read (a link without a node): left out of its list."""


_ABSENT = object()
_Decoder = typing.Callable[[object], object]


@functools.cache
def _field_decoders(cls: type) -> tuple[tuple[str, _Decoder], ...]:
    """One decoder per field of a dataclass, built once from its type hints (a pure function of
    the class, cached): reading the hints with ``typing.get_origin``/``get_args`` on every value
    was most of the cost of reading a status, which every node does a few times a second."""
    hints, fields = dataclass_layout(cls)
    out = []
    for f in fields:
        if "decode" in f.metadata:  # a field with a format of its own
            out.append((f.name, _own_format(f.metadata["decode"])))
        else:
            out.append((f.name, _decoder(hints[f.name], f.metadata.get("max", 64), f.metadata.get("signed", False))))
    return tuple(out)


def _own_format(decode: typing.Callable[[object], object]) -> _Decoder:
    def run(value: object) -> object:
        try:
            return decode(value)
        except EncodingError:
            return _ABSENT
    return run


@functools.cache
def _decoder(hint: Any, bound: int, signed: bool = False) -> _Decoder:
    """The function that reads a value of type ``hint`` by the module's rules (``_ABSENT``: unusable)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None
        inner = _decoder([a for a in args if a is not type(None)][0], bound, signed)

        def optional(value: object) -> object:
            decoded = inner(value)
            return None if decoded is _ABSENT else decoded
        return optional
    if hint is bool:
        return lambda value: value if isinstance(value, bool) else _ABSENT
    if hint is int:
        if signed:
            return lambda value: value if (isinstance(value, int) and not isinstance(value, bool)
                                           and -MAX_COUNT <= value <= MAX_COUNT) else _ABSENT
        return lambda value: _ABSENT if count(value) is None else value
    if hint is str:
        def text(value: object) -> object:
            got = label(value)
            return _ABSENT if got is None else got
        return text
    if origin is tuple:
        item_decoder = _decoder(args[0], bound)

        def items(value: object) -> object:
            if not isinstance(value, list):
                return _ABSENT
            return tuple(d for d in map(item_decoder, value[:bound]) if d is not _ABSENT)
        return items
    if origin is Mapping:
        value_decoder = _decoder(args[1], bound)

        def mapping(value: object) -> object:
            if not isinstance(value, dict):
                return _ABSENT
            result = {}
            for key, item in list(value.items())[:bound]:
                k, v = label(key), value_decoder(item)
                if k is not None and v is not _ABSENT:
                    result[k] = v
            return result
        return mapping
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        cls = hint

        def record(value: object) -> object:
            if not isinstance(value, dict):
                return _ABSENT
            try:
                return _decode_dataclass(cls, value)
            except _Unusable:
                return _ABSENT
        return record
    raise TypeError(f"status field of unsupported type {hint!r}")  # a programming error, caught by the tests
