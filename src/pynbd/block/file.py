"""A raw image file or block device, shared by every connection through one fd.

Rules of this module:
- The file is opened once (``os.open``, ``O_CLOEXEC``); every connection uses
  that one fd, so there is no per-connection cache and ``flush`` on the fd
  covers every completed write (what ``NBD_FLAG_CAN_MULTI_CONN`` needs).
- All I/O is offset-explicit (``os.preadv``/``os.pwritev``); the fd position
  is never used for I/O (``block_status`` moves it with ``SEEK_DATA``/
  ``SEEK_HOLE`` and only uses the returned offsets).
- The event loop never blocks on storage: reads and writes are first tried
  inline with ``RWF_NOWAIT`` (served from the page cache, or failing at once);
  whatever remains, and every call that can block (``fdatasync``,
  ``fallocate``, ``ioctl``), runs in the shared ``pynbd-io`` thread pool.
- Flushes are group-committed: concurrent ones share ``fdatasync`` calls,
  each caller covered by one that started after it called.
- Durability latch (as qemu's file driver): once ``fdatasync`` has failed, the
  kernel may have dropped the dirty pages, so every later ``flush`` and FUA
  request fails with ``EIO`` until a new ``FileNode`` is opened.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import errno
import fcntl
import functools
import os
import stat
import struct
import time
from typing import TYPE_CHECKING

from ._pool import POOL, in_pool, track
from .fileio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    ZEROES,
    as_bytes,
    fallocate,
    pread_all,
    pwrite_all,
)
from .node import Capabilities, Extent, ExtentFlags, FastZeroUnsupported, Node

if TYPE_CHECKING:
    from collections.abc import Callable

#: Requests larger than this skip the inline attempt and go to the pool.
INLINE_MAX = 1 << 20

#: ``block_status`` returns at most this many extents per call.
MAX_EXTENTS = 1024

#: page-aligned writes up to this size may go inline (see ``_pwrite_inline_guarded``).
#: Copying 1 MiB into the page cache is quick; in the pool the thread hop and
#: the GIL hand-back cost more (the A/B is in docs/performance.md).
INLINE_WRITE_MAX = 1 << 20
#: an inline write slower than this turns inline writes off for a while.  It is
#: well above a scheduler time slice, so being preempted on a busy host does not
#: count as slow storage; dirty-page throttling (tens of ms and more) does.
INLINE_WRITE_SLOW_NS = 5_000_000
#: how long inline writes stay off after a slow one
INLINE_BACKOFF_NS = 1_000_000_000
_PAGE = os.sysconf("SC_PAGE_SIZE")

# <linux/fs.h>: _IO(0x12, n)
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
_RANGE = struct.Struct("=QQ")  # uint64_t range[2] = {start, length}

#: errno values that mean "this operation is not implemented here".
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

#: cachestat(2) (Linux 6.5): how much of a range is in the page cache
_SYS_CACHESTAT = 451 if os.uname().machine in ("x86_64", "aarch64", "riscv64") else -1
#: struct cachestat_range {u64 off, len}; struct cachestat {u64 nr_cache, nr_dirty, ...}
_CACHESTAT_RANGE = struct.Struct("=QQ")
_CACHESTAT = struct.Struct("=QQQQQ")


class _Feature(enum.Enum):
    """Optional kernel features; one found missing is not tried again."""

    NOWAIT_READ = enum.auto()
    NOWAIT_WRITE = enum.auto()
    PUNCH_HOLE = enum.auto()
    ZERO_RANGE = enum.auto()
    BLKZEROOUT = enum.auto()
    BLKDISCARD = enum.auto()
    SEEK_DATA = enum.auto()
    CACHESTAT = enum.auto()


class FileNode(Node):
    """A raw image file or a block device (qemu's ``file`` and ``host_device`` drivers).

    Args:
        path: the file or block device to serve.
        read_only: open ``O_RDONLY``; writes fail with ``EBADF``.
        discard: let ``trim`` and ``write_zeroes(may_trim=True)`` punch holes
            (otherwise trim is a no-op, like ``qemu-nbd --discard=ignore``).

    Raises:
        OSError: the path cannot be opened (``filename`` is set), or it is
            neither a regular file nor a block device.
    """

    def __init__(self, path: str, *, read_only: bool = False, discard: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.discard = discard
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(path, flags)
        #: logical sector size (the alignment BLKDISCARD/BLKZEROOUT need)
        self._sector = 512
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self.is_block_device = False
                self.size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                self.is_block_device = True
                self.driver = "host_device"
                self.size = os.lseek(fd, 0, os.SEEK_END)
                self._sector = struct.unpack(
                    "i", fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0)))[0]
            else:
                raise OSError(errno.EINVAL, "not a regular file or block device", path)
        except BaseException:
            os.close(fd)
            raise
        #: the shared fd; -1 once closed
        self._fd = fd
        self._unsupported: set[_Feature] = set()
        #: monotonic ns before which inline writes are not tried (after a slow one)
        self._inline_writes_off_until = 0
        #: argument buffers for cachestat(2), reused (only the event loop calls it)
        self._cachestat_range = ctypes.create_string_buffer(_CACHESTAT_RANGE.size)
        self._cachestat = ctypes.create_string_buffer(_CACHESTAT.size)
        if _SYS_CACHESTAT < 0:
            self._unsupported.add(_Feature.CACHESTAT)
        #: the first failed fdatasync; set once, never cleared
        self._sync_error: OSError | None = None
        #: the fdatasync round running now, and the one callers arriving meanwhile share
        self._sync_running: asyncio.Future[None] | None = None
        self._sync_next: asyncio.Future[None] | None = None
        writable = not read_only
        self.capabilities = Capabilities(
            can_write=writable,
            can_flush=True,
            can_fua=writable,
            can_trim=discard and writable,
            can_fast_zero=writable,
            can_extents=not self.is_block_device,
            can_multi_conn=True,
        )

    driver = "file"

    @property
    def filename(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return (f"FileNode({self.path!r}, read_only={self.read_only}, "
                f"discard={self.discard}, size={self.size})")

    # -- reads and writes --------------------------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        view = as_bytes(buf)
        done = 0
        if len(view) <= INLINE_MAX and _Feature.NOWAIT_READ not in self._unsupported:
            done = self._nowait(os.preadv, _Feature.NOWAIT_READ, view, offset)
        if done < len(view):
            await in_pool(pread_all, self._fd, view[done:], offset + done)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        view = as_bytes(buf)
        if len(view) > INLINE_MAX or _Feature.NOWAIT_READ in self._unsupported:
            return False
        return self._nowait(os.preadv, _Feature.NOWAIT_READ, view, offset) == len(view)

    def sendfile_source(self, offset: int, length: int,
                        data_only: bool) -> tuple[int, int] | None:
        """The file and position to ``os.sendfile`` the range from, or None.

        Only when every page of the range is in the page cache (checked with
        ``cachestat(2)``; None where the kernel lacks it) and, with
        ``data_only``, the range holds no hole.  A page evicted between this
        check and the send makes that one send wait for the read.
        """
        if _Feature.CACHESTAT in self._unsupported or offset + length > self.size:
            return None
        _CACHESTAT_RANGE.pack_into(self._cachestat_range, 0, offset, length)
        if _libc.syscall(_SYS_CACHESTAT, self._fd, self._cachestat_range,
                         self._cachestat, 0) != 0:
            if ctypes.get_errno() in _UNSUPPORTED or ctypes.get_errno() == errno.EINVAL:
                self._unsupported.add(_Feature.CACHESTAT)
            return None
        first, last = offset // _PAGE, (offset + length - 1) // _PAGE
        if _CACHESTAT.unpack_from(self._cachestat)[0] < last - first + 1:
            return None
        if data_only and not self.is_block_device:
            try:
                if os.lseek(self._fd, offset, os.SEEK_HOLE) < offset + length:
                    return None
            except OSError:
                return None
        return self._fd, offset

    def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
        view = as_bytes(data)
        if len(view) > INLINE_MAX:
            return False
        if _Feature.NOWAIT_WRITE not in self._unsupported:
            done = self._nowait(os.pwritev, _Feature.NOWAIT_WRITE, view, offset)
            if done == len(view) or _Feature.NOWAIT_WRITE not in self._unsupported:
                return done == len(view)
        return self._pwrite_inline_guarded(view, offset)

    def _pwrite_inline_guarded(self, view: memoryview, offset: int) -> bool:
        """A small whole-page write straight into the page cache, while that is fast.

        Where the kernel has no ``RWF_NOWAIT`` for buffered writes (ext4),
        page-aligned writes of at most ``INLINE_WRITE_MAX`` bytes are copied
        into the page cache inline: whole pages need no read-modify-write, so
        such a write normally takes microseconds.  If one ever takes longer
        than ``INLINE_WRITE_SLOW_NS`` (dirty-page throttling, memory
        pressure), inline writes stop for ``INLINE_BACKOFF_NS`` and everything
        goes through the thread pool, so a stall of the event loop stays rare
        and short.
        """
        if len(view) > INLINE_WRITE_MAX or (offset | len(view)) % _PAGE:
            return False
        start = time.monotonic_ns()
        if start < self._inline_writes_off_until:
            return False
        written = os.pwrite(self._fd, view, offset)
        elapsed = time.monotonic_ns() - start
        if elapsed > INLINE_WRITE_SLOW_NS:
            self._inline_writes_off_until = start + elapsed + INLINE_BACKOFF_NS
        return written == len(view)

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        view = as_bytes(data)
        if not self.pwrite_nowait(view, offset):
            await in_pool(pwrite_all, self._fd, view, offset)
        if fua:
            await self._sync()

    def _nowait(self, syscall: Callable[[int, list[memoryview], int, int], int],
                feature: _Feature, view: memoryview, offset: int) -> int:
        """One inline ``RWF_NOWAIT`` attempt; returns the bytes done (maybe 0)."""
        try:
            return syscall(self._fd, [view], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in _UNSUPPORTED or exc.errno == errno.EINVAL:
                self._unsupported.add(feature)
                return 0
            raise

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            count = min(len(ZEROES), end - offset)
            pwrite_all(self._fd, ZEROES[:count], offset)
            offset += count

    # -- durability --------------------------------------------------------

    async def grow(self, size: int) -> None:
        """Make the file at least ``size`` bytes long; the new bytes read as zeroes.

        For format nodes that allocate at the end of their file (qcow2).  Never
        shrinks.  ``ftruncate`` only sets the size (no data is written), so it
        runs inline: a pool job could land after a later, larger one and shrink.
        """
        if size <= self.size:
            return
        if self.is_block_device:
            raise OSError(errno.ENOSPC, "a block device cannot grow", self.path)
        os.ftruncate(self._fd, size)
        self.size = size

    async def flush(self) -> None:
        await self._sync()

    async def _sync(self) -> None:
        """Make every write completed before this call durable (group commit).

        Each caller is covered by an ``fdatasync`` that starts after it
        called.  With none running, one starts at once; callers that arrive
        while one runs all share the next one, which starts when it ends.  So
        concurrent flushes and FUA writes, from any connection, cost at most
        two ``fdatasync`` calls in a row, not one each.
        """
        if self._sync_error is not None:
            raise self._latched_error()
        if self._sync_running is None:
            round_ = asyncio.get_running_loop().create_future()
            self._start_sync(round_)
        else:
            if self._sync_next is None:
                self._sync_next = asyncio.get_running_loop().create_future()
            round_ = self._sync_next
        # shielded: a cancelled caller must not cancel the round others share
        await asyncio.shield(round_)

    def _latched_error(self) -> OSError:
        error = OSError(errno.EIO, "an earlier fdatasync failed, so written data may be "
                        "lost; reopen the image", self.path)
        error.__cause__ = self._sync_error
        return error

    def _start_sync(self, round_: asyncio.Future[None]) -> None:
        self._sync_running = round_
        job = track(asyncio.get_running_loop().run_in_executor(POOL, self._fdatasync))
        job.add_done_callback(functools.partial(self._sync_done, round_))

    def _sync_done(self, round_: asyncio.Future[None], job: asyncio.Future[None]) -> None:
        error: BaseException | None = (
            OSError(errno.EIO, "fdatasync was cancelled", self.path) if job.cancelled()
            else job.exception())
        if isinstance(error, OSError) and self._sync_error is None:
            self._sync_error = error
        if not round_.done():
            if error is None:
                round_.set_result(None)
            else:
                round_.set_exception(error)
                round_.exception()  # retrieved: its waiters may all have gone
        self._sync_running = None
        waiting, self._sync_next = self._sync_next, None
        if waiting is not None:
            if self._sync_error is not None:
                waiting.set_exception(self._latched_error())
                waiting.exception()
            else:
                self._start_sync(waiting)

    # -- trim and zero -----------------------------------------------------

    def _fdatasync(self) -> None:
        os.fdatasync(self._fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        fallocate(self._fd, mode, offset, length)

    def _ioctl_range(self, request: int, offset: int, length: int) -> None:
        fcntl.ioctl(self._fd, request, _RANGE.pack(offset, length))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.discard or length <= 0:
            return
        if self.is_block_device:
            start, stop = self._sector_align_inward(offset, length)
            if stop > start:
                await self._try_in_pool(_Feature.BLKDISCARD, functools.partial(
                    self._ioctl_range, BLKDISCARD, start, stop - start))
        else:
            await self._try_in_pool(_Feature.PUNCH_HOLE, functools.partial(
                self._fallocate, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length))
        if fua:
            await self._sync()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        if length > 0:
            if self.is_block_device:
                await self._zero_block_device(offset, length, fast=fast)
            else:
                await self._zero_file(offset, length, may_trim=may_trim, fast=fast)
        if fua:
            await self._sync()

    async def _zero_file(self, offset: int, length: int, *, may_trim: bool,
                         fast: bool) -> None:
        if may_trim and self.discard and await self._try_in_pool(
                _Feature.PUNCH_HOLE, functools.partial(
                    self._fallocate, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    offset, length)):
            return
        if await self._try_in_pool(_Feature.ZERO_RANGE, functools.partial(
                self._fallocate, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)):
            return
        if fast:
            raise FastZeroUnsupported("this filesystem cannot zero a range without writing")
        await in_pool(functools.partial(self._write_zero_buffers, offset, length))

    async def _zero_block_device(self, offset: int, length: int, *, fast: bool) -> None:
        start, stop = self._sector_align_inward(offset, length)
        if stop > start:
            zeroed = await self._try_in_pool(_Feature.BLKZEROOUT, functools.partial(
                self._ioctl_range, BLKZEROOUT, start, stop - start))
            if not zeroed:
                if fast:
                    raise FastZeroUnsupported("this device has no BLKZEROOUT")
                start = stop = offset  # write everything below
        # the unaligned edges (less than a sector each), or all of it
        end = offset + length
        for edge_start, edge_stop in ((offset, start), (stop, end)):
            if edge_stop > edge_start:
                await in_pool(functools.partial(
                    self._write_zero_buffers, edge_start, edge_stop - edge_start))

    def _sector_align_inward(self, offset: int, length: int) -> tuple[int, int]:
        sector = self._sector
        start = -(-offset // sector) * sector
        stop = (offset + length) // sector * sector
        return start, max(start, stop)

    async def _try_in_pool(self, feature: _Feature, call: Callable[[], object]) -> bool:
        """Run an optional operation; False if the kernel or filesystem lacks it.

        ``EINVAL`` also returns False (some filesystems reject unaligned ranges
        that they should accept) but is not remembered.
        """
        if feature in self._unsupported:
            return False
        try:
            await in_pool(call)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._unsupported.add(feature)
                return False
            if exc.errno == errno.EINVAL:
                return False
            raise
        return True

    # -- metadata ----------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        if self.is_block_device or _Feature.SEEK_DATA in self._unsupported:
            return [Extent(end - offset, ExtentFlags.DATA)]
        extents: list[Extent] = []
        pos = offset
        while pos < end and len(extents) < MAX_EXTENTS:
            run_end, flags = self._next_run(pos, end)
            extents.append(Extent(run_end - pos, flags))
            pos = run_end
        return extents

    def _next_run(self, pos: int, end: int) -> tuple[int, ExtentFlags]:
        """The end (``> pos``, ``<= end``) and status of the run starting at ``pos``."""
        if _Feature.SEEK_DATA in self._unsupported:
            return end, ExtentFlags.DATA
        try:
            data = os.lseek(self._fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: a hole up to EOF
                return end, ExtentFlags.HOLE | ExtentFlags.ZERO
            if exc.errno in _UNSUPPORTED or exc.errno == errno.EINVAL:
                self._unsupported.add(_Feature.SEEK_DATA)
                return end, ExtentFlags.DATA
            raise
        if data > pos:
            return min(data, end), ExtentFlags.HOLE | ExtentFlags.ZERO
        try:
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            hole = end  # the file shrank under us; data is always a safe answer
        # a concurrent trim may have made pos a hole since SEEK_DATA: DATA stays safe
        return min(max(hole, pos + 1), end), ExtentFlags.DATA

    async def cache(self, offset: int, length: int) -> None:
        if length > 0:  # a length of 0 would mean "to the end of the file"
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            # later calls fail with EBADF instead of reaching a reused fd number
            os.close(fd)
