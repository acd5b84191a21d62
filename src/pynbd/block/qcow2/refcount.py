"""Host cluster refcounts: the refcount table, its blocks, and allocating clusters.

Owns qemu's docs/interop/qcow2.rst "Host cluster management": reading and
changing refcounts of every width (1..64 bits), allocating host clusters (free
ones first, found through the refcount blocks from a hint as qemu's
``free_cluster_index``, then at the end of the file), freeing them (punched in
the file when it can trim), creating refcount blocks (themselves counted) and
growing the refcount table.

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
- A cluster is free (``allocate`` may hand it out) when its refcount is 0 in
  memory; ``release`` is only called once nothing can use the clusters any
  more (the node's rules).  Refcount blocks and refcount tables are taken at
  the end of the file, never from free clusters, so nothing ``allocate`` has
  found but not yet counted can be taken twice while the counts are written;
  an old refcount table is freed only after the header points at the new one
  durably.
- Punching: a cluster whose last reference goes is punched in the file
  (``file.capabilities.can_trim``) before its refcount is decremented, under
  the lock.  So the punch has finished before the cluster can be handed out
  again (a punch landing after a new write would destroy it), and a crash
  or failure in between leaves a leaked cluster of zeroes, never a counted
  cluster that is needed.  Punch errors are ignored (a discard is a hint, as
  in qemu).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import re
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
#: a byte that is not zero
_NONZERO = re.compile(rb"[^\x00]")
#: for entries narrower than a byte: a byte holding at least one entry of 0
_HAS_ZERO = {bits: re.compile(b"[" + b"".join(
    re.escape(bytes([value])) for value in range(256)
    if any(not (value >> shift) & ((1 << bits) - 1) for shift in range(0, 8, bits))) + b"]")
    for bits in (1, 2, 4)}


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


def find_free(block: bytearray, index: int, stop: int, bits: int) -> int:
    """The first entry of ``[index, stop)`` that is 0, or ``stop``."""
    if bits >= 8:
        width = bits // 8
        zero = bytes(width)
        pos, limit = index * width, stop * width
        while True:
            hit = block.find(zero, pos, limit)
            if hit < 0:
                return stop
            if not hit % width:
                return hit // width
            pos = hit - hit % width + width  # across two entries: go on at the next one
    return _scan_narrow(block, index, stop, bits, _HAS_ZERO[bits], want_zero=True)


def find_used(block: bytearray, index: int, stop: int, bits: int) -> int:
    """The first entry of ``[index, stop)`` that is not 0, or ``stop``."""
    if bits >= 8:
        width = bits // 8
        found = _NONZERO.search(block, index * width, stop * width)
        return stop if found is None else found.start() // width
    return _scan_narrow(block, index, stop, bits, _NONZERO, want_zero=False)


def _scan_narrow(block: bytearray, index: int, stop: int, bits: int,
                 byte_with: re.Pattern[bytes], *, want_zero: bool) -> int:
    """``find_free``/``find_used`` for entries narrower than a byte: entry by entry
    up to a byte boundary, then whole bytes with ``byte_with`` (C speed)."""
    per_byte = 8 // bits
    while index < stop and index % per_byte:
        if (get_entry(block, index, bits) == 0) == want_zero:
            return index
        index += 1
    if index >= stop:
        return stop
    found = byte_with.search(block, index // per_byte, -(-stop // per_byte))
    if found is None:
        return stop
    index = found.start() * per_byte
    while (get_entry(block, index, bits) == 0) != want_zero:
        index += 1  # the byte holds one: this ends within it
    return min(index, stop)


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
        #: the first cluster index past the file's clusters (allocated at the end)
        self.end = -(-file.size // self.cluster_size)
        #: no free cluster below this index (qemu's free_cluster_index)
        self.hint = 0
        #: host offsets ``allocate`` handed out from space the file just grew by (a
        #: hole: they read as zeroes until written); the user takes them out
        self.fresh: set[int] = set()
        #: host offsets of the refcount table's clusters and of the refcount blocks
        #: (for the overlap check of data writes)
        self.meta: set[int] = set()
        self._growing = False

    async def load(self) -> None:
        raw = bytearray(self.file_entries * 8)
        await self.file.pread(memoryview(raw), self.table_offset)
        self.table = [entry & _TABLE_OFFSET_MASK
                      for entry in struct.unpack(f">{self.file_entries}Q", raw)]
        for offset in self.table:
            if offset % self.cluster_size or offset + self.cluster_size > self.file.size:
                raise Qcow2Error(f"refcount block offset {offset:#x} is invalid")
        self.meta = self._table_clusters() | set(self.table)
        self.meta.discard(0)

    def _table_clusters(self) -> set[int]:
        size = self.cluster_size
        first = self.table_offset & ~(size - 1)
        return set(range(first, self.table_offset + self.file_entries * 8, size))

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
        self.meta.add(offset)
        await self._write_table_entry(number)
        return offset, block

    async def _write_table_entry(self, number: int) -> None:
        if number < self.file_entries:
            await self.file.pwrite(struct.pack(">Q", self.table[number]),
                                   self.table_offset + 8 * number)

    async def _take(self, count: int) -> int:
        """Reserve ``count`` clusters at the end of the file; the first's index.  Not
        counted yet: only the caller, under the lock, knows of them."""
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
        self.meta -= self._table_clusters()
        self.table_offset, self.file_entries = new_offset, entries
        self.meta |= self._table_clusters()
        first = old_offset >> self.cluster_bits
        await self._release(list(range(first, first + old_clusters)))

    # -- the public side -----------------------------------------------------

    async def get(self, cluster: int) -> int:
        """The refcount of host cluster ``cluster`` (an index)."""
        async with self.lock:
            return await self._get(cluster)

    async def allocate(self, count: int = 1) -> list[int]:
        """Allocate up to ``count`` clusters (refcount 1, written to the file, not
        flushed): the free ones from the hint up if there are any (maybe fewer,
        so that the file does not grow while clusters are free), else ``count``
        at the end of the file; their offsets, in order."""
        async with self.lock:
            clusters = await self._gather(count)
            if not clusters:
                first_new = -(-self.file.size // self.cluster_size)
                start = await self._take(count)
                clusters = list(range(start, start + count))
                self.fresh.update(c << self.cluster_bits for c in clusters if c >= first_new)
            elif (clusters[-1] + 1) << self.cluster_bits > self.file.size:
                # the file ends inside the last cluster handed out: whole clusters
                if not isinstance(self.file, Growable):
                    raise OSError(errno.ENOSPC, "the image's file node cannot grow")
                await self.file.grow((clusters[-1] + 1) << self.cluster_bits)
            await self._apply(clusters, 1, fresh=True)
            return [cluster << self.cluster_bits for cluster in clusters]

    async def _gather(self, count: int) -> list[int]:
        """Up to ``count`` free clusters below ``end``, from the hint up; the hint
        moves past them (and past every used cluster seen)."""
        found: list[int] = []
        cluster, end, per_block = self.hint, self.end, self.per_block
        while cluster < end and len(found) < count:
            number = cluster // per_block
            base = number * per_block
            stop = min(end, base + per_block)
            offset = self.table[number] if number < len(self.table) else 0
            if not offset:  # no block: every cluster it would count is free
                take = min(stop - cluster, count - len(found))
                found.extend(range(cluster, cluster + take))
                cluster += take
                continue
            block = await self.blocks.get(offset)
            while cluster < stop and len(found) < count:
                first = base + find_free(block, cluster - base, stop - base, self.bits)
                if first >= stop:
                    cluster = stop
                    break
                limit = min(stop, first + count - len(found))
                cluster = base + find_used(block, first - base, limit - base, self.bits)
                found.extend(range(first, cluster))
        self.hint = cluster
        return found

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
        """Drop one reference to each of ``clusters`` (nothing may use those whose
        last reference this is: they are punched, then free)."""
        async with self.lock:
            await self._release(sorted(clusters))

    async def _release(self, clusters: list[int]) -> None:
        freed: list[int] = []
        for cluster, group in itertools.groupby(clusters):
            if await self._get(cluster) == len(list(group)):
                freed.append(cluster)
        if freed and self.file.capabilities.can_trim:
            await self._punch(freed)
        await self._apply(clusters, -1)
        if freed:
            self.hint = min(self.hint, freed[0])

    async def _punch(self, clusters: list[int]) -> None:
        """Trim ``clusters`` (sorted) in the file, one call per contiguous run."""
        bits = self.cluster_bits
        for _, group in itertools.groupby(enumerate(clusters), lambda pair: pair[1] - pair[0]):
            run = [cluster for _, cluster in group]
            try:
                await self.file.trim(run[0] << bits, len(run) << bits)
            except OSError:
                return  # a hint: the clusters are freed all the same

    async def change(self, cluster: int, delta: int) -> int:
        """Add ``delta`` to the refcount of ``cluster``; the new value."""
        async with self.lock:
            return await self._change(cluster, delta)
