"""What one connected ``GET /v1/events`` client is sent, and when (the HTTP side is Starlette's
streaming response, meshpos.terminal.app).

Every event's bytes are made once for all clients (``Event.wire``). A stream writes what the
journal got since its last write in one piece. An idle stream writes an event as soon as it is in
the journal; a stream that wrote less than ``Readers.gap()`` ago waits for the next round of
writes (one timer for all streams) and sends everything that came meanwhile together. Each write
costs the node a pass through the HTTP stack (Starlette, Hypercorn's h11, the socket) whatever its
size: one write per client per sale made 100 idle clients cut the selling rate to a third. The gap
grows with the number of connected streams, so that under load all of them together write about
``WRITES_PER_S`` times a second, between ``MIN_GAP_S`` (one client: 5 ms) and ``MAX_GAP_S``
(100 clients or more: 40 ms, within the 50 ms the issue allows from a result to its event).
A stream with nothing to send writes a comment every ``HEARTBEAT_S``: one timer wakes them all
(``heartbeat``, run beside the API by meshpos.terminal.server), where each stream had a cancel
scope of its own around every wait.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import trio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from meshpos.terminal.events import RESYNC, Event, EventJournal, Resume

HEARTBEAT_S = 15.0  # a comment line this often keeps proxies and clients from timing out
RETRY_MS = 2000  # the SSE reconnection delay suggested to clients
WRITES_PER_S = 2500  # writes to event streams per second, all clients together, under load
MIN_GAP_S = 0.005
MAX_GAP_S = 0.040


class Readers:
    """How many event streams are connected, and the rounds in which they write: a stream that
    wrote waits for the next round, ``gap()`` after the first of them asked. One timer and one
    wake-up per stream per round, not a timer each (100 timers firing every few ms cost the node
    more than the writes' own cancel scopes)."""

    def __init__(self) -> None:
        self.count = 0
        self._round: trio.Event | None = None

    def gap(self) -> float:
        return min(MAX_GAP_S, max(MIN_GAP_S, self.count / WRITES_PER_S))

    async def next_round(self) -> None:
        """Return at the start of the next round of writes."""
        if self._round is not None:
            await self._round.wait()
            return
        self._round = round_ = trio.Event()
        try:
            await trio.sleep(self.gap())  # the first to ask keeps the time for all of them
        finally:  # also if this stream went away: the others write a little early, once
            self._round = None
            round_.set()


class EventStreamResponse(StreamingResponse):
    """The streaming response of one client, counted in ``readers`` while it is connected."""

    def __init__(self, journal: EventJournal, readers: Readers, resume: Resume, headers: dict[str, str]) -> None:
        super().__init__(event_stream(journal, readers, resume), media_type="text/event-stream", headers=headers)
        self.readers = readers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.readers.count += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.readers.count -= 1


async def event_stream(journal: EventJournal, readers: Readers, resume: Resume) -> AsyncIterator[bytes]:
    """The bytes of one client's stream: a hello, a resync or the missed events, then what comes."""
    yield f"retry: {RETRY_MS}\n: connected at {journal.last_id}\n\n".encode()
    if resume.resync is not None:
        yield resume.resync.encode()
    for event in resume.events:
        yield event.wire
    next_seq = resume.next_seq
    wrote = -math.inf
    while True:
        if not journal.holds(next_seq):
            await journal.changed()  # an event, or the heartbeat (``heartbeat``)
        if trio.current_time() - wrote < readers.gap():  # wrote a moment ago: the next round
            await readers.next_round()                   # takes what comes until then too
        batch = journal.after(next_seq)
        wrote = trio.current_time()
        if not batch:
            yield b": keep-alive\n\n"
            continue
        # the events that came together go out together: one write, not one per event (each write
        # is a checkpoint where a forwarder taking a reply in slices would run before the rest)
        out = [event.wire for event in batch]
        if batch[0].seq > next_seq:  # this client fell behind the horizon while connected
            out.insert(0, behind(journal, batch[0].seq - 1).encode())
        yield b"".join(out)
        next_seq = batch[-1].seq + 1


async def heartbeat(journal: EventJournal, period: float = HEARTBEAT_S) -> None:
    """Until cancelled: every ``period``, wake the streams, so that one with nothing to send
    writes a comment (a keep-alive: proxies and clients do not time it out, and a client that
    has gone is noticed)."""
    while True:
        await trio.sleep(period)
        journal.pulse()


def behind(journal: EventJournal, seq: int) -> Event:
    before = f"{journal.epoch}-{seq}"
    data: dict[str, Any] = {"reason": "this client fell behind the event horizon", "last_id": before}
    return Event(0, before, RESYNC, data)
