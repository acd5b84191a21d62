"""The ``snapshot-access`` node: the frozen view a copy-before-write node keeps, read-only
(qemu 7.0+; what a fleecing backup exports over NBD).

Owns ``SnapshotAccess`` and ``FrozenBacking``.  The file child of a
snapshot-access node is a copy-before-write node (``pynbd.block.fleece``,
whose docstring states the frozen-view rule this node follows), as the graph
names it: the daemon's implicit filters over it are looked through.

Rules of this module:
- The node is as large as the source and reads what the source held when the
  copy-before-write node was made: each run of a read comes from the target
  where its granules are done (copied), and from the source elsewhere, as a
  frozen read (``CopyBeforeWrite.frozen``), entered with no await between
  seeing the run is not done and entering it.
- ``block_status`` reports, run by run under the same rule, the target's status
  where copied and the source's elsewhere, so it never says ZERO where the
  frozen view has data; it stops at the first byte the snapshot cannot read.
- A request where the snapshot holds nothing (outside the copy bitmap, or
  discarded) or once the snapshot is broken fails with EACCES, as qemu's; a
  read that was under way when the snapshot broke fails too (the source may
  have changed under it).
- Read-only: writes and write-zeroes fail with EROFS and the node advertises
  no writes.  ``trim`` is qemu's discard on snapshot-access, for a backup that
  is done with a range: the granules wholly inside it are no longer copied or
  readable, and are discarded in the target.  ``flush`` has nothing to do.
- ``FrozenBacking`` is the same view seen from below: the backing node of a
  classic fleecing target (qemu's ``blockdev-backup`` sync=none, a qcow2 image
  whose backing node is the source, exported read-only).  The target reads
  what it holds (the copies) itself and the rest through its backing node,
  which must then read the frozen view, not the live source: a read there
  takes each run from the target where copied and from the source as a frozen
  read elsewhere, as above.  Its reads wait until the view is sealed (the
  writes in flight when the copying began have landed).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .filter import FilterNode
from .fleece import CopyBeforeWrite
from .graph import shown
from .node import Capabilities, Extent, Node

if TYPE_CHECKING:
    import asyncio

    from .node import Data

#: ``block_status`` answers at most this many extents per call
MAX_EXTENTS = 1024


class SnapshotAccess(Node):
    """The frozen view of the copy-before-write node ``file`` (itself, or the filters
    the system put over it).

    Raises:
        ValueError: ``file`` is not a copy-before-write node.
    """

    driver = "snapshot-access"

    def __init__(self, file: Node) -> None:
        cbw = shown(file)
        if not isinstance(cbw, CopyBeforeWrite):
            raise ValueError(f"The file of a snapshot-access node must be a "
                             f"copy-before-write node, not {cbw.driver}")
        self.file = file
        self.cbw = cbw
        self.size = cbw.size
        self.capabilities = Capabilities(
            can_write=False, can_flush=False, can_fua=False, can_trim=True,
            can_fast_zero=False, can_extents=True, can_multi_conn=True,
            sparse_reads=all(child.capabilities.sparse_reads
                             for child in cbw.children.values()))

    def __repr__(self) -> str:
        return f"SnapshotAccess({self.file!r})"

    @property
    def children(self) -> dict[str, Node]:
        return {"file": self.file}

    async def pread(self, buf: memoryview, offset: int) -> None:
        cbw = self.cbw
        end = offset + len(buf)
        source, target = cbw.snapshot_nodes(offset, end)
        pos = offset
        while pos < end:
            length, done = cbw.done.run_at(pos, end)
            view = buf[pos - offset:pos - offset + length]
            if done:
                await target.pread(view, pos)
            else:
                with cbw.frozen(pos, pos + length):
                    await source.pread(view, pos)
            pos += length
        cbw.snapshot_nodes(offset, end)  # broken (the source may have changed) or discarded

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        cbw = self.cbw
        source, target = cbw.snapshot_nodes(offset, offset + 1)
        end = min(offset + length, self.size)
        if cbw.access is not None:
            end = offset + cbw.access.run_at(offset, end)[0]
        extents: list[Extent] = []
        pos = offset
        while pos < end and len(extents) < MAX_EXTENTS:
            run, done = cbw.done.run_at(pos, end)
            if done:
                got = await target.block_status(pos, run)
            else:
                with cbw.frozen(pos, pos + run):
                    got = await source.block_status(pos, run)
            covered = _append(extents, got, run)
            pos += covered
            if covered < run:
                break
        cbw.snapshot_nodes(offset, offset)
        return extents

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.cbw.snapshot_discard(offset, length)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "a snapshot-access node is read-only")

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "a snapshot-access node is read-only")

    async def flush(self) -> None:
        """Nothing to make durable: the node writes nothing."""


class FrozenBacking(FilterNode):
    """The backing node of a fleecing target while ``cbw`` copies into that target:
    reads the frozen view of ``cbw``, never the live source ``child`` (which the
    graph still shows as the backing node, and which queries look through to).

    Args:
        child: the target's backing node as it was: the source.
        cbw: the copy-before-write node whose target is the image over this node.
        sealed: set once the writes in flight when ``cbw`` began copying have landed;
            reads wait for it.
    """

    driver = "x-frozen-backing"

    def __init__(self, child: Node, cbw: CopyBeforeWrite, sealed: asyncio.Event) -> None:
        super().__init__(child)
        self.implicit = True
        self.view = SnapshotAccess(cbw)
        self.sealed = sealed

    def __repr__(self) -> str:
        return f"FrozenBacking({self.child!r})"

    async def pread(self, buf: memoryview, offset: int) -> None:
        if not self.sealed.is_set():
            await self.sealed.wait()
        await self.view.pread(buf, offset)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not self.sealed.is_set():
            await self.sealed.wait()
        return await self.view.block_status(offset, length)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "a frozen backing node is read-only")

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "a frozen backing node is read-only")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "a frozen backing node is read-only")


def _append(into: list[Extent], got: list[Extent], limit: int) -> int:
    """Append ``got`` to ``into``, cut at ``limit`` bytes, merged with the last extent
    where the flags agree; the bytes appended."""
    covered = 0
    for extent in got:
        length = min(extent.length, limit - covered)
        if length <= 0:
            break
        if into and into[-1].flags == extent.flags:
            into[-1] = Extent(into[-1].length + length, extent.flags)
        else:
            into.append(Extent(length, extent.flags))
        covered += length
    return covered
