"""Fleecing: reading one moment of a disk while its writers go on (qemu's
``copy-before-write`` filter, qemu 6.2+, with the snapshot API its
``snapshot-access`` node reads through, qemu 7.0+).

Owns ``CopyBeforeWrite`` (the filter, its copy state, and the snapshot API the
read-only ``pynbd.block.snapshotaccess.SnapshotAccess`` reads through:
``snapshot_nodes``, ``frozen``, ``snapshot_discard``) and the lookups
``blockdev`` needs (``find_tracking``, ``lookup_bitmap``).

Rules of this module:
- The node is a filter over its source (``file``): reads, flushes and block
  status go to the source, and so do writes, which pass the source's tracking
  filter on the way.  Copying is done by a hook on that tracking filter
  (``TrackingFilter.hooks``), which every writer of the source passes, whichever
  parent or export it came through; so the source must have a tracking filter
  on its chain of filters (``find_tracking``), and the node refuses one without.
- The source is copied in *granules*: the largest of 64 KiB, the target's
  cluster size and ``min-cluster-size``, as qemu's block-copy picks its
  cluster size.  A granule is *pending* (to copy, unclaimed), *in flight* (one
  copy claimed it), *done* (its old data is in the target, at the same
  offset), or, with ``bitmap``, outside the copy set (never copied, never
  readable in the snapshot: EACCES, as qemu).
- A write, zeroing or trim of the source first claims every pending granule it
  touches and copies it (source read; target write, or ``write_zeroes`` for a
  granule of zeroes), waits for the copies others claimed of the granules it
  touches, and lands only when each of them is done.  So every granule is
  copied once, and never after a write changed it.  A failed copy puts what
  it did not copy back to pending (the next writer retries): with
  ``on-cbw-error=break-guest-write`` (the default) the write fails with the
  copy's error and changes nothing; with ``break-snapshot`` the write goes on,
  the snapshot is broken (every snapshot request from then on fails with
  EACCES) and writes copy nothing more.  ``cbw-timeout`` (seconds, 0: none)
  limits how long a write waits for its copies; a copy that times out goes
  on in the background and the timeout counts as a failed copy (ETIMEDOUT).
- The frozen-view rule, between a snapshot read and a write of one place:
  the read takes each run of its range from the target where the granules are
  done, and from the source elsewhere, registering that run as a *frozen read*
  in the same step (no await between looking and registering).  A write, once
  its granules are done, waits for the frozen reads overlapping its bytes
  before it lands.  So a run read from the target was copied before the read
  looked (the target's data there is final), and a run read from the source
  is read before any write changes it (a write there waits for the read).  No
  write waits for ever: a read that starts after a write's granules are done
  reads them from the target and freezes nothing there.  ``block_status``
  keeps the same rule, so its answer is true of the frozen view: the target's
  status where done, the source's (frozen) status elsewhere.
- The moment the snapshot shows is when the hook is installed (the node is
  made).  A write already past the tracking filter then is not waited for:
  whoever makes the node must make sure no write to the source is in flight
  (qemu drains the source while it inserts the filter).
- ``release`` takes the hook off at once, with no await (writes stop copying;
  their fast paths come back): from then on the snapshot fails (ENODEV), and
  so does a snapshot read under way, since writes no longer wait for it.
  ``close`` releases, stops copies left running in the background by a
  timeout, waits for the copies in flight and drops the source and the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
from typing import TYPE_CHECKING, cast

from .bitmap import DEFAULT_GRANULARITY, MAX_GRANULARITY, DirtyBitmap
from .fileio import ZEROES
from .filter import FilterNode
from .graph import shown
from .node import Extent, FastPaths, Node
from .tracking import TrackingFilter

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .graph import BlockGraph
    from .node import Data

ON_CBW_ERROR = ("break-guest-write", "break-snapshot")
#: a copy reads and writes at most this much at a time (or one granule, if larger)
COPY_CHUNK = 1 << 20

_ZERO = cast("bytes", ZEROES.obj)


def find_tracking(node: Node) -> TrackingFilter | None:
    """The tracking filter every write to ``node`` passes: ``node`` itself or one under
    it through filters (which keep offsets); None if there is none."""
    while not isinstance(node, TrackingFilter):
        if not isinstance(node, FilterNode):
            return None
        node = node.child
    return node


def lookup_bitmap(graph: BlockGraph, node_name: str, name: str) -> DirtyBitmap:
    """The dirty bitmap ``name`` of the node ``node_name`` (on it or on a filter the
    system put over it); ``ValueError`` with qemu's words if there is none."""
    node = graph.get(node_name)
    if node is None:
        raise ValueError(f"Node '{node_name}' not found")
    while True:
        bitmap = node.bitmaps.get(name) if node.bitmaps is not None else None
        if bitmap is not None:
            return bitmap
        below = list(node.children.values())
        if not node.implicit or len(below) != 1:
            raise ValueError(f"Dirty bitmap '{name}' not found")
        node = below[0]


def granule_for(target: Node, min_cluster_size: int = 0) -> int:
    """The copy granule: the largest of 64 KiB, the target's cluster size (qcow2) and
    ``min_cluster_size`` (a power of two)."""
    if min_cluster_size & (min_cluster_size - 1):
        raise ValueError("min-cluster-size needs to be a power of 2")
    if min_cluster_size > MAX_GRANULARITY:
        raise ValueError(f"min-cluster-size too large: {min_cluster_size} > "
                         f"{MAX_GRANULARITY}")
    cluster = getattr(shown(target), "cluster_size", None)
    return max(DEFAULT_GRANULARITY, min_cluster_size,
               cluster if isinstance(cluster, int) else 0)


def _all_zero(view: memoryview) -> bool:
    step = len(_ZERO)
    return all(_ZERO.startswith(view[pos:pos + step]) for pos in range(0, len(view), step))


class GranuleMap(DirtyBitmap):
    """A bit per granule whose lookups search no further than the range asked (a
    ``DirtyBitmap`` run search goes on to the end of the bitmap: milliseconds per
    call on a large disk, too slow for every write)."""

    def run_at(self, offset: int, end: int) -> tuple[int, bool]:
        """The run from ``offset`` (before ``end``, inside the node): its length, cut
        at ``end``, and whether its bits are set."""
        bit = offset >> self.shift
        value = self.is_dirty(offset)
        stop = self._next(bit + 1, ((end - 1) >> self.shift) + 1, dirty=not value)
        return min(end, stop << self.shift) - offset, value

    def set_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """``(offset, length)`` of the runs of set bits in ``[start, end)``."""
        runs: list[tuple[int, int]] = []
        while start < end:
            length, value = self.run_at(start, end)
            if value:
                runs.append((start, length))
            start += length
        return runs


@dataclasses.dataclass(eq=False)
class _Span:
    """A copy in flight, or a frozen read: bytes ``[start, end)``, ``pos`` how far a
    copy got, ``over`` resolved when it ends."""

    start: int
    end: int
    over: asyncio.Future[None]
    pos: int = 0


class CopyBeforeWrite(Node):
    """Copies the old data of the source to ``target`` before any write changes it.

    Args:
        source: the ``file`` child: the node as its parents and exports use it.
        target: where old data goes, at the same offsets (at least as large).
        tracking: the source's tracking filter (found under ``source`` if None).
        bitmap: copy (and let the snapshot read) only the granules it marks.
        on_cbw_error: ``break-guest-write`` or ``break-snapshot``.
        cbw_timeout: seconds a write waits for its copies; 0 for no limit.
        min_cluster_size: the smallest granule (a power of two; 0: 64 KiB).

    Raises:
        ValueError: the nodes cannot be used so (qemu's words where it has them).
    """

    driver = "copy-before-write"

    def __init__(self, source: Node, target: Node, *, tracking: TrackingFilter | None = None,
                 bitmap: DirtyBitmap | None = None, on_cbw_error: str = "break-guest-write",
                 cbw_timeout: float = 0, min_cluster_size: int = 0) -> None:
        found = find_tracking(source)
        if found is None or (tracking is not None and found is not tracking):
            raise ValueError("Cannot copy before write: not every write to the source "
                             "passes a tracking filter")
        if find_tracking(target) is found or shown(target) is shown(source):
            raise ValueError("The copy-before-write target cannot be its source")
        if target.size < source.size:
            raise ValueError(f"The copy-before-write target ({target.size} bytes) is "
                             f"smaller than the source ({source.size} bytes)")
        if on_cbw_error not in ON_CBW_ERROR:
            raise ValueError(f"Invalid on-cbw-error '{on_cbw_error}'")
        if cbw_timeout < 0:
            raise ValueError("cbw-timeout must not be negative")
        self.granule = granule_for(target, min_cluster_size)
        self._mask = self.granule - 1
        self.size = source.size
        self.capabilities = source.capabilities
        self._source: Node | None = source
        self._target: Node | None = target
        self.tracking: TrackingFilter | None = found
        self.on_cbw_error = on_cbw_error
        self.cbw_timeout = cbw_timeout
        #: granules whose old data is in the target
        self.done = GranuleMap("done", self.size, self.granule, enabled=False)
        #: granules still to copy, unclaimed
        self.pending = GranuleMap("pending", self.size, self.granule, enabled=False)
        #: granules the snapshot may read (None: all)
        self.access: GranuleMap | None = None
        if bitmap is None:
            self.pending.fill()
        else:
            self.pending.merge(bitmap)
            self.access = GranuleMap("access", self.size, self.granule, enabled=False)
            self.access.merge(self.pending)
        #: the first copy error, with ``break-snapshot``: the snapshot is gone
        self.snapshot_error: OSError | None = None
        self._copies: list[_Span] = []
        self._reads: list[_Span] = []
        self._background: set[asyncio.Task[None]] = set()
        found.hooks.append(self._before_write)

    def __repr__(self) -> str:
        return (f"CopyBeforeWrite({self._source!r}, {self._target!r}, "
                f"granule={self.granule})")

    @property
    def children(self) -> dict[str, Node]:
        if self._source is None or self._target is None:
            return {}
        return {"file": self._source, "target": self._target}

    def _nodes(self) -> tuple[Node, Node]:
        if self._source is None or self._target is None:
            raise OSError(errno.ENODEV, "the copy-before-write node is closed")
        return self._source, self._target

    # -- the filter: everything goes to the source ---------------------------------------

    def fast_paths(self) -> FastPaths:
        return self._source.resolve().fast_paths() if self._source is not None else FastPaths()

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._nodes()[0].pread(buf, offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self._nodes()[0].pwrite(data, offset, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self._nodes()[0].write_zeroes(offset, length, may_trim=may_trim, fast=fast,
                                            fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._nodes()[0].trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self._nodes()[0].flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self._nodes()[0].block_status(offset, length)

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self._nodes()[0].allocation_depth(offset, length)

    # -- copying before writes -----------------------------------------------------------

    async def _before_write(self, offset: int, length: int) -> None:
        """The hook: copy what ``[offset, offset + length)`` touches, then wait for the
        frozen reads of those bytes."""
        end = min(offset + length, self.size)
        if self.tracking is None or end <= offset:  # closed, or the snapshot is broken
            return
        start, stop = offset & ~self._mask, min(self.size, (end + self._mask) & ~self._mask)
        try:
            if self.cbw_timeout:
                await self._copy_in_time(start, stop)
            else:
                await self._copy(start, stop)
        except OSError as err:
            if self.on_cbw_error == "break-guest-write":
                raise
            self._break(err)
        await _wait_for(self._reads, offset, end)

    async def _copy_in_time(self, start: int, stop: int) -> None:
        task = asyncio.ensure_future(self._copy(start, stop))
        self._background.add(task)
        task.add_done_callback(self._reap)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.cbw_timeout)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"copy before write took more than "
                                           f"{self.cbw_timeout} s") from None

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # seen by the write that waited, or by nobody after a timeout

    async def _copy(self, start: int, stop: int) -> None:
        """Make every granule of the copy set in ``[start, stop)`` done."""
        loop = asyncio.get_running_loop()
        while self.tracking is not None:  # not closed, the snapshot not broken
            others = [span.over for span in self._copies
                      if span.start < stop and start < span.end]
            mine: list[_Span] = []
            for run_start, run_length in self.pending.set_runs(start, stop):
                self.pending.reset(run_start, run_length)
                span = _Span(run_start, run_start + run_length, loop.create_future(), run_start)
                self._copies.append(span)
                mine.append(span)
            if not mine and not others:
                return
            try:
                for span in mine:
                    await self._copy_span(span)
                    self._end(span)
            finally:
                for span in mine:
                    if not span.over.done():  # failed or cancelled: the rest is pending again
                        self._repend(span.pos, span.end)
                        self._end(span)
            if others:
                await asyncio.wait(others)

    async def _copy_span(self, span: _Span) -> None:
        source, target = self._nodes()
        step = max(COPY_CHUNK, self.granule)
        while span.pos < span.end:
            count = min(step, span.end - span.pos)
            buf = bytearray(count)
            view = memoryview(buf)
            await source.pread(view, span.pos)
            if _all_zero(view):
                await target.write_zeroes(span.pos, count)
            else:
                await target.pwrite(view, span.pos)
            self.done.set(span.pos, count)
            span.pos += count

    def _repend(self, start: int, end: int) -> None:
        if self.access is None:
            self.pending.set(start, end - start)
            return
        for run_start, run_length in self.access.set_runs(start, end):
            self.pending.set(run_start, run_length)  # not what the snapshot discarded

    def _end(self, span: _Span) -> None:
        self._copies.remove(span)
        span.over.set_result(None)

    def _break(self, err: OSError) -> None:
        """``break-snapshot``: the snapshot is gone, writes copy nothing more."""
        if self.snapshot_error is None:
            self.snapshot_error = err
        self._unhook()

    def _unhook(self) -> None:
        if self.tracking is not None:
            if self._before_write in self.tracking.hooks:
                self.tracking.hooks.remove(self._before_write)
            self.tracking = None

    # -- the snapshot API, for ``pynbd.block.snapshotaccess`` -----------------------------

    def snapshot_nodes(self, offset: int, end: int) -> tuple[Node, Node]:
        """``(source, target)`` for a snapshot request of ``[offset, end)``.

        Raises:
            OSError: EACCES if the snapshot is broken or holds nothing there (outside
                the copy bitmap, or discarded); ENODEV once the node is released or
                closed.
        """
        nodes = self._nodes()
        if self.snapshot_error is not None:
            raise OSError(errno.EACCES, "the snapshot is broken: a copy before write "
                                        f"failed ({self.snapshot_error})")
        if self.tracking is None:
            raise OSError(errno.ENODEV, "the snapshot was released: writes no longer copy")
        end = min(end, self.size)
        if self.access is not None and end > offset:
            length, readable = self.access.run_at(offset, end)
            if not readable or length < end - offset:
                raise OSError(errno.EACCES, "the snapshot holds no data here (outside "
                                            "its copy bitmap, or discarded)")
        return nodes

    @contextlib.contextmanager
    def frozen(self, start: int, end: int) -> Iterator[None]:
        """A frozen read of ``[start, end)`` of the source: writes there wait until it
        ends.  Enter it in the same step as seeing the range is not done."""
        span = _Span(start, end, asyncio.get_running_loop().create_future())
        self._reads.append(span)
        try:
            yield
        finally:
            self._reads.remove(span)
            span.over.set_result(None)

    async def snapshot_discard(self, offset: int, length: int) -> None:
        """The snapshot no longer needs the granules wholly inside the range: not copied
        from now on, unreadable, and discarded in the target (qemu's discard on
        snapshot-access)."""
        _, target = self._nodes()
        end = min(offset + length, self.size)
        start = (offset + self._mask) & ~self._mask
        stop = end if end == self.size else end & ~self._mask
        if stop <= start:
            return
        if self.access is None:
            self.access = GranuleMap("access", self.size, self.granule, enabled=False)
            self.access.fill()
        self.access.reset(start, stop - start)
        self.pending.reset(start, stop - start)
        await target.trim(start, stop - start)

    # -- closing ---------------------------------------------------------------------

    def release(self) -> None:
        """Take the hook off now (no await): writes copy nothing more, and the snapshot
        fails from now on.  ``close`` still waits for the copies in flight."""
        self._unhook()

    async def close(self) -> None:
        self._unhook()
        for task in list(self._background):
            task.cancel()
        waiting = [span.over for span in self._copies] + list(self._background)
        if waiting:
            await asyncio.wait(waiting)
        self._source = self._target = None


async def _wait_for(spans: list[_Span], start: int, end: int) -> None:
    """Until no span of ``spans`` overlaps ``[start, end)``."""
    while True:
        overlapping = [span.over for span in spans if span.start < end and start < span.end]
        if not overlapping:
            return
        await asyncio.wait(overlapping)

