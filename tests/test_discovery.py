"""Discovery without sockets: TXT codec, the peer table, the trio bridge."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import pytest
import trio

from meshpos.replication.discovery import (
    DEFAULT_TTL,
    Goodbye,
    Heard,
    PeerGone,
    PeerSeen,
    PeerTable,
    TrioInbox,
    run_discovery,
)
from meshpos.domain.errors import EncodingError, InputError
from meshpos.wire.dnssd import LocalService, decode_txt, encode_txt, instance_name

SITE = "site-1"


def local(node: str = "n0", **kw: Any) -> LocalService:
    args: dict[str, Any] = dict(site_id=SITE, node_id=node, role="terminal", name=f"Till {node}", port=7443)
    args.update(kw)
    return LocalService(**args)


def props(node: str = "n1", **kw: Any) -> dict[bytes, bytes | None]:
    txt = encode_txt(local(node, **kw))
    return {k.encode(): v.encode() for k, v in txt.items()}


# --- TXT -------------------------------------------------------------------------


def test_txt_round_trip() -> None:
    svc = local("n7", role="gateway", proto=3, uplink=True, name="Cassa 7 — bar")
    txt = decode_txt({k.encode(): v.encode() for k, v in encode_txt(svc).items()})
    assert (txt.site_id, txt.node_id, txt.role, txt.proto, txt.uplink, txt.name) == (
        SITE, "n7", "gateway", 3, True, "Cassa 7 — bar")
    assert encode_txt(svc)["uplink"] == "1" and encode_txt(local())["uplink"] == "0"


@pytest.mark.parametrize(
    "change",
    [
        {b"site": None},
        {b"role": b"switch"},
        {b"proto": b"-1"},
        {b"proto": b"1.0"},
        {b"proto": b"\xd9\xa3"},  # an Arabic-Indic digit: isdigit() but not ASCII
        {b"uplink": b"yes"},
        {b"name": b"\xff\xfe"},
        {b"node": b""},
        {b"name": b"x" * 300},
    ],
)
def test_malformed_txt_is_rejected(change: dict[bytes, bytes | None]) -> None:
    p = props()
    p.update(change)
    with pytest.raises(EncodingError):
        decode_txt(p)


def test_missing_txt_key_is_rejected() -> None:
    p = props()
    del p[b"uplink"]
    with pytest.raises(EncodingError):
        decode_txt(p)


@pytest.mark.parametrize(
    "kw", [{"role": "switch"}, {"port": 0}, {"node_id": ""}, {"addresses": ["fe80::1"]}, {"proto": -1}]
)
def test_local_service_is_validated(kw: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        local(**kw)


def test_instance_name_fits_one_dns_label() -> None:
    long_id = "ab" * 32  # 64 hex chars, e.g. an Ed25519 key
    label = instance_name(long_id).split(".")[0]
    assert len(label) == 63 and long_id.startswith(label)
    assert instance_name("n1") == "n1._meshpos._tcp.local."


# --- the peer table --------------------------------------------------------------


def table() -> PeerTable:
    return PeerTable(SITE, "n0", random.Random(1))


def observe(t: PeerTable, node: str = "n1", now: float = 0.0, ttl: float = 10, **kw: Any) -> list[Any]:
    return t.observe(instance_name(node), props(node, **kw), ["10.0.0.2"], 7443, ttl, now)


def test_new_peer_is_seen_once_and_again_when_txt_changes() -> None:
    t = table()
    [ev] = observe(t)
    assert ev == PeerSeen("n1", SITE, "terminal", "Till n1", ("10.0.0.2",), 7443, 1, False)
    assert observe(t, now=1) == []
    [ev2] = observe(t, now=2, uplink=True)
    assert ev2.uplink is True and ev2.node_id == "n1"
    [ev3] = t.observe(instance_name("n1"), props("n1", uplink=True), ["10.0.0.3"], 7443, 10, 3)
    assert isinstance(ev3, PeerSeen) and ev3.addresses == ("10.0.0.3",)


def test_own_foreign_malformed_and_mismatched_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    t = table()
    caplog.set_level(logging.DEBUG, logger="meshpos.replication.discovery")
    assert observe(t, "n0") == []  # our own advertisement
    assert observe(t, site_id="site-2") == []
    bad = props("n1")
    bad[b"role"] = b"admin"
    assert t.observe(instance_name("n1"), bad, [], 7443, 10, 0) == []
    assert "malformed TXT" in caplog.text
    assert t.observe(instance_name("n9"), props("n1"), [], 7443, 10, 0) == []  # claims another id
    assert t.peers == {}


def test_goodbye_and_unknown_goodbye() -> None:
    t = table()
    observe(t)
    assert t.goodbye(instance_name("n1").upper()) == [PeerGone("n1")]
    assert t.goodbye(instance_name("n1")) == []


def test_silent_peer_is_requeried_then_expires_after_its_ttl() -> None:
    t = table()
    observe(t, now=0, ttl=10)
    assert not t.query_due(4.0)
    assert t.expire(9.9) == []
    assert t.query_due(6.1)  # 50 % + at most 10 % jitter
    t.query_sent(6.1)
    assert not t.query_due(6.5)  # spaced by 15 % of the TTL
    assert t.query_due(7.7) and 6.1 < t.next_wakeup(6.2) <= 10
    observe(t, now=8)  # it answered: alive again
    assert t.expire(17.9) == []
    assert t.expire(18.0) == [PeerGone("n1")]
    assert t.peers == {} and not t.query_due(30)


def test_each_peer_expires_on_its_own_ttl() -> None:
    t = table()
    observe(t, "n1", now=0, ttl=4)
    observe(t, "n2", now=0, ttl=DEFAULT_TTL)
    assert t.expire(4) == [PeerGone("n1")]
    assert set(t.peers) == {"n2"}


# --- the trio bridge -------------------------------------------------------------


async def test_inbox_carries_notes_from_a_foreign_thread_in_order_without_blocking() -> None:
    inbox = TrioInbox()
    worst = 0.0

    def zeroconf_thread() -> None:
        nonlocal worst
        for i in range(500):
            t0 = time.perf_counter()
            inbox.post(Goodbye(f"x{i}"))
            worst = max(worst, time.perf_counter() - t0)

    # trio is busy (not reading) while the thread posts: post must not wait for it
    thread = threading.Thread(target=zeroconf_thread)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive()
    got = [await inbox.receive.receive() for _ in range(500)]
    assert [g.name for g in got] == [f"x{i}" for i in range(500)]
    assert worst < 0.05
    inbox.close()
    inbox.post(Goodbye("late"))  # after close: dropped, no error


def test_post_after_trio_run_ended_is_dropped() -> None:
    box: list[TrioInbox] = []

    async def main() -> None:
        box.append(TrioInbox())

    trio.run(main)
    box[0].post(Goodbye("late"))  # must not raise in zeroconf's thread


class FakeBackend:
    """An mDNS stack whose 'zeroconf thread' is a plain thread we drive by hand."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.queries = 0
        self.post: Any = None
        self.updates: list[LocalService] = []

    def start(self, post: Any) -> None:
        self.calls.append("start")
        self.post = post

    def register(self, local: LocalService, ttl: int) -> None:
        self.calls.append(f"register {local.node_id} ttl={ttl}")

    def update(self, local: LocalService, ttl: int) -> None:
        self.updates.append(local)

    def send_query(self) -> None:
        self.queries += 1

    def close(self) -> None:
        self.calls.append("close")

    def from_thread(self, *notes: Any) -> None:
        t = threading.Thread(target=lambda: [self.post(n) for n in notes])
        t.start()
        t.join()


def heard(node: str, ttl: float = 2, **kw: Any) -> Heard:
    return Heard(instance_name(node), props(node, **kw), ("10.0.0.9",), 7443, ttl)


async def wait_for(events: list[Any], n: int, timeout: float = 3) -> None:
    with trio.fail_after(timeout):
        while len(events) < n:
            await trio.sleep(0.01)


async def test_run_discovery_with_a_fake_zeroconf_thread() -> None:
    fake = FakeBackend()
    events: list[Any] = []
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            lambda task_status: run_discovery(local(), events.append, ttl=2, backend=fake, task_status=task_status)
        )
        assert fake.calls == ["start", "register n0 ttl=2"]
        fake.from_thread(heard("n1"), heard("n0"), heard("n2", site_id="other"), heard("n3"))
        await wait_for(events, 2)
        assert [e.node_id for e in events] == ["n1", "n3"]

        fake.from_thread(heard("n1", uplink=True))
        await wait_for(events, 3)
        assert events[2].uplink is True

        fake.from_thread(Goodbye(instance_name("n3")))
        await wait_for(events, 4)
        assert events[3] == PeerGone("n3")

        await handle.set_uplink(True)
        await handle.set_uplink(True)  # unchanged: no second announcement
        assert [u.uplink for u in fake.updates] == [True] and handle.local.uplink

        # n1 falls silent: re-queried, then gone once its 2 s TTL has run out
        t0 = trio.current_time()
        await wait_for(events, 5, timeout=4)
        assert events[4] == PeerGone("n1")
        assert fake.queries >= 1
        assert 1.0 < trio.current_time() - t0 < 2.5
        nursery.cancel_scope.cancel()
    assert fake.calls[-1] == "close"


async def test_close_runs_even_when_cancelled_during_register() -> None:
    fake = FakeBackend()
    fake.register = lambda local, ttl: time.sleep(0.3)  # type: ignore[method-assign]
    with trio.move_on_after(0.1):
        await run_discovery(local(), lambda e: None, backend=fake)
    assert fake.calls == ["start", "close"]


async def test_bad_ttl_is_refused() -> None:
    with pytest.raises(InputError):
        await run_discovery(local(), lambda e: None, ttl=0, backend=FakeBackend())
