"""``pattern``: a read-only test disk whose every 8-byte big-endian word holds its own
offset (as nbdkit's pattern plugin), so any read shows where it came from.

``pynbd plugin:pattern:size=1G``; options: ``size`` (required; ``1G``, ``512M``
or a number of bytes).

Rules of this module: reads are computed, never stored; a read of any length at
any offset is the slice of the infinite pattern, so unaligned reads see parts
of words.  A small read packs its words one by one; a large one is made in
pieces of ``PIECE`` bytes, each with one big-integer sum (no carry can cross a
word: every word is below 2**64), which keeps a read of many megabytes cheap
enough to run on the event loop (``blocking = False``).
"""

from __future__ import annotations

import struct

from . import parse_size

#: reads of up to this many words are packed word by word
SMALL = 4096

#: bytes made per big-integer sum
PIECE = 1 << 20
_WORDS = PIECE // 8
#: word k (of a piece) holds k * 8 ...
_STEPS = int.from_bytes(b"".join((k * 8).to_bytes(8, "big") for k in range(_WORDS)), "big")
#: ... plus the piece's first offset, added to every word at once
_ONES = int.from_bytes(b"\0\0\0\0\0\0\0\1" * _WORDS, "big")


def pattern_bytes(offset: int, length: int) -> bytes:
    """The pattern's bytes from ``offset``: big-endian words that hold their offsets."""
    start = offset - offset % 8
    end = offset + length
    skip = offset - start
    words = (end - start + 7) // 8
    if words <= SMALL:
        data = struct.pack(f">{words}Q", *range(start, start + 8 * words, 8))
        return data[skip:skip + length]
    out = bytearray()
    base = start
    while base < end:
        out += (_STEPS + base * _ONES).to_bytes(PIECE, "big")
        base += PIECE
    return bytes(out[skip:skip + length])


class PatternDisk:
    """A read-only disk of ``size`` bytes holding the offset pattern."""

    #: reads are computed quickly: call them on the event loop, no thread
    blocking = False

    def __init__(self, size: str) -> None:
        self._size = parse_size(size)
        if self._size >= 1 << 63:
            raise ValueError(f"size {size} is too large")

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return pattern_bytes(offset, length)
