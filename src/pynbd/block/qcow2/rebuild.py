"""Rebuilding the refcounts of a dirty image (incompatible bit 0) before writing to it.

Owns the repair qemu's docs/interop/qcow2.rst asks for when the dirty bit is set
("scan L1/L2 tables to repair refcounts before accessing the image"): every
reference to a cluster is counted, as ``qemu-img check`` counts them:

- the header, the active L1 table and the snapshot table, once each;
- each snapshot's L1 table, and for every L1 table (active or a snapshot's),
  each L2 table it names and each data cluster that table names, once per
  naming L1 entry (an L2 table shared with a snapshot counts its data twice);
- the bitmap directory, and each bitmap's table and data clusters.

Clusters that only one table may use (the header, L1 tables, the snapshot
table and everything of the bitmaps) must be counted once, and no L2 table
may also be a data cluster; anything else is refused with a one-line
``Qcow2Error`` that points to ``qemu-img check -r all``.  The COPIED flags of
the active L1 and L2 tables are then set exactly where the count is 1 (and
cleared where a snapshot shares the cluster, so that a write copies it).  A
new refcount table and blocks are written at the end of the file; then the
header is switched to them and the dirty bit cleared, each step flushed.  A
crash before the switch leaves the old (dirty) state, so the repair runs again.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
from typing import TYPE_CHECKING

from ..node import Growable
from .bitmaps import TABLE_OFFSET, parse_directory, read_table
from .entries import COPIED, OFFSET_MASK, compressed_host_clusters, decode
from .header import INCOMPAT_DIRTY, OFFSET_INCOMPATIBLE, OFFSET_REFCOUNT_TABLE, Qcow2Error
from .refcount import set_entry
from .snapshots import check_l1, read_snapshot_table

if TYPE_CHECKING:
    from ..node import Node
    from .header import Header

_REPAIR = "repair it with 'qemu-img check -r all'"


def _refuse(what: str) -> Qcow2Error:
    return Qcow2Error(f"dirty qcow2 image with {what}: {_REPAIR}")


class _Census:
    """Every reference to a cluster of the image, and of which kind it is."""

    def __init__(self, file: Node, header: Header) -> None:
        self.file, self.header = file, header
        self.counts: collections.Counter[int] = collections.Counter()
        #: clusters only one table may use
        self.exclusive: set[int] = set()
        self.tables: set[int] = set()
        self.data: set[int] = set()
        #: the data clusters each L2 table names (read once, counted per reference)
        self._hosts: dict[int, list[int]] = {}

    def count(self, offset: int, length: int, *, exclusive: bool = True) -> None:
        bits = self.header.cluster_bits
        clusters = range(offset >> bits, ((offset + length - 1) >> bits) + 1)
        self.counts.update(clusters)
        if exclusive:
            self.exclusive.update(clusters)

    async def l1_table(self, offset: int, l1: list[int]) -> None:
        """An L1 table at ``offset``, its L2 tables and their data clusters."""
        if l1:
            self.count(offset, len(l1) * 8)
        size = self.header.cluster_size
        for entry in l1:
            l2_offset = entry & OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset % size or l2_offset + size > self.file.size:
                raise _refuse("an invalid L2 table offset")
            self.count(l2_offset, size, exclusive=False)
            self.tables.add(l2_offset >> self.header.cluster_bits)
            hosts = self._hosts.get(l2_offset)
            if hosts is None:
                hosts = self._hosts[l2_offset] = await self._scan(l2_offset)
            self.counts.update(hosts)
            self.data.update(hosts)

    async def _scan(self, l2_offset: int) -> list[int]:
        """The data clusters (cluster numbers) one L2 table names."""
        header, file = self.header, self.file
        table = bytearray(header.cluster_size)
        await file.pread(memoryview(table), l2_offset)
        hosts: list[int] = []
        for pos in range(0, len(table), 16 if header.extended_l2 else 8):
            word = struct.unpack_from(">Q", table, pos)[0]
            mapping = decode(word, 0, extended=header.extended_l2,
                             cluster_bits=header.cluster_bits)
            if mapping.compressed:
                if mapping.host + mapping.csize > file.size + header.cluster_size:
                    # (qemu-img makes compressed data end up to a sector past the file's
                    # end; anything further is not data at all)
                    raise _refuse("an invalid compressed cluster")
                hosts.extend(compressed_host_clusters(mapping, header.cluster_bits))
            elif mapping.host:
                if mapping.host % header.cluster_size or mapping.host >= file.size:
                    raise _refuse("an invalid data cluster")
                hosts.append(mapping.host >> header.cluster_bits)
        return hosts

    async def snapshots(self) -> None:
        header = self.header
        snapshots, table_bytes = await read_snapshot_table(self.file, header)
        if table_bytes:
            self.count(header.snapshots_offset, table_bytes)
        for snapshot in snapshots:
            check_l1(snapshot, header, self.file.size)
            raw = bytearray(snapshot.l1_size * 8)
            await self.file.pread(memoryview(raw), snapshot.l1_table_offset)
            await self.l1_table(snapshot.l1_table_offset,
                                list(struct.unpack(f">{snapshot.l1_size}Q", raw)))

    async def bitmaps(self) -> None:
        header, file = self.header, self.file
        ext = header.bitmaps
        if ext is None:
            return
        if ext.directory_offset + ext.directory_size > file.size:
            raise _refuse("a bitmap directory past the end of the file")
        raw = bytearray(ext.directory_size)
        await file.pread(memoryview(raw), ext.directory_offset)
        self.count(ext.directory_offset, ext.directory_size)
        for entry in parse_directory(bytes(raw), ext.count, header.cluster_size,
                                     header.size, file.size):
            self.count(entry.table_offset, entry.table_size * 8)
            for value in await read_table(file, entry, header.cluster_size):
                if value & TABLE_OFFSET:
                    self.count(value & TABLE_OFFSET, header.cluster_size)

    def check(self) -> None:
        counts = self.counts
        if any(counts[cluster] > 1 for cluster in self.exclusive) \
                or not self.tables.isdisjoint(self.data):
            raise _refuse("clusters used twice")

    async def fix_copied(self, l1_offset: int, l1: list[int]) -> None:
        """COPIED set exactly where the count is 1, in the active tables (in ``l1``, in
        memory, and in the file)."""
        header, file, counts = self.header, self.file, self.counts
        bits = header.cluster_bits
        fixed: set[int] = set()
        for index, entry in enumerate(l1):
            l2_offset = entry & OFFSET_MASK
            if not l2_offset:
                continue
            want = entry | COPIED if counts[l2_offset >> bits] == 1 else entry & ~COPIED
            if want != entry:
                l1[index] = want
                await file.pwrite(struct.pack(">Q", want), l1_offset + 8 * index)
            if l2_offset not in fixed:
                fixed.add(l2_offset)
                await self._fix_table(l2_offset)

    async def _fix_table(self, l2_offset: int) -> None:
        header, counts = self.header, self.counts
        table = bytearray(header.cluster_size)
        await self.file.pread(memoryview(table), l2_offset)
        changed = False
        for pos in range(0, len(table), 16 if header.extended_l2 else 8):
            word = struct.unpack_from(">Q", table, pos)[0]
            mapping = decode(word, 0, extended=header.extended_l2,
                             cluster_bits=header.cluster_bits)
            if mapping.compressed or not mapping.host:
                continue
            want = (word | COPIED if counts[mapping.host >> header.cluster_bits] == 1
                    else word & ~COPIED)
            if want != word:
                struct.pack_into(">Q", table, pos, want)
                changed = True
        if changed:
            await self.file.pwrite(table, l2_offset)


async def rebuild_refcounts(file: Node, header: Header, l1: list[int]) -> Header:
    """Repair the refcounts of the dirty image in ``file``; the header it has after.

    ``l1`` (the active L1 table) gets its COPIED flags fixed, in memory and in the file.
    """
    census = _Census(file, header)
    census.count(0, header.cluster_size)
    await census.l1_table(header.l1_table_offset, l1)
    await census.snapshots()
    await census.bitmaps()
    census.check()
    await census.fix_copied(header.l1_table_offset, l1)
    return await _write_refcounts(file, header, census.counts)


async def _write_refcounts(file: Node, header: Header,
                           counts: collections.Counter[int]) -> Header:
    cluster_bits, cluster_size = header.cluster_bits, header.cluster_size
    bits = 1 << header.refcount_order
    per_block = cluster_size * 8 // bits
    end = max(max(counts, default=0) + 1, -(-file.size // cluster_size))
    blocks, table_clusters = 0, 0
    while True:  # the new blocks and table count themselves
        total = end + blocks + table_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = need_blocks, need_table
    table_start = end + blocks
    counts.update(range(end, table_start + table_clusters))
    if not isinstance(file, Growable):
        raise Qcow2Error(f"dirty qcow2 image on a node that cannot grow: {_REPAIR}")
    await file.grow((table_start + table_clusters) << cluster_bits)
    table = [0] * (table_clusters * cluster_size // 8)
    for number in range(blocks):
        block = bytearray(cluster_size)
        first = number * per_block
        for cluster in range(first, first + per_block):
            value = counts.get(cluster, 0)
            if value:
                set_entry(block, cluster - first, value, bits)
        table[number] = (end + number) << cluster_bits
        await file.pwrite(block, table[number])
    table_offset = table_start << cluster_bits
    await file.pwrite(struct.pack(f">{len(table)}Q", *table), table_offset)
    await file.flush()
    await file.pwrite(struct.pack(">QI", table_offset, table_clusters), OFFSET_REFCOUNT_TABLE)
    await file.flush()
    incompatible = header.incompatible & ~INCOMPAT_DIRTY
    await file.pwrite(struct.pack(">Q", incompatible), OFFSET_INCOMPATIBLE)
    await file.flush()
    return dataclasses.replace(header, refcount_table_offset=table_offset,
                               refcount_table_clusters=table_clusters,
                               incompatible=incompatible)
