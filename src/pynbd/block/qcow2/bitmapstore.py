"""Changing the persistent dirty bitmaps of a qcow2 image: in_use flags, storing
them when the node closes, removing one.

Owns ``StoredBitmaps`` (the bitmaps the image holds, its directory as the file
has it): ``prepare`` runs before the first guest write, ``close`` stores the
bitmaps when the node closes, ``remove`` takes one out of the image; and
``PersistentBitmaps``, the node's methods the daemon's bitmap commands call.  The
format and loading are ``pynbd.block.qcow2.bitmaps``.

Rules of this module:
- Nothing is changed in place.  Every change writes new clusters (counted by
  ``Refcounts.allocate`` before they are written), flushes, switches the
  header's bitmaps extension to the new directory in one write, flushes, and
  only then frees what the old directory used.  A crash leaves the old
  directory or the new one, and at worst leaked clusters (which ``qemu-img
  check`` allows).  A change that fails before the switch frees what it took.
- The first change of a writable image flags every loaded bitmap in_use in the
  image (``prepare``, before any guest write lands); ``close`` writes every
  persistent bitmap that is neither inconsistent nor readonly anew, in_use
  clear, and keeps the entries of inconsistent ones as they are.  So a killed
  server leaves its bitmaps in_use, and the next open finds them inconsistent.
  An image nothing changed (no write, no bitmap changed) is not written.
- Clean clusters of a bitmap are zero table entries, full ones "all ones"
  entries (value 1); only the others take a data cluster.
- Autoclear: the bitmaps bit is kept while the image has bitmaps (set by the
  header write that adds the extension, cleared by the one that drops it);
  unknown bits are cleared, and a stale bitmaps extension dropped, before the
  first change, as the spec requires (and as qemu does on a writable open).
- The node runs ``prepare``, ``close`` and ``remove`` one at a time (under its
  ``meta_lock``); the header is read and rewritten under the refcounts' lock,
  since moving the refcount table rewrites the header too.
- A failure at close is logged in qemu's words and the node closes anyway;
  the image then still has the bitmaps flagged in_use (inconsistent).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
import struct
from typing import TYPE_CHECKING

from .bitmaps import (
    ALL_ONES,
    FLAG_AUTO,
    FLAG_IN_USE,
    MAX_NAME,
    MAX_PHYS_BYTES,
    MAX_TABLE_ENTRIES,
    TABLE_OFFSET,
    Entry,
    check_new,
    digest,
    load_bitmaps,
    name_bytes,
    read_table,
)
from .header import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    MAX_BITMAP_DIRECTORY,
    MAX_BITMAPS,
    Bitmaps,
    Qcow2Error,
    header_with_bitmaps,
)
from .writeback import clusters_of

if TYPE_CHECKING:
    import asyncio

    from ..bitmap import DirtyBitmap
    from .node import Qcow2Node

log = logging.getLogger("pynbd")

_NONZERO = re.compile(rb"[^\x00]")
_NONFULL = re.compile(rb"[^\xff]")


def _first_run(hosts: list[int], count: int, cluster_size: int) -> list[int]:
    """``count`` clusters of ``hosts`` (sorted) that follow each other, or none."""
    start = 0
    for i in range(1, len(hosts) + 1):
        if i == len(hosts) or hosts[i] != hosts[i - 1] + cluster_size:
            if i - start >= count:
                return hosts[start:start + count]
            start = i
    return []


class PersistentBitmaps:
    """What a qcow2 node offers the daemon's bitmap commands (a base of ``Qcow2Node``)."""

    stored: StoredBitmaps
    _meta_lock: asyncio.Lock

    def check_persistent_bitmap(self, name: str, granularity: int) -> None:
        """``BitmapError`` (qemu's words) if a new persistent bitmap cannot be stored."""
        self.stored.check_new(name, granularity)

    async def remove_persistent_bitmap(self, name: str) -> None:
        """Take the bitmap out of the image now (nothing if the image has none so named)."""
        async with self._meta_lock:
            await self.stored.remove(name)


class StoredBitmaps:
    """The bitmaps the image of ``node`` holds: its directory as the file has it."""

    def __init__(self, node: Qcow2Node) -> None:
        self.node = node
        self.entries: list[Entry] = []
        #: the header's autoclear field as the file has it
        self.autoclear = node.header.autoclear
        #: the unknown autoclear bits are cleared, a stale extension dropped
        self.owned = False
        #: ``prepare`` flagged bitmaps in_use: ``close`` must store them
        self.marked = False
        #: digests of the bits as loaded or last stored (nothing changed: no store)
        self.digests: dict[str, bytes] = {}

    @classmethod
    async def load(cls, node: Qcow2Node) -> StoredBitmaps:
        """Read the image's bitmaps onto the node's ``BitmapSet`` (``Qcow2Error``)."""
        stored = cls(node)
        stored.entries, stored.digests = await load_bitmaps(node)
        return stored

    def check_new(self, name: str, granularity: int) -> None:
        """``BitmapError`` (qemu's words) if a new persistent bitmap cannot be stored."""
        check_new(self.node, name, granularity)

    # -- changes ----------------------------------------------------------------------

    async def prepare(self) -> None:
        """Before the first guest write: the header made ours, every loaded bitmap
        flagged in_use in the image."""
        await self._own_header()
        if any(not entry.flags & FLAG_IN_USE for entry in self.entries):
            await self._change([dataclasses.replace(entry, flags=entry.flags | FLAG_IN_USE)
                                for entry in self.entries], [])
            self.marked = True

    async def close(self) -> None:
        """Store the bitmaps; a failure is logged (qemu's words) and the node closes."""
        try:
            await self._store()
        except (OSError, Qcow2Error) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            log.error("Lost persistent bitmaps during inactivation of node '%s': %s",
                      self.node.node_name, reason)

    async def remove(self, name: str) -> None:
        """Take bitmap ``name`` out of the image (nothing if the image has none so named)."""
        entry = next((e for e in self.entries if e.name == name), None)
        if entry is None:
            return
        if self.node.read_only:
            raise OSError(errno.EROFS, "the qcow2 node is read-only")
        await self._own_header()
        await self._change([e for e in self.entries if e is not entry], [])
        self.digests.pop(name, None)
        await self._free_bitmap(entry)

    async def _store(self) -> None:
        node = self.node
        storable = [b for b in reversed(list(node.bitmaps or ()))
                    if b.persistent and not b.inconsistent and not b.readonly and b.size]
        if not self._changed(storable):
            return
        if node.read_only:
            raise OSError(errno.EROFS, "No write access")
        if node.version < 3:
            raise OSError(errno.ENOTSUP, "Cannot store dirty bitmaps in qcow2 v2 files")
        await self._own_header()
        by_name = {bitmap.name: bitmap for bitmap in storable}
        entries: list[Entry] = []
        replaced: list[Entry] = []
        allocated: list[int] = []
        try:
            for entry in self.entries:
                bitmap = by_name.pop(entry.name, None)
                if bitmap is None:  # an inconsistent one: kept as it is
                    entries.append(entry)
                else:
                    entries.append(await self._write_bitmap(bitmap, allocated))
                    replaced.append(entry)
            for bitmap in storable:  # new ones last, in qemu's order
                if bitmap.name in by_name:
                    entries.append(await self._write_bitmap(bitmap, allocated))
        except BaseException:
            await self._free(allocated)
            raise
        await self._change(entries, allocated)
        self.marked = False
        self.digests = {bitmap.name: digest(bitmap) for bitmap in storable}
        for entry in replaced:
            await self._free_bitmap(entry)

    def _changed(self, storable: list[DirtyBitmap]) -> bool:
        if self.marked:
            return True
        entries = {entry.name: entry for entry in self.entries}
        for bitmap in storable:
            entry = entries.get(bitmap.name)
            if (entry is None or entry.flags & FLAG_IN_USE
                    or bool(entry.flags & FLAG_AUTO) != bitmap.enabled
                    or entry.granularity_bits != bitmap.shift
                    or self.digests.get(bitmap.name) != digest(bitmap)):
                return True
        return False

    async def _write_bitmap(self, bitmap: DirtyBitmap, allocated: list[int]) -> Entry:
        """Write the bits (the clean clusters as zero entries, full ones as "all ones")
        and a new table; the directory entry that names them."""
        node = self.node
        size = node.cluster_size
        data = memoryview(bitmap.to_bytes())
        count = -(-len(data) // size)
        if count > MAX_TABLE_ENTRIES or count * size > MAX_PHYS_BYTES \
                or len(name_bytes(bitmap.name)) > MAX_NAME:
            raise OSError(errno.EINVAL, f"Bitmap '{bitmap.name}' is too big")
        table = [0] * count
        dirty: list[int] = []
        for i in range(count):
            chunk = data[i * size:(i + 1) * size]
            if _NONZERO.search(chunk) is None:
                continue
            if len(chunk) == size and _NONFULL.search(chunk) is None:
                table[i] = ALL_ONES
            else:
                dirty.append(i)
        hosts = await self._allocate(len(dirty), allocated)
        start = 0
        while start < len(dirty):  # one write per run of neighbours
            end = start + 1
            while end < len(dirty) and dirty[end] == dirty[end - 1] + 1 \
                    and hosts[end] == hosts[end - 1] + size:
                end += 1
            first, last = dirty[start], dirty[end - 1] + 1
            run = bytes(data[first * size:last * size]).ljust((last - first) * size, b"\0")
            await node.file.pwrite(run, hosts[start])
            for i in range(start, end):
                table[dirty[i]] = hosts[i]
            start = end
        raw = struct.pack(f">{count}Q", *table)
        offset = await self._allocate_run(-(-len(raw) // size), allocated)
        await node.file.pwrite(raw, offset)
        return Entry(bitmap.name, offset, count, FLAG_AUTO if bitmap.enabled else 0,
                     bitmap.shift, table)

    async def _change(self, entries: list[Entry], allocated: list[int]) -> None:
        """Write ``entries`` as a new directory (none: drop the extension), switch the
        header to it, then free the old directory.  ``allocated``: the clusters this
        change took so far, freed if it fails before the header is written."""
        node = self.node
        old = node.header.bitmaps
        ext: Bitmaps | None = None
        try:
            if entries:
                raw = b"".join(entry.encode() for entry in entries)
                if len(entries) > MAX_BITMAPS or len(raw) > MAX_BITMAP_DIRECTORY:
                    raise OSError(errno.EINVAL, "Bitmap directory is too large")
                offset = await self._allocate_run(-(-len(raw) // node.cluster_size),
                                                  allocated)
                await node.file.pwrite(raw, offset)
                ext = Bitmaps(len(entries), len(raw), offset)
            await node.file.flush()  # tables, data, directory and their counts first
        except BaseException:
            await self._free(allocated)
            raise
        allocated.clear()  # the header may point at them from here on: never freed
        node.metadata_moved(self._clusters(ext), set())  # the overlap check follows
        await self._write_header(ext)
        self.entries = entries
        if old is not None:
            freed = self._clusters(old)
            node.metadata_moved(set(), freed)
            await self._free(sorted(freed))

    def _clusters(self, ext: Bitmaps | None) -> set[int]:
        """The host offsets of the clusters of the directory ``ext`` names."""
        if ext is None:
            return set()
        return clusters_of(self.node.cluster_size, [(ext.directory_offset,
                                                     ext.directory_size)])

    async def _free_bitmap(self, entry: Entry) -> None:
        """Free the table and data clusters of an entry the directory no longer has."""
        node = self.node
        table = entry.table
        if table is None:
            try:
                table = await read_table(node.file, entry, node.cluster_size)
            except (OSError, Qcow2Error) as err:  # qemu leaks them too
                log.warning("bitmap %r: its clusters are leaked: %s", entry.name, err)
                return
        hosts = [value & TABLE_OFFSET for value in table if value & TABLE_OFFSET]
        bits, size = node.cluster_bits, entry.table_size * 8
        first, last = entry.table_offset >> bits, (entry.table_offset + size - 1) >> bits
        await self._free(hosts + [cluster << bits for cluster in range(first, last + 1)])

    # -- clusters and the header ------------------------------------------------------

    def _check_reused(self, hosts: list[int]) -> None:
        """The node's overlap check for clusters that were free (corrupt refcounts)."""
        node = self.node
        for host in hosts:
            if host not in node.refcounts.fresh and node._overlaps(host):
                raise OSError(errno.EIO, f"qcow2: the refcount of metadata cluster "
                              f"{host:#x} is 0 (the image is corrupt: qemu-img check "
                              f"-r all repairs it)")

    async def _allocate(self, count: int, allocated: list[int]) -> list[int]:
        """``count`` new clusters, counted (anywhere)."""
        refcounts = self.node.refcounts
        hosts: list[int] = []
        while len(hosts) < count:
            got = await refcounts.allocate(count - len(hosts))
            allocated.extend(got)
            self._check_reused(got)
            hosts.extend(got)
        for host in hosts:
            refcounts.fresh.discard(host)
        return hosts

    async def _allocate_run(self, count: int, allocated: list[int]) -> int:
        """``count`` new clusters that follow each other, counted; the first's offset.
        Free clusters that do not make such a run are given back."""
        refcounts = self.node.refcounts
        taken: list[int] = []
        run: list[int] = []
        try:
            while not run:  # ends: once no cluster is free, they come from the end
                got = await refcounts.allocate(count)
                taken.extend(got)
                self._check_reused(got)
                run = _first_run(got, count, self.node.cluster_size)
        finally:
            used = set(run)
            await self._free([host for host in taken if host not in used])
        allocated.extend(run)
        for host in run:
            refcounts.fresh.discard(host)
        return run[0]

    async def _free(self, hosts: list[int]) -> None:
        """Give clusters back (nothing uses them); a failure only leaks them."""
        if not hosts:
            return
        try:
            await self.node.refcounts.release([host >> self.node.cluster_bits
                                               for host in hosts])
        except OSError as err:
            log.warning("qcow2: %d bitmap clusters are leaked: %s", len(hosts), err)

    def _keep(self, has_bitmaps: bool) -> int:
        """The autoclear bits this node keeps."""
        return (self.autoclear & AUTOCLEAR_DATA_FILE_RAW) | (
            AUTOCLEAR_BITMAPS if has_bitmaps else 0)

    async def _own_header(self) -> None:
        """Before the first change: drop a stale bitmaps extension, clear the autoclear
        bits this node does not keep (qemu does both on a writable open)."""
        if self.owned:
            return
        node = self.node
        has = node.header.bitmaps is not None
        if node.header.stale_bitmaps or (node.version >= 3
                                         and self.autoclear != self._keep(has)):
            await self._write_header(node.header.bitmaps)
        self.owned = True

    async def _write_header(self, ext: Bitmaps | None) -> None:
        """Point the header at the directory ``ext`` (None: no bitmaps), the autoclear
        bits to match, in one write of the bytes that change; flushed."""
        node = self.node
        file = node.file
        autoclear = self._keep(ext is not None) if node.version >= 3 else 0
        async with node.refcounts.lock:
            old = bytearray(min(file.size, node.cluster_size))
            await file.pread(memoryview(old), 0)
            try:
                new = header_with_bitmaps(bytes(old), ext, autoclear)
            except Qcow2Error as err:
                raise OSError(errno.ENOSPC, f"qcow2: {err}") from None
            changed = [i for i in range(len(new)) if i >= len(old) or new[i] != old[i]]
            if changed:
                await file.pwrite(new[changed[0]:changed[-1] + 1], changed[0])
        await file.flush()
        node.header = dataclasses.replace(node.header, bitmaps=ext, autoclear=autoclear,
                                          stale_bitmaps=False)
        self.autoclear = autoclear
