"""Host cluster refcounts: the refcount table, its blocks, and allocating clusters.

Owns qemu's docs/interop/qcow2.rst "Host cluster management": reading and
changing refcounts of every width (1..64 bits), allocating host clusters at
the end of the file (freed clusters are not reused), creating refcount blocks
(themselves counted) and growing the refcount table.

Rules of this module:
- Every change runs under one lock and is written through to the file at
  once, in an order a crash cannot turn into corruption: a new refcount
  block is written (with its own count) before the table entry that points
  at it; a new refcount table is written whole, then the header switched to
  it in one 12-byte write, then the old table freed.  A crash leaves at
  worst leaked clusters.
- A new refcount block and a new table are flushed before anything points
  at them.  ``allocate`` writes the counts without flushing: the caller
  flushes before it writes an entry that uses the clusters.
"""

from __future__ import annotations

import asyncio
import errno
import struct
from typing import TYPE_CHECKING

from ..node import Growable
from .cache import TableCache
from .header import OFFSET_REFCOUNT_TABLE, Qcow2Error

if TYPE_CHECKING:
    from ..node import Node
    from .header import Header

#: bits 9..63 of a refcount table entry
_TABLE_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00


def get_entry(block: bytearray, index: int, bits: int) -> int:
    """Refcount ``index`` of a block of ``bits``-bit entries."""
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(block[index * width:(index + 1) * width], "big")
    bit = index * bits
    return (block[bit // 8] >> (bit % 8)) & ((1 << bits) - 1)


def set_entry(block: bytearray, index: int, value: int, bits: int) -> tuple[int, int]:
    """Set refcount ``index`` in memory; returns the byte range that changed.  Entries
    narrower than a byte fill it from the least significant bit up."""
    if bits >= 8:
        width = bits // 8
        block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
        return index * width, width
    bit = index * bits
    shift = bit % 8
    byte = block[bit // 8] & ~(((1 << bits) - 1) << shift)
    block[bit // 8] = byte | (value << shift)
    return bit // 8, 1


class Refcounts:
    """The refcounts of the image in ``file``; ``load`` before use."""

    def __init__(self, file: Node, header: Header, budget: int) -> None:
        self.file = file
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.bits = 1 << header.refcount_order
        self.max_value = (1 << self.bits) - 1
        #: refcount entries per block
        self.per_block = self.cluster_size * 8 // self.bits
        self.table_offset = header.refcount_table_offset
        self.table: list[int] = []
        #: how many table entries the table in the file holds
        self.file_entries = header.refcount_table_clusters * self.cluster_size // 8
        self.blocks = TableCache(file, self.cluster_size, budget)
        self.lock = asyncio.Lock()
        #: the next cluster index to allocate
        self.end = -(-file.size // self.cluster_size)
        self._growing = False

    async def load(self) -> None:
        raw = bytearray(self.file_entries * 8)
        await self.file.pread(memoryview(raw), self.table_offset)
        self.table = [entry & _TABLE_OFFSET_MASK
                      for entry in struct.unpack(f">{self.file_entries}Q", raw)]
        for offset in self.table:
            if offset % self.cluster_size or offset + self.cluster_size > self.file.size:
                raise Qcow2Error(f"refcount block offset {offset:#x} is invalid")

    # -- entries ---------------------------------------------------------------

    def _get_entry(self, block: bytearray, index: int) -> int:
        return get_entry(block, index, self.bits)

    def _set_entry(self, block: bytearray, index: int, value: int) -> tuple[int, int]:
        return set_entry(block, index, value, self.bits)

    async def _block(self, number: int, *, create: bool) -> tuple[int, bytearray] | None:
        """Refcount block ``number``: ``(offset, table)``; None if absent and not created."""
        if number >= len(self.table):
            if not create:
                return None
            await self._grow_table(number)
        offset = self.table[number]
        if offset:
            return offset, await self.blocks.get(offset)
        if not create:
            return None
        cluster = await self._take(1)
        block = bytearray(self.cluster_size)
        if cluster // self.per_block == number:
            self._set_entry(block, cluster % self.per_block, 1)
        else:
            await self._change(cluster, 1)
        offset = cluster << self.cluster_bits
        await self.file.pwrite(block, offset)
        await self.file.flush()  # the block is durable before the table points at it
        self.blocks.put(offset, block)
        self.table[number] = offset
        await self._write_table_entry(number)
        return offset, block

    async def _write_table_entry(self, number: int) -> None:
        if number < self.file_entries:
            await self.file.pwrite(struct.pack(">Q", self.table[number]),
                                   self.table_offset + 8 * number)

    async def _take(self, count: int) -> int:
        """Reserve ``count`` clusters at the end of the file; the first's index."""
        start = self.end
        self.end += count
        new_size = self.end << self.cluster_bits
        if new_size > self.file.size:
            if not isinstance(self.file, Growable):
                raise OSError(errno.ENOSPC, "the image's file node cannot grow")
            await self.file.grow(new_size)
        return start

    async def _get(self, cluster: int) -> int:
        found = await self._block(cluster // self.per_block, create=False)
        if found is None:
            return 0
        return self._get_entry(found[1], cluster % self.per_block)

    async def _change(self, cluster: int, delta: int) -> int:
        found = await self._block(cluster // self.per_block, create=True)
        assert found is not None
        offset, block = found
        index = cluster % self.per_block
        value = self._get_entry(block, index) + delta
        if not 0 <= value <= self.max_value:
            raise OSError(errno.EIO, f"refcount of cluster {cluster} out of range ({value})")
        start, length = self._set_entry(block, index, value)
        await self.file.pwrite(bytes(block[start:start + length]), offset + start)
        return value

    async def _grow_table(self, number: int) -> None:
        if self._growing:
            raise OSError(errno.EIO, "refcount table grew while growing")
        self._growing = True
        try:
            await self._switch_table(number)
        finally:
            self._growing = False

    async def _switch_table(self, number: int) -> None:
        per_cluster = self.cluster_size // 8
        entries = max(2 * len(self.table), number + 1)
        while True:
            clusters = -(-entries // per_cluster)
            entries = clusters * per_cluster
            limit = (self.end + 2 * clusters + 8) // self.per_block + 2
            if entries >= max(limit, number + 1):
                break
            entries = max(limit, number + 1)
        self.table.extend([0] * (entries - len(self.table)))
        start = await self._take(clusters)
        for cluster in range(start, start + clusters):
            await self._change(cluster, 1)
        new_offset = start << self.cluster_bits
        await self.file.pwrite(struct.pack(f">{entries}Q", *self.table), new_offset)
        await self.file.flush()  # the new table is durable before the header points at it
        await self.file.pwrite(struct.pack(">QI", new_offset, clusters), OFFSET_REFCOUNT_TABLE)
        await self.file.flush()  # ... and the header is, before the old table is freed
        old_offset = self.table_offset
        old_clusters = self.file_entries // per_cluster
        self.table_offset, self.file_entries = new_offset, entries
        for cluster in range(old_offset >> self.cluster_bits,
                             (old_offset >> self.cluster_bits) + old_clusters):
            await self._change(cluster, -1)

    # -- the public side -----------------------------------------------------

    async def get(self, cluster: int) -> int:
        """The refcount of host cluster ``cluster`` (an index)."""
        async with self.lock:
            return await self._get(cluster)

    async def allocate(self, count: int = 1) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1, written to the file, not
        flushed); the first one's offset."""
        async with self.lock:
            start = await self._take(count)
            await self._set_range(start, count)
            return start << self.cluster_bits

    async def _set_range(self, start: int, count: int) -> None:
        """Count clusters ``[start, start + count)`` (free until now) once."""
        await self._apply(range(start, start + count), 1, fresh=True)

    async def _apply(self, clusters: range | list[int], delta: int, *,
                     fresh: bool = False) -> None:
        """Add ``delta`` to the refcount of every cluster in ``clusters`` (sorted): one
        write per refcount block.  ``fresh``: they must be free until now."""
        pos = 0
        while pos < len(clusters):
            number = clusters[pos] // self.per_block
            found = await self._block(number, create=True)
            assert found is not None
            offset, block = found
            lo, hi = len(block), 0
            while pos < len(clusters) and clusters[pos] // self.per_block == number:
                cluster = clusters[pos]
                index = cluster % self.per_block
                old = self._get_entry(block, index)
                value = old + delta
                if (fresh and old) or not 0 <= value <= self.max_value:
                    raise OSError(errno.EIO, f"qcow2: refcount of cluster {cluster} is "
                                  f"{old}, cannot add {delta}")
                first, length = self._set_entry(block, index, value)
                lo, hi = min(lo, first), max(hi, first + length)
                pos += 1
            await self.file.pwrite(bytes(block[lo:hi]), offset + lo)

    async def release(self, clusters: list[int]) -> None:
        """Drop one reference to each of ``clusters``."""
        async with self.lock:
            await self._apply(sorted(clusters), -1)

    async def change(self, cluster: int, delta: int) -> int:
        """Add ``delta`` to the refcount of ``cluster``; the new value."""
        async with self.lock:
            return await self._change(cluster, delta)
