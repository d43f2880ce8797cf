"""The link protocol as a sans-IO state machine (protocols/link.md).

Bytes go in with ``receive_data(data, now)``, events come out of
``next_event()``, ``send(event)`` returns the bytes to write, ``tick(now)``
runs the timers and returns keep-alive bytes. No socket, no clock of its own:
``now`` is monotonic seconds given by the caller.

States and transitions (the only ones):

    AWAIT_HELLO --recv HELLO, common version, same site, not self--> OPEN
    AWAIT_HELLO --recv HELLO, no common version / other site / self--> CLOSED  (Closed event)
    AWAIT_HELLO --recv any other frame--------------------------------> CLOSED  (out of order)
    AWAIT_HELLO --no HELLO within hello_timeout (tick)----------------> CLOSED
    OPEN        --recv SUMMARY/SYNC/SNAPSHOT/HAVE/PING/PONG-----------> OPEN    (event)
    OPEN        --recv STATUS on a version-1 link---------------------> CLOSED
    OPEN        --recv PUSH on a version-1 or -2 link-----------------> CLOSED
    OPEN        --recv IHAVE/PRUNE/GRAFT on a link below version 4----> CLOSED
    OPEN        --recv HELLO------------------------------------------> CLOSED  (out of order)
    OPEN        --recv DRAIN on a link below version 5----------------> CLOSED
    OPEN        --drain(now): DRAIN sent (version 5; below, nothing is
                  sent and the link only lingers)-----------------------> OPEN    (draining)
    OPEN        --recv DRAIN, none sent yet---------------------------> OPEN    (Drain event; the
                  caller answers with drain(now))
    OPEN        --recv DRAIN after sending ours-----------------------> CLOSED  (drained)
    OPEN        --draining for drain_timeout (tick)-------------------> CLOSED  (not an error)
    OPEN        --recv after the peer's DRAIN anything but PUSH, PING,
                  PONG, GOODBYE---------------------------------------> CLOSED
    OPEN        --recv PONG with no PING outstanding / wrong nonce----> CLOSED
    OPEN        --nothing received within idle_timeout (tick)---------> CLOSED
    any         --recv GOODBYE----------------------------------------> CLOSED  (Closed, by_peer)
    any         --bad frame, bad payload, oversize, EOF, partial frame
                  older than frame_timeout----------------------------> CLOSED
    any         --send Goodbye----------------------------------------> CLOSED

Our HELLO is the first thing ``start()`` returns; both ends send HELLO at
once, so there is no client/server asymmetry. Every way in to CLOSED yields
exactly one ``Closed(reason)`` event; after that the connection ignores input.
The caller answers a Closed it did not ask for with ``send(Goodbye(reason))``
(empty bytes if a GOODBYE was sent already), as wsproto's CloseConnection.

Draining (version 5, protocols/link.md "Draining a link"): the end that closes a link it no
longer needs calls ``drain(now)``; from then on it sends only PUSH (until the peer's DRAIN),
PING, PONG and GOODBYE. The peer answers with its own DRAIN (after any PUSH it had waiting),
after which it sends only PING, PONG and GOODBYE. The first end closes on that answer: every frame the peer sent has arrived.
Either end closes ``drain_timeout`` after its own DRAIN whatever the peer does.
"""

from __future__ import annotations

import enum
import itertools
import struct
from dataclasses import dataclass, field
from typing import Any, Union

from meshpos.domain.roles import ROLES
from meshpos.domain.errors import EncodingError, ProtocolError
from meshpos.wire import canonical
from meshpos.wire.link_frames import MAX_PAYLOAD, Frame, FrameDecoder, FrameType, encode_frame
from meshpos.wire.shards import valid_shard_name

SUPPORTED_VERSIONS = (1, 2, 3, 4, 5)
STATUS_VERSION = 2  # the first version with STATUS frames
PUSH_VERSION = 3  # the first version with PUSH frames
TREE_VERSION = 4  # the first version with IHAVE, PRUNE and GRAFT (push trees)
DRAIN_VERSION = 5  # the first version with DRAIN (a graceful close)
CHANGE_HASH_LEN = 32  # an Automerge change hash (SHA-256)
MAX_ORIGINS = 256  # node ids in one PRUNE or GRAFT
MAX_STATUS = 8192  # one signed envelope (protocols/envelope.md)
HELLO_TIMEOUT = 10.0
IDLE_TIMEOUT = 45.0
KEEPALIVE_INTERVAL = 15.0
FRAME_TIMEOUT = 60.0
DRAIN_TIMEOUT = 2.0  # a draining link closes this long after its DRAIN, answered or not
MAX_REASON = 512
_NONCE = struct.Struct(">Q")
_LENGTH = struct.Struct(">I")
DIGEST_LEN = 8


class LinkState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    OPEN = "open"
    CLOSED = "closed"


# -- events (received and sent) ----------------------------------------------------

@dataclass(frozen=True)
class Hello:
    versions: tuple[int, ...]
    site_id: str
    node_id: str
    role: str
    summary: dict[str, bytes] = field(default_factory=dict)  # shard -> 8-byte digest


@dataclass(frozen=True)
class LinkUp:
    """The peer's HELLO was accepted; ``version`` is the one both ends speak."""

    peer: Hello
    version: int


@dataclass(frozen=True)
class Summary:
    summary: dict[str, bytes]


@dataclass(frozen=True)
class Sync:
    shard: str
    data: bytes  # one Automerge sync message


@dataclass(frozen=True)
class Snapshot:
    shard: str
    data: bytes  # one saved Automerge document


@dataclass(frozen=True)
class Have:
    """The sender's heads digest of these shards, as of now."""

    shards: dict[str, bytes]


@dataclass(frozen=True)
class Push:
    """New Automerge changes of one shard (version 3 links): ``digest`` is the sender's heads
    digest of the shard once they are applied; nothing is answered unless it differs from ours."""

    shard: str
    digest: bytes
    changes: tuple[bytes, ...]


@dataclass(frozen=True)
class Ihave:
    """Lazy announcement (version 4 links): the sender holds these changes (32-byte Automerge
    change hashes) of these shards; nothing is answered unless they fail to arrive otherwise."""

    entries: tuple[tuple[str, tuple[bytes, ...]], ...]  # (shard, change hashes), shards distinct


@dataclass(frozen=True)
class Prune:
    """(version 4) Stop pushing to me the changes of the shards of these nodes: announce them."""

    origins: tuple[str, ...]  # node ids, sorted, distinct


@dataclass(frozen=True)
class Graft:
    """(version 4) Push to me again the changes of the shards of these nodes."""

    origins: tuple[str, ...]  # node ids, sorted, distinct


@dataclass(frozen=True)
class Drain:
    """(version 5) I will close this link: graft elsewhere what it brings you eagerly, then
    answer DRAIN; ``reason`` is for the logs."""

    reason: str = ""


@dataclass(frozen=True)
class Ping:
    nonce: int


@dataclass(frozen=True)
class Pong:
    nonce: int
    rtt: float | None = None  # filled in on receipt of the answer to our own PING


@dataclass(frozen=True)
class Status:
    """One signed ``status`` envelope (version 2 links): gossip, never part of the ledger."""

    envelope: bytes


@dataclass(frozen=True)
class Goodbye:
    reason: str


@dataclass(frozen=True)
class Closed:
    reason: str
    by_peer: bool = False
    error: bool = False  # the peer broke the protocol or timed out


Event = Union[LinkUp, Summary, Sync, Snapshot, Have, Push, Ihave, Prune, Graft, Drain, Ping, Pong, Status, Closed]
Sendable = Union[Hello, Summary, Sync, Snapshot, Have, Push, Ihave, Prune, Graft, Drain, Ping, Pong, Status,
                 Goodbye]
MIN_VERSION: dict[type, int] = {Status: STATUS_VERSION, Push: PUSH_VERSION, Ihave: TREE_VERSION,
                                Prune: TREE_VERSION, Graft: TREE_VERSION,
                                Drain: DRAIN_VERSION}  # frames later versions added
_COUNT = struct.Struct(">H")


# -- payload layouts ------------------------------------------------------------------

def _digests_to_json(digests: dict[str, bytes]) -> dict[str, str]:
    return {shard: d.hex() for shard, d in digests.items()}


def _digests_from_json(obj: Any) -> dict[str, bytes]:
    if not isinstance(obj, dict):
        raise EncodingError("digest map must be an object")
    out: dict[str, bytes] = {}
    for shard, text in obj.items():
        if not valid_shard_name(shard):
            raise EncodingError(f"bad shard name {shard[:60]!r}")
        if not isinstance(text, str) or len(text) != 16 or text != text.lower():
            raise EncodingError(f"bad digest for shard {shard}")
        try:
            out[shard] = bytes.fromhex(text)
        except ValueError as exc:
            raise EncodingError(f"bad digest for shard {shard}") from exc
    return out


def _shard_payload(shard: str, data: bytes) -> bytes:
    name = shard.encode("ascii")
    return bytes([len(name)]) + name + data


def _parse_shard_payload(payload: bytes) -> tuple[str, bytes]:
    if not payload:
        raise EncodingError("empty shard payload")
    n = payload[0]
    if len(payload) < 1 + n:
        raise EncodingError("shard name runs past the payload")
    try:
        shard = payload[1:1 + n].decode("ascii")
    except UnicodeDecodeError as exc:
        raise EncodingError("shard name is not ASCII") from exc
    if not valid_shard_name(shard):
        raise EncodingError(f"bad shard name {shard[:60]!r}")
    data = payload[1 + n:]
    if not data:
        raise EncodingError(f"no data for shard {shard}")
    return shard, data


def _node_id(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v)


def _origins_payload(origins: tuple[str, ...], what: str) -> bytes:
    if (not 0 < len(origins) <= MAX_ORIGINS or list(origins) != sorted(set(origins))
            or not all(map(_node_id, origins))):
        raise ProtocolError(f"{what} needs 1..{MAX_ORIGINS} sorted distinct node ids")
    return canonical.encode({"origins": list(origins)})


def _parse_origins(payload: bytes, what: str) -> tuple[str, ...]:
    origins = _json_object(payload, {"origins"}, what)["origins"]
    if (not isinstance(origins, list) or not 0 < len(origins) <= MAX_ORIGINS or not all(map(_node_id, origins))
            or origins != sorted(set(origins))):
        raise EncodingError(f"{what} origins must be 1..{MAX_ORIGINS} sorted distinct 16-hex-digit node ids")
    return tuple(origins)


def _ihave_payload(event: Ihave) -> bytes:
    out = bytearray()
    shards: set[str] = set()
    for shard, hashes in event.entries:
        if (shard in shards or not valid_shard_name(shard) or not 0 < len(hashes) < 1 << 16
                or any(len(h) != CHANGE_HASH_LEN for h in hashes)):
            raise ProtocolError("IHAVE needs distinct valid shards, each with 1..65535 32-byte change hashes")
        shards.add(shard)
        name = shard.encode("ascii")
        out += bytes([len(name)]) + name + _COUNT.pack(len(hashes)) + b"".join(hashes)
    if not out:
        raise ProtocolError("IHAVE announces nothing")
    return bytes(out)


def _parse_ihave(payload: bytes) -> Ihave:
    entries: list[tuple[str, tuple[bytes, ...]]] = []
    seen: set[str] = set()
    at = 0
    if not payload:
        raise EncodingError("IHAVE announces nothing")
    while at < len(payload):
        n = payload[at]
        end = at + 1 + n
        if end + _COUNT.size > len(payload):
            raise EncodingError("IHAVE entry runs past the payload")
        try:
            shard = payload[at + 1:end].decode("ascii")
        except UnicodeDecodeError as exc:
            raise EncodingError("IHAVE shard name is not ASCII") from exc
        if not valid_shard_name(shard) or shard in seen:
            raise EncodingError(f"bad or repeated IHAVE shard name {shard[:60]!r}")
        seen.add(shard)
        (k,) = _COUNT.unpack_from(payload, end)
        at = end + _COUNT.size
        if k == 0 or at + k * CHANGE_HASH_LEN > len(payload):
            raise EncodingError(f"IHAVE of {shard}: no hash, or hashes run past the payload")
        entries.append((shard, tuple(payload[at + i * CHANGE_HASH_LEN:at + (i + 1) * CHANGE_HASH_LEN]
                                     for i in range(k))))
        at += k * CHANGE_HASH_LEN
    return Ihave(tuple(entries))


def encode_event(event: Sendable) -> bytes:
    """The one byte encoding of each frame (deterministic: canonical JSON or a fixed layout)."""
    if isinstance(event, Hello):
        body = {"versions": list(event.versions), "site": event.site_id, "node": event.node_id,
                "role": event.role, "summary": _digests_to_json(event.summary)}
        return encode_frame(FrameType.HELLO, canonical.encode(body))
    if isinstance(event, Summary):
        return encode_frame(FrameType.SUMMARY, canonical.encode({"summary": _digests_to_json(event.summary)}))
    if isinstance(event, Sync):
        return encode_frame(FrameType.SYNC, _shard_payload(event.shard, event.data))
    if isinstance(event, Snapshot):
        return encode_frame(FrameType.SNAPSHOT, _shard_payload(event.shard, event.data))
    if isinstance(event, Have):
        return encode_frame(FrameType.HAVE, canonical.encode({"shards": _digests_to_json(event.shards)}))
    if isinstance(event, Push):
        if len(event.digest) != DIGEST_LEN or not event.changes:
            raise ProtocolError("PUSH needs an 8-byte digest and at least one change")
        pushed = b"".join(_LENGTH.pack(len(c)) + c for c in event.changes)
        return encode_frame(FrameType.PUSH, _shard_payload(event.shard, event.digest + pushed))
    if isinstance(event, Ihave):
        return encode_frame(FrameType.IHAVE, _ihave_payload(event))
    if isinstance(event, Prune):
        return encode_frame(FrameType.PRUNE, _origins_payload(event.origins, "PRUNE"))
    if isinstance(event, Graft):
        return encode_frame(FrameType.GRAFT, _origins_payload(event.origins, "GRAFT"))
    if isinstance(event, Ping):
        return encode_frame(FrameType.PING, _NONCE.pack(event.nonce))
    if isinstance(event, Pong):
        return encode_frame(FrameType.PONG, _NONCE.pack(event.nonce))
    if isinstance(event, Status):
        if not 0 < len(event.envelope) <= MAX_STATUS:
            raise ProtocolError(f"STATUS envelope of {len(event.envelope)} bytes (1..{MAX_STATUS})")
        return encode_frame(FrameType.STATUS, event.envelope)
    if isinstance(event, Goodbye):
        return encode_frame(FrameType.GOODBYE, event.reason.encode("utf-8")[:MAX_REASON])
    if isinstance(event, Drain):
        return encode_frame(FrameType.DRAIN, event.reason.encode("utf-8")[:MAX_REASON])
    raise ProtocolError(f"cannot send {type(event).__name__}")


def _json_object(payload: bytes, keys: set[str], what: str) -> dict[str, Any]:
    obj = canonical.decode(payload)
    if not isinstance(obj, dict) or set(obj) != keys:
        raise EncodingError(f"{what} must be an object with exactly {sorted(keys)}")
    return obj


def _parse_push(payload: bytes) -> Push:
    shard, data = _parse_shard_payload(payload)
    if len(data) < DIGEST_LEN + _LENGTH.size:
        raise EncodingError("PUSH carries no change")
    digest, changes, at = data[:DIGEST_LEN], [], DIGEST_LEN
    while at < len(data):
        if len(data) - at < _LENGTH.size:
            raise EncodingError("PUSH change length is truncated")
        (n,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if n == 0 or n > len(data) - at:
            raise EncodingError("PUSH change length is zero or runs past the payload")
        changes.append(data[at:at + n])
        at += n
    return Push(shard, digest, tuple(changes))


def decode_frame(frame: Frame) -> Sendable:
    """Parse one frame's payload; EncodingError if it does not match its type's layout."""
    t, p = frame.type, frame.payload
    if t is FrameType.HELLO:
        obj = _json_object(p, {"versions", "site", "node", "role", "summary"}, "HELLO")
        versions = obj["versions"]
        if (not isinstance(versions, list) or not 1 <= len(versions) <= 16
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in versions)):
            raise EncodingError("HELLO versions must be a short list of small positive integers")
        for key in ("site", "node"):
            v = obj[key]
            if not isinstance(v, str) or len(v) != 16 or any(c not in "0123456789abcdef" for c in v):
                raise EncodingError(f"HELLO {key} must be a 16-hex-digit id")
        if obj["role"] not in ROLES:
            raise EncodingError(f"HELLO role {str(obj['role'])[:20]!r} is unknown")
        return Hello(tuple(versions), obj["site"], obj["node"], obj["role"], _digests_from_json(obj["summary"]))
    if t is FrameType.SUMMARY:
        return Summary(_digests_from_json(_json_object(p, {"summary"}, "SUMMARY")["summary"]))
    if t is FrameType.SYNC:
        return Sync(*_parse_shard_payload(p))
    if t is FrameType.SNAPSHOT:
        return Snapshot(*_parse_shard_payload(p))
    if t is FrameType.HAVE:
        return Have(_digests_from_json(_json_object(p, {"shards"}, "HAVE")["shards"]))
    if t in (FrameType.PING, FrameType.PONG):
        if len(p) != _NONCE.size:
            raise EncodingError(f"{t.name} payload must be {_NONCE.size} bytes")
        (nonce,) = _NONCE.unpack(p)
        return Ping(nonce) if t is FrameType.PING else Pong(nonce)
    if t is FrameType.STATUS:
        if not 0 < len(p) <= MAX_STATUS:
            raise EncodingError(f"STATUS payload must be 1..{MAX_STATUS} bytes")
        return Status(p)
    if t is FrameType.PUSH:
        return _parse_push(p)
    if t is FrameType.IHAVE:
        return _parse_ihave(p)
    if t is FrameType.PRUNE:
        return Prune(_parse_origins(p, "PRUNE"))
    if t is FrameType.GRAFT:
        return Graft(_parse_origins(p, "GRAFT"))
    if t in (FrameType.GOODBYE, FrameType.DRAIN):
        if len(p) > MAX_REASON:
            raise EncodingError(f"{t.name} reason too long")
        reason = p.decode("utf-8", errors="replace")
        return Goodbye(reason) if t is FrameType.GOODBYE else Drain(reason)
    raise EncodingError(f"unhandled frame type {t!r}")  # pragma: no cover - FrameType is closed


def _min_version(event: Sendable) -> int:
    return MIN_VERSION.get(type(event), 1)


# -- the machine ------------------------------------------------------------------------

@dataclass(frozen=True)
class Timeouts:
    hello: float = HELLO_TIMEOUT
    idle: float = IDLE_TIMEOUT
    keepalive: float = KEEPALIVE_INTERVAL
    frame: float = FRAME_TIMEOUT
    drain: float = DRAIN_TIMEOUT


class LinkConnection:
    def __init__(self, hello: Hello, now: float, *, timeouts: Timeouts = Timeouts(),
                 expect_node: str | None = None, max_payload: int = MAX_PAYLOAD) -> None:
        self.our_hello = hello
        self.timeouts = timeouts
        self.expect_node = expect_node
        self.state = LinkState.AWAIT_HELLO
        self.peer: Hello | None = None
        self.version: int | None = None
        self.close_reason: str | None = None
        self._decoder = FrameDecoder(max_payload)
        self._events: list[Event] = []
        self._started_at = now
        self._last_rx = now
        self._partial_since: float | None = None
        self._nonces = itertools.count(1)
        self._ping_out: tuple[int, float] | None = None
        self._goodbye_sent = False
        self._hello_sent = False
        self._drain_deadline: float | None = None  # set by drain(): the link closes then at the latest
        self._drain_sent = False
        self._drain_received = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.rtt: float | None = None

    @property
    def closed(self) -> bool:
        return self.state is LinkState.CLOSED

    @property
    def draining(self) -> bool:
        """This end has started to drain the link (``drain``), or the peer has: nothing is sent on
        it any more but PUSH (``may_push``), PING, PONG and GOODBYE."""
        return self._drain_deadline is not None or self._drain_received

    @property
    def may_push(self) -> bool:
        """PUSH may still be sent: open, and not both DRAINs (the peer's, ours) passed."""
        return self.state is LinkState.OPEN and not (self._drain_received and self._drain_sent)

    # -- output -------------------------------------------------------------------

    def start(self) -> bytes:
        """Our HELLO: the first bytes on the link."""
        return self.send(self.our_hello)

    def send(self, event: Sendable) -> bytes:
        if isinstance(event, Goodbye):
            if self._goodbye_sent:
                return b""
            self._goodbye_sent = True
            self._close(event.reason, by_peer=False, error=False)
            return self._count(encode_event(event))
        if self.state is LinkState.CLOSED:
            raise ProtocolError(f"cannot send {type(event).__name__}: link is closed")
        if isinstance(event, Drain) and (self._drain_deadline is None or self._drain_sent):
            raise ProtocolError("DRAIN is sent once, by drain(now), which arms its timer")
        if self.draining and not isinstance(event, (Ping, Pong, Drain)):
            if not (isinstance(event, Push) and self.may_push):
                raise ProtocolError(f"cannot send {type(event).__name__} on a draining link")
        if isinstance(event, Hello):
            if self._hello_sent:
                raise ProtocolError("HELLO was sent already")
            self._hello_sent = True
        elif self.state is not LinkState.OPEN or not self._hello_sent:
            raise ProtocolError(f"cannot send {type(event).__name__} before the link is open")
        elif (self.version or 0) < _min_version(event):
            raise ProtocolError(f"cannot send {type(event).__name__} on a version-{self.version} link")
        return self._count(encode_event(event))

    def _count(self, data: bytes) -> bytes:
        self.bytes_out += len(data)
        return data

    def ping(self, now: float) -> bytes:
        if self.state is not LinkState.OPEN or self._ping_out is not None:
            return b""
        nonce = next(self._nonces)
        self._ping_out = (nonce, now)
        return self.send(Ping(nonce))

    def drain(self, now: float, reason: str = "") -> bytes:
        """Start closing this link gracefully: on a version-5 link, DRAIN (the peer answers with its
        own, and we close on it); below version 5 nothing is sent and the link only lingers. Either
        way it closes ``timeouts.drain`` from now at the latest (a Closed event from ``tick``).
        Once only; empty bytes if the link is not open or drains already."""
        if self.state is not LinkState.OPEN or self._drain_deadline is not None:
            return b""
        self._drain_deadline = now + self.timeouts.drain
        if (self.version or 0) < DRAIN_VERSION:
            return b""
        data = self.send(Drain(reason))
        self._drain_sent = True
        return data

    def tick(self, now: float) -> bytes:
        """Run the timers: a timeout closes the link (Closed event); a due keep-alive returns a PING."""
        if self.state is LinkState.CLOSED:
            return b""
        if self._partial_since is not None and now - self._partial_since > self.timeouts.frame:
            self._fail(f"peer stalled mid-frame for more than {self.timeouts.frame:g}s")
            return b""
        if self.state is LinkState.AWAIT_HELLO:
            if now - self._started_at > self.timeouts.hello:
                self._fail(f"no HELLO within {self.timeouts.hello:g}s")
            return b""
        if now - self._last_rx > self.timeouts.idle:
            self._fail(f"nothing received for {self.timeouts.idle:g}s")
            return b""
        if self._drain_deadline is not None and now >= self._drain_deadline:
            if self._drain_received:
                reason = f"drained; no GOODBYE within {self.timeouts.drain:g}s"
            elif self._drain_sent:
                reason = f"DRAIN not answered within {self.timeouts.drain:g}s"
            else:
                reason = f"drained (a version-{self.version} link: no DRAIN, {self.timeouts.drain:g}s lingered)"
            self._close(reason, by_peer=False, error=False)
            return b""
        if self._ping_out is None and now - self._last_rx >= self.timeouts.keepalive:
            return self.ping(now)
        return b""

    def next_deadline(self) -> float:
        """The monotonic time at which ``tick`` has something to do."""
        if self.state is LinkState.CLOSED:
            return float("inf")
        if self.state is LinkState.AWAIT_HELLO:
            deadline = self._started_at + self.timeouts.hello
        else:
            deadline = self._last_rx + self.timeouts.idle
            if self._ping_out is None:
                deadline = min(deadline, self._last_rx + self.timeouts.keepalive)
            if self._drain_deadline is not None:
                deadline = min(deadline, self._drain_deadline)
        if self._partial_since is not None:
            deadline = min(deadline, self._partial_since + self.timeouts.frame)
        return deadline + 1e-3

    # -- input --------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self.state is LinkState.CLOSED:
            return
        if not data:
            self._fail("peer closed the connection" + (" mid-frame" if self._decoder.partial else ""),
                       by_peer=True)
            return
        self.bytes_in += len(data)
        self._last_rx = now
        self._decoder.receive_data(data)
        while not self.closed:
            try:
                frame = self._decoder.next_frame()
            except ProtocolError as exc:
                self._fail(str(exc))
                return
            if frame is None:
                break
            self._handle(frame, now)
        if not self.closed:
            if self._decoder.partial:
                if self._partial_since is None:
                    self._partial_since = now
            else:
                self._partial_since = None

    def next_event(self) -> Event | None:
        """The next event, or None: feed more data (or tick)."""
        return self._events.pop(0) if self._events else None

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _handle(self, frame: Frame, now: float) -> None:
        try:
            event = decode_frame(frame)
        except EncodingError as exc:
            self._fail(f"bad {frame.type.name} frame: {exc}")
            return
        if isinstance(event, Goodbye):
            self._close(event.reason or "peer said goodbye", by_peer=True, error=False)
            self._goodbye_sent = True  # nothing more to say to a peer that left
            return
        if self.state is LinkState.AWAIT_HELLO:
            if not isinstance(event, Hello):
                self._fail(f"{frame.type.name} before HELLO")
                return
            self._on_hello(event)
            return
        if isinstance(event, Hello):
            self._fail("second HELLO")
            return
        if (self.version or 0) < _min_version(event):
            self._fail(f"{frame.type.name} on a version-{self.version} link")
            return
        if self._drain_received and not isinstance(event, (Push, Ping, Pong)):
            # (the peer drained first, so it still pushes until our answer reaches it)
            self._fail(f"{frame.type.name} after the peer's DRAIN")
            return
        if isinstance(event, Drain):
            self._drain_received = True
            if self._drain_sent:  # the answer to ours: every frame the peer sent is in
                self._close("link drained", by_peer=False, error=False)
            else:
                self._events.append(event)
            return
        if isinstance(event, Pong):
            if self._ping_out is None or self._ping_out[0] != event.nonce:
                self._fail("PONG that answers no PING")
                return
            self.rtt = now - self._ping_out[1]
            self._ping_out = None
            self._events.append(Pong(event.nonce, self.rtt))
            return
        assert not isinstance(event, Goodbye)
        self._events.append(event)

    def _on_hello(self, hello: Hello) -> None:
        ours = self.our_hello
        common = set(ours.versions) & set(hello.versions)
        if not common:
            self._fail(f"no common protocol version (ours {list(ours.versions)}, peer's {list(hello.versions)})")
        elif hello.site_id != ours.site_id:
            self._fail(f"peer is of site {hello.site_id}, not {ours.site_id}")
        elif hello.node_id == ours.node_id:
            self._fail("link to ourselves")
        elif self.expect_node is not None and hello.node_id != self.expect_node:
            self._fail(f"peer says it is node {hello.node_id} but its certificate names {self.expect_node}")
        else:
            self.peer = hello
            self.version = max(common)
            self.state = LinkState.OPEN
            self._events.append(LinkUp(hello, self.version))

    def _fail(self, reason: str, by_peer: bool = False) -> None:
        self._close(reason, by_peer=by_peer, error=True)

    def _close(self, reason: str, by_peer: bool, error: bool) -> None:
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        self.close_reason = reason
        self._events.append(Closed(reason, by_peer=by_peer, error=error))
