"""The read side of the qcow2 node: the image's state, L1/L2 lookup, reads, block status.

Owns mapping guest ranges to pieces (host data, zeroes, unallocated,
compressed) through the L1 table (in memory) and the L2 tables (a bounded LRU
cache), and serving reads and ``block_status`` from them.  Reads take no lock:
an entry is read from its table without an ``await`` in between, and a read
counts itself in the current epoch (``epoch``) until it is done, so the
clusters it looked up cannot be reused (for another offset) before it ends
(the rules of ``pynbd.block.qcow2.node``): a read racing a write or a trim
sees the old or the new mapping, both valid.  The write side
(``pynbd.block.qcow2.node``) extends this.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import struct
from typing import TYPE_CHECKING

from ..fileio import as_bytes, fill_zeroes
from ..node import Extent, ExtentFlags, Node
from .cache import TableCache
from .entries import COPIED, OFFSET_MASK, Mapping, decode, decompress

if TYPE_CHECKING:
    from .header import Header

#: ``block_status`` visits at most this many L2 tables per call
MAX_TABLES_PER_STATUS = 64
_WORD = struct.Struct(">Q")
_WORDS = struct.Struct(">QQ")


class Kind(enum.Enum):
    DATA = enum.auto()
    ZERO = enum.auto()
    UNALLOCATED = enum.auto()
    COMPRESSED = enum.auto()


@dataclasses.dataclass(slots=True)
class Piece:
    """``length`` guest bytes from ``offset`` that read the same way."""

    kind: Kind
    offset: int
    length: int
    #: DATA: host offset of the first byte; ZERO: nonzero if a host cluster is kept;
    #: COMPRESSED: the cluster's mapping is in ``mapping``
    host: int = 0
    #: DATA: every cluster of the piece has refcount 1 (writable in place)
    copied: bool = False
    mapping: Mapping | None = None


def _append(pieces: list[Piece], piece: Piece) -> None:
    """Add ``piece``, merged into the last one when they read as one run."""
    if pieces:
        last = pieces[-1]
        if last.kind is piece.kind and last.offset + last.length == piece.offset:
            kind = piece.kind
            if kind is Kind.UNALLOCATED or (kind is Kind.ZERO and
                                            bool(last.host) == bool(piece.host)) or (
                    kind is Kind.DATA and last.host + last.length == piece.host
                    and last.copied == piece.copied):
                last.length += piece.length
                return
    pieces.append(piece)


class Qcow2Reader(Node):
    """State and read paths of a qcow2 node (see ``Qcow2Node``)."""

    driver = "qcow2"

    def __init__(self, file: Node, header: Header, l1: list[int], *,
                 backing: Node | None, cache_size: int) -> None:
        self.file = file
        self.backing = backing
        self.header = header
        self.size = header.size
        self.version = header.version
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.extended = header.extended_l2
        self.l2_entries = header.l2_entries
        self.entry_size = 16 if self.extended else 8
        #: subclusters per cluster (1 without extended L2) and their size
        self.subclusters = 32 if self.extended else 1
        self.sub_bits = self.cluster_bits - (5 if self.extended else 0)
        self.l1 = l1
        self.l2_cache = TableCache(file, self.cluster_size, cache_size)
        #: the last cluster decompressed: (host offset, data)
        self._inflated: tuple[int, bytes] | None = None
        #: requests in flight that may use host clusters they looked up, started in
        #: the current epoch (a one-item list: the write side starts new ones)
        self.epoch = [0]

    @property
    def children(self) -> dict[str, Node]:
        children = {"file": self.file}
        if self.backing is not None:
            children["backing"] = self.backing
        return children

    def __repr__(self) -> str:
        return f"Qcow2Node({self.file!r}, size={self.size})"

    # -- lookup --------------------------------------------------------------

    def l2_offset(self, l1_index: int) -> int:
        """The L2 table offset of an L1 entry (0: none); EIO if it is invalid."""
        if l1_index >= len(self.l1):
            return 0
        offset = self.l1[l1_index] & OFFSET_MASK
        if offset % self.cluster_size or offset + self.cluster_size > self.file.size:
            raise OSError(errno.EIO, f"qcow2: L2 table offset {offset:#x} is invalid")
        return offset

    def entry(self, table: bytearray, index: int) -> Mapping:
        if self.extended:
            word, bitmap = _WORDS.unpack_from(table, index * 16)
        else:
            word, bitmap = _WORD.unpack_from(table, index * 8)[0], 0
        mapping = decode(word, bitmap, extended=self.extended, cluster_bits=self.cluster_bits)
        if mapping.host % (1 if mapping.compressed else self.cluster_size):
            raise OSError(errno.EIO, f"qcow2: data cluster offset {mapping.host:#x} "
                          f"is unaligned")
        return mapping

    def contiguous(self, offset: int, length: int, *, copied: bool) -> int:
        """Where the range lies in the file if that is one run: its clusters are
        standard data clusters (with ``copied``: COPIED too) whose host clusters
        follow each other, in one L2 table already in memory, without extended L2.
        The host offset of ``offset``, or 0 (use ``walk``).

        One ``unpack`` and one comparison with the run it would be, so a 1 MiB
        request costs what a single cluster does; no ``await``, so the answer
        holds until the caller next awaits (a request counts itself in the epoch
        for what comes after)."""
        bits, entries = self.cluster_bits, self.l2_entries
        first, last = offset >> bits, (offset + length - 1) >> bits
        l1_index = first // entries
        if self.extended or last // entries != l1_index or l1_index >= len(self.l1):
            return 0
        table = self.l2_cache.cached(self.l1[l1_index] & OFFSET_MASK)
        if table is None:
            return 0
        count = last - first + 1
        words = struct.unpack_from(f">{count}Q", table, (first % entries) * 8)
        word: int = words[0]
        host = word & OFFSET_MASK
        flags = word ^ host
        if (flags != COPIED if copied else flags & ~COPIED) or not host \
                or host & (self.cluster_size - 1):
            return 0
        if count > 1 and words != tuple(range(word, word + (count << bits), 1 << bits)):
            return 0
        return host + (offset & (self.cluster_size - 1))

    async def walk(self, offset: int, length: int,
                   max_tables: int | None = None) -> list[Piece]:
        """The pieces of ``[offset, offset + length)``, in order (maybe fewer bytes
        than asked when ``max_tables`` stops the walk)."""
        pieces: list[Piece] = []
        pos, end = offset, offset + length
        span = self.l2_entries << self.cluster_bits
        tables = 0
        while pos < end:
            l1_index = pos // span
            span_end = min(end, (l1_index + 1) * span)
            l2_offset = self.l2_offset(l1_index)
            if not l2_offset:
                _append(pieces, Piece(Kind.UNALLOCATED, pos, span_end - pos))
                pos = span_end
                continue
            if max_tables is not None and tables >= max_tables:
                break
            tables += 1
            table = await self.l2_cache.get(l2_offset)
            self._walk_table(pieces, table, pos, span_end)
            pos = span_end
        return pieces

    def _walk_table(self, pieces: list[Piece], table: bytearray, pos: int, end: int) -> None:
        bits, sub_bits = self.cluster_bits, self.sub_bits
        while pos < end:
            cluster = pos >> bits
            start = cluster << bits
            cluster_end = min(end, start + self.cluster_size)
            mapping = self.entry(table, cluster % self.l2_entries)
            if mapping.compressed:
                pieces.append(Piece(Kind.COMPRESSED, pos, cluster_end - pos, mapping=mapping))
                pos = cluster_end
                continue
            while pos < cluster_end:
                sub = (pos - start) >> sub_bits
                sub_end = min(cluster_end, start + ((sub + 1) << sub_bits))
                bit = 1 << sub
                if mapping.alloc & bit:
                    piece = Piece(Kind.DATA, pos, sub_end - pos, mapping.host + pos - start,
                                  mapping.copied)
                elif mapping.zero & bit:
                    piece = Piece(Kind.ZERO, pos, sub_end - pos, mapping.host)
                else:
                    piece = Piece(Kind.UNALLOCATED, pos, sub_end - pos)
                _append(pieces, piece)
                pos = sub_end

    # -- reads ---------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        view = as_bytes(buf)
        if view:
            epoch = self.epoch
            epoch[0] += 1
            try:
                await self.read_into(view, offset)
            finally:
                epoch[0] -= 1

    async def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the guest bytes at ``offset``."""
        host = self.contiguous(offset, len(view), copied=False)
        if host:
            await self._read_file(view, host)
            return
        for piece in await self.walk(offset, len(view)):
            part = view[piece.offset - offset:piece.offset - offset + piece.length]
            kind = piece.kind
            if kind is Kind.DATA:
                await self._read_file(part, piece.host)
            elif kind is Kind.ZERO:
                fill_zeroes(part)
            elif kind is Kind.UNALLOCATED:
                await self._read_backing(part, piece.offset)
            else:
                assert piece.mapping is not None
                data = await self._inflate(piece.mapping)
                start = piece.offset & (self.cluster_size - 1)
                part[:] = data[start:start + piece.length]

    async def _read_file(self, view: memoryview, host: int) -> None:
        """Host bytes; past the end of the file they read as zeroes (as in qemu)."""
        count = max(0, min(len(view), self.file.size - host))
        if count:
            await self.file.pread(view[:count], host)
        if count < len(view):
            fill_zeroes(view[count:])

    async def _read_backing(self, view: memoryview, offset: int) -> None:
        backing = self.backing
        count = 0
        if backing is not None and offset < backing.size:
            count = min(len(view), backing.size - offset)
            await backing.pread(view[:count], offset)
        if count < len(view):
            fill_zeroes(view[count:])

    async def _inflate(self, mapping: Mapping) -> bytes:
        cached = self._inflated
        if cached is not None and cached[0] == mapping.host:
            return cached[1]
        length = min(mapping.csize, self.file.size - mapping.host)
        if length <= 0:
            raise OSError(errno.EIO, "qcow2: compressed cluster lies past the end of the file")
        raw = bytearray(length)
        await self.file.pread(memoryview(raw), mapping.host)
        data = decompress(bytes(raw), self.cluster_size, self.header.compression_type)
        self._inflated = (mapping.host, data)
        return data

    # -- block status ----------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        length = min(length, self.size - offset)
        extents: list[Extent] = []
        for piece in await self.walk(offset, length, MAX_TABLES_PER_STATUS):
            kind = piece.kind
            if kind is Kind.UNALLOCATED and self.backing is not None:
                if not await self._backing_status(extents, piece.offset, piece.length):
                    break
                continue
            if kind is Kind.DATA or kind is Kind.COMPRESSED:
                flags = ExtentFlags.DATA
            elif kind is Kind.ZERO and piece.host:
                flags = ExtentFlags.ZERO
            else:
                flags = ExtentFlags.HOLE | ExtentFlags.ZERO
            _add_extent(extents, piece.length, flags)
        if not extents:  # only when the first L2 table was over the limit (never: >= 1)
            extents.append(Extent(length, ExtentFlags.DATA))
        return extents

    async def _backing_status(self, extents: list[Extent], offset: int, length: int) -> bool:
        """Add the backing node's status of the range; False if it answered short."""
        backing = self.backing
        assert backing is not None
        end = offset + length
        pos = offset
        while pos < min(end, backing.size):
            count = min(end, backing.size) - pos
            answered = await backing.block_status(pos, count)
            for extent in answered:
                take = min(extent.length, count)
                _add_extent(extents, take, extent.flags)
                pos += take
                count -= take
                if count == 0:
                    break
            if count:
                return False
        if pos < end:
            _add_extent(extents, end - pos, ExtentFlags.HOLE | ExtentFlags.ZERO)
        return True


    # -- allocation depth ---------------------------------------------------------

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Depth 1 where this image's clusters say (data, or zero clusters: both
        allocated here), else the backing chain's depth plus one, 0 where no
        layer holds the bytes (qemu's ``qemu:allocation-depth``)."""
        length = min(length, self.size - offset)
        runs: list[tuple[int, int]] = []
        for piece in await self.walk(offset, length, MAX_TABLES_PER_STATUS):
            if piece.kind is not Kind.UNALLOCATED:
                _add_run(runs, piece.length, 1)
            elif not await self._backing_depth(runs, piece.offset, piece.length):
                break
        return runs or [(length, 1)]

    async def _backing_depth(self, runs: list[tuple[int, int]], offset: int,
                             length: int) -> bool:
        """Add the depths of an unallocated range; False if the backing node
        answered short."""
        end = offset + length
        pos = offset
        backing = self.backing
        if backing is not None:
            while pos < min(end, backing.size):
                count = min(end, backing.size) - pos
                for run_length, depth in await backing.allocation_depth(pos, count):
                    take = min(run_length, count)
                    _add_run(runs, take, depth + 1 if depth else 0)
                    pos += take
                    count -= take
                    if count == 0:
                        break
                if count:
                    return False
        if pos < end:
            # past a short backing node's end its zeroes count as its own (as
            # qemu's bdrv_co_common_block_status_above): depth 2 from here
            _add_run(runs, end - pos, 0 if backing is None else 2)
        return True


def _add_run(runs: list[tuple[int, int]], length: int, depth: int) -> None:
    if runs and runs[-1][1] == depth:
        runs[-1] = (runs[-1][0] + length, depth)
    else:
        runs.append((length, depth))


def _add_extent(extents: list[Extent], length: int, flags: ExtentFlags) -> None:
    if extents and extents[-1].flags == flags:
        extents[-1] = Extent(extents[-1].length + length, flags)
    else:
        extents.append(Extent(length, flags))
