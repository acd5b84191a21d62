"""A sparse in-memory disk shared by every connection.

Rules of this module:
- Data lives in fixed ``CHUNK_SIZE`` chunks (``bytearray``) in a dict keyed by
  chunk index; an absent chunk is a hole that reads as zeroes.
- No method awaits anything, so each call runs to completion without
  interleaving: every completed write is visible to the next read from anyone,
  and ``flush`` has nothing to do (memory is this backend's durable store).
- Copies go through ``memoryview`` slice assignment; there are no per-byte loops.
"""

from __future__ import annotations

import bisect

from .base import Backend, Capabilities, Extent, ExtentFlags

#: Allocation granularity; also the granularity of holes in ``block_status``.
CHUNK_SIZE = 64 * 1024

#: ``block_status`` returns at most this many extents per call.
MAX_EXTENTS = 100_000

_ZEROES = memoryview(bytes(CHUNK_SIZE))


class MemoryBackend(Backend):
    """A sparse RAM disk of ``size`` bytes, lost when the process exits."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must not be negative, got {size}")
        self.size = size
        self.capabilities = Capabilities(inline_reads=True)
        self._chunks: dict[int, bytearray] = {}
        #: sorted chunk indices present in ``_chunks`` (for ``block_status``)
        self._keys: list[int] = []

    # -- chunk bookkeeping -------------------------------------------------

    def _chunk_for_write(self, index: int) -> bytearray:
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = bytearray(CHUNK_SIZE)
            bisect.insort(self._keys, index)
        return chunk

    def _drop(self, index: int) -> None:
        if self._chunks.pop(index, None) is not None:
            del self._keys[bisect.bisect_left(self._keys, index)]

    def _spans(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Split a range into ``(chunk index, start in chunk, count)`` pieces."""
        spans = []
        end = offset + length
        while offset < end:
            index, start = divmod(offset, CHUNK_SIZE)
            count = min(CHUNK_SIZE - start, end - offset)
            spans.append((index, start, count))
            offset += count
        return spans

    def _chunk_limit(self, index: int) -> int:
        """Bytes of chunk ``index`` that lie inside the disk."""
        return min(CHUNK_SIZE, self.size - index * CHUNK_SIZE)

    # -- I/O -------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        self.pread_nowait(buf, offset)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        out = buf.cast("B") if buf.format != "B" else buf
        pos = 0
        for index, start, count in self._spans(offset, len(out)):
            chunk = self._chunks.get(index)
            if chunk is None:
                out[pos:pos + count] = _ZEROES[:count]
            else:
                out[pos:pos + count] = memoryview(chunk)[start:start + count]
            pos += count
        return True

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        self.pwrite_nowait(data, offset)

    def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
        src = memoryview(data).cast("B")
        pos = 0
        for index, start, count in self._spans(offset, len(src)):
            if count == CHUNK_SIZE and index not in self._chunks:
                # a whole new chunk: build it from the data (no zero-fill, one copy)
                self._chunks[index] = bytearray(src[pos:pos + count])
                bisect.insort(self._keys, index)
            else:
                chunk = self._chunk_for_write(index)
                memoryview(chunk)[start:start + count] = src[pos:pos + count]
            pos += count
        return True

    async def flush(self) -> None:
        return None

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._zero_range(offset, length, allocate=False)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        self._zero_range(offset, length, allocate=not may_trim)

    def _zero_range(self, offset: int, length: int, *, allocate: bool) -> None:
        """Make a range read as zeroes.

        With ``allocate`` every chunk touched exists afterwards (NO_HOLE);
        otherwise fully covered chunks are dropped and partial ones that
        exist are zeroed in place.
        """
        if length <= 0:
            return
        first = offset // CHUNK_SIZE
        last = (offset + length - 1) // CHUNK_SIZE
        if not allocate and last - first + 1 > len(self._keys):
            # A huge trim over a sparse disk: visit only the chunks that exist.
            lo = bisect.bisect_left(self._keys, first)
            hi = bisect.bisect_right(self._keys, last)
            indices = self._keys[lo:hi]
        else:
            indices = list(range(first, last + 1))
        end = offset + length
        for index in indices:
            base = index * CHUNK_SIZE
            start = max(offset, base) - base
            stop = min(end, base + CHUNK_SIZE) - base
            covers_chunk = start == 0 and stop >= self._chunk_limit(index)
            if allocate:
                chunk = self._chunk_for_write(index)
            elif covers_chunk:
                self._drop(index)
                continue
            else:
                existing = self._chunks.get(index)
                if existing is None:
                    continue
                chunk = existing
            memoryview(chunk)[start:stop] = _ZEROES[:stop - start]

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        extents: list[Extent] = []
        keys = self._keys
        pos = offset
        while pos < end and len(extents) < MAX_EXTENTS:
            index = pos // CHUNK_SIZE
            j = bisect.bisect_left(keys, index)
            if j < len(keys) and keys[j] == index:
                # allocated run: follow consecutive chunk indices
                while j + 1 < len(keys) and keys[j + 1] == keys[j] + 1 \
                        and (keys[j] + 1) * CHUNK_SIZE < end:
                    j += 1
                run_end = (keys[j] + 1) * CHUNK_SIZE
                flags = ExtentFlags.DATA
            else:
                run_end = keys[j] * CHUNK_SIZE if j < len(keys) else end
                flags = ExtentFlags.HOLE | ExtentFlags.ZERO
            run_end = min(run_end, end)
            extents.append(Extent(run_end - pos, flags))
            pos = run_end
        return extents
