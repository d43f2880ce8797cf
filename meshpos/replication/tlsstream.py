"""TLS for links over a trio stream, driven through ``ssl.MemoryBIO`` by this module.

``trio.SSLStream`` returns the plaintext of one TLS record per ``receive_some`` and yields to the
scheduler after each, so a link reader that finds five records in one socket read runs its whole
path five times (trio's retry loop, the session's processing, a wake-up of every writer). Here
``receive_some`` returns the plaintext of every whole record already received, with no wait for
more: a sender that wrote several frames while the reader was busy is read in one go. Sending is
the same as trio's: the whole buffer encrypted in one ``SSLObject.write`` and one transport write.

What it keeps of ``trio.SSLStream``'s contract, as the link driver uses it: ``do_handshake``,
``getpeercert``, ``send_all``, ``receive_some`` (``b""`` after the peer's close_notify),
``aclose`` (sends close_notify, does not wait for the peer's); a TLS error, or the transport's
end without close_notify, is ``trio.BrokenResourceError`` (its ``__cause__`` the ssl error), a
call after ``aclose`` ``trio.ClosedResourceError``, two tasks receiving (or sending) at once
``trio.BusyResourceError``. TLS 1.3 only (meshpos.replication.tls): no renegotiation.
"""

from __future__ import annotations

import ssl

import trio

TRANSPORT_READ = 65536


class LinkTLSStream(trio.abc.Stream):
    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, *, server_side: bool) -> None:
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._send_lock = trio.StrictFIFOLock()  # the reader may have TLS bytes to send too
        self._receiving = False
        self._sending = False
        self._closed = False
        self._broken: BaseException | None = None
        self._eof = False
        self._handshaken = False

    # -- the stream interface -----------------------------------------------------------

    async def do_handshake(self) -> None:
        self._check()
        while True:
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                await self._flush_quietly()  # the alert tells the peer why
                raise self._break(exc) from exc
            await self._flush()
            if done:
                self._handshaken = True
                return
            await self._fill()

    def getpeercert(self, binary_form: bool = False) -> object:
        return self._ssl.getpeercert(binary_form=binary_form)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this link's TLS stream")
        self._receiving = True
        try:
            self._check()
            limit = TRANSPORT_READ if max_bytes is None else max_bytes
            if limit < 1:
                raise ValueError("max_bytes must be >= 1")
            data = self._decrypt(limit)
            if data or self._eof:
                await trio.lowlevel.checkpoint()
                return data
            while True:
                await self._fill()
                data = self._decrypt(limit)
                if self._outgoing.pending:  # a post-handshake message of the peer wants an answer
                    await self._flush()
                if data or self._eof:
                    return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this link's TLS stream")
        self._sending = True
        try:
            self._check()
            if not data:
                await trio.lowlevel.checkpoint()
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[self._ssl.write(view):]
            except ssl.SSLError as exc:
                raise self._break(exc) from exc
            await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._broken is None and self._handshaken:
                try:
                    self._ssl.unwrap()  # close_notify; the peer's is not waited for
                except ssl.SSLError:
                    pass
                await self._flush_quietly()
        finally:
            await self.transport_stream.aclose()

    # -- inside --------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the link's TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("the link's TLS stream is broken") from self._broken

    def _break(self, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = exc
        return trio.BrokenResourceError(str(exc))

    def _decrypt(self, limit: int) -> bytes:
        """The plaintext of the whole records in the incoming buffer, up to ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while size < limit and not self._eof:
            try:
                chunk = self._ssl.read(limit - size)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                self._eof = True
                break
            except ssl.SSLError as exc:
                raise self._break(exc) from exc
            if not chunk:
                self._eof = True
                break
            parts.append(chunk)
            size += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _fill(self) -> None:
        try:
            raw = await self.transport_stream.receive_some(TRANSPORT_READ)
        except (trio.BrokenResourceError, OSError) as exc:
            raise self._break(exc) from exc
        if not raw:
            eof = ssl.SSLEOFError("the peer closed the connection without close_notify")
            raise self._break(eof) from eof
        self._incoming.write(raw)

    async def _flush(self) -> None:
        async with self._send_lock:
            out = self._outgoing.read()
            if out:
                try:
                    await self.transport_stream.send_all(out)
                except (trio.BrokenResourceError, OSError) as exc:
                    raise self._break(exc) from exc

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
