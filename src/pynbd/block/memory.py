"""A sparse in-memory disk shared by every connection.

Rules of this module:
- The disk is one anonymous shared-memory file (``memfd_create``), sized once
  with ``ftruncate``.  The kernel allocates its pages on first write and frees
  them when a hole is punched, so an untouched range costs nothing and reads as
  zeroes (reading a hole allocates nothing: the kernel copies its zero page).
- Every connection reaches the disk through that one fd, and shared memory has
  no cache in front of it: a completed write is visible to the next read from
  anyone, and ``flush`` has nothing to do (memory is this node's durable
  store).
- The file is also mapped into the process.  Shared memory never waits for a
  device, so reads and writes up to ``INLINE_MAX`` are done inline on the
  event loop: through the mapping (a plain memory copy) where the chunks are
  allocated, with ``os.preadv``/``os.pwritev`` where they may not be (a read
  fault through the mapping would allocate a hole's pages; the syscalls do
  not).  Larger requests go to the shared I/O thread pool, so that one loop
  turn stays short.  (First-touch writes in the pool were measured slower:
  the threads and the loop fight over the GIL; see docs/performance.md.)
- Because the disk is a file, large reads go to the socket with ``sendfile``
  (``sendfile_source``), and trims and zeroing are ``fallocate`` calls.
- Allocation is tracked here in ``CHUNK_SIZE`` chunks (the kernel's
  ``SEEK_HOLE`` walks every page of a data run, milliseconds per GiB): a chunk
  is marked before a write to it starts and again when it ends, and unmarked
  only by a hole punch that covers it, on the event loop.  So every byte that
  is not zero lies in a marked chunk, and ``block_status`` reports holes from
  the marks alone.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import weakref

from ._pool import in_pool
from .fileio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    as_bytes,
    fallocate,
    pread_all,
    pwrite_all,
)
from .node import Capabilities, Extent, ExtentFlags, Node

#: Granularity of allocation tracking, and so of holes in ``block_status``.
CHUNK_SIZE = 64 * 1024
_SHIFT = CHUNK_SIZE.bit_length() - 1

#: ``block_status`` returns at most this many extents per call.
MAX_EXTENTS = 100_000

#: Reads and writes up to this size are done on the caller's thread.
INLINE_MAX = 1 << 20

#: Disks up to this size are mapped (larger ones use the syscalls only).
MAP_MAX = 1 << 44


class MemoryNode(Node):
    """A sparse RAM disk of ``size`` bytes, lost when the process exits."""

    driver = "memory"

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must not be negative, got {size}")
        if size >= 1 << 63:
            raise ValueError(f"size {size} is too large (the limit is 2**63 - 1 bytes)")
        self.size = size
        self.capabilities = Capabilities()
        fd = os.memfd_create("pynbd-memory", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError as err:
            os.close(fd)
            if err.errno == errno.EFBIG:
                raise ValueError(f"size {size} is too large for this kernel") from None
            raise
        #: the shared fd; -1 once closed
        self._fd = fd
        # closed with the object even if ``close`` is never called (tests, errors)
        self._finalizer = weakref.finalize(self, os.close, fd)
        #: the whole disk mapped shared (None: too large, or empty)
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        if 0 < size <= MAP_MAX:
            try:
                self._map = mmap.mmap(fd, size)
            except OSError:  # no address space for it: the syscalls still work
                pass
            else:
                self._view = memoryview(self._map)
        #: indices of the chunks that may hold data, as a set and sorted
        self._present: set[int] = set()
        self._keys: list[int] = []

    def __repr__(self) -> str:
        return f"MemoryNode(size={self.size})"

    # -- allocation tracking -----------------------------------------------

    def _mark(self, offset: int, length: int) -> None:
        present = self._present
        for index in range(offset >> _SHIFT, ((offset + length - 1) >> _SHIFT) + 1):
            if index not in present:
                present.add(index)
                bisect.insort(self._keys, index)

    def _unmark_covered(self, offset: int, length: int) -> None:
        """Unmark the chunks that ``[offset, offset + length)`` covers whole (the
        last chunk of the disk counts as whole if the range reaches the end)."""
        first = (offset + CHUNK_SIZE - 1) >> _SHIFT
        end = offset + length
        last = (end >> _SHIFT) - 1 if end < self.size else (end - 1) >> _SHIFT
        if last < first:
            return
        keys = self._keys
        lo = bisect.bisect_left(keys, first)
        hi = bisect.bisect_right(keys, last)
        for index in keys[lo:hi]:
            self._present.discard(index)
        del keys[lo:hi]

    def _all_marked(self, offset: int, length: int) -> bool:
        first, last = offset >> _SHIFT, (offset + length - 1) >> _SHIFT
        present = self._present
        if first == last:
            return first in present
        return all(index in present for index in range(first, last + 1))

    def _mapped(self, offset: int, count: int) -> memoryview | None:
        """The mapping's view of a range (``count`` > 0) whose chunks are all
        marked, else None (a read fault there could allocate a hole's pages, a
        write fault costs more than ``pwritev``)."""
        mapped = self._view
        if mapped is None or not self._all_marked(offset, count):
            return None
        return mapped[offset:offset + count]

    # -- reads and writes --------------------------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        if not self.pread_nowait(buf, offset):
            await in_pool(pread_all, self._fd, as_bytes(buf), offset)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        view = as_bytes(buf)
        count = len(view)
        if count > INLINE_MAX:
            return False
        if count:
            mapped = self._mapped(offset, count)
            if mapped is not None:
                view[:] = mapped
            else:
                pread_all(self._fd, view, offset)
        return True

    def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
        view = as_bytes(data)
        count = len(view)
        if count > INLINE_MAX:
            return False
        if count:
            mapped = self._mapped(offset, count)
            if mapped is not None:
                mapped[:] = view
            else:
                self._mark(offset, count)
                pwrite_all(self._fd, view, offset)
        return True

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        view = as_bytes(data)
        if self.pwrite_nowait(view, offset):
            return
        self._mark(offset, len(view))
        try:
            await in_pool(pwrite_all, self._fd, view, offset)
        finally:
            self._mark(offset, len(view))  # a trim may have unmarked it meanwhile

    def sendfile_source(self, offset: int, length: int,
                        data_only: bool) -> tuple[int, int] | None:
        """The memfd and position (shared memory never blocks); None when
        ``data_only`` and the range may hold a hole."""
        if data_only and not self._all_marked(offset, length):
            return None
        return self._fd, offset

    # -- durability, trim and zero -------------------------------------------

    async def grow(self, size: int) -> None:
        """Make the disk at least ``size`` bytes long; the new bytes read as zeroes.

        For format nodes that allocate at the end of their storage (qcow2).
        Never shrinks.  The mapping is made again at the new size.
        """
        if size <= self.size:
            return
        if size >= 1 << 63:
            raise OSError(errno.EFBIG, f"size {size} is too large")
        os.ftruncate(self._fd, size)
        self.size = size
        view, self._view = self._view, None
        if view is not None:
            view.release()
        if self._map is not None:
            self._map.close()
            self._map = None
        if size <= MAP_MAX:
            try:
                self._map = mmap.mmap(self._fd, size)
            except OSError:  # no address space for it: the syscalls still work
                pass
            else:
                self._view = memoryview(self._map)

    async def flush(self) -> None:
        return None

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._punch(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        self._punch(offset, length)
        if not may_trim and length > 0:
            # NO_HOLE: the range stays allocated, as zeroes
            self._mark(offset, length)
            fallocate(self._fd, FALLOC_FL_KEEP_SIZE, offset, length)

    def _punch(self, offset: int, length: int) -> None:
        """Free the whole pages of the range and zero the partial ones at its edges."""
        if length > 0:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            self._unmark_covered(offset, length)

    # -- metadata ----------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        extents: list[Extent] = []
        keys = self._keys
        pos = offset
        while pos < end and len(extents) < MAX_EXTENTS:
            index = pos >> _SHIFT
            j = bisect.bisect_left(keys, index)
            if j < len(keys) and keys[j] == index:
                # a marked run: follow consecutive chunk indices
                while j + 1 < len(keys) and keys[j + 1] == keys[j] + 1 \
                        and (keys[j] + 1) << _SHIFT < end:
                    j += 1
                run_end = (keys[j] + 1) << _SHIFT
                flags = ExtentFlags.DATA
            else:
                run_end = keys[j] << _SHIFT if j < len(keys) else end
                flags = ExtentFlags.HOLE | ExtentFlags.ZERO
            run_end = min(run_end, end)
            extents.append(Extent(run_end - pos, flags))
            pos = run_end
        return extents

    def allocated_bytes(self) -> int:
        """Memory the disk holds now (whole pages)."""
        return os.fstat(self._fd).st_blocks * 512

    async def close(self) -> None:
        self._fd = -1
        view, self._view = self._view, None
        if view is not None:
            view.release()
        if self._map is not None:
            self._map.close()
            self._map = None
        self._finalizer()
