"""What ``--cache`` changes above the storage, for every kind of image: writes made
durable before their reply (writethrough, directsync) and flushes ignored (unsafe).

(Bypassing the host page cache, ``cache.direct``, is the file node's own:
``pynbd.block.directfile``.)

Rules of this module:
- ``WritethroughFilter`` goes on top of the image, where qemu's BlockBackend
  turns its write cache off: every write, zeroing and trim goes down with FUA,
  so a format node (qcow2) makes its metadata durable with the data.  A
  file makes FUA durable with a group-committed ``fdatasync`` after the write
  (not ``O_DSYNC``: see docs/performance.md).  Reads and their fast paths
  are the child's; the inline write path is not offered (it never carries
  FUA), direct writes (rbd) are kept, with FUA.
- ``NoFlushFilter`` goes over the protocol node (qemu's ``cache.no-flush=on``,
  a flag of the file node): ``flush`` does nothing and FUA is dropped, so a
  format node above still writes its cached metadata out on a flush; only
  the device flush is skipped.  Every fast path of the child is kept (inline
  writes never carry FUA; direct writes lose their FUA).
- Both are implicit: queries show the node under them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .filter import FilterNode

if TYPE_CHECKING:
    from .node import Data, FastPaths, Node, WriteDone


class WritethroughFilter(FilterNode):
    """Every write-type request to ``child`` carries FUA."""

    driver = "writethrough"

    def __init__(self, child: Node) -> None:
        super().__init__(child)
        self.implicit = True

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self.child.pwrite(data, offset, fua=True)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.child.trim(offset, length, fua=True)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=True)

    def fast_paths(self) -> FastPaths:
        paths = super().fast_paths()  # the child's reads; its writes dropped
        start = self.child.resolve().fast_paths().start_write
        if start is not None:
            def start_write(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
                return start(data, offset, True, done)

            paths = dataclasses.replace(paths, start_write=start_write)
        return paths


class NoFlushFilter(FilterNode):
    """``flush`` is a no-op and FUA is dropped (``cache.no-flush=on``)."""

    driver = "no-flush"

    def __init__(self, child: Node) -> None:
        super().__init__(child)
        self.implicit = True

    async def flush(self) -> None:
        pass

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self.child.pwrite(data, offset)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.child.trim(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast)

    def fast_paths(self) -> FastPaths:
        paths = self.child.resolve().fast_paths()  # all of them: none carries FUA ...
        start = paths.start_write
        if start is not None:  # ... but direct writes, which lose it
            def start_write(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
                return start(data, offset, False, done)

            paths = dataclasses.replace(paths, start_write=start_write)
        return paths
