"""The link frame codec, and nothing else (protocols/link.md, "Frames").

A frame is ``length (u32 big-endian) | type (u8) | payload``, where ``length``
counts the payload only. A length over MAX_PAYLOAD or an unknown type is a
protocol error as soon as the 5-byte header is in: the decoder never buffers
more than one frame's worth of a hostile peer's bytes. The decoder never
blocks: ``next_frame`` returns None when it needs more data.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from meshpos.domain.errors import ProtocolError

HEADER = struct.Struct(">IB")
HEADER_LEN = HEADER.size
MAX_PAYLOAD = 4 * 1024 * 1024  # a one-shard snapshot is well under 1 MiB


class FrameType(enum.IntEnum):
    HELLO = 1
    SUMMARY = 2
    SYNC = 3
    SNAPSHOT = 4
    HAVE = 5
    PING = 6
    PONG = 7
    GOODBYE = 8
    STATUS = 9  # version 2 links only
    PUSH = 10  # version 3 links only
    IHAVE = 11  # version 4 links only
    PRUNE = 12  # version 4 links only
    GRAFT = 13  # version 4 links only
    DRAIN = 14  # version 5 links only


@dataclass(frozen=True)
class Frame:
    type: FrameType
    payload: bytes


def encode_frame(type_: FrameType, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), int(FrameType(type_))) + payload


class FrameDecoder:
    """Bytes in, whole frames out. Once it has raised, it stays broken."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload
        self._broken: ProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        if self._broken is None:
            self._buf += data

    @property
    def partial(self) -> bool:
        """True while part of a frame is buffered (the peer is mid-frame)."""
        return bool(self._buf)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        if self._broken is not None:
            raise self._broken
        if len(self._buf) < HEADER_LEN:
            return None
        length, code = HEADER.unpack_from(self._buf)
        if length > self._max:
            self._broken = ProtocolError(f"frame length {length} exceeds the maximum of {self._max}")
            raise self._broken
        try:
            type_ = FrameType(code)
        except ValueError as exc:
            self._broken = ProtocolError(f"unknown frame type {code}")
            raise self._broken from exc
        end = HEADER_LEN + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_LEN:end])
        del self._buf[:end]
        return Frame(type_, payload)
