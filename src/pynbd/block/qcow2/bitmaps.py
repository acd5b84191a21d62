"""Persistent dirty bitmaps in a qcow2 image (qemu's docs/interop/qcow2.rst, "Bitmaps"):
the on-disk format, loading, and qemu's checks for a new persistent bitmap.

Owns the bitmap directory entry and bitmap table layouts (``Entry``,
``parse_directory``, ``read_table``), ``load_bitmaps`` (the image's bitmaps
read into ``DirtyBitmap`` objects on the node's ``BitmapSet``, see
``pynbd.block.tracking.bitmaps_of``) and ``check_new``.  Changing the image's
bitmaps (in_use flags, storing, removing) is ``pynbd.block.qcow2.bitmapstore``.

Rules of this module:
- Loading is qemu's (``qcow2_load_dirty_bitmaps``): a bad directory or table
  refuses the image with a one-line ``Qcow2Error``; a bitmap flagged in_use
  is loaded empty and ``inconsistent`` (its data is not even read); the auto
  flag is ``enabled``; an image opened read-only gives ``readonly`` bitmaps.
  A bitmaps extension without autoclear bit 0 was left by a program that
  does not keep bitmaps: ``parse_header`` ignores it (the bitmaps are lost, as
  in qemu).
- Every read is bounded by the file and by qemu's limits; memory too: qemu's
  512 MiB per bitmap, ``MAX_TOTAL_BYTES`` for all the bitmaps of an image.
- Names are kept byte for byte (undecodable bytes as surrogates).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import TYPE_CHECKING

from ..bitmap import BitmapError, DirtyBitmap
from ..tracking import bitmaps_of
from .header import MAX_BITMAP_DIRECTORY, MAX_BITMAPS, Qcow2Error

if TYPE_CHECKING:
    from ..node import Node
    from .node import Qcow2Node

#: qemu's limits on one bitmap (BME_MAX_TABLE_SIZE, BME_MAX_PHYS_SIZE, ...)
MAX_TABLE_ENTRIES = 0x8000000
MAX_PHYS_BYTES = 0x20000000
MAX_NAME = 1023
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
#: this node's limit on the memory all the bitmaps of an image take
MAX_TOTAL_BYTES = 1 << 30
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
_RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1
#: bitmap table entries: reserved bits, the host offset, "all ones" (offset 0 only)
_TABLE_RESERVED = 0xFF000000000001FE
TABLE_OFFSET = 0x00FFFFFFFFFFFE00
ALL_ONES = 1
#: a directory entry's fixed part: table offset, table size, flags, type,
#: granularity bits, name size, extra data size
_ENTRY = struct.Struct(">QIIBBHI")
#: data clusters read at once when they follow each other
_READ_BYTES = 1 << 20


def bitmap_bytes(size: int, granularity: int) -> int:
    """Bytes of bitmap data for a disk of ``size`` bytes."""
    bits = -(-size // granularity)
    return -(-bits // 8)


def entry_size(name_length: int) -> int:
    return (_ENTRY.size + name_length + 7) & ~7


def name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


@dataclasses.dataclass
class Entry:
    """One bitmap directory entry (no extra data: qemu refuses any)."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    #: the bitmap table once read (None: not read, as for an in_use bitmap)
    table: list[int] | None = None

    def encode(self) -> bytes:
        name = name_bytes(self.name)
        head = _ENTRY.pack(self.table_offset, self.table_size, self.flags,
                           TYPE_DIRTY_TRACKING, self.granularity_bits, len(name), 0)
        return (head + name).ljust(entry_size(len(name)), b"\0")


def parse_directory(raw: bytes, count: int, cluster_size: int, disk_size: int,
                    file_size: int) -> list[Entry]:
    """The entries of a bitmap directory, checked as qemu's ``bitmap_list_load`` and
    ``check_dir_entry`` check them, and inside the file."""
    entries: list[Entry] = []
    names: set[str] = set()
    pos = 0
    while pos < len(raw):
        if pos + _ENTRY.size > len(raw):
            raise Qcow2Error("broken bitmap directory")
        if len(entries) >= count:
            raise Qcow2Error("more bitmaps found than the bitmaps extension says")
        (table_offset, table_size, flags, kind, bits, name_size,
         extra) = _ENTRY.unpack_from(raw, pos)
        end = pos + entry_size(name_size + extra)
        if end > len(raw):
            raise Qcow2Error("broken bitmap directory")
        if extra:
            raise Qcow2Error("bitmap extra data is not supported")
        start = pos + _ENTRY.size
        name = raw[start:start + name_size].decode("utf-8", "surrogateescape")
        phys = table_size * cluster_size
        if (not table_size or not table_offset or table_offset % cluster_size
                or table_size > MAX_TABLE_ENTRIES or phys > MAX_PHYS_BYTES
                or not MIN_GRANULARITY_BITS <= bits <= MAX_GRANULARITY_BITS
                or flags & _RESERVED_FLAGS or not 0 < name_size <= MAX_NAME
                or kind != TYPE_DIRTY_TRACKING
                or (not flags & FLAG_IN_USE and disk_size > (phys * 8) << bits)):
            raise Qcow2Error(f"bitmap {name!r} doesn't satisfy the constraints")
        if table_offset + table_size * 8 > file_size:
            raise Qcow2Error(f"bitmap {name!r}: its table lies past the end of the file")
        if name in names:
            raise Qcow2Error(f"two bitmaps named {name!r}")
        names.add(name)
        entries.append(Entry(name, table_offset, table_size, flags, bits))
        pos = end
    if len(entries) != count:
        raise Qcow2Error("fewer bitmaps found than the bitmaps extension says")
    return entries


async def read_table(file: Node, entry: Entry, cluster_size: int) -> list[int]:
    """The bitmap table of ``entry``, every entry checked (``Qcow2Error``)."""
    raw = bytearray(entry.table_size * 8)
    await file.pread(memoryview(raw), entry.table_offset)
    table = list(struct.unpack(f">{entry.table_size}Q", raw))
    for value in table:
        offset = value & TABLE_OFFSET
        if value & _TABLE_RESERVED or (offset and (value & ALL_ONES or offset % cluster_size)):
            raise Qcow2Error(f"bitmap {entry.name!r}: bad bitmap table entry {value:#x}")
        if offset + cluster_size > file.size:
            raise Qcow2Error(f"bitmap {entry.name!r}: a data cluster lies past the end "
                             f"of the file")
    return table


async def load_data(file: Node, table: list[int], bitmap: DirtyBitmap,
                     cluster_size: int) -> None:
    """Read the data clusters ``table`` names into ``bitmap`` (neighbours at once)."""
    most = max(1, _READ_BYTES // cluster_size)
    i = 0
    while i < len(table):
        offset = table[i] & TABLE_OFFSET
        if not offset:
            if table[i] & ALL_ONES:
                bitmap.load_bytes(b"\xff" * cluster_size, i * cluster_size)
            i += 1
            continue
        run = 1
        while (i + run < len(table) and run < most
               and table[i + run] & TABLE_OFFSET == offset + run * cluster_size):
            run += 1
        data = bytearray(run * cluster_size)
        await file.pread(memoryview(data), offset)
        bitmap.load_bytes(data, i * cluster_size)
        i += run


def digest(bitmap: DirtyBitmap) -> bytes:
    return hashlib.blake2b(bitmap.to_bytes(), digest_size=16).digest()


async def load_bitmaps(node: Qcow2Node) -> tuple[list[Entry], dict[str, bytes]]:
    """Read the image's bitmaps onto the node's ``BitmapSet``; the directory's entries
    and the digests of the bitmaps loaded (``digest``)."""
    ext = node.header.bitmaps
    if ext is None:
        return [], {}
    file, cluster_size, size = node.file, node.cluster_size, node.size
    raw = bytearray(ext.directory_size)
    await file.pread(memoryview(raw), ext.directory_offset)
    entries = parse_directory(bytes(raw), ext.count, cluster_size, size, file.size)
    bitmaps, total = bitmaps_of(node), 0
    digests: dict[str, bytes] = {}
    for entry in entries:
        granularity = 1 << entry.granularity_bits
        need = bitmap_bytes(size, granularity)
        total += need
        if need > MAX_PHYS_BYTES or total > MAX_TOTAL_BYTES:
            raise Qcow2Error(f"bitmap {entry.name!r} is too large to load "
                             f"({need} bytes; {total} for the bitmaps so far)")
        bitmap = DirtyBitmap(entry.name, size, granularity,
                             enabled=bool(entry.flags & FLAG_AUTO), persistent=True)
        bitmap.readonly = node.read_only
        if entry.flags & FLAG_IN_USE:
            bitmap.inconsistent = True  # its data may be stale: not even read
        else:
            expected = -(-need // cluster_size)
            if entry.table_size != expected:
                raise Qcow2Error(f"bitmap {entry.name!r}: its table has "
                                 f"{entry.table_size} entries, not {expected}")
            entry.table = await read_table(file, entry, cluster_size)
            await load_data(file, entry.table, bitmap, cluster_size)
            digests[entry.name] = digest(bitmap)
        bitmaps.add(bitmap)
    return entries, digests


def check_new(node: Qcow2Node, name: str, granularity: int) -> None:
    """``BitmapError`` in qemu's words (``qcow2_co_can_store_new_dirty_bitmap``) if a
    new persistent bitmap could not be stored in the image."""
    def refuse(reason: str) -> BitmapError:
        return BitmapError(f"Can't make bitmap '{name}' persistent in "
                           f"'{node.node_name or node.shown_name}': {reason}")

    if node.version < 3:
        raise refuse("Cannot store dirty bitmaps in qcow2 v2 files")
    bits = granularity.bit_length() - 1
    if bits > MAX_GRANULARITY_BITS:
        raise refuse(f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
    if bits < MIN_GRANULARITY_BITS:
        raise refuse(f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
    need = bitmap_bytes(node.size, granularity)
    if need > MAX_PHYS_BYTES or need > MAX_TABLE_ENTRIES * node.cluster_size:
        raise refuse("Too much space will be occupied by the bitmap. "
                     "Use larger granularity")
    if len(name_bytes(name)) > MAX_NAME:
        raise refuse(f"Name length exceeds maximum ({MAX_NAME} characters)")
    persistent = [b for b in node.bitmaps or () if b.persistent]
    if len(persistent) + 1 > MAX_BITMAPS:
        raise refuse("Maximum number of persistent bitmaps is already reached")
    size = sum(entry_size(len(name_bytes(b.name))) for b in persistent)
    if size + entry_size(len(name_bytes(name))) > MAX_BITMAP_DIRECTORY:
        raise refuse("Not enough space in the bitmap directory")
