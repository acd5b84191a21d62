"""The qcow2 node's metadata write-back: L1 and L2 changes kept in memory, and written
in crash-safe order when the node is flushed.

Owns ``Qcow2Metadata`` (a base of ``Qcow2Node``), and the overlap check
(``_overlaps``): ``_set_entry`` and
``_write_l1`` change the tables in memory only and mark them dirty;
``_writeback`` writes them out; ``_apply_releases`` then decrements what the
written changes stopped using.

Rules of this module (the order of a writeback, so that a power cut at any
moment leaves an image with leaks at worst):
1. Dirty tables and L1 entries are copied (a consistent snapshot: changes are
   made with no ``await`` inside) together with the releases waiting for
   them; changes made later wait for the next writeback.
2. The file is flushed: the data every copied entry points at (written before
   its entry changed) and the refcounts of every cluster they use (raised
   before the cluster was handed out) are durable before any entry is.
3. The copied L2 tables are written, and flushed before any L1 entry that may
   point at a new one is written; then the L1 entries, and a flush.
4. Only then are the waiting releases held for decrement (with the epoch of
   requests that may still use them, see ``Qcow2Node``), so no refcount drops
   before the entries that stopped using the cluster are durable.
- A failed writeback leaves everything dirty (retried by the next flush) and
  fails the flush that ran it, so no change is lost silently (qemu keeps its
  cache entries dirty the same way).
- Writebacks run one at a time: a flush waits for one in progress, since
  that one may hold entries of writes the flush must cover.
- Dirty tables stay pinned in the L2 cache (never evicted unwritten); beyond
  half of the cache's capacity a writeback is forced.
- A SIGKILL loses the changes since the last flush, as it does for qemu: the
  data of writes that needed no new cluster is in the file, that of
  allocating writes unreferenced (leaked) until written again.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import struct
from typing import TYPE_CHECKING

from ..node import Growable
from .entries import OFFSET_MASK
from .fast import Qcow2Fast

if TYPE_CHECKING:
    from ..node import Node
    from .entries import Mapping
    from .header import Header
    from .refcount import Refcounts

_ENTRY = struct.Struct(">Q")


class Qcow2Metadata(Qcow2Fast):
    """The write-back of L1 and L2 changes (see the module's docstring)."""

    refcounts: Refcounts

    def __init__(self, file: Node, header: Header, l1: list[int], *,
                 backing: Node | None, cache_size: int) -> None:
        super().__init__(file, header, l1, backing=backing, cache_size=cache_size)
        #: offsets of L2 tables changed in memory only (each holds one cache pin)
        self._dirty_l2: dict[int, None] = {}
        #: L1 indices changed in memory only
        self._dirty_l1: set[int] = set()
        #: host offsets of the active L2 tables (for the overlap check)
        self._l2_tables = {entry & OFFSET_MASK for entry in l1} - {0}
        #: host offsets of the metadata clusters that never move (overlap check)
        self._static_meta = clusters_of(header.cluster_size, [
            (0, header.cluster_size), (header.l1_table_offset, header.l1_size * 8),
            (header.snapshots_offset, 40 * header.nb_snapshots),
            (0, 0) if header.bitmaps is None else (header.bitmaps.directory_offset,
                                                   header.bitmaps.directory_size)])
        self._writeback_lock = asyncio.Lock()
        #: clusters whose entries are gone, to decrement after the next writeback
        self._to_release: list[int] = []
        #: (epoch, clusters) unused durably, to decrement once the epoch is over
        self._held: collections.deque[tuple[list[int], list[int]]] = collections.deque()

    # -- changes in memory ----------------------------------------------------------

    def _set_entry(self, table: bytearray, l2_offset: int, index: int,
                   entry: tuple[int, int]) -> None:
        if self.extended:
            struct.pack_into(">QQ", table, index * 16, *entry)
        else:
            _ENTRY.pack_into(table, index * 8, entry[0])
        self._table_changed(l2_offset)

    def _table_changed(self, l2_offset: int) -> None:
        if l2_offset not in self._dirty_l2:
            self._dirty_l2[l2_offset] = None
            self.l2_cache.pin(l2_offset)

    def _write_l1(self, l1_index: int, value: int) -> None:
        self._l2_tables.discard(self.l1[l1_index] & OFFSET_MASK)
        self.l1[l1_index] = value
        self._l2_tables.add(value & OFFSET_MASK)
        self._dirty_l1.add(l1_index)

    def _forget_table(self, l2_offset: int) -> None:
        """A table that nothing points at any more (its cluster is being freed)."""
        if self._dirty_l2.pop(l2_offset, 0) is None:
            self.l2_cache.unpin(l2_offset)
        self.l2_cache.drop(l2_offset)

    def _overlaps(self, host: int) -> bool:
        """qemu's overlap check ("cached"), for a data cluster about to be written or
        handed out: is it the header, the L1 table, the refcount table or a block,
        an active L2 table, the snapshot table or the bitmap directory?  Only a
        corrupt image can make it so; the write then fails with EIO instead of
        destroying metadata."""
        return (host in self._static_meta or host in self._l2_tables
                or host in self.refcounts.meta)

    def _overlaps_range(self, host: int, length: int) -> bool:
        """``_overlaps`` for every cluster of a run, each set searched in C."""
        size = self.cluster_size
        clusters = range(host & ~(size - 1), host + length, size)
        return not (self._static_meta.isdisjoint(clusters)
                    and self._l2_tables.isdisjoint(clusters)
                    and self.refcounts.meta.isdisjoint(clusters))

    def metadata_moved(self, added: set[int], removed: set[int]) -> None:
        """Metadata that is not an L2 or refcount structure moved (the bitmap
        directory): the overlap check follows it."""
        self._static_meta |= added
        self._static_meta -= removed

    async def _writable_in_place(self, mapping: Mapping) -> bool:
        if mapping.compressed or not mapping.host:
            return False
        if self._overlaps(mapping.host):
            raise OSError(errno.EIO, f"qcow2: data cluster {mapping.host:#x} overlaps "
                          f"metadata (the image is corrupt)")
        if mapping.host + self.cluster_size > self.file.size:
            if mapping.host >= self.file.size or not isinstance(self.file, Growable):
                raise OSError(errno.EIO, f"qcow2: data cluster {mapping.host:#x} lies "
                              f"past the end of the file")
            # qemu-img leaves the file ending inside a last cluster whose tail is
            # unallocated (extended L2): its file grows to hold the whole cluster
            await self.file.grow(mapping.host + self.cluster_size)
        if mapping.copied:
            return True
        return await self.refcounts.get(mapping.host >> self.cluster_bits) == 1

    @property
    def _too_dirty(self) -> bool:
        return len(self._dirty_l2) > self.l2_cache.capacity // 2

    # -- writing out -------------------------------------------------------------------

    async def _writeback(self) -> None:
        """Make every change made so far durable, in the order of the module's rules."""
        async with self._writeback_lock:
            cache = self.l2_cache
            tables, self._dirty_l2 = self._dirty_l2, {}
            copies = []
            for offset in tables:
                table = cache.cached(offset)  # pinned while dirty: always there
                assert table is not None
                copies.append((offset, bytes(table)))
            l1_dirty, self._dirty_l1 = sorted(self._dirty_l1), set()
            l1_values = [self.l1[i] for i in l1_dirty]
            pending, self._to_release = self._to_release, []
            try:
                await self.file.flush()
                for offset, raw in copies:
                    await self.file.pwrite(raw, offset)
                if l1_dirty:
                    if copies:
                        await self.file.flush()
                    await self._write_l1_entries(l1_dirty, l1_values)
                if copies or l1_dirty:
                    await self.file.flush()
            except BaseException:
                for offset in tables:  # still dirty: the next writeback tries again
                    if offset in self._dirty_l2:
                        cache.unpin(offset)
                    else:
                        self._dirty_l2[offset] = None
                self._dirty_l1.update(l1_dirty)
                self._to_release[:0] = pending
                raise
            for offset in tables:
                cache.unpin(offset)
            if pending:
                self._held.append((self.epoch, pending))
                self.epoch = [0]

    async def _write_l1_entries(self, indices: list[int], values: list[int]) -> None:
        """The L1 entries, one write per run of neighbours."""
        base = self.header.l1_table_offset
        start = 0
        while start < len(indices):
            end = start + 1
            while end < len(indices) and indices[end] == indices[end - 1] + 1:
                end += 1
            raw = struct.pack(f">{end - start}Q", *values[start:end])
            await self.file.pwrite(raw, base + 8 * indices[start])
            start = end

    async def _apply_releases(self) -> None:
        """Write back what waits, then decrement the clusters whose entries' change
        is durable and whose epoch (and every older one) has no request left."""
        await self._writeback()
        held, ready = self._held, []
        while held and not held[0][0][0]:
            ready.extend(held.popleft()[1])
        if ready:
            await self.refcounts.release(ready)


def clusters_of(size: int, areas: list[tuple[int, int]]) -> set[int]:
    """The host offsets of every cluster the ``(offset, length)`` areas touch."""
    hosts: set[int] = set()
    for start, length in areas:
        if length > 0:
            hosts.update(range(start & ~(size - 1), start + length, size))
    return hosts
