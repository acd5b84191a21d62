"""The qcow2 format node: opening an image, and the write side (allocation, COW, zeroing).

Owns ``Qcow2Node``: ``open`` validates the header and the open mode; writes
allocate data clusters and L2 tables at the end of the file, copy what a
partial write must keep (from the backing node, zeroes, or the old cluster
when it is compressed or shared), and free what trims and zeroing release.

Rules of this module (crash safety and concurrency):
- Order of writes, durable even across a power cut: refcounts of new
  clusters are written and flushed first (clusters are reserved in batches,
  ``_new_cluster``), then the cluster's data, then the L2 entry, then the L1
  entry for a new L2 table; an entry is cleared or repointed, and flushed,
  before the old cluster's refcount is decremented (decrements wait for the
  next flush).  A crash leaves leaks at worst.
- Metadata is written through at once (nothing is cached dirty), so
  ``flush`` is the file's flush, plus the decrements that waited for it.
- Every change to one L2 table runs under that table's lock; refcounts have
  their own lock.  Writes into clusters already allocated with refcount 1
  take no lock at all.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import struct
from typing import TYPE_CHECKING

from ..fileio import ZEROES, as_bytes
from ..node import Capabilities, FastZeroUnsupported, Node
from .entries import ALL_SUB, COPIED, compressed_host_clusters, encode, have_zstd
from .fast import Qcow2Fast
from .header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZSTD,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    OFFSET_AUTOCLEAR,
    OFFSET_INCOMPATIBLE,
    Qcow2Error,
    read_header,
)
from .reads import Kind
from .rebuild import rebuild_refcounts
from .refcount import Refcounts

if TYPE_CHECKING:
    from ..node import Data
    from .cache import TableCache
    from .entries import Mapping
    from .header import Header
    from .snapshots import SnapshotRef

#: qemu's default L2 cache limit
DEFAULT_CACHE_SIZE = 32 << 20
#: freed clusters waiting for a flush before a flush is forced
RELEASE_BATCH = 4096


class Qcow2Node(Qcow2Fast):
    """A qcow2 image in ``file``; build with ``await Qcow2Node.open(file)``."""

    driver = "qcow2"

    def __init__(self, file: Node, header: Header, l1: list[int], *,
                 backing: Node | None, read_only: bool, cache_size: int) -> None:
        super().__init__(file, header, l1, backing=backing, cache_size=cache_size)
        self.read_only = read_only
        writable = not read_only
        self.capabilities = Capabilities(
            can_write=writable, can_flush=True, can_fua=writable, can_trim=writable,
            can_fast_zero=writable and self.version >= 3, can_extents=True,
            can_multi_conn=True, sparse_reads=True)
        self.refcounts = Refcounts(file, header, max(cache_size // 4, 4 * self.cluster_size))
        self._locks: dict[int, asyncio.Lock] = {}
        self._autoclear = header.autoclear
        self._prepared = False
        #: the dirty bit was set here (lazy refcounts) and is cleared on close
        self._marked_dirty = False
        #: host offsets of clusters counted (durably) and not used yet
        self._spare: collections.deque[int] = collections.deque()
        #: clusters whose entries are gone, to decrement after the next flush
        self._to_release: list[int] = []
        self._closed = False

    @classmethod
    async def open(cls, file: Node, *, backing: Node | None = None, read_only: bool = False,
                   cache_size: int | None = None,
                   snapshot: SnapshotRef | None = None) -> Qcow2Node:
        """Open the image in ``file`` (``Qcow2Error`` if it is bad or unsupported).

        With ``snapshot`` the node is the internal snapshot it names, read-only
        (``SnapshotError`` if it cannot be loaded), as qemu-nbd's ``-l``.
        """
        header = await read_header(file)
        if header.compression_type == COMPRESSION_ZSTD and not have_zstd():
            raise Qcow2Error("zstd-compressed qcow2 image, and the zstandard module "
                             "is not installed")
        read_only = read_only or not file.capabilities.can_write
        if not read_only and header.incompatible & INCOMPAT_CORRUPT:
            raise Qcow2Error("qcow2 image is marked corrupt: it can only be opened read-only")
        if snapshot is not None:
            from .snapshots import SnapshotError, load_snapshot

            if not read_only:
                raise SnapshotError("Device is not readonly")
            header = await load_snapshot(file, header, snapshot)
        raw = bytearray(header.l1_size * 8)
        if raw:
            await file.pread(memoryview(raw), header.l1_table_offset)
        l1 = list(struct.unpack(f">{header.l1_size}Q", raw))
        if not read_only and header.incompatible & INCOMPAT_DIRTY:
            header = await rebuild_refcounts(file, header, l1)
        node = cls(file, header, l1, backing=backing, read_only=read_only,
                   cache_size=DEFAULT_CACHE_SIZE if cache_size is None else cache_size)
        if not read_only:
            await node.refcounts.load()
        return node

    # -- helpers ----------------------------------------------------------------

    def _lock(self, l1_index: int) -> asyncio.Lock:
        lock = self._locks.get(l1_index)
        if lock is None:
            lock = self._locks[l1_index] = asyncio.Lock()
        return lock

    async def _prepare(self) -> None:
        """Before the first change: clear the autoclear bits this node does not keep
        (unknown ones, and the bitmaps bit: bitmaps are not updated here)."""
        if self._prepared:
            return
        if self.read_only:
            raise OSError(errno.EROFS, "qcow2 node is read-only")
        self._prepared = True
        if self.version >= 3 and self._autoclear & ~AUTOCLEAR_DATA_FILE_RAW:
            self._autoclear &= AUTOCLEAR_DATA_FILE_RAW
            await self.file.pwrite(struct.pack(">Q", self._autoclear), OFFSET_AUTOCLEAR)
            await self.file.flush()
        if self.header.compatible & COMPAT_LAZY_REFCOUNTS:
            # as qemu: a lazy-refcounts image is dirty while it is written to.  The
            # refcounts here are kept exact anyway; after a crash the next open
            # rebuilds them (and so reclaims any leak).
            await self._set_incompatible(self.header.incompatible | INCOMPAT_DIRTY)
            self._marked_dirty = True

    async def _set_incompatible(self, value: int) -> None:
        await self.file.pwrite(struct.pack(">Q", value), OFFSET_INCOMPATIBLE)
        await self.file.flush()

    async def _write_l1(self, l1_index: int, value: int) -> None:
        self.l1[l1_index] = value
        await self.file.pwrite(struct.pack(">Q", value),
                               self.header.l1_table_offset + 8 * l1_index)

    async def _l2_for_write(self, l1_index: int) -> tuple[int, bytearray]:
        """The L2 table of ``l1_index``, allocated or copied (if shared) as needed,
        and pinned in the cache: the caller unpins it.  Under the table's lock."""
        entry = self.l1[l1_index]
        old = self.l2_offset(l1_index)
        cache = self.l2_cache
        if old and (entry & COPIED or await self.refcounts.get(old >> self.cluster_bits) == 1):
            table = await _get_pinned(cache, old)
            if not entry & COPIED:
                await self._write_l1(l1_index, old | COPIED)
            return old, table
        new = await self._new_cluster()
        table = bytearray(await cache.get(old)) if old else bytearray(self.cluster_size)
        await self.file.pwrite(table, new)
        cache.put(new, table)
        cache.pin(new)
        await self._write_l1(l1_index, new | COPIED)
        if old:
            await self._release_clusters([old >> self.cluster_bits])
            cache.drop(old)
        return new, table

    async def _set_entry(self, table: bytearray, l2_offset: int, index: int,
                         entry: tuple[int, int]) -> None:
        raw = struct.pack(">QQ", *entry) if self.extended else struct.pack(">Q", entry[0])
        start = index * self.entry_size
        table[start:start + len(raw)] = raw
        await self.file.pwrite(raw, l2_offset + start)

    async def _new_cluster(self) -> int:
        """A host cluster for new data or a new L2 table, its refcount already durable.

        Clusters are reserved in batches (1 MiB, at least 16 clusters), their
        refcounts written and flushed once, so that no entry ever reaches the
        disk before the refcount of the cluster it points at.  Clusters still
        spare on close are freed.
        """
        if not self._spare:
            count = max(16, (1 << 20) >> self.cluster_bits)
            start = await self.refcounts.allocate(count)
            await self.file.flush()
            self._spare.extend(range(start, start + (count << self.cluster_bits),
                                     self.cluster_size))
        return self._spare.popleft()

    async def _release(self, mapping: Mapping) -> None:
        """Drop the reference an old entry held (after the entry stopped pointing)."""
        if mapping.compressed:
            await self._release_clusters(
                list(compressed_host_clusters(mapping, self.cluster_bits)))
        elif mapping.host:
            await self._release_clusters([mapping.host >> self.cluster_bits])

    async def _release_clusters(self, clusters: list[int]) -> None:
        """Decrement refcounts once the entries that stopped using the clusters are
        durable: on the next flush (or now, after a flush, if many are waiting)."""
        self._to_release.extend(clusters)
        if len(self._to_release) >= RELEASE_BATCH:
            await self._apply_releases()

    async def _apply_releases(self) -> None:
        pending, self._to_release = self._to_release, []
        if pending:
            await self.file.flush()
            await self.refcounts.release(pending)

    async def _writable_in_place(self, mapping: Mapping) -> bool:
        if mapping.compressed or not mapping.host:
            return False
        if mapping.host + self.cluster_size > self.file.size:
            raise OSError(errno.EIO, f"qcow2: data cluster {mapping.host:#x} lies past "
                          f"the end of the file")
        if mapping.copied:
            return True
        return await self.refcounts.get(mapping.host >> self.cluster_bits) == 1

    # -- writes -----------------------------------------------------------------

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        view = as_bytes(data)
        if not view:
            return
        pieces = await self.walk(offset, len(view))
        limit = self.file.size
        if self._prepared and all(p.kind is Kind.DATA and p.copied
                                  and p.host + p.length <= limit for p in pieces):
            for piece in pieces:  # every cluster allocated with refcount 1: in place
                start = piece.offset - offset
                await self.file.pwrite(view[start:start + piece.length], piece.host)
        else:
            await self._prepare()
            pos, end = offset, offset + len(view)
            while pos < end:
                cluster_end = min(end, ((pos >> self.cluster_bits) + 1) << self.cluster_bits)
                await self._write_cluster(pos, view[pos - offset:cluster_end - offset])
                pos = cluster_end
        if fua:
            await self.file.flush()

    async def _write_cluster(self, pos: int, chunk: memoryview) -> None:
        cluster = pos >> self.cluster_bits
        l1_index, index = divmod(cluster, self.l2_entries)
        async with self._lock(l1_index):
            l2_offset, table = await self._l2_for_write(l1_index)
            try:
                await self._write_mapped(table, l2_offset, index, pos, chunk)
            finally:
                self.l2_cache.unpin(l2_offset)

    async def _write_mapped(self, table: bytearray, l2_offset: int, index: int, pos: int,
                            chunk: memoryview) -> None:
        old = self.entry(table, index)
        base = pos & ~(self.cluster_size - 1)
        start, end = pos - base, pos - base + len(chunk)
        if await self._writable_in_place(old) or not (old.compressed or old.host):
            host = old.host
            first, last = start >> self.sub_bits, (end - 1) >> self.sub_bits
            touched = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
            missing = touched & ~old.alloc
            lo = first << self.sub_bits if missing & (1 << first) else start
            hi = min((last + 1) << self.sub_bits, self.cluster_size) \
                if missing & (1 << last) else end
            alloc, zero, release = old.alloc | touched, old.zero & ~touched, False
        else:  # compressed or shared: a new cluster with all of the old one's data
            host, lo, hi = 0, 0, self.cluster_size
            alloc, zero, release = (ALL_SUB if self.extended else 1), 0, True
        if not host:
            host = await self._new_cluster()
        if (lo, hi) == (start, end):
            await self.file.pwrite(chunk, host + start)
        else:
            merged = bytearray(hi - lo)
            await self.read_into(memoryview(merged), base + lo)
            merged[start - lo:end - lo] = chunk
            await self.file.pwrite(merged, host + lo)
        entry = encode(host, True, alloc, zero, extended=self.extended)
        if (host, alloc, zero, True) != (old.host, old.alloc, old.zero, old.copied) \
                or old.compressed:
            await self._set_entry(table, l2_offset, index, entry)
        if release:
            await self._release(old)

    # -- zeroes, trim, flush -------------------------------------------------------

    def _whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """The clusters ``[first, end)`` that the range covers whole (the last
        cluster counts as whole when the range reaches the end of the disk)."""
        end = offset + length
        first = -(-offset // self.cluster_size)
        last = end // self.cluster_size if end < self.size else -(-end // self.cluster_size)
        return first, max(first, last)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        first, last = self._whole_clusters(offset, length)
        whole_start = first << self.cluster_bits
        whole_end = min(self.size, last << self.cluster_bits)
        if self.version < 3 and not (may_trim and self.backing is None):
            whole_start = whole_end = offset + length  # no zero flag: write zeroes
        if fast and (whole_start != offset or whole_end != offset + length):
            raise FastZeroUnsupported()
        await self._prepare()
        if whole_start >= whole_end:
            await self._write_zero_bytes(offset, offset + length)
        else:
            await self._write_zero_bytes(offset, whole_start)
            await self._discard(first, last, keep=not may_trim, zero=True)
            await self._write_zero_bytes(whole_end, offset + length)
        if fua:
            await self.file.flush()

    async def _write_zero_bytes(self, start: int, end: int) -> None:
        while start < end:
            count = min(end - start, len(ZEROES))
            await self.pwrite(ZEROES[:count], start)
            start += count

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self.version < 3 and self.backing is not None:
            return  # freeing would show the backing node through
        first, last = self._whole_clusters(offset, length)
        if first < last:
            await self._prepare()
            await self._discard(first, last, keep=False, zero=False)
        if fua:
            await self.file.flush()

    async def _discard(self, first: int, last: int, *, keep: bool, zero: bool) -> None:
        """Make clusters ``[first, last)`` unallocated, or zero clusters (keeping
        their host cluster with ``keep``) where the backing node would show."""
        cluster = first
        while cluster < last:
            l1_index, index = divmod(cluster, self.l2_entries)
            stop = min(last, (l1_index + 1) * self.l2_entries)
            as_zero = self.version >= 3 and (keep or self.backing is not None)
            if not self.l2_offset(l1_index) and not as_zero:
                cluster = stop
                continue
            async with self._lock(l1_index):
                l2_offset, table = await self._l2_for_write(l1_index)
                try:
                    for i in range(index, index + stop - cluster):
                        await self._discard_one(table, l2_offset, i, keep=keep,
                                                as_zero=as_zero)
                finally:
                    self.l2_cache.unpin(l2_offset)
            cluster = stop

    async def _discard_one(self, table: bytearray, l2_offset: int, index: int, *,
                           keep: bool, as_zero: bool) -> None:
        old = self.entry(table, index)
        kept = keep and await self._writable_in_place(old)
        host = old.host if kept else 0
        zero_mask = (ALL_SUB if self.extended else 1) if as_zero else 0
        entry = encode(host, kept, 0, zero_mask, extended=self.extended)
        if (host, 0, zero_mask) == (old.host, old.alloc, old.zero) and not old.compressed:
            return
        await self._set_entry(table, l2_offset, index, entry)
        if not kept:
            await self._release(old)

    async def flush(self) -> None:
        await self._apply_releases()
        await self.file.flush()

    async def close(self) -> None:
        """Free the spare clusters, apply what waits, clear the dirty bit set here."""
        if self._closed:
            return
        self._closed = True
        if self.read_only:
            return
        spare, self._spare = list(self._spare), collections.deque()
        await self._apply_releases()
        if spare:
            await self.refcounts.release([host >> self.cluster_bits for host in spare])
        await self.file.flush()
        if self._marked_dirty:
            self._marked_dirty = False
            await self._set_incompatible(self.header.incompatible & ~INCOMPAT_DIRTY)


async def _get_pinned(cache: TableCache, offset: int) -> bytearray:
    """The cached table at ``offset``, pinned (and the one the cache holds)."""
    while True:
        table = await cache.get(offset)
        if cache.cached(offset) is table:
            cache.pin(offset)
            return table

