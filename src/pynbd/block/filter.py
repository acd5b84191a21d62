"""The base of nodes over one child: everything forwarded unless a subclass changes it.

Rules of this module:
- A ``FilterNode`` forwards every request to its child unchanged; a subclass
  overrides only the methods whose requests it changes.
- Its fast paths are the child's, minus every fast path that would go around
  a method the subclass overrides (an overridden ``pread`` drops the child's
  ``pread_nowait``, ``start_read``, ``sendfile_source`` and ``read``; an
  overridden ``pwrite`` drops ``pwrite_nowait`` and ``start_write``).  A
  subclass that can keep them (by adapting them) overrides ``fast_paths``.
- A filter closes nothing of its child: the graph closes every node once.
- A filter grows with its child (``Growable``): a qcow2 node over a filter over
  a file can still allocate at the end of the file.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import TYPE_CHECKING

from .node import FastPaths, Growable, Node

if TYPE_CHECKING:
    from .node import Data, Extent


class FilterNode(Node):
    """A node over ``child`` (in the role ``role``) that forwards what it does not change."""

    def __init__(self, child: Node, *, role: str = "file") -> None:
        self.child = child
        self.role = role
        self.size = child.size
        self.capabilities = child.capabilities

    @property
    def children(self) -> dict[str, Node]:
        return {self.role: self.child}

    @property
    def filename(self) -> str:
        return self.child.filename

    def fast_paths(self) -> FastPaths:
        paths = self.child.resolve().fast_paths()
        cls = type(self)
        if cls.pread is not FilterNode.pread:
            paths = dataclasses.replace(paths, pread_nowait=None, start_read=None,
                                        sendfile_source=None, read=None)
        if cls.pwrite is not FilterNode.pwrite:
            paths = dataclasses.replace(paths, pwrite_nowait=None, start_write=None)
        return paths

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.child.pread(buf, offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self.child.pwrite(data, offset, fua=fua)

    async def flush(self) -> None:
        await self.child.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.child.trim(offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.child.block_status(offset, length)

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.child.allocation_depth(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(offset, length)

    async def grow(self, size: int) -> None:
        if not isinstance(self.child, Growable):
            raise OSError(errno.ENOSPC, f"{self.child.driver} node cannot grow")
        await self.child.grow(size)
        self.size = self.child.size
