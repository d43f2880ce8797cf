"""The event journal behind ``GET /v1/events`` (Server-Sent Events), without any HTTP.

Every event gets an id ``EPOCH-N``: ``EPOCH`` names this run of the node (its start time in ms),
``N`` counts from 1. The journal keeps the last ``HORIZON`` events in memory. A client that
reconnects with ``Last-Event-ID`` gets every event after that id, once and in order, if that id is
of this run and still within the horizon; otherwise (the node restarted, or the client was away
for more than ``HORIZON`` events) it first gets one ``resync`` event: it may have missed some and
should read ``GET /v1/sales`` and ``GET /v1/status`` again. protocols/terminal-api.yaml says the
same for clients.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import trio

HORIZON = 1000  # events kept for clients that reconnect
RESYNC = "resync"


@dataclass(frozen=True)
class Event:
    seq: int
    id: str
    type: str
    data: dict[str, Any]

    @cached_property
    def wire(self) -> bytes:
        """``encode()`` made once: every connected client sends the same bytes."""
        return self.encode()

    def encode(self) -> bytes:
        """The event as one SSE message (one ``data:`` line: the JSON has no newlines)."""
        body = json.dumps(self.data, separators=(",", ":"), ensure_ascii=True)
        return f"id: {self.id}\nevent: {self.type}\ndata: {body}\n\n".encode()


@dataclass(frozen=True)
class Resume:
    """Where a (re)connecting client starts: the events it missed, after an optional resync."""

    resync: Event | None
    events: list[Event]
    next_seq: int  # the seq of the next event to wait for


class EventJournal:
    def __init__(self, epoch: int, horizon: int = HORIZON) -> None:
        self.epoch = epoch
        self._events: deque[Event] = deque(maxlen=horizon)
        self._last = 0
        self._changed = trio.Event()

    @property
    def last_id(self) -> str:
        return f"{self.epoch}-{self._last}"

    def append(self, type_: str, data: dict[str, Any]) -> Event:
        self._last += 1
        event = Event(self._last, f"{self.epoch}-{self._last}", type_, data)
        self._events.append(event)
        self._changed.set()
        self._changed = trio.Event()
        return event

    def _parse(self, last_event_id: str | None) -> int | None:
        """The seq a client has seen up to, if its id is of this run; None otherwise."""
        if last_event_id is None:
            return None
        epoch, _, seq = last_event_id.strip().partition("-")
        if epoch != str(self.epoch) or not seq.isascii() or not seq.isdigit() or len(seq) > 18:
            return None
        n = int(seq)
        return n if n <= self._last else None

    def resume(self, last_event_id: str | None) -> Resume:
        """A new client (no id) starts with what happens from now on; a returning one with what it
        missed, or with a resync when that cannot be told."""
        if last_event_id is None:
            return Resume(None, [], self._last + 1)
        seen = self._parse(last_event_id)
        oldest = self._events[0].seq if self._events else self._last + 1
        if seen is None or seen + 1 < oldest:
            why = ("the node restarted or the id is unknown" if seen is None
                   else f"more than {len(self._events)} events were missed")
            resync = Event(0, self.last_id, RESYNC, {"reason": why, "last_id": self.last_id})
            return Resume(resync, [], self._last + 1)
        return Resume(None, self.after(seen + 1), self._last + 1)

    def after(self, seq: int) -> list[Event]:
        """Events from ``seq`` on that the journal still holds (a slow reader may find a gap:
        then the first one returned is later than ``seq``). Read from the newest end: a
        connected client asks for the few newest, and the journal holds up to HORIZON."""
        out = []
        for event in reversed(self._events):
            if event.seq < seq:
                break
            out.append(event)
        out.reverse()
        return out

    def holds(self, seq: int) -> bool:
        """Whether an event with this seq (or a later one) exists."""
        return self._last >= seq

    async def wait_for(self, seq: int) -> None:
        """Return once an event with this seq (or a later one) exists."""
        while self._last < seq:
            await self._changed.wait()

    async def changed(self) -> None:
        """Return at the next event or the next ``pulse()``."""
        await self._changed.wait()

    def pulse(self) -> None:
        """Wake every reader waiting in ``changed()`` without an event (the streams' heartbeat:
        one timer for all of them, not a cancel scope each around every wait)."""
        self._changed.set()
        self._changed = trio.Event()
