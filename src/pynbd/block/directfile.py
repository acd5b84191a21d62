"""An image file or block device read and written with ``O_DIRECT`` (qemu's
``cache.direct=on``, what ``--cache=none`` and ``--cache=directsync`` ask for).

Rules of this module:
- ``DirectFileNode`` is a ``FileNode`` whose fd bypasses the host page cache:
  FileNode opens it, then ``O_DIRECT`` is set on it (``F_SETFL``); a file
  system that cannot do direct I/O refuses that (``EINVAL``) and the node is
  not made (qemu's words: "filesystem does not support O_DIRECT").
  Everything that moves no data through a buffer is FileNode's: the group
  commit and its durability latch, ``block_status``, ``fallocate`` trims and
  zeroing, ``grow``.
- Direct I/O needs the offset, the length and the buffer's address aligned:
  to what ``statx(STATX_DIOALIGN)`` reports, else to the device's logical
  sector size (block devices), else to 4096 bytes.  Requests that are aligned,
  in buffers that are, go straight to the fd; anything else goes through a
  page-aligned bounce buffer (``mmap``, one per I/O thread, reused), and an
  unaligned write first reads the blocks it only partly covers
  (read-modify-write).
- Every write, zero and trim registers the block-aligned span it touches.  An
  unaligned one is *serialising* (as qemu's serialising requests): it waits
  for every earlier overlapping request, and every later overlapping request
  waits for it, so two writes into one block never lose each other's bytes.
  Aligned requests never wait for each other.  Reads do not register: a read
  racing a write may see either, as on any node.
- The bytes after the last whole block of a file whose size is not a multiple
  of the alignment (the tail) are read and written through a second, buffered
  fd of the same file: a direct write of the whole last block would grow the
  file.  The kernel keeps the page cache and direct I/O coherent, and a flush
  covers both fds (one inode).
- No fast path: inline (``RWF_NOWAIT``) and ``sendfile`` reads and writes
  would either block the event loop on the device or be refused for their
  alignment (``sendfile`` from an ``O_DIRECT`` fd fails with ``EINVAL`` unless
  the range is aligned), so ``fast_paths`` offers none and every request runs
  in the shared I/O thread pool.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import fcntl
import mmap
import os
import struct
import threading
from typing import TYPE_CHECKING

from ._pool import in_pool
from .file import FileNode
from .fileio import ZEROES, as_bytes, fill_zeroes, pwrite_all
from .node import FastPaths

if TYPE_CHECKING:
    from .node import Data

#: the alignment assumed when the kernel reports none (safe on every file system)
FALLBACK_ALIGN = 4096
#: the size of each I/O thread's bounce buffer; larger requests go through it in pieces
BOUNCE_SIZE = 1 << 20
_PAGE = mmap.PAGESIZE

# statx(2): <linux/stat.h>.  struct statx is 0x100 bytes; stx_mask is the u32 at 0,
# stx_dio_mem_align and stx_dio_offset_align the two u32 at 0x98.
_SYS_STATX = {"x86_64": 332, "aarch64": 291, "riscv64": 291}.get(os.uname().machine, -1)
_AT_EMPTY_PATH = 0x1000
_STATX_DIOALIGN = 0x2000
_STATX_SIZE = 0x100
_STATX_MASK = struct.Struct("=I")
_STATX_DIO = struct.Struct("=II")
_STATX_DIO_AT = 0x98

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

#: each pool thread's bounce buffer (a page-aligned anonymous mapping)
_local = threading.local()


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """``(memory, offset)`` alignment the kernel reports for direct I/O on ``fd``
    (``statx`` with ``STATX_DIOALIGN``, Linux 6.1), or None where it reports none."""
    if _SYS_STATX < 0:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.syscall(ctypes.c_long(_SYS_STATX), ctypes.c_long(fd), b"",
                     ctypes.c_long(_AT_EMPTY_PATH), ctypes.c_long(_STATX_DIOALIGN), buf):
        return None
    (mask,) = _STATX_MASK.unpack_from(buf, 0)
    memory, offset = _STATX_DIO.unpack_from(buf, _STATX_DIO_AT)
    if not mask & _STATX_DIOALIGN or not memory or not offset:
        return None
    return memory, offset


def _bounce() -> memoryview:
    """This thread's bounce buffer (made on first use, kept for the thread's life)."""
    view: memoryview | None = getattr(_local, "bounce", None)
    if view is None:
        view = memoryview(mmap.mmap(-1, BOUNCE_SIZE))
        _local.bounce = view
    return view


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _pread_some(fd: int, view: memoryview, offset: int, align: int) -> int:
    """Read aligned ``view`` at aligned ``offset``; fewer bytes only at the end of the file."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        done += count
        if count == 0 or done % align:  # the end of the file
            break
    return done


def _pwrite_direct(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        count = os.pwritev(fd, [view[done:]], offset + done)
        if count == 0:
            raise OSError(errno.ENOSPC, "write made no progress")
        done += count


@dataclasses.dataclass(eq=False, slots=True)
class _Span:
    """A write-type request in flight: the block-aligned range it touches."""

    start: int
    end: int
    serialising: bool
    active: bool = True
    #: set when a later request waits for this one
    done: asyncio.Future[None] | None = None


class DirectFileNode(FileNode):
    """A raw image file or block device with ``O_DIRECT`` (``cache.direct=on``).

    Arguments as ``FileNode``'s.

    Raises:
        OSError: as FileNode; ``EINVAL`` "filesystem does not support O_DIRECT"
            where the file system refuses direct I/O.
    """

    cache_direct = True

    def __init__(self, path: str, *, read_only: bool = False, discard: bool = False) -> None:
        super().__init__(path, read_only=read_only, discard=discard)
        #: the buffered fd for the tail (regular files only); -1: none
        self._tail_fd = -1
        try:
            self._go_direct(path, read_only)
        except BaseException:
            if self._tail_fd >= 0:
                os.close(self._tail_fd)
            os.close(self._fd)
            self._fd = -1
            raise
        #: write-type requests in flight (``_enter``/``_leave``), on the event loop
        self._spans: list[_Span] = []

    def _go_direct(self, path: str, read_only: bool) -> None:
        fd = self._fd
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError as err:
            if err.errno == errno.EINVAL:
                raise OSError(errno.EINVAL, "filesystem does not support O_DIRECT",
                              path) from None
            raise
        reported = dio_alignment(fd)
        if reported is not None:
            memory, align = reported
        else:
            align = self._sector if self.is_block_device else FALLBACK_ALIGN
            memory = align
        if memory > _PAGE or align > BOUNCE_SIZE or align & (align - 1):
            raise OSError(errno.EINVAL, f"unsupported O_DIRECT alignment (memory {memory}, "
                          f"offset {align})", path)
        #: offsets and lengths of direct I/O are multiples of this
        self.align = align
        #: and buffers start at a multiple of this
        self.memory_align = memory
        if not self.is_block_device:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            try:  # the same file, even if its path was replaced meanwhile
                self._tail_fd = os.open(f"/proc/self/fd/{fd}", flags)
            except OSError:
                self._tail_fd = os.open(path, flags)
        self._set_tail()

    def _set_tail(self) -> None:
        #: where the tail starts: direct I/O below, the buffered fd from here
        self._direct_end = self.size if self.is_block_device else (
            self.size - self.size % self.align)

    def __repr__(self) -> str:
        return (f"DirectFileNode({self.path!r}, read_only={self.read_only}, "
                f"discard={self.discard}, size={self.size}, align={self.align})")

    def fast_paths(self) -> FastPaths:
        return FastPaths()

    # -- serialising -------------------------------------------------------

    async def _enter(self, offset: int, length: int) -> _Span:
        """Register a write-type request, after the overlapping ones it must follow."""
        align = self.align
        start, end = offset - offset % align, _round_up(offset + length, align)
        serialising = (offset | length) % align != 0
        earlier = [span for span in self._spans if span.start < end and start < span.end
                   and (serialising or span.serialising)]
        span = _Span(start, end, serialising)
        self._spans.append(span)
        if earlier:
            try:
                for other in earlier:
                    if other.active:
                        if other.done is None:
                            other.done = asyncio.get_running_loop().create_future()
                        # shielded: a cancelled waiter must not cancel what others wait on
                        await asyncio.shield(other.done)
            except BaseException:
                self._leave(span)
                raise
        return span

    def _leave(self, span: _Span) -> None:
        span.active = False
        self._spans.remove(span)
        if span.done is not None and not span.done.done():
            span.done.set_result(None)

    # -- reads and writes --------------------------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        view = as_bytes(buf)
        if view:
            await in_pool(self._read, view, offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        view = as_bytes(data)
        if view:
            span = await self._enter(offset, len(view))
            try:
                await in_pool(self._write, view, offset, len(view))
            finally:
                self._leave(span)
        if fua:
            await self._sync()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        if length <= 0:
            await super().write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)
            return
        span = await self._enter(offset, length)
        try:
            await super().write_zeroes(offset, length, may_trim=may_trim, fast=fast)
        finally:
            self._leave(span)
        if fua:
            await self._sync()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if length <= 0 or not self.discard:
            return  # as FileNode: a trim that does nothing has nothing to make durable
        span = await self._enter(offset, length)
        try:
            await super().trim(offset, length)
        finally:
            self._leave(span)
        if fua:
            await self._sync()

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        # FileNode's fallback when nothing can zero the range: in a pool thread,
        # under the span write_zeroes registered
        self._write(None, offset, length)

    def _aligned(self, view: memoryview) -> bool:
        """Whether ``view``'s memory can be used for direct I/O as it is."""
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        except (TypeError, ValueError):  # read-only: not worth finding out
            return False
        return address % self.memory_align == 0

    def _read(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset`` (in a pool thread)."""
        end, tail = offset + len(view), self._direct_end
        if offset < tail:
            self._read_direct(view[:min(end, tail) - offset], offset)
        if end > tail:
            start = max(offset, tail)
            part = view[start - offset:]
            done = 0
            while done < len(part):
                count = os.preadv(self._tail_fd, [part[done:]], start + done)
                if count == 0:  # past the end of the file: zeroes
                    fill_zeroes(part[done:])
                    break
                done += count

    def _read_direct(self, view: memoryview, offset: int) -> None:
        fd, align, length = self._fd, self.align, len(view)
        if (offset | length) % align == 0 and self._aligned(view):
            got = _pread_some(fd, view, offset, align)
            if got < length:
                fill_zeroes(view[got:])
            return
        bounce = _bounce()
        stop = _round_up(offset + length, align)
        pos = 0
        while pos < length:
            start = offset + pos
            first = start - start % align
            chunk = bounce[:min(len(bounce), stop - first)]
            got = _pread_some(fd, chunk, first, align)
            skip = start - first
            take = min(len(chunk) - skip, length - pos)
            have = max(0, min(take, got - skip))
            view[pos:pos + have] = chunk[skip:skip + have]
            if have < take:
                fill_zeroes(view[pos + have:pos + take])
            pos += take

    def _write(self, view: memoryview | None, offset: int, length: int) -> None:
        """Write ``view`` (None: zeroes) of ``length`` bytes at ``offset`` (in a pool
        thread, under the request's span)."""
        end, tail = offset + length, self._direct_end
        if offset < tail:
            self._write_direct(view, offset, min(end, tail) - offset)
        if end > tail:
            start = max(offset, tail)
            if view is not None:
                pwrite_all(self._tail_fd, view[start - offset:], start)
                return
            while start < end:
                count = min(len(ZEROES), end - start)
                pwrite_all(self._tail_fd, ZEROES[:count], start)
                start += count

    def _write_direct(self, view: memoryview | None, offset: int, length: int) -> None:
        fd, align = self._fd, self.align
        if view is not None and (offset | length) % align == 0 and self._aligned(view):
            _pwrite_direct(fd, view[:length], offset)
            return
        bounce = _bounce()
        stop = _round_up(offset + length, align)
        pos = 0
        while pos < length:
            start = offset + pos
            first = start - start % align
            chunk = bounce[:min(len(bounce), stop - first)]
            skip = start - first
            take = min(len(chunk) - skip, length - pos)
            if skip:  # the first block is only partly written: read it
                self._read_block(chunk[:align], first)
            last = (skip + take) - (skip + take) % align
            if last < len(chunk) and not (skip and last == 0):  # so is the last one
                self._read_block(chunk[last:last + align], first + last)
            if view is None:
                fill_zeroes(chunk[skip:skip + take])
            else:
                chunk[skip:skip + take] = view[pos:pos + take]
            _pwrite_direct(fd, chunk, first)
            pos += take

    def _read_block(self, block: memoryview, offset: int) -> None:
        got = _pread_some(self._fd, block, offset, self.align)
        if got < len(block):
            fill_zeroes(block[got:])

    # -- the rest ----------------------------------------------------------

    async def grow(self, size: int) -> None:
        await super().grow(size)
        self._set_tail()

    async def cache(self, offset: int, length: int) -> None:
        """Nothing: reads bypass the page cache, so there is nothing to prefetch into."""

    async def close(self) -> None:
        fd, self._tail_fd = self._tail_fd, -1
        if fd >= 0:
            os.close(fd)
        await super().close()
