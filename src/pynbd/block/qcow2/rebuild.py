"""Rebuilding the refcounts of a dirty image (incompatible bit 0) before writing to it.

Owns the repair qemu's docs/interop/qcow2.rst asks for when the dirty bit is set
("scan L1/L2 tables to repair refcounts before accessing the image"): every
cluster in use is counted from the header, the L1 table, the L2 tables and the
data clusters; COPIED flags are set (every cluster is then used once); a new
refcount table and blocks are written at the end of the file; then the header
is switched to them and the dirty bit cleared, each step flushed.  A crash
before the switch leaves the old (dirty) state, so the repair runs again.

Images with internal snapshots or persistent bitmaps are refused (their
clusters would have to be counted too): ``qemu-img check -r all`` repairs them.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
from typing import TYPE_CHECKING

from ..node import Growable
from .entries import COPIED, OFFSET_MASK, compressed_host_clusters, decode
from .header import INCOMPAT_DIRTY, OFFSET_INCOMPATIBLE, OFFSET_REFCOUNT_TABLE, Qcow2Error
from .refcount import set_entry

if TYPE_CHECKING:
    from ..node import Node
    from .header import Header

_REPAIR = "repair it with 'qemu-img check -r all'"


async def rebuild_refcounts(file: Node, header: Header, l1: list[int]) -> Header:
    """Repair the refcounts of the dirty image in ``file``; the header it has after.

    ``l1`` (the active L1 table) gets its COPIED flags set, in memory and in the file.
    """
    if header.nb_snapshots or header.bitmaps is not None:
        raise Qcow2Error(f"dirty qcow2 image with internal snapshots or bitmaps: {_REPAIR}")
    cluster_bits, cluster_size = header.cluster_bits, header.cluster_size
    counts: collections.Counter[int] = collections.Counter()

    def count(offset: int, length: int) -> None:
        for cluster in range(offset >> cluster_bits, ((offset + length - 1) >> cluster_bits) + 1):
            counts[cluster] += 1

    count(0, cluster_size)
    if header.l1_size:
        count(header.l1_table_offset, header.l1_size * 8)
    for index, entry in enumerate(l1):
        l2_offset = entry & OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset % cluster_size or l2_offset + cluster_size > file.size:
            raise Qcow2Error(f"dirty qcow2 image with an invalid L2 table offset: {_REPAIR}")
        count(l2_offset, cluster_size)
        await _scan_table(file, header, l2_offset, counts)
        if not entry & COPIED:
            l1[index] = entry | COPIED
            await file.pwrite(struct.pack(">Q", l1[index]),
                              header.l1_table_offset + 8 * index)
    if counts and max(counts.values()) > 1:
        raise Qcow2Error(f"dirty qcow2 image with clusters used twice: {_REPAIR}")
    return await _write_refcounts(file, header, counts)


async def _scan_table(file: Node, header: Header, l2_offset: int,
                      counts: collections.Counter[int]) -> None:
    """Count the data clusters of one L2 table; set the COPIED flags it lacks."""
    table = bytearray(header.cluster_size)
    await file.pread(memoryview(table), l2_offset)
    size = 16 if header.extended_l2 else 8
    changed = False
    for pos in range(0, len(table), size):
        word = struct.unpack_from(">Q", table, pos)[0]
        mapping = decode(word, 0, extended=header.extended_l2,
                         cluster_bits=header.cluster_bits)
        if mapping.compressed:
            if mapping.host + mapping.csize > file.size + header.cluster_size:
                # (qemu-img makes compressed data end up to a sector past the file's
                # end; anything further is not data at all)
                raise Qcow2Error(f"dirty qcow2 image with an invalid compressed cluster: "
                                 f"{_REPAIR}")
            counts.update(compressed_host_clusters(mapping, header.cluster_bits))
        elif mapping.host:
            if mapping.host % header.cluster_size or mapping.host >= file.size:
                raise Qcow2Error(f"dirty qcow2 image with an invalid data cluster: {_REPAIR}")
            counts[mapping.host >> header.cluster_bits] += 1
            if not mapping.copied:
                struct.pack_into(">Q", table, pos, word | COPIED)
                changed = True
    if changed:
        await file.pwrite(table, l2_offset)


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
