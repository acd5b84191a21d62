"""Write tracking: the filter through which a node's writes pass, for its dirty bitmaps
and for hooks that must run before a write lands (copy-before-write).

Owns ``TrackingFilter`` and ``bitmaps_of``.  qemu keeps dirty bitmaps on a
block node and marks them for every write that reaches the node, whichever
parent sent it; here every writer of a tracked node goes through its
tracking filter (the command line puts one over the exported node; the
daemon over every node it builds, as the node its parents and exports use),
so one filter sees all of them.

Rules of this module:
- A write, write-zeroes or trim marks the enabled bitmaps of the tracked node
  (``bitmaps_of(child)``) before it is sent on, so a write that fails part
  way is marked too (a backup then copies a little more, never less).
- Hooks (``before_write``) run, in order, before any write, write-zeroes or
  trim is sent on, and may await (copying old data aside); while there is
  a hook, writes do not take the fast paths (which cannot await).
- With no enabled bitmap and no hook, a write costs one attribute check more
  than without the filter; reads pass through untouched (their fast paths
  are the child's).
- ``quiesce`` waits for the changes on the task path that were in flight when
  it was called (a hook added just before then sees every later change).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from .bitmap import BitmapSet
from .filter import FilterNode

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .node import Data, FastPaths, Node, WriteDone

def bitmaps_of(node: Node) -> BitmapSet:
    """The dirty bitmaps of ``node`` (made empty on first use)."""
    bitmaps = node.bitmaps
    if bitmaps is None:
        bitmaps = node.bitmaps = BitmapSet()
    return bitmaps


class TrackingFilter(FilterNode):
    """Passes everything to ``child``, marking its dirty bitmaps and running the
    before-write hooks for every change."""

    driver = "x-tracking"

    def __init__(self, child: Node) -> None:
        super().__init__(child)
        self.implicit = True
        self.tracked = bitmaps_of(child)
        #: coroutines given ``(offset, length)`` of each change before it is made
        self.hooks: list[Callable[[int, int], Awaitable[None]]] = []
        #: changes in flight on the task path, counted per generation (``quiesce``)
        self._in_flight = [0]
        self._idle: asyncio.Event | None = None

    async def quiesce(self) -> None:
        """Wait for the changes that were in flight when called (those that may have
        passed before a hook just added): qemu drains a node for the same reason.
        The fast paths finish within their call, so only the task path counts."""
        old, self._in_flight = self._in_flight, [0]
        while old[0]:
            self._idle = self._idle or asyncio.Event()
            await self._idle.wait()
            self._idle = None

    def _done(self, generation: list[int]) -> None:
        generation[0] -= 1
        if self._idle is not None and generation is not self._in_flight:
            self._idle.set()

    async def _before(self, offset: int, length: int) -> list[int]:
        generation = self._in_flight
        generation[0] += 1
        try:
            self.tracked.record(offset, length)
            for hook in list(self.hooks):
                await hook(offset, length)
        except BaseException:
            self._done(generation)
            raise
        return generation

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        generation = await self._before(offset, len(data))
        try:
            await self.child.pwrite(data, offset, fua=fua)
        finally:
            self._done(generation)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        generation = await self._before(offset, length)
        try:
            await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast,
                                          fua=fua)
        finally:
            self._done(generation)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.child.capabilities.can_trim:  # a no-op below (discard=ignore):
            await self.child.trim(offset, length, fua=fua)  # nothing changes, as in qemu
            return
        generation = await self._before(offset, length)
        try:
            await self.child.trim(offset, length, fua=fua)
        finally:
            self._done(generation)

    async def grow(self, size: int) -> None:
        await super().grow(size)
        self.tracked.resize(self.size)  # as qemu resizes a node's bitmaps

    def fast_paths(self) -> FastPaths:
        inner = self.child.resolve().fast_paths()
        pwrite_nowait, start_write = inner.pwrite_nowait, inner.start_write
        tracked, hooks = self.tracked, self.hooks

        def tracked_pwrite_nowait(data: Data, offset: int) -> bool:
            assert pwrite_nowait is not None
            if hooks:
                return False
            if tracked.recording:
                tracked.record(offset, len(data))
            return pwrite_nowait(data, offset)

        def tracked_start_write(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
            assert start_write is not None
            if hooks:
                return False
            if tracked.recording:
                tracked.record(offset, len(data))
            return start_write(data, offset, fua, done)

        return dataclasses.replace(
            inner,
            pwrite_nowait=tracked_pwrite_nowait if pwrite_nowait is not None else None,
            start_write=tracked_start_write if start_write is not None else None)
