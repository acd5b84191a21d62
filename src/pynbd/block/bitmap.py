"""Dirty bitmaps: which parts of a node were written since a point in time.

Owns ``DirtyBitmap`` (one bitmap: a bit per ``granularity`` bytes of the
node, set by every write, zeroing or trim that reaches the node while the
bitmap is enabled) and ``BitmapSet`` (the bitmaps of one node, by name, as
qemu keeps them per block node).  The set records writes through
``record``; ``pynbd.block.tracking`` calls it for every write that reaches the
node, whichever parent or export it came through.

Rules of this module:
- Pure data: no I/O, no event loop.  Persistence (qcow2's bitmaps extension)
  loads and stores the bits through ``to_bytes``/``from_bytes``, in qcow2's
  bit order (bit ``i`` of the image is bit ``i % 8`` of byte ``i // 8``).
- Granularity is a power of two from 512 B to 2 GiB, as qemu's.
- Marking a range and finding runs are done a byte (or a run of bytes) at a
  time by C code (slice assignment, ``re`` searches), never a bit at a time
  in Python over a whole range, so a write costs the same on a 1 TiB node.
- A bitmap's ``busy`` count is the number of exports (or jobs) using it;
  qemu refuses to change or remove a busy bitmap, and so do the callers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
#: qemu's default granularity for nodes without a cluster size of their own
DEFAULT_GRANULARITY = 64 << 10

_NONZERO = re.compile(rb"[^\x00]")
_NONFULL = re.compile(rb"[^\xff]")
#: low bits set from bit ``i`` up (``_FROM[i]``) and below bit ``i`` (``_BELOW[i]``)
_FROM = [(0xFF << i) & 0xFF for i in range(8)]
_BELOW = [(1 << i) - 1 for i in range(9)]


class BitmapError(ValueError):
    """A bitmap operation that qemu would refuse; the message is qemu's."""


def check_granularity(granularity: int) -> None:
    if granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY \
            or granularity & (granularity - 1):
        raise BitmapError("Granularity must be power of 2 between 512 and 2147483648")


class DirtyBitmap:
    """One dirty bitmap over ``size`` bytes.

    Args:
        name: its name on the node (qemu: at most 1023 bytes).
        size: the node's size in bytes.
        granularity: bytes per bit.
        enabled: whether writes are recorded.
        persistent: stored in the node's image (qcow2) when it closes.
    """

    def __init__(self, name: str, size: int, granularity: int = DEFAULT_GRANULARITY, *,
                 enabled: bool = True, persistent: bool = False) -> None:
        check_granularity(granularity)
        self.name = name
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.enabled = enabled
        self.persistent = persistent
        #: the image said the bitmap may have missed writes (qemu: inconsistent)
        self.inconsistent = False
        #: loaded from an image opened read-only: it cannot be stored, so no change
        #: is allowed (qemu's readonly bitmaps)
        self.readonly = False
        #: exports or jobs using it: no change or removal meanwhile
        self.busy = 0
        self.bits_count = (size + granularity - 1) >> self.shift
        self._bits = bytearray((self.bits_count + 7) >> 3)

    def __repr__(self) -> str:
        return (f"DirtyBitmap({self.name!r}, size={self.size}, "
                f"granularity={self.granularity}, dirty={self.count()})")

    # -- changing --------------------------------------------------------------------

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The bits ``[first, end)`` a byte range touches (clipped to the node)."""
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return 0, 0
        return offset >> self.shift, ((end - 1) >> self.shift) + 1

    def set(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset + length)`` dirty (every granule it touches)."""
        self._fill(*self._span(offset, length), value=True)

    def reset(self, offset: int, length: int) -> None:
        """Mark clean the granules wholly inside ``[offset, offset + length)`` (qemu's
        ``bdrv_reset_dirty_bitmap``, which works on whole granules)."""
        end = min(offset + length, self.size)
        first = (offset + self.granularity - 1) >> self.shift
        last = (end >> self.shift) if end < self.size else self.bits_count
        if last > first:
            self._fill(first, last, value=False)

    def clear(self) -> None:
        self._bits[:] = bytes(len(self._bits))

    def fill(self) -> None:
        """Every granule dirty."""
        self._fill(0, self.bits_count, value=True)

    def merge(self, other: DirtyBitmap) -> None:
        """Add ``other``'s dirty bits (qemu's merge: same size; any granularity)."""
        if other.size != self.size:
            raise BitmapError("Bitmaps are incompatible and can't be merged")
        if other.granularity == self.granularity:
            merged = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits,
                                                                            "little")
            self._bits[:] = merged.to_bytes(len(self._bits), "little")
            return
        for start, length in other.dirty_runs(0, other.size):
            self.set(start, length)

    def _fill(self, first: int, end: int, *, value: bool) -> None:
        if end <= first:
            return
        bits = self._bits
        lo, hi = first >> 3, (end - 1) >> 3
        if lo == hi:
            mask = _FROM[first & 7] & _BELOW[((end - 1) & 7) + 1]
            bits[lo] = bits[lo] | mask if value else bits[lo] & ~mask
            return
        head, tail = _FROM[first & 7], _BELOW[((end - 1) & 7) + 1]
        if value:
            bits[lo] |= head
            bits[hi] |= tail
        else:
            bits[lo] &= ~head & 0xFF
            bits[hi] &= ~tail & 0xFF
        if hi > lo + 1:
            bits[lo + 1:hi] = (b"\xff" if value else b"\x00") * (hi - lo - 1)

    # -- reading ---------------------------------------------------------------------

    def is_dirty(self, offset: int) -> bool:
        bit = offset >> self.shift
        return bool(self._bits[bit >> 3] >> (bit & 7) & 1)

    def count(self) -> int:
        """Dirty bytes (qemu's ``count``: dirty granules times the granularity, the
        last one counted whole)."""
        return int.from_bytes(self._bits, "little").bit_count() << self.shift

    def _next(self, bit: int, end: int, *, dirty: bool) -> int:
        """The first bit from ``bit`` (before ``end``) that is dirty (or clean), else
        ``end``."""
        bits = self._bits
        while bit < end:
            byte = bits[bit >> 3]
            if not dirty:
                byte = ~byte & 0xFF
            byte &= _FROM[bit & 7]
            if byte:
                return min(end, (bit & ~7) + (byte & -byte).bit_length() - 1)
            index = (bit >> 3) + 1
            found = (_NONZERO if dirty else _NONFULL).search(bits, index, (end + 7) >> 3)
            if found is None:
                return end
            bit = found.start() << 3
        return end

    def runs(self, offset: int, length: int,
             limit: int | None = None) -> list[tuple[int, bool]]:
        """``(length, dirty)`` runs covering ``[offset, offset + length)`` (clipped to
        the node), in order, each as long as possible; at most ``limit`` of them
        (then they cover less)."""
        end = min(offset + length, self.size)
        runs: list[tuple[int, bool]] = []
        pos = offset
        end_bit = ((end - 1) >> self.shift) + 1 if end > offset else 0
        while pos < end and (limit is None or len(runs) < limit):
            bit = pos >> self.shift
            dirty = self.is_dirty(pos)
            stop_bit = self._next(bit + 1, end_bit, dirty=not dirty)
            stop = min(end, stop_bit << self.shift)
            runs.append((stop - pos, dirty))
            pos = stop
        return runs

    def dirty_runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(start, length)`` of the dirty runs in the range."""
        out: list[tuple[int, int]] = []
        pos = offset
        for run_length, dirty in self.runs(offset, length):
            if dirty:
                out.append((pos, run_length))
            pos += run_length
        return out

    # -- persistence -----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The bits, qcow2's order (bit ``i`` is bit ``i % 8`` of byte ``i // 8``)."""
        return bytes(self._bits)

    def load_bytes(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Put ``data`` (qcow2's order) at byte ``offset`` of the bits (bits past the
        end are ignored)."""
        chunk = bytes(data[:max(0, len(self._bits) - offset)])
        self._bits[offset:offset + len(chunk)] = chunk
        if self.bits_count & 7 and offset + len(chunk) == len(self._bits):
            self._bits[-1] &= _BELOW[self.bits_count & 7]

    def resize(self, size: int) -> None:
        """Follow the node's new size (new granules clean)."""
        self.size = size
        self.bits_count = (size + self.granularity - 1) >> self.shift
        want = (self.bits_count + 7) >> 3
        if want > len(self._bits):
            self._bits.extend(bytes(want - len(self._bits)))
        else:
            del self._bits[want:]
            if self.bits_count & 7:
                self._bits[-1] &= _BELOW[self.bits_count & 7]


class BitmapSet:
    """The dirty bitmaps of one node, by name, in the order they were added."""

    def __init__(self) -> None:
        self._bitmaps: dict[str, DirtyBitmap] = {}
        #: the enabled bitmaps (what ``record`` marks): kept apart for the write path
        self._recording: tuple[DirtyBitmap, ...] = ()
        #: whether any bitmap is enabled (one attribute read on the write path)
        self.recording = False

    def __iter__(self) -> Iterator[DirtyBitmap]:
        return iter(list(self._bitmaps.values()))

    def __len__(self) -> int:
        return len(self._bitmaps)

    def __contains__(self, name: object) -> bool:
        return name in self._bitmaps

    def get(self, name: str) -> DirtyBitmap | None:
        return self._bitmaps.get(name)

    def add(self, bitmap: DirtyBitmap) -> None:
        if bitmap.name in self._bitmaps:
            raise BitmapError(f"Bitmap already exists: {bitmap.name}")
        self._bitmaps[bitmap.name] = bitmap
        self.changed()

    def remove(self, name: str) -> DirtyBitmap:
        bitmap = self._bitmaps.pop(name)
        self.changed()
        return bitmap

    def changed(self) -> None:
        """Call after enabling or disabling a bitmap."""
        self._recording = tuple(b for b in self._bitmaps.values() if b.enabled)
        self.recording = bool(self._recording)

    def resize(self, size: int) -> None:
        """The node's size changed: every bitmap follows (new granules clean)."""
        for bitmap in self._bitmaps.values():
            bitmap.resize(size)

    def record(self, offset: int, length: int) -> None:
        """A write, zeroing or trim of the range reached the node."""
        for bitmap in self._recording:
            bitmap.set(offset, length)
