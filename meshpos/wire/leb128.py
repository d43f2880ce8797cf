"""LEB128, the variable-length integer of Automerge's binary formats (changes, sync messages) and
of the ``held`` vector in statuses: 7 bits a byte, low group first, the high bit set on every byte
but the last; the signed form keeps the sign in bit 6 of the last byte. Encoders here write the
shortest form, as Automerge does; ``Reader`` reads any form (canonical checks compare what it read
with what the encoders write). Pure: no I/O."""

from __future__ import annotations


class Truncated(Exception):
    """The input ended inside a number or a field (``Reader``), or a number ran past 64 bits."""


_ONE_BYTE = tuple(bytes([n]) for n in range(128))


def uleb128(n: int) -> bytes:
    if 0 <= n < 128:  # nearly every number of a change header
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def sleb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40):
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


class Reader:
    """Reads LEB128 numbers and byte strings from ``data[pos:end]``; ``Truncated`` past the end."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def uleb(self) -> int:
        if self.pos < self.end and self.data[self.pos] < 0x80:  # one byte: nearly every field
            self.pos += 1
            return self.data[self.pos - 1]
        return self._varint()[0]

    def sleb(self) -> int:
        result, bits, last = self._varint()
        return result - (1 << bits) if last & 0x40 else result

    def _varint(self) -> tuple[int, int, int]:
        """A LEB128 number's bits, how many bits it has, and its last byte (for the sign)."""
        result, shift = 0, 0
        while True:
            if self.pos >= self.end or shift > 63:
                raise Truncated
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result, shift, byte

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise Truncated
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def done(self) -> bool:
        return self.pos >= self.end
