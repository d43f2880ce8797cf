"""The thin trio side of links: move bytes between a stream and a SyncSession.

``run_link`` drives one session over any ``trio.abc.Stream``; ``connect_link``
and ``serve_links`` add TCP, the TLS 1.3 handshake and the identity check.
Whatever one peer does (garbage, stalls, resets, a failed handshake), its task
ends with a logged reason and never raises into the caller's nursery, so one
misbehaving link cannot stop the node or its other links. Inbound connections
are bounded (meshpos.infra.netguard, numbers in meshpos.replication.planner): one that has not
finished its TLS handshake and HELLO within ``AUTH_TIMEOUT`` is closed; past a cap
a new one makes room by closing an old unauthenticated one, or is closed at once.
"""

from __future__ import annotations

import logging
import math
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import trio

from meshpos.infra.clock import Clock
from meshpos.domain.errors import MeshposError, VerificationError
from meshpos.replication.planner import AUTH_TIMEOUT, MAX_INBOUND, MAX_PENDING_INBOUND, MAX_PENDING_PER_SOURCE
from meshpos.infra.netguard import InboundGate, InboundLimits, serve_bounded
from meshpos.site.roster import Roster
from meshpos.replication.sync import Replicator, SyncSession
from meshpos.replication import tls
from meshpos.replication.tlsstream import LinkTLSStream

if TYPE_CHECKING:
    from cryptography import x509


log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
READ_SIZE = 65536
INBOUND = InboundLimits(total=MAX_INBOUND, pending=MAX_PENDING_INBOUND, per_source=MAX_PENDING_PER_SOURCE,
                        proof_timeout=AUTH_TIMEOUT)


@dataclass
class LinkEndpoint:
    """What a node needs to open and accept links."""

    replicator: Replicator
    roster: Roster
    ca_cert: "x509.Certificate"
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext
    clock: Clock
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    @classmethod
    def from_files(cls, replicator: Replicator, roster: Roster, ca_cert: "x509.Certificate", cert_path: Path,
                   key_path: Path, ca_pem: bytes, clock: Clock) -> "LinkEndpoint":
        return cls(replicator, roster, ca_cert, tls.server_context(cert_path, key_path, ca_pem),
                   tls.client_context(cert_path, key_path, ca_pem), clock)


async def run_link(stream: trio.abc.Stream, session: SyncSession, clock: Clock,
                   opened: Callable[[], None] | None = None) -> str:
    """Drive ``session`` over ``stream`` until the link closes; returns the reason. Never raises
    (but cancellation). ``opened`` is called once the peer's HELLO is accepted."""
    wake = trio.Event()

    def wakeup() -> None:
        wake.set()

    session.wakeup = wakeup

    async def reader() -> None:
        nonlocal opened
        while not session.closed:
            try:
                data = bytes(await stream.receive_some(READ_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = exc.__cause__ or exc
                log.info("link %s: read failed: %s", session.label, cause)
                data = b""
            session.receive_data(data)  # calls wakeup() itself when there is something to send
            if opened is not None and session.peer_node is not None:
                opened()
                opened = None
            if not data or session.closed:
                wake.set()
                return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            while True:
                data = session.data_to_send()
                if data:
                    try:
                        await stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        if not session.closed:
                            session.receive_data(b"")
                        log.info("link %s: write failed: %s", session.label, exc.__cause__ or exc)
                        break
                    continue
                if session.closed:
                    break
                wake = trio.Event()
                if session.wants_write:
                    continue
                deadline = session.next_deadline()
                delay = deadline - clock.monotonic()
                if math.isfinite(delay):
                    with trio.move_on_after(max(0.0, delay)):
                        await wake.wait()
                else:
                    await wake.wait()
                # the timers only when one is due: a wake-up for a frame to write (most of them
                # under load) has nothing for them to do
                if clock.monotonic() >= deadline:
                    session.tick()
            nursery.cancel_scope.cancel()
    except Exception as exc:  # a bug must cost one link, not the node
        log.exception("link %s: unexpected failure", session.label)
        if not session.closed:
            session.close(f"internal error: {type(exc).__name__}")
    finally:
        session.wakeup = None
        if not session.closed:  # cancelled: the replicator must not keep a session nobody drives
            session.close("link task ended")
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:  # a half-dead TLS stream may fail to close politely
                pass
    reason = session.close_reason or "link ended"
    return reason


async def _handshake(endpoint: LinkEndpoint, stream: LinkTLSStream, where: str) -> tls.LinkPeer | None:
    try:
        with trio.fail_after(endpoint.handshake_timeout):
            await stream.do_handshake()
        return tls.peer_identity(stream, endpoint.ca_cert, endpoint.roster, endpoint.clock.now_ms())
    except trio.TooSlowError:
        log.warning("refused link %s: TLS handshake not finished within %gs", where, endpoint.handshake_timeout)
    except trio.BrokenResourceError as exc:
        log.warning("refused link %s: TLS handshake failed: %s", where, exc.__cause__ or exc)
    except VerificationError as exc:
        log.warning("refused link %s: %s", where, exc)
    except MeshposError as exc:
        log.warning("refused link %s: %s", where, exc)
    await trio.aclose_forcefully(stream)
    return None


async def _link(endpoint: LinkEndpoint, stream: LinkTLSStream, where: str,
                task_status: trio.TaskStatus[SyncSession | None], opened: Callable[[], None] | None = None) -> str:
    peer = await _handshake(endpoint, stream, where)
    if peer is None:
        task_status.started(None)
        return "refused"
    session = endpoint.replicator.open_session(label=f"{peer.identity.name}/{peer.node_id}@{where}",
                                               expect_node=peer.node_id, read_only=peer.read_only)
    log.info("link %s: authenticated %s (%s)%s", where, peer.node_id, peer.identity.role,
             ", read-only" if peer.read_only else "")
    task_status.started(session)
    reason = await run_link(stream, session, endpoint.clock, opened)
    log.info("link %s ended: %s", session.label, reason)
    return reason


async def connect_link(endpoint: LinkEndpoint, host: str, port: int, *,
                       task_status: trio.TaskStatus[SyncSession | None] = trio.TASK_STATUS_IGNORED) -> str:
    """Dial a peer and run the link until it ends; ``started`` gets the session (None: refused)."""
    where = f"{host}:{port}"
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        log.info("cannot reach %s: %s", where, exc)
        task_status.started(None)
        return f"unreachable: {exc}"
    stream = LinkTLSStream(tcp, endpoint.client_ctx, server_side=False)
    return await _link(endpoint, stream, where, task_status)


async def serve_links(endpoint: LinkEndpoint, host: str, port: int, *, limits: InboundLimits = INBOUND,
                      task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept links on host:port forever; ``started`` gets the listeners (their port if 0 was asked)."""
    gate = InboundGate(limits)

    async def handler(tcp: trio.SocketStream, source: str, where: str, proved: Callable[[], None]) -> None:
        with trio.CancelScope(deadline=trio.current_time() + limits.proof_timeout) as scope:
            def opened() -> None:
                scope.deadline = math.inf  # authenticated: from now on the link protocol's own timers
                proved()
            try:
                stream = LinkTLSStream(tcp, endpoint.server_ctx, server_side=True)
                await _link(endpoint, stream, where, trio.TASK_STATUS_IGNORED, opened)
            except Exception:
                log.exception("link %s: unexpected failure", where)
        if scope.cancelled_caught:
            log.warning("refused link %s: no TLS handshake and HELLO within %gs", where, limits.proof_timeout)

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)  # bound: the kernel queues connections until the loop accepts them
    await serve_bounded(handler, listeners, gate, what="link")
