"""The terminal API's event journal, without HTTP: ids, resume with Last-Event-ID within the
horizon (no gap, no duplicate), resync past it or across a restart, waiting for new events."""

from __future__ import annotations

import json

import trio
import trio.testing

from meshpos.terminal.events import RESYNC, EventJournal


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
    """The stream of a connected client (meshpos.terminal.app._stream) sends what the journal got
    between two of its wake-ups as one piece: one write, where there was one per event (each write
    a checkpoint at which a forwarder taking a reply in slices ran its next slice first)."""
    from meshpos.terminal.app import _stream

    journal = EventJournal(epoch=1)
    resume = journal.resume(None)
    stream = _stream(journal, resume.resync, resume.events, resume.next_seq)
    assert (await stream.__anext__()).startswith(b"retry: ")
    ids = _fill(journal, 3)  # e.g. a slice of three results, taken in before the stream's task ran
    piece = await stream.__anext__()
    assert [line.removeprefix(b"id: ").decode() for line in piece.split(b"\n") if line.startswith(b"id: ")] == ids
    journal.append("sale.created", {"n": 3})
    assert (await stream.__anext__()).startswith(b"id: 1-4\n")  # the next one, alone
    await stream.aclose()
