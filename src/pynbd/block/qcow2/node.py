"""The qcow2 format node: opening an image, and the write side (allocation, COW, zeroing).

Owns ``Qcow2Node``: ``open`` validates the header and the open mode; writes
allocate data clusters and L2 tables (free ones first, else at the end of the
file), copy what a partial write must keep (from the backing node, zeroes, or
the old cluster when it is compressed or shared), and free what trims and
zeroing release.  Persistent bitmaps: loaded at open, flagged in_use before the
first write, stored at close (``pynbd.block.qcow2.bitmapstore``).

Rules of this module (crash safety and concurrency):
- Order of writes, durable even across a power cut: a new cluster's refcount
  is written when it is reserved (in batches, ``_new_cluster``), then its
  data; L1 and L2 changes stay in memory until a flush writes them back
  (``pynbd.block.qcow2.writeback``: data and refcounts made durable first,
  then the tables, then the L1 entries), and a cluster's refcount is
  decremented only after the change that stopped using it is durable.  A
  crash leaves leaks at worst.  A FUA request flushes the node.
- Every change to one L2 table runs under that table's lock; refcounts have
  their own lock.  Writes into clusters already allocated with refcount 1
  take no lock at all.
- Reuse: a cluster whose refcount reaches 0 is free, and ``allocate`` hands
  free clusters out before it grows the file.  So a decrement must also wait
  until no request can still use the cluster: reads (``pread``) and in-place
  writes (``pwrite`` before it takes a lock) count themselves in the current
  epoch (``self.epoch``, a one-item list); the clusters a flush made durably
  unused are held with that epoch, a new epoch starts, and they are
  decremented once it (and every older one) has no request left.  A request
  that looked a cluster up before its entry went is thus over before the
  cluster can hold another offset's data.  Everything else that touches a
  host cluster does so under the lock of the L2 table whose entry holds it
  (so the entry cannot go meanwhile), or with no ``await`` between lookup and
  I/O (the nowait fast paths).  L2 tables are never freed here (one is only
  copied when shared, and the old one keeps its other reference), so walks
  that read tables only (``block_status``) need no epoch.
- Punching (file can trim, ``--discard unmap``): a freed cluster is punched
  by ``Refcounts.release``, after the flush that made its entries' change
  durable and before its decrement: the data is dead by then, a crash
  leaves a leak of zeroes, and the punch is over before the cluster can be
  reused.  A TRIM thus reaches the host file at the next flush (qemu-nbd
  punches at once, before the L2 change is durable).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import struct
from typing import TYPE_CHECKING

from ..fileio import ZEROES, as_bytes
from ..node import Capabilities, FastZeroUnsupported, Node
from .bitmapstore import PersistentBitmaps, StoredBitmaps
from .entries import ALL_SUB, COPIED, compressed_host_clusters, encode, have_zstd
from .header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZSTD,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    OFFSET_INCOMPATIBLE,
    Qcow2Error,
    read_header,
)
from .reads import Kind
from .rebuild import rebuild_refcounts
from .refcount import Refcounts
from .writeback import Qcow2Metadata

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


class Qcow2Node(Qcow2Metadata, PersistentBitmaps):
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
        self._prepared = False
        self._meta_lock = asyncio.Lock()  # header changes: _prepare, bitmaps
        self.stored = StoredBitmaps(self)  # the image's persistent bitmaps
        #: mark the image dirty while it is written to (qemu's lazy-refcounts)
        self.lazy_refcounts = False
        #: the dirty bit was set here (lazy refcounts) and is cleared on close
        self._marked_dirty = False
        #: host offsets of clusters counted and not used yet
        self._spare: collections.deque[int] = collections.deque()
        self._closed = False

    @classmethod
    async def open(cls, file: Node, *, backing: Node | None = None, read_only: bool = False,
                   cache_size: int | None = None,
                   snapshot: SnapshotRef | None = None,
                   lazy_refcounts: bool | None = None) -> Qcow2Node:
        """Open the image in ``file`` (``Qcow2Error`` if it is bad or unsupported).

        With ``snapshot`` the node is the internal snapshot it names, read-only
        (``SnapshotError`` if it cannot be loaded), as qemu-nbd's ``-l``.
        ``lazy_refcounts`` is qemu's option of that name (None: the image's own
        compatible bit): the image is marked dirty while it is written to.
        """
        header = await read_header(file)
        if lazy_refcounts and header.version < 3:
            raise Qcow2Error("Lazy refcounts require a qcow2 image with at least qemu "
                             "1.1 compatibility level")
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
        node.lazy_refcounts = (bool(header.compatible & COMPAT_LAZY_REFCOUNTS)
                               if lazy_refcounts is None else lazy_refcounts)
        if not read_only:
            await node.refcounts.load()
        node.stored = await StoredBitmaps.load(node)
        return node

    # -- helpers ----------------------------------------------------------------

    def _lock(self, l1_index: int) -> asyncio.Lock:
        lock = self._locks.get(l1_index)
        if lock is None:
            lock = self._locks[l1_index] = asyncio.Lock()
        return lock

    async def _prepare(self) -> None:
        """Before the first change (callers meanwhile wait): clear the autoclear bits
        this node does not keep and flag the image's bitmaps in_use (``bitmaps``)."""
        if self._prepared:
            return
        if self.read_only:
            raise OSError(errno.EROFS, "qcow2 node is read-only")
        async with self._meta_lock:
            if not self._prepared:  # not done by a caller that held the lock first
                await self.stored.prepare()
                if self.lazy_refcounts:
                    # as qemu: a lazy-refcounts image is dirty while written to (the
                    # refcounts are exact anyway; after a crash, open rebuilds them)
                    await self._set_incompatible(self.header.incompatible | INCOMPAT_DIRTY)
                    self._marked_dirty = True
                self._prepared = True

    async def _set_incompatible(self, value: int) -> None:
        await self.file.pwrite(struct.pack(">Q", value), OFFSET_INCOMPATIBLE)
        await self.file.flush()

    async def _l2_for_write(self, l1_index: int) -> tuple[int, bytearray]:
        """The L2 table of ``l1_index``, allocated or copied (if shared) as needed,
        and pinned in the cache: the caller unpins it.  Under the table's lock."""
        entry = self.l1[l1_index]
        old = self.l2_offset(l1_index)
        cache = self.l2_cache
        if old and (entry & COPIED or await self.refcounts.get(old >> self.cluster_bits) == 1):
            table = await _get_pinned(cache, old)
            if not entry & COPIED:
                self._write_l1(l1_index, old | COPIED)
            return old, table
        new = await self._new_cluster()
        self.refcounts.fresh.discard(new)
        table = bytearray(await cache.get(old)) if old else bytearray(self.cluster_size)
        cache.put(new, table)
        cache.pin(new)
        self._table_changed(new)  # written back, before the L1 entry that points at it
        self._write_l1(l1_index, new | COPIED)
        if old:
            await self._release_clusters([old >> self.cluster_bits])
            self._forget_table(old)
        return new, table

    async def _new_cluster(self) -> int:
        """A host cluster for new data or a new L2 table, its refcount already durable.

        Clusters are reserved in batches (1 MiB, at least 16 clusters, free
        ones first: see ``Refcounts.allocate``), their refcounts written at
        once; a writeback flushes them before any entry that uses them is
        written.  Releases that wait are applied first, so what they free is
        reused.  Clusters still spare on close are freed.
        """
        if not self._spare:
            if self._to_release or self._held:
                await self._apply_releases()  # what is free now is reused
            count = max(16, (1 << 20) >> self.cluster_bits)
            hosts = await self.refcounts.allocate(count)
            fresh = self.refcounts.fresh  # space the file just grew by: no metadata
            reused = [host for host in hosts if host not in fresh]
            if reused:
                for host in reused:
                    if self._overlaps(host):
                        raise OSError(errno.EIO, f"qcow2: the refcount of metadata "
                                      f"cluster {host:#x} is 0 (the image is corrupt: "
                                      f"qemu-img check -r all repairs it)")
            self._spare.extend(hosts)
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

    # -- writes -----------------------------------------------------------------

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        view = as_bytes(data)
        if not view:
            return
        epoch = self.epoch  # in place, no lock: counted until the writes are done
        epoch[0] += 1
        try:
            host = self.in_place(offset, len(view))  # one run: no walk, checked
            pieces = await self.walk(offset, len(view)) if not host else []
            limit = self.file.size
            in_place = bool(host) or (self._prepared and all(
                p.kind is Kind.DATA and p.copied and p.host + p.length <= limit
                and not self._overlaps_range(p.host, p.length) for p in pieces))
            if host:
                await self.file.pwrite(view, host)
            elif in_place:
                for piece in pieces:  # every cluster allocated with refcount 1: in place
                    start = piece.offset - offset
                    await self.file.pwrite(view[start:start + piece.length], piece.host)
        finally:
            epoch[0] -= 1
        if not in_place:
            await self._prepare()
            pos, end = offset, offset + len(view)
            span = self.l2_entries << self.cluster_bits
            while pos < end:
                table_end = min(end, (pos // span + 1) * span)
                await self._write_in_table(pos, view[pos - offset:table_end - offset])
                pos = table_end
            if self._too_dirty:
                await self._writeback()
        if fua:
            await self.flush()

    async def _write_in_table(self, pos: int, chunk: memoryview) -> None:
        """Write ``chunk`` (within one L2 table's span) at ``pos``: runs of whole new
        clusters in one write to contiguous new clusters, the rest cluster by
        cluster (``_write_mapped``)."""
        bits = self.cluster_bits
        l1_index = (pos >> bits) // self.l2_entries
        async with self._lock(l1_index):
            l2_offset, table = await self._l2_for_write(l1_index)
            try:
                start, end = pos, pos + len(chunk)
                while pos < end:
                    index = (pos >> bits) % self.l2_entries
                    count = self._new_whole_clusters(table, index, pos, end)
                    if count:
                        hosts = await self._new_run(count)
                        length = len(hosts) << bits
                        await self.file.pwrite(chunk[pos - start:pos - start + length],
                                               hosts[0])
                        alloc = ALL_SUB if self.extended else 1
                        for i, host in enumerate(hosts):
                            self._set_entry(table, l2_offset, index + i,
                                            encode(host, True, alloc, 0,
                                                   extended=self.extended))
                        pos += length
                        continue
                    cluster_end = min(end, ((pos >> bits) + 1) << bits)
                    await self._write_mapped(table, l2_offset, index, pos,
                                             chunk[pos - start:cluster_end - start])
                    pos = cluster_end
            finally:
                self.l2_cache.unpin(l2_offset)

    def _new_whole_clusters(self, table: bytearray, index: int, pos: int, end: int) -> int:
        """How many clusters from ``pos`` the write covers whole and that have no host
        cluster yet (unallocated or zero): those take new clusters, no copy."""
        size = self.cluster_size
        if pos & (size - 1):
            return 0
        count = 0
        while pos + (count + 1) * size <= end and index + count < self.l2_entries:
            old = self.entry(table, index + count)
            if old.host or old.compressed:
                break
            count += 1
        return count

    async def _new_run(self, count: int) -> list[int]:
        """Up to ``count`` (at least one) new clusters that follow each other."""
        hosts = [await self._new_cluster()]
        spare, size = self._spare, self.cluster_size
        while len(hosts) < count and spare and spare[0] == hosts[-1] + size:
            hosts.append(spare.popleft())
        fresh = self.refcounts.fresh
        for host in hosts:
            fresh.discard(host)
        return hosts

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
            if host in self.refcounts.fresh:
                self.refcounts.fresh.discard(host)
                if not release and self.backing is None:
                    lo, hi = start, end  # a hole, and what it keeps reads as zeroes
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
            self._set_entry(table, l2_offset, index, entry)
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
            await self.flush()

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
            await self.flush()

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
        if self._too_dirty:
            await self._writeback()

    async def _discard_one(self, table: bytearray, l2_offset: int, index: int, *,
                           keep: bool, as_zero: bool) -> None:
        old = self.entry(table, index)
        kept = keep and await self._writable_in_place(old)
        host = old.host if kept else 0
        zero_mask = (ALL_SUB if self.extended else 1) if as_zero else 0
        entry = encode(host, kept, 0, zero_mask, extended=self.extended)
        if (host, 0, zero_mask) == (old.host, old.alloc, old.zero) and not old.compressed:
            return
        self._set_entry(table, l2_offset, index, entry)
        if not kept:
            await self._release(old)

    async def flush(self) -> None:
        await self._apply_releases()

    async def close(self) -> None:
        """Free spare clusters, apply what waits, store bitmaps, clear our dirty bit."""
        if self._closed:
            return
        self._closed = True
        if self.read_only:
            await self.stored.close()  # nothing to store, or says what is lost
            return
        spare, self._spare = list(self._spare), collections.deque()
        await self._apply_releases()
        if spare:
            await self.refcounts.release([host >> self.cluster_bits for host in spare])
        await self.file.flush()
        async with self._meta_lock:
            await self.stored.close()
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

