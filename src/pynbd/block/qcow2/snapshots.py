"""Internal snapshots of a qcow2 image: the snapshot table, and loading one read-only.

Owns qemu's docs/interop/qcow2.rst "Snapshots": parsing and validating the
snapshot table (``read_snapshots``), finding a snapshot as qemu-nbd's ``-l``
does (``SnapshotRef``), and the header a read-only node needs to serve it
(``load_snapshot``: the active L1 table swapped for the snapshot's, as qemu's
``qcow2_snapshot_load_tmp`` does; the virtual size stays the image's, as in
qemu-nbd and ``qemu-img convert -l``).

Every problem is a one-line ``Qcow2Error``: a bad table refuses the image,
and a snapshot that cannot be loaded (not found, or its L1 table bad) is a
``SnapshotError``, which callers word as qemu-nbd does ("Failed to load
snapshot: ...").  Reads are bounded: the table is read in chunks, never past
the end of the file nor past qemu's 64 MiB limit on its size.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

from .header import MAX_L1_BYTES, MAX_SIZE, Qcow2Error, l1_entries_needed

if TYPE_CHECKING:
    from ..node import Node
    from .header import Header

#: a table entry's fixed part: l1_table_offset, l1_size, id_str_size, name_size,
#: date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size
_ENTRY = struct.Struct(">QIHHIIQII")
#: qemu's QCOW_MAX_SNAPSHOTS_SIZE and QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_BYTES = 64 << 20
MAX_EXTRA_DATA = 1024
#: the table is read this much at a time
_CHUNK = 64 << 10


class SnapshotError(Qcow2Error):
    """A snapshot that cannot be loaded (qemu's wording, after "Failed to load snapshot: ")."""


@dataclasses.dataclass(frozen=True)
class SnapshotRef:
    """Which snapshot to load, as qemu-nbd's ``-l`` says it: ``id`` and/or ``name``
    (``-l snapshot.id=ID,snapshot.name=NAME``; both must match when both are
    given), or ``either`` (``-l ID_OR_NAME``: an id first, then a name)."""

    id: str | None = None
    name: str | None = None
    either: str | None = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One entry of the snapshot table."""

    index: int
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    #: the virtual size when the snapshot was taken (the image's, without extra data)
    disk_size: int
    #: the record/replay instruction count (None: not recorded in the entry)
    icount: int | None
    extra_data_size: int


class _TableReader:
    """Sequential, bounded reads of the table, a chunk at a time."""

    def __init__(self, file: Node, offset: int) -> None:
        self.file = file
        self.start = offset
        self.pos = offset
        self.limit = min(file.size, offset + MAX_TABLE_BYTES)
        self.buffer = b""
        self.buffer_start = offset

    def align(self) -> None:
        self.pos = (self.pos + 7) & ~7

    async def take(self, count: int, index: int) -> bytes:
        end = self.pos + count
        if end > self.limit:
            if end > self.file.size:
                raise Qcow2Error(f"snapshot table entry {index} lies past the end of the file")
            raise Qcow2Error(f"snapshot table is too big (over {MAX_TABLE_BYTES >> 20} MiB)")
        if end > self.buffer_start + len(self.buffer):
            length = min(self.limit - self.pos, max(count, _CHUNK))
            data = bytearray(length)
            await self.file.pread(memoryview(data), self.pos)
            self.buffer, self.buffer_start = bytes(data), self.pos
        skip = self.pos - self.buffer_start
        self.pos = end
        return self.buffer[skip:skip + count]


def _text(raw: bytes) -> str:
    """An id or name as qemu compares it (a C string: up to a NUL), and as a command
    line argument decodes (UTF-8, undecodable bytes kept as surrogates)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


async def read_snapshots(file: Node, header: Header) -> tuple[Snapshot, ...]:
    """The snapshot table of the image in ``file`` (``Qcow2Error`` if it is bad)."""
    return (await read_snapshot_table(file, header))[0]


async def read_snapshot_table(file: Node, header: Header) -> tuple[tuple[Snapshot, ...], int]:
    """``read_snapshots``, and how many bytes the table takes in the file."""
    if not header.nb_snapshots:
        return (), 0
    reader = _TableReader(file, header.snapshots_offset)
    found = []
    for index in range(header.nb_snapshots):
        reader.align()
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock,
         vm_state, extra_size) = _ENTRY.unpack(await reader.take(_ENTRY.size, index))
        if extra_size > MAX_EXTRA_DATA:
            raise Qcow2Error(f"too much extra metadata in snapshot table entry {index} "
                             f"({extra_size} bytes, at most {MAX_EXTRA_DATA})")
        extra = await reader.take(extra_size, index)
        disk_size, icount = header.size, None
        if extra_size >= 8:
            vm_state = struct.unpack_from(">Q", extra)[0]
        if extra_size >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_size >= 24:
            icount = struct.unpack_from(">q", extra, 16)[0]
        raw_id = await reader.take(id_size, index)
        raw_name = await reader.take(name_size, index)
        if l1_size * 8 > MAX_L1_BYTES:
            raise Qcow2Error(f"snapshot table entry {index}: L1 table too large "
                             f"({l1_size} entries)")
        if disk_size > MAX_SIZE:
            raise Qcow2Error(f"snapshot table entry {index}: disk size {disk_size} "
                             f"is too large")
        found.append(Snapshot(
            index=index, id=_text(raw_id), name=_text(raw_name), l1_table_offset=l1_offset,
            l1_size=l1_size, date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock,
            vm_state_size=vm_state, disk_size=disk_size, icount=icount,
            extra_data_size=extra_size))
    return tuple(found), reader.pos - reader.start


def find_snapshot(snapshots: tuple[Snapshot, ...], *, snapshot_id: str | None = None,
                  name: str | None = None) -> Snapshot:
    """The first snapshot with this id and/or name, as qemu's
    ``find_snapshot_by_id_and_name`` (``SnapshotError`` if there is none)."""
    if snapshot_id is None and name is None:
        raise SnapshotError("Can't find snapshot")
    for snapshot in snapshots:
        if snapshot_id in (None, snapshot.id) and name in (None, snapshot.name):
            return snapshot
    raise SnapshotError("Can't find snapshot")


def check_l1(snapshot: Snapshot, header: Header, file_size: int) -> None:
    """The snapshot's L1 table is where a table can be and large enough for its
    disk (``SnapshotError`` naming the problem)."""
    length = snapshot.l1_size * 8
    offset = snapshot.l1_table_offset
    if length and (offset == 0 or offset % header.cluster_size):
        raise SnapshotError(f"Snapshot L1 table offset {offset:#x} invalid")
    if offset + length > file_size:
        raise SnapshotError(f"Snapshot L1 table at {offset:#x} ({length} bytes) lies past "
                            f"the end of the file")
    needed = l1_entries_needed(snapshot.disk_size, header.cluster_bits, header.l2_entries)
    if snapshot.l1_size < needed:
        raise SnapshotError(f"Snapshot L1 table too small for its disk size "
                            f"({snapshot.l1_size} entries, {needed} needed)")


def select(snapshots: tuple[Snapshot, ...], ref: SnapshotRef, header: Header,
           file_size: int) -> Snapshot:
    """The snapshot ``ref`` names, its L1 table checked; for ``either``, as qemu's
    ``bdrv_snapshot_load_tmp_by_id_or_name``: by id, and if that fails by name."""
    if ref.either is None:
        snapshot = find_snapshot(snapshots, snapshot_id=ref.id, name=ref.name)
        check_l1(snapshot, header, file_size)
        return snapshot
    try:
        snapshot = find_snapshot(snapshots, snapshot_id=ref.either)
        check_l1(snapshot, header, file_size)
    except SnapshotError:
        snapshot = find_snapshot(snapshots, name=ref.either)
        check_l1(snapshot, header, file_size)
    return snapshot


async def load_snapshot(file: Node, header: Header, ref: SnapshotRef) -> Header:
    """The header of the image in ``file`` with the L1 table of the snapshot ``ref``
    names in place of the active one (only for a read-only node)."""
    snapshot = select(await read_snapshots(file, header), ref, header, file.size)
    return dataclasses.replace(header, l1_table_offset=snapshot.l1_table_offset,
                               l1_size=snapshot.l1_size)
