"""Unsigned LEB128, the variable-length integer of Automerge's sync messages and of the ``held``
vector in statuses: 7 bits a byte, low group first, the high bit set on every byte but the last."""

from __future__ import annotations


def uleb128(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)
