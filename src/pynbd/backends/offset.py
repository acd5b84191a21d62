"""A window onto another backend, starting at a byte offset (``qemu-nbd -o``).

Rules of this module:
- Every call is forwarded to the inner backend with ``offset`` added; the
  window keeps no state of its own, so sharing rules are the inner backend's.
- ``block_status`` never describes bytes outside the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend, Extent

if TYPE_CHECKING:
    from .base import ReadDone, WriteDone


class OffsetBackend(Backend):
    """Expose ``inner`` from byte ``offset`` on, for ``size`` bytes.

    Args:
        inner: the backend to look into; closing the window closes it.
        offset: where the window starts in ``inner``.
        size: the window's length; defaults to the rest of ``inner``.

    Raises:
        ValueError: the window does not fit inside ``inner``.
    """

    def __init__(self, inner: Backend, offset: int, size: int | None = None) -> None:
        if offset < 0 or offset > inner.size:
            raise ValueError(f"offset {offset} is outside the inner backend "
                             f"(size {inner.size})")
        if size is None:
            size = inner.size - offset
        if size < 0 or offset + size > inner.size:
            raise ValueError(f"a window of {size} bytes at offset {offset} does not fit "
                             f"in the inner backend (size {inner.size})")
        self.inner = inner
        self.offset = offset
        self.size = size
        self.capabilities = inner.capabilities

    def __repr__(self) -> str:
        return f"OffsetBackend({self.inner!r}, offset={self.offset}, size={self.size})"

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.inner.pread(buf, self.offset + offset)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self.inner.read(self.offset + offset, length)

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        await self.inner.pwrite(data, self.offset + offset, fua=fua)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        return self.inner.pread_nowait(buf, self.offset + offset)

    def sendfile_source(self, offset: int, length: int, *,
                        data_only: bool = False) -> tuple[int, int] | None:
        return self.inner.sendfile_source(self.offset + offset, length, data_only=data_only)

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        return self.inner.start_read(self.offset + offset, length, done)

    def start_write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool,
                    done: WriteDone) -> bool:
        return self.inner.start_write(data, self.offset + offset, fua, done)

    def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
        return self.inner.pwrite_nowait(data, self.offset + offset)

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.inner.trim(self.offset + offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self.inner.write_zeroes(self.offset + offset, length, may_trim=may_trim,
                                      fast=fast, fua=fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        limit = min(length, self.size - offset)
        extents: list[Extent] = []
        total = 0
        for extent in await self.inner.block_status(self.offset + offset, limit):
            if total >= limit:
                break
            if total + extent.length > limit:
                extent = Extent(limit - total, extent.flags)
            extents.append(extent)
            total += extent.length
        return extents

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(self.offset + offset, length)

    async def close(self) -> None:
        await self.inner.close()
