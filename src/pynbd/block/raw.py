"""The raw format node: the bytes of its ``file`` child, optionally a window of them.

As qemu's raw driver: ``offset`` and ``size`` select a window of the child
(``qemu-nbd -o`` builds one), and a raw node may be read-only over a writable
child.

Rules of this module:
- Without a window (offset 0, the child's whole size) the node adds nothing:
  ``resolve()`` is the child's, so an export over it talks to the storage
  directly at no cost per request.
- With a window every request is shifted by ``offset``, fast paths included,
  and ``block_status`` never describes bytes outside the window.
- A raw node whose format was probed (no ``-f`` given) guards its first sector
  as qemu does: a write there must cover the whole first ``PROBE_BYTES`` from
  offset 0 (else EINVAL), and must not make them probe as another format, a
  qcow2 header (else EPERM), so a guest cannot turn a raw image into one that
  the next probe would open as qcow2.  Only writes that touch the first
  sector pay for the check.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import TYPE_CHECKING

from .filter import FilterNode
from .node import Extent, FastPaths, Node
from .probe import PROBE_BYTES, probe_bytes

if TYPE_CHECKING:
    from .node import Data, ReadDone, WriteDone


class RawNode(FilterNode):
    """Raw format over ``file``: bytes ``[offset, offset + size)`` of it.

    Args:
        file: the child node holding the bytes.
        offset: where the window starts in ``file``.
        size: the window's length; defaults to the rest of ``file``.
        read_only: refuse writes even if ``file`` can write.

    Raises:
        ValueError: the window does not fit inside ``file``.
    """

    driver = "raw"

    def __init__(self, file: Node, *, offset: int = 0, size: int | None = None,
                 read_only: bool = False, probed: bool = False) -> None:
        super().__init__(file)
        # qemu's raw driver's words (raw_apply_options), double space included
        if offset < 0 or offset > file.size:
            raise ValueError(f"Offset ({offset}) cannot be greater than size of the "
                             f"containing file ({file.size})")
        if size is None:
            size = file.size - offset
        if size < 0 or offset + size > file.size:
            raise ValueError(f"The sum of offset ({offset}) and size ({size}) has to be "
                             f"smaller or equal to the  actual size of the containing file "
                             f"({file.size})")
        self.offset = offset
        self.size = size
        self.probed = probed
        if read_only:
            self.capabilities = dataclasses.replace(
                file.capabilities, can_write=False, can_fua=False, can_trim=False,
                can_fast_zero=False)

    def __repr__(self) -> str:
        return f"RawNode({self.child!r}, offset={self.offset}, size={self.size})"

    @property
    def windowed(self) -> bool:
        return self.offset != 0 or self.size != self.child.size

    def resolve(self) -> Node:
        return self if self.windowed or self.probed else self.child.resolve()

    def fast_paths(self) -> FastPaths:
        inner = self.child.resolve().fast_paths()
        if self.windowed:
            inner = _shifted(inner, self.offset)
        return _guarded(inner) if self.probed else inner

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.child.pread(buf, self.offset + offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        if self.probed and offset < PROBE_BYTES:
            _check_first_sector(data, offset)
        await self.child.pwrite(data, self.offset + offset, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.child.trim(self.offset + offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self.child.write_zeroes(self.offset + offset, length, may_trim=may_trim,
                                      fast=fast, fua=fua)

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        # a raw image holds all of itself (as qemu counts: not a filter here)
        return [(min(length, self.size - offset), 1)]

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        limit = min(length, self.size - offset)
        extents: list[Extent] = []
        total = 0
        for extent in await self.child.block_status(self.offset + offset, limit):
            if total >= limit:
                break
            if total + extent.length > limit:
                extent = Extent(limit - total, extent.flags)
            extents.append(extent)
            total += extent.length
        return extents

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(self.offset + offset, length)

    async def grow(self, size: int) -> None:
        if self.windowed:
            raise OSError(errno.ENOSPC, "a raw window cannot grow")
        await super().grow(size)


def _check_first_sector(data: Data, offset: int) -> None:
    """Refuse a write to a probed raw image's first sector as qemu does."""
    if offset != 0 or len(data) < PROBE_BYTES:
        raise OSError(errno.EINVAL, "a write to the first sector of a probed raw image "
                      "must cover all of it (give -f raw to lift this)")
    if probe_bytes(memoryview(data)[:PROBE_BYTES]) != "raw":
        raise OSError(errno.EPERM, "refusing to write an image header into a probed raw "
                      "image (give -f raw to allow it)")


def _guarded(paths: FastPaths) -> FastPaths:
    """``paths`` whose writes decline the first sector (the slow path checks it)."""
    pwrite_nowait, start_write = paths.pwrite_nowait, paths.start_write

    def pwrite_nowait_guarded(data: Data, offset: int) -> bool:
        assert pwrite_nowait is not None
        return offset >= PROBE_BYTES and pwrite_nowait(data, offset)

    def start_write_guarded(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
        assert start_write is not None
        return offset >= PROBE_BYTES and start_write(data, offset, fua, done)

    return dataclasses.replace(
        paths, pwrite_nowait=pwrite_nowait_guarded if pwrite_nowait is not None else None,
        start_write=start_write_guarded if start_write is not None else None)


def _shifted(paths: FastPaths, shift: int) -> FastPaths:
    """``paths`` with every offset moved by ``shift``."""
    pread_nowait, pwrite_nowait = paths.pread_nowait, paths.pwrite_nowait
    start_read, start_write = paths.start_read, paths.start_write
    sendfile_source, own_read = paths.sendfile_source, paths.read

    def pread_nowait_at(buf: memoryview, offset: int) -> bool:
        assert pread_nowait is not None
        return pread_nowait(buf, shift + offset)

    def pwrite_nowait_at(data: Data, offset: int) -> bool:
        assert pwrite_nowait is not None
        return pwrite_nowait(data, shift + offset)

    def start_read_at(offset: int, length: int, done: ReadDone) -> bool:
        assert start_read is not None
        return start_read(shift + offset, length, done)

    def start_write_at(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
        assert start_write is not None
        return start_write(data, shift + offset, fua, done)

    def sendfile_source_at(offset: int, length: int,
                           data_only: bool) -> tuple[int, int] | None:
        assert sendfile_source is not None
        return sendfile_source(shift + offset, length, data_only)

    async def read_at(offset: int, length: int) -> bytes | bytearray:
        assert own_read is not None
        return await own_read(shift + offset, length)

    return FastPaths(
        pread_nowait=pread_nowait_at if pread_nowait is not None else None,
        pwrite_nowait=pwrite_nowait_at if pwrite_nowait is not None else None,
        start_read=start_read_at if start_read is not None else None,
        start_write=start_write_at if start_write is not None else None,
        sendfile_source=sendfile_source_at if sendfile_source is not None else None,
        read=read_at if own_read is not None else None,
    )
