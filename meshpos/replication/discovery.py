"""Peer discovery: DNS-SD over mDNS (RFC 6762/6763) with python-zeroconf.

Spec: ``protocols/discovery.md``. Each node advertises one instance of
``_meshpos._tcp.local.`` whose TXT record carries its site, node id, role,
protocol version, uplink state and human name, and browses for the others.
The caller gets :class:`PeerSeen` (again whenever a peer's TXT, port or
addresses change) and :class:`PeerGone` events.

Three layers, so that each can be tested alone:

- pure functions and :class:`PeerTable`, a sans-IO state machine that turns
  "records about instance X arrived at time t" into events and decides when a
  peer has been silent for longer than its records' TTL;
- :class:`MdnsBackend`, the tiny interface to the mDNS stack, with
  :class:`ZeroconfBackend` as the real one. python-zeroconf runs its own
  asyncio loop in its own thread; the backend reports from that thread through
  a non-blocking, thread-safe ``post`` callable (see :class:`TrioInbox`);
- :func:`run_discovery`, the trio task that drives both.

Why our own liveness instead of zeroconf's ``ServiceStateChange.Removed``:
zeroconf's browser reports a removal only when the PTR record goes away, and
it raises the TTL of every PTR it receives to at least 1125 s
(``_DNS_PTR_MIN_TTL``; the default PTR TTL is 4500 s). A peer that vanishes
without a goodbye would stay "present" for 19 to 75 minutes. We instead track
when we last *heard* each peer's SRV/TXT records (whose TTL zeroconf does not
raise) and re-query before that TTL runs out, as RFC 6762 §5.2 asks of a
querier that maintains its cache.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from meshpos.domain.errors import EncodingError, InputError, MeshposError
from meshpos.wire.dnssd import SERVICE_TYPE, LocalService, decode_txt, encode_txt, instance_label, instance_name

log = logging.getLogger(__name__)

# TTL (seconds) of every record we advertise. 120 s is RFC 6762 §10's TTL for
# records that carry a host name; a peer that disappears without a goodbye is
# reported gone at most this long after it was last heard.
DEFAULT_TTL = 120
MIN_TTL = 2
# A peer is re-queried once this fraction of its TTL has passed without news,
# then again every RETRY_FRACTION of it until it answers or the TTL runs out.
REFRESH_FRACTION = 0.5
RETRY_FRACTION = 0.15
# Random extra delay (fraction of the TTL) before a refresh query, so that the
# nodes of a site, which all heard the same answer at the same moment, do not
# all ask at once: the first query's multicast answers refresh everyone
# (RFC 6762 §5.2 asks for 2 %; we use more because every node browses).
JITTER_FRACTION = 0.1
# Never query more often than this, whatever the TTL.
MIN_QUERY_SPACING = 1.0
# How long the backend may wait for a peer's SRV/TXT/A when it only has a PTR.
RESOLVE_TIMEOUT_MS = 3000


# --- public data -----------------------------------------------------------------


@dataclass(frozen=True)
class PeerSeen:
    node_id: str
    site_id: str
    role: str
    name: str
    addresses: tuple[str, ...]
    port: int
    proto: int
    uplink: bool


@dataclass(frozen=True)
class PeerGone:
    node_id: str


DiscoveryEvent = PeerSeen | PeerGone


class DiscoveryError(MeshposError):
    """The mDNS stack could not be started, or our name is taken by another node."""

    exit_code = 11


# --- the peer table (sans-IO) ------------------------------------------------------


@dataclass
class _Peer:
    seen: PeerSeen
    ttl: float
    last_heard: float


class PeerTable:
    """Which peers of our site are alive, from what the network told us and when.

    Rules:
    - ``observe`` (records about an instance arrived) decodes the TXT; foreign
      sites, our own node, malformed TXT and an instance name that does not
      match the node id are ignored. A new peer, or one whose advertised data
      changed, yields PeerSeen; every observation refreshes ``last_heard``.
    - ``goodbye`` (TTL-0 records, RFC 6762 §10.1) yields PeerGone at once.
    - ``expire(now)`` yields PeerGone for each peer not heard for its TTL.
    - ``query_due(now)`` says whether to send a refresh query: some peer has
      been silent for REFRESH_FRACTION (+ jitter) of its TTL, and we have not
      asked within RETRY_FRACTION of it.
    """

    def __init__(self, site_id: str, own_node_id: str, rng: random.Random | None = None) -> None:
        self.site_id = site_id
        self.own_node_id = own_node_id
        self._rng = rng or random.Random()
        self._peers: dict[str, _Peer] = {}
        self._last_query = -math.inf
        self._jitter = self._rng.uniform(0.0, JITTER_FRACTION)

    @property
    def peers(self) -> dict[str, PeerSeen]:
        return {p.seen.node_id: p.seen for p in self._peers.values()}

    def observe(
        self,
        name: str,
        props: Mapping[bytes, bytes | None],
        addresses: Sequence[str],
        port: int,
        ttl: float,
        now: float,
    ) -> list[DiscoveryEvent]:
        key = name.lower()
        try:
            txt = decode_txt(props)
        except EncodingError as exc:
            log.debug("discovery: ignoring %s: malformed TXT: %s", name, exc)
            return []
        if txt.node_id == self.own_node_id:
            return []
        if txt.site_id != self.site_id:
            log.debug("discovery: ignoring %s of site %r", name, txt.site_id)
            return []
        if key != instance_name(txt.node_id).lower():
            log.debug("discovery: ignoring %s: instance name does not match node %r", name, txt.node_id)
            return []
        seen = PeerSeen(
            node_id=txt.node_id,
            site_id=txt.site_id,
            role=txt.role,
            name=txt.name,
            addresses=tuple(sorted(set(addresses))),
            port=port,
            proto=txt.proto,
            uplink=txt.uplink,
        )
        old = self._peers.get(key)
        self._peers[key] = _Peer(seen, max(float(ttl), MIN_TTL), now)
        if old is not None and old.seen == seen:
            return []
        return [seen]

    def goodbye(self, name: str) -> list[DiscoveryEvent]:
        peer = self._peers.pop(name.lower(), None)
        return [] if peer is None else [PeerGone(peer.seen.node_id)]

    def expire(self, now: float) -> list[DiscoveryEvent]:
        gone = [k for k, p in self._peers.items() if now - p.last_heard >= p.ttl]
        return [PeerGone(self._peers.pop(k).seen.node_id) for k in gone]

    def query_due(self, now: float) -> bool:
        for p in self._peers.values():
            silent = now - p.last_heard
            spacing = max(MIN_QUERY_SPACING, RETRY_FRACTION * p.ttl)
            if silent >= (REFRESH_FRACTION + self._jitter) * p.ttl and now - self._last_query >= spacing:
                return True
        return False

    def query_sent(self, now: float) -> None:
        self._last_query = now
        self._jitter = self._rng.uniform(0.0, JITTER_FRACTION)

    def next_wakeup(self, now: float) -> float:
        """The next time ``expire`` or ``query_due`` could change its answer."""
        times = [now + 60.0]
        for p in self._peers.values():
            times.append(p.last_heard + p.ttl)
            refresh = p.last_heard + (REFRESH_FRACTION + self._jitter) * p.ttl
            retry = self._last_query + max(MIN_QUERY_SPACING, RETRY_FRACTION * p.ttl)
            times.append(max(refresh, retry))
        return max(min(times), now + 0.05)


# --- the thread-safe handoff into trio ----------------------------------------------


@dataclass(frozen=True)
class Heard:
    """Backend note: fresh records about ``name`` (with its current data)."""

    name: str
    properties: Mapping[bytes, bytes | None]
    addresses: tuple[str, ...]
    port: int
    ttl: float


@dataclass(frozen=True)
class Goodbye:
    """Backend note: ``name`` said goodbye (TTL-0 records) or its PTR expired."""

    name: str


Note = Heard | Goodbye
Post = Callable[[Note], None]


class TrioInbox:
    """Carries notes from a foreign thread into trio without ever blocking it.

    ``trio.from_thread.run_sync`` would make zeroconf's event-loop thread wait
    for the trio loop (and so stall mDNS for as long as trio is busy); instead
    ``post`` schedules a non-blocking ``send_nowait`` on an unbounded channel
    with ``TrioToken.run_sync_soon``, the primitive ``from_thread`` is built on.
    The channel is unbounded but its producer is bounded: one note per
    received mDNS packet about our service type.
    """

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._send, self.receive = trio.open_memory_channel[Note](math.inf)

    def post(self, note: Note) -> None:
        try:
            self._token.run_sync_soon(self._deliver, note)
        except trio.RunFinishedError:
            pass

    def _deliver(self, note: Note) -> None:
        try:
            self._send.send_nowait(note)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def close(self) -> None:
        self._send.close()


# --- the mDNS backend ----------------------------------------------------------------


class MdnsBackend(Protocol):
    """The mDNS stack. Every method but ``send_query`` may block (trio calls
    them in a worker thread); ``send_query`` must be thread-safe and return at
    once. Reports arrive through the ``post`` given to ``start``."""

    def start(self, post: Post) -> None: ...

    def register(self, local: LocalService, ttl: int) -> None: ...

    def update(self, local: LocalService, ttl: int) -> None: ...

    def send_query(self) -> None: ...

    def close(self) -> None: ...


def _ipv4_addresses(interfaces: Sequence[str] | None) -> list[str]:
    if interfaces is not None:
        return list(interfaces)
    import ifaddr  # zeroconf's own dependency

    found = {
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and not ipaddress.IPv4Address(str(ip.ip)).is_loopback
    }
    return sorted(found)


class ZeroconfBackend:
    """MdnsBackend over python-zeroconf, with its own asyncio thread."""

    def __init__(self, interfaces: Sequence[str] | None = None) -> None:
        self._interfaces = interfaces
        self._zc: Any = None
        self._info: Any = None
        self._side: Any = None

    def start(self, post: Post) -> None:
        from zeroconf import InterfaceChoice, IPVersion, Zeroconf

        choice: Any = InterfaceChoice.All if self._interfaces is None else list(self._interfaces)
        try:
            self._zc = Zeroconf(interfaces=choice, ip_version=IPVersion.V4Only, use_asyncio=False)
        except OSError as exc:
            raise DiscoveryError(f"cannot open mDNS sockets: {exc}") from exc
        self._side = _zeroconf_side(self._zc, post)
        _on_loop(self._zc, self._side.async_start).result(timeout=5)

    def _service_info(self, local: LocalService, ttl: int) -> Any:
        from zeroconf import ServiceInfo

        label = instance_label(local.node_id)
        addresses = local.addresses if local.addresses is not None else _ipv4_addresses(self._interfaces)
        return ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=local.port,
            properties=encode_txt(local),
            server=f"{label}.local.",
            host_ttl=ttl,
            other_ttl=ttl,
            parsed_addresses=addresses,
        )

    def register(self, local: LocalService, ttl: int) -> None:
        from zeroconf import Error as ZeroconfError

        self._info = self._service_info(local, ttl)
        try:
            self._zc.register_service(self._info)
        except ZeroconfError as exc:
            raise DiscoveryError(f"cannot register {self._info.name}: {exc!r}") from exc

    def update(self, local: LocalService, ttl: int) -> None:
        self._info = self._service_info(local, ttl)
        self._zc.update_service(self._info)

    def send_query(self) -> None:
        if self._zc is not None and self._zc.loop is not None and not self._zc.loop.is_closed():
            self._zc.loop.call_soon_threadsafe(self._side.async_send_query)

    def close(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            if self._side is not None:
                _on_loop(zc, self._side.async_stop).result(timeout=5)
            if self._info is not None:
                zc.unregister_service(self._info)  # goodbye packets, RFC 6762 §10.1
        except Exception:  # the socket may be gone already: still close
            log.debug("discovery: unregister failed", exc_info=True)
        finally:
            zc.close()


def _on_loop(zc: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (sync or async) on zeroconf's loop; a concurrent Future."""

    async def call() -> Any:
        result = fn()
        if asyncio.iscoroutine(result):
            result = await result
        return result

    return asyncio.run_coroutine_threadsafe(call(), zc.loop)


def _make_side_class() -> type:
    # Defined lazily so that importing meshpos.replication.discovery stays cheap and the
    # pure parts are usable without touching zeroconf.
    from zeroconf import RecordUpdateListener, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo
    from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_A, _TYPE_PTR, _TYPE_SRV, _TYPE_TXT
    from zeroconf._dns import DNSQuestion
    from zeroconf._protocol.outgoing import DNSOutgoing

    suffix = "." + SERVICE_TYPE

    class Side(RecordUpdateListener):
        """Runs on zeroconf's loop: turns records and browser callbacks into notes."""

        def __init__(self, zc: Any, post: Post) -> None:
            super().__init__()
            self.zc = zc
            self.post = post
            self.browser: Any = None
            self.touched: set[str] = set()
            self.resolving: dict[str, asyncio.Task[None]] = {}

        def async_start(self) -> None:
            self.zc.async_add_listener(self, None)
            self.browser = AsyncServiceBrowser(self.zc, [SERVICE_TYPE], handlers=[self.on_change])

        async def async_stop(self) -> None:
            if self.browser is not None:
                await self.browser.async_cancel()
            self.zc.async_remove_listener(self)
            for task in self.resolving.values():
                task.cancel()

        def async_send_query(self) -> None:
            # No known answers on purpose: every live peer answers, and the
            # multicast answers refresh every node of the site at once.
            out = DNSOutgoing(_FLAGS_QR_QUERY)
            out.add_question(DNSQuestion(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN))
            self.zc.async_send(out)

        def on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            if state_change is ServiceStateChange.Removed:
                self.post(Goodbye(name))
            else:
                self.resolve(name)

        def async_update_records(self, zc: Any, now: float, records: list[Any]) -> None:
            for update in records:
                record = update.new
                rtype = record.type
                if rtype == _TYPE_PTR:
                    if record.name.lower() != SERVICE_TYPE:
                        continue
                    name = record.alias
                elif rtype in (_TYPE_SRV, _TYPE_TXT):
                    name = record.name
                elif rtype == _TYPE_A:
                    for srv in self.zc.cache.async_entries_with_server(record.name):
                        if srv.name.lower().endswith(suffix) and not record.is_expired(now):
                            self.touched.add(srv.name)
                    continue
                else:
                    continue
                if not name.lower().endswith(suffix):
                    continue
                if record.ttl == 0 and rtype != _TYPE_PTR:
                    self.post(Goodbye(name))  # the browser reports the PTR goodbye
                elif not record.is_expired(now):
                    self.touched.add(name)

        def async_update_records_complete(self) -> None:
            touched, self.touched = self.touched, set()
            for name in touched:
                self.resolve(name)

        def resolve(self, name: str) -> None:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if info.load_from_cache(self.zc):
                self.post_info(info)
            elif name not in self.resolving:
                self.resolving[name] = asyncio.ensure_future(self.request(name, info))

        async def request(self, name: str, info: Any) -> None:
            try:
                if await info.async_request(self.zc, RESOLVE_TIMEOUT_MS):
                    self.post_info(info)
            finally:
                self.resolving.pop(name, None)

        def post_info(self, info: Any) -> None:
            srv = self.zc.cache.get_all_by_details(info.name, _TYPE_SRV, _CLASS_IN)
            ttl = max((r.ttl for r in srv), default=DEFAULT_TTL)
            props = info.properties
            self.post(
                Heard(
                    name=info.name,
                    properties=dict(props) if props else {},
                    addresses=tuple(info.parsed_addresses()),
                    port=int(info.port or 0),
                    ttl=float(ttl),
                )
            )

    return Side


def _zeroconf_side(zc: Any, post: Post) -> Any:
    global _SIDE_CLASS
    if _SIDE_CLASS is None:
        _SIDE_CLASS = _make_side_class()
    return _SIDE_CLASS(zc, post)


_SIDE_CLASS: type | None = None


# --- the trio driver ---------------------------------------------------------------


@dataclass
class DiscoveryHandle:
    """Given to the caller by ``await nursery.start(run_discovery, ...)``."""

    local: LocalService
    ttl: int
    _backend: MdnsBackend
    _lock: trio.Lock = field(default_factory=trio.Lock)

    async def set_uplink(self, uplink: bool) -> None:
        """Re-announce our TXT with the new uplink flag (no-op if unchanged)."""
        async with self._lock:
            if self.local.uplink == uplink:
                return
            new = LocalService(**{**self.local.__dict__, "uplink": uplink})
            await trio.to_thread.run_sync(self._backend.update, new, self.ttl)
            self.local = new


async def run_discovery(
    local: LocalService,
    on_event: Callable[[DiscoveryEvent], None],
    *,
    interfaces: Sequence[str] | None = None,
    ttl: int = DEFAULT_TTL,
    backend: MdnsBackend | None = None,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[DiscoveryHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Advertise ``local`` and report peers of its site until cancelled.

    ``interfaces``: IPv4 addresses of the interfaces to use (default: all).
    ``ttl``: TTL in seconds of our records, which is also how long after the
    last answer other nodes report us gone when we vanish without a goodbye.
    On cancellation, sends goodbyes and closes the mDNS stack (shielded).
    ``task_status.started`` gets a :class:`DiscoveryHandle` once registered.
    """
    if not (isinstance(ttl, int) and ttl >= MIN_TTL):
        raise InputError(f"discovery: ttl must be an int >= {MIN_TTL} s")
    mdns: MdnsBackend = backend if backend is not None else ZeroconfBackend(interfaces)
    table = PeerTable(local.site_id, local.node_id, rng)
    inbox = TrioInbox()
    wake = trio.Event()

    async def pump() -> None:
        nonlocal wake
        async for note in inbox.receive:
            now = trio.current_time()
            if isinstance(note, Heard):
                events = table.observe(note.name, note.properties, note.addresses, note.port, note.ttl, now)
            else:
                events = table.goodbye(note.name)
            for event in events:
                on_event(event)
            wake.set()

    async def liveness() -> None:
        nonlocal wake
        while True:
            now = trio.current_time()
            for event in table.expire(now):
                on_event(event)
            if table.query_due(now):
                mdns.send_query()
                table.query_sent(now)
            wake = trio.Event()
            with trio.move_on_at(table.next_wakeup(trio.current_time())):
                await wake.wait()

    try:
        async with trio.open_nursery() as nursery:
            await trio.to_thread.run_sync(mdns.start, inbox.post)
            nursery.start_soon(pump)
            nursery.start_soon(liveness)
            await trio.to_thread.run_sync(mdns.register, local, ttl)
            task_status.started(DiscoveryHandle(local, ttl, mdns))
    finally:
        inbox.close()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await trio.to_thread.run_sync(mdns.close, abandon_on_cancel=True)


def local_addresses(interfaces: Iterable[str] | None = None) -> list[str]:
    """The IPv4 addresses we would advertise (for diagnostics and the CLI)."""
    return _ipv4_addresses(list(interfaces) if interfaces is not None else None)


__all__ = [
    "DEFAULT_TTL",
    "DiscoveryError",
    "DiscoveryEvent",
    "DiscoveryHandle",
    "MdnsBackend",
    "PeerGone",
    "PeerSeen",
    "PeerTable",
    "ZeroconfBackend",
    "run_discovery",
]
