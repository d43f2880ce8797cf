"""The terminal API's event journal, without HTTP: ids, resume with Last-Event-ID within the
horizon (no gap, no duplicate), resync past it or across a restart, waiting for new events."""

from __future__ import annotations

import json

import trio
import trio.testing

from meshpos.terminal.events import RESYNC, EventJournal
from meshpos.terminal.stream import HEARTBEAT_S, MAX_GAP_S, Readers, event_stream, heartbeat


def _fill(journal: EventJournal, n: int) -> list[str]:
    return [journal.append("sale.created", {"n": i}).id for i in range(n)]


def test_every_event_has_an_id_of_this_run_counting_up() -> None:
    journal = EventJournal(epoch=1234)
    assert _fill(journal, 3) == ["1234-1", "1234-2", "1234-3"]
    assert journal.last_id == "1234-3"


def test_resume_gives_exactly_what_was_missed_in_order() -> None:
    journal = EventJournal(epoch=7)
    ids = _fill(journal, 10)
    resume = journal.resume(ids[3])
    assert resume.resync is None
    assert [e.id for e in resume.events] == ids[4:]
    assert resume.next_seq == 11
    assert journal.resume(ids[-1]).events == []  # up to date: nothing again


def test_a_new_client_starts_from_now() -> None:
    journal = EventJournal(epoch=7)
    _fill(journal, 5)
    resume = journal.resume(None)
    assert resume.resync is None and resume.events == [] and resume.next_seq == 6


def test_past_the_horizon_or_another_run_the_client_is_told_to_resync() -> None:
    journal = EventJournal(epoch=7, horizon=4)
    ids = _fill(journal, 10)
    behind = journal.resume(ids[2])  # events 4, 5 were dropped: a gap cannot be filled
    assert behind.resync is not None and behind.resync.type == RESYNC and behind.events == []
    assert "missed" in behind.resync.data["reason"]
    edge = journal.resume(ids[5])  # 7..10 still held
    assert edge.resync is None and [e.id for e in edge.events] == ids[6:]
    for stale in ("6-3", "garbage", "7-999", "7-", "7-1e3", ""):
        got = journal.resume(stale)
        assert got.resync is not None and got.resync.id == journal.last_id, stale


def test_sse_encoding_is_one_message_with_id_type_and_json_data() -> None:
    journal = EventJournal(epoch=1)
    event = journal.append("sale.approved", {"id": "t-1", "note": "two\nlines"})
    text = event.encode().decode()
    assert text.endswith("\n\n") and text.count("\n") == 4
    lines = text.splitlines()
    assert lines[0] == "id: 1-1" and lines[1] == "event: sale.approved"
    assert json.loads(lines[2].removeprefix("data: ")) == {"id": "t-1", "note": "two\nlines"}


async def test_a_waiting_reader_wakes_for_the_next_event() -> None:
    journal = EventJournal(epoch=1)
    got: list[str] = []

    async def reader() -> None:
        await journal.wait_for(1)
        got.extend(e.id for e in journal.after(1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        journal.append("node.status", {})
    assert got == ["1-1"]


async def test_events_that_came_together_leave_in_one_write() -> None:
    """The stream of a connected client (meshpos.terminal.stream) sends what the journal got
    between two of its wake-ups as one piece: one write, where there was one per event (each write
    a checkpoint at which a forwarder taking a reply in slices ran its next slice first)."""
    journal = EventJournal(epoch=1)
    stream = event_stream(journal, Readers(), journal.resume(None))
    assert (await stream.__anext__()).startswith(b"retry: ")
    ids = _fill(journal, 3)  # e.g. a slice of three results, taken in before the stream's task ran
    piece = await stream.__anext__()
    assert [line.removeprefix(b"id: ").decode() for line in piece.split(b"\n") if line.startswith(b"id: ")] == ids
    journal.append("sale.created", {"n": 3})
    assert (await stream.__anext__()).startswith(b"id: 1-4\n")  # the next one, alone
    await stream.aclose()


def _ids(piece: bytes) -> list[str]:
    return [line.removeprefix(b"id: ").decode() for line in piece.split(b"\n") if line.startswith(b"id: ")]


async def test_a_stream_that_just_wrote_sends_what_comes_next_in_one_later_write(
        autojump_clock: trio.testing.MockClock) -> None:
    """Under a stream of sales, a client's stream writes at most once a round (``Readers.gap``, up
    to 40 ms with 100 clients), all that came meanwhile in one piece: one write per client per sale
    made 100 idle clients cut the selling rate to a third. An idle client still gets an event at
    once (virtual time: the clock does not move), and nothing is lost or sent twice."""
    journal = EventJournal(epoch=1)
    readers = Readers()
    readers.count = 100  # as many streams as the benchmark's idle clients: the longest gap
    stream = event_stream(journal, readers, journal.resume(None))
    await stream.__anext__()  # the hello
    start = trio.current_time()
    first = journal.append("sale.created", {"n": 0}).id
    assert _ids(await stream.__anext__()) == [first]
    assert trio.current_time() == start  # idle until then: sent at once

    made: list[str] = []

    async def sell() -> None:  # a sale every millisecond for 30 ms
        for i in range(30):
            made.append(journal.append("sale.created", {"n": i + 1}).id)
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sell)
        piece = await stream.__anext__()
    assert _ids(piece) == made  # all 30 in one write, in order
    assert trio.current_time() - start <= MAX_GAP_S + 0.001
    await stream.aclose()


async def test_one_timer_keeps_the_rounds_of_all_streams(autojump_clock: trio.testing.MockClock) -> None:
    """Streams waiting for the next round all wake at its start, together."""
    readers = Readers()
    readers.count = 3
    woke: list[float] = []

    async def waiter() -> None:
        await readers.next_round()
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
    assert len(woke) == 3 and len(set(woke)) == 1


async def test_an_idle_stream_sends_a_keep_alive_at_each_heartbeat(autojump_clock: trio.testing.MockClock) -> None:
    """One heartbeat timer for all streams (``heartbeat``): an idle stream writes a comment every
    HEARTBEAT_S, and events still come after it, once each."""
    journal = EventJournal(epoch=1)
    stream = event_stream(journal, Readers(), journal.resume(None))
    await stream.__anext__()  # the hello
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat, journal)
        start = trio.current_time()
        assert await stream.__anext__() == b": keep-alive\n\n"
        assert trio.current_time() - start == HEARTBEAT_S
        event = journal.append("sale.created", {"n": 1})
        assert _ids(await stream.__anext__()) == [event.id]
        nursery.cancel_scope.cancel()
    await stream.aclose()
