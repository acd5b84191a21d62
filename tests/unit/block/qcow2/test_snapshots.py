"""Internal snapshots: the snapshot table of images made by ``qemu-img snapshot -c``,
loading a snapshot read-only (compared with ``qemu-img convert -l``), and corrupt
tables refused with one line."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.block.qcow2.images import create, in_new_loop, needs_qemu, qemu_img, qemu_io
from tests.unit.block.support import read, run

from pynbd.block.file import FileNode
from pynbd.block.memory import MemoryNode
from pynbd.block.qcow2 import Qcow2Error, Qcow2Node
from pynbd.block.qcow2 import snapshots as snapshots_module
from pynbd.block.qcow2.header import read_header
from pynbd.block.qcow2.snapshots import (
    Snapshot,
    SnapshotError,
    SnapshotRef,
    read_snapshots,
)

if TYPE_CHECKING:
    import pathlib

pytestmark = needs_qemu
KIB, MIB = 1024, 1024 * 1024
SIZE = 4 * MIB
#: header fields: nb_snapshots (4 bytes) then snapshots_offset (8 bytes)
NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 60, 64
_ENTRY = struct.Struct(">QIHHIIQII")

VERSIONS = [
    ("v3", ()),
    ("v2", ("compat=0.10",)),
    ("c512", ("cluster_size=512",)),
    ("extl2", ("extended_l2=on",)),
]


def make_image(path: pathlib.Path, *options: str, active: bool = True) -> pathlib.Path:
    """Two snapshots over different contents, then (with ``active``) more writes to
    the active image: snapshot 1 is named "2" (so that an id and a name clash),
    snapshot 2 "base"."""
    create(path, SIZE, *options)
    qemu_io(path, "write -P 0x11 0 256k", "write -P 0x12 3m 64k", "write -P 0x13 1m 5k")
    qemu_img("snapshot", "-c", "2", str(path))
    qemu_io(path, "write -P 0x21 64k 64k", "write -z 3m 64k", "write -P 0x22 1m 128k")
    qemu_img("snapshot", "-c", "base", str(path))
    if active:
        qemu_io(path, "write -P 0x31 0 4k", "discard 1m 1m", "write -P 0x32 2m 3k")
    return path


def converted(path: pathlib.Path, selector: str) -> bytes:
    """What ``qemu-img convert -l SELECTOR`` makes of the image (the oracle)."""
    out = path.with_name(f"{path.name}.{hashlib.md5(selector.encode()).hexdigest()}.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", selector, str(path), str(out))
    return out.read_bytes()


async def _open_and_read(path: pathlib.Path, ref: SnapshotRef) -> tuple[int, bytes]:
    file = FileNode(str(path), read_only=True)
    try:
        node = await Qcow2Node.open(file, read_only=True, snapshot=ref)
        try:
            assert not node.capabilities.can_write
            return node.size, await read(node, 0, node.size)
        finally:
            await node.close()
    finally:
        await file.close()


def read_snapshot(path: pathlib.Path, ref: SnapshotRef) -> tuple[int, bytes]:
    """The size and the bytes of the snapshot ``ref`` names, through a node."""
    return in_new_loop(lambda: _open_and_read(path, ref))


async def _table(path: pathlib.Path) -> tuple[Snapshot, ...]:
    file = FileNode(str(path), read_only=True)
    try:
        return await read_snapshots(file, await read_header(file))
    finally:
        await file.close()


def table(path: pathlib.Path) -> tuple[Snapshot, ...]:
    return in_new_loop(lambda: _table(path))


def digest(path: pathlib.Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("options", [o for _, o in VERSIONS], ids=[n for n, _ in VERSIONS])
def test_snapshots_read_as_qemu_converts_them(tmp_path: pathlib.Path,
                                              options: tuple[str, ...]) -> None:
    image = make_image(tmp_path / "a.qcow2", *options)
    first, second = converted(image, "snapshot.id=1"), converted(image, "snapshot.id=2")
    assert first != second
    before = digest(image)
    cases = [
        (SnapshotRef(id="1"), first),
        (SnapshotRef(name="2"), first),
        (SnapshotRef(id="2", name="base"), second),
        (SnapshotRef(name="base"), second),
        (SnapshotRef(either="1"), first),
        (SnapshotRef(either="2"), second),  # an id before a name, as qemu
        (SnapshotRef(either="base"), second),
    ]
    for ref, want in cases:
        size, got = read_snapshot(image, ref)
        assert size == SIZE, ref
        assert got == want, ref
    assert digest(image) == before, "loading a snapshot changed the image"


def test_table_matches_qemu_img_info(tmp_path: pathlib.Path) -> None:
    image = make_image(tmp_path / "a.qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(image)))["snapshots"]
    found = table(image)
    assert [(s.index, s.id, s.name) for s in found] == [(0, "1", "2"), (1, "2", "base")]
    for snapshot, theirs in zip(found, info, strict=True):
        assert (snapshot.id, snapshot.name) == (theirs["id"], theirs["name"])
        assert (snapshot.date_sec, snapshot.date_nsec) == (theirs["date-sec"],
                                                           theirs["date-nsec"])
        assert snapshot.vm_clock_nsec == theirs["vm-clock-sec"] * 10**9 \
            + theirs["vm-clock-nsec"]
        assert snapshot.vm_state_size == theirs["vm-state-size"]
        assert snapshot.icount == theirs.get("icount")
        assert snapshot.disk_size == SIZE
        assert snapshot.extra_data_size >= 16
        assert snapshot.l1_size >= 1


def test_image_without_snapshots_has_an_empty_table(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "a.qcow2", SIZE)
    assert table(image) == ()
    with pytest.raises(SnapshotError, match=r"^Can't find snapshot$"):
        read_snapshot(image, SnapshotRef(either="1"))


@pytest.mark.parametrize("new_size", ["+2M", "1M"], ids=["grown", "shrunk"])
def test_resized_image_serves_its_current_size(tmp_path: pathlib.Path, new_size: str) -> None:
    """As ``qemu-nbd -l`` and ``qemu-img convert -l``: the snapshot is read at the
    image's current virtual size, whatever its own disk size was."""
    image = create(tmp_path / "a.qcow2", 2 * MIB)
    qemu_io(image, "write -P 0x41 0 64k", "write -P 0x42 1536k 64k")
    qemu_img("snapshot", "-c", "before", str(image))
    qemu_img("resize", "-q", *(["--shrink"] if new_size == "1M" else []), str(image),
             new_size)
    qemu_io(image, "write -P 0x43 0 4k")
    size = json.loads(qemu_img("info", "--output=json", str(image)))["virtual-size"]
    assert table(image)[0].disk_size == 2 * MIB
    got_size, got = read_snapshot(image, SnapshotRef(name="before"))
    assert got_size == size
    assert got == converted(image, "snapshot.name=before")


def test_unknown_snapshots(tmp_path: pathlib.Path) -> None:
    image = make_image(tmp_path / "a.qcow2")
    for ref in (SnapshotRef(id="3"), SnapshotRef(name="1"), SnapshotRef(id="1", name="base"),
                SnapshotRef(either="nope"), SnapshotRef(either=""), SnapshotRef()):
        with pytest.raises(SnapshotError, match=r"^Can't find snapshot$"):
            read_snapshot(image, ref)


def test_a_writable_node_cannot_load_a_snapshot(tmp_path: pathlib.Path) -> None:
    image = make_image(tmp_path / "a.qcow2")

    async def body() -> None:
        file = FileNode(str(image), read_only=False)
        try:
            with pytest.raises(SnapshotError, match=r"^Device is not readonly$"):
                await Qcow2Node.open(file, snapshot=SnapshotRef(id="1"))
        finally:
            await file.close()

    in_new_loop(body)


def _entries(data: bytes) -> list[int]:
    """The offsets of the snapshot table's entries in an image's bytes."""
    count, pos = struct.unpack_from(">IQ", data, NB_SNAPSHOTS)
    found = []
    for _ in range(count):
        pos = (pos + 7) & ~7
        found.append(pos)
        fields = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size + fields[8] + fields[2] + fields[3]
    return found


def test_entries_without_extra_data(tmp_path: pathlib.Path) -> None:
    """A version 2 table written without extra data (as qemu before 1.x did): no
    disk size, so the snapshot's is the image's, and the 32-bit VM state size."""
    image = make_image(tmp_path / "a.qcow2", "compat=0.10")
    want = [converted(image, "snapshot.id=1"), converted(image, "snapshot.id=2")]
    data = bytearray(image.read_bytes())
    old = table(image)
    table_at = struct.unpack_from(">Q", data, SNAPSHOTS_OFFSET)[0]
    pos = table_at
    for snapshot in old:
        entry = _ENTRY.pack(snapshot.l1_table_offset, snapshot.l1_size, len(snapshot.id),
                            len(snapshot.name), snapshot.date_sec, snapshot.date_nsec,
                            snapshot.vm_clock_nsec, 0, 0)
        entry += snapshot.id.encode() + snapshot.name.encode()
        entry += bytes(-len(entry) % 8)
        data[pos:pos + len(entry)] = entry
        pos += len(entry)
    image.write_bytes(bytes(data))
    new = table(image)
    assert [(s.id, s.name, s.extra_data_size, s.icount) for s in new] == [
        ("1", "2", 0, None), ("2", "base", 0, None)]
    assert all(s.disk_size == SIZE for s in new)
    assert [read_snapshot(image, SnapshotRef(id=s.id))[1] for s in new] == want
    assert [converted(image, f"snapshot.id={s.id}") for s in new] == want


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a ``make_image`` image whose snapshot table ends the file."""
    path = make_image(tmp_path_factory.mktemp("snapshots") / "p.qcow2", "cluster_size=4k",
                      active=False)
    data = path.read_bytes()
    last = _entries(data)[-1]
    fields = _ENTRY.unpack_from(data, last)
    assert len(data) - (last + _ENTRY.size + fields[8] + fields[2] + fields[3]) < 8
    return data


def _patched(data: bytes, changes: list[tuple[int, str, int]]) -> bytes:
    out = bytearray(data)
    for offset, fmt, value in changes:
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


#: entry field offsets: l1_table_offset, l1_size, id_str_size, name_size, extra_data_size
L1_OFFSET, L1_SIZE, ID_SIZE, NAME_SIZE, EXTRA_SIZE, DISK_SIZE = 0, 8, 12, 14, 36, 48

#: (name, which entry (None: the header), field offset, format, value, message)
CORRUPT = [
    ("extra-data-too-large", 0, EXTRA_SIZE, ">I", 1025, "too much extra metadata in "
     "snapshot table entry 0"),
    ("name-past-the-end", 1, NAME_SIZE, ">H", 65535, "entry 1 lies past the end"),
    ("id-past-the-end", 1, ID_SIZE, ">H", 65535, "entry 1 lies past the end"),
    ("extra-past-the-end", 1, EXTRA_SIZE, ">I", 1024, "entry 1 lies past the end"),
    ("more-entries-than-the-file", None, NB_SNAPSHOTS, ">I", 3, "entry 2 lies past the end"),
    ("l1-too-large", 0, L1_SIZE, ">I", (32 << 20) // 8 + 1, "entry 0: L1 table too large"),
    ("disk-size-too-large", 0, DISK_SIZE, ">Q", 1 << 63, "disk size .* is too large"),
    ("table-offset-past-the-end", None, SNAPSHOTS_OFFSET, ">Q", 1 << 40,
     "snapshot table .* past the end"),
    ("table-offset-unaligned", None, SNAPSHOTS_OFFSET, ">Q", 4096 + 8,
     "snapshot table offset .* unaligned"),
]


@pytest.mark.parametrize(("entry", "field", "fmt", "value", "message"),
                         [case[1:] for case in CORRUPT], ids=[case[0] for case in CORRUPT])
def test_corrupt_tables_are_refused(tmp_path: pathlib.Path, pristine: bytes,
                                    entry: int | None, field: int, fmt: str, value: int,
                                    message: str) -> None:
    """A bad table refuses the image whichever snapshot is asked for (one line)."""
    at = field if entry is None else _entries(pristine)[entry] + field
    image = tmp_path / "bad.qcow2"
    image.write_bytes(_patched(pristine, [(at, fmt, value)]))
    for ref in (SnapshotRef(id="1"), SnapshotRef(name="base")):
        with pytest.raises(Qcow2Error, match=message) as caught:
            read_snapshot(image, ref)
        assert not isinstance(caught.value, SnapshotError)
        assert "\n" not in str(caught.value)


#: (name, field offset, format, value, message): the L1 table of entry 0 (snapshot 1)
BAD_L1 = [
    ("unaligned", L1_OFFSET, ">Q", 0x1008, "Snapshot L1 table offset 0x1008 invalid"),
    ("zero-offset", L1_OFFSET, ">Q", 0, "Snapshot L1 table offset 0x0 invalid"),
    ("past-the-end", L1_OFFSET, ">Q", 1 << 30, "Snapshot L1 table at 0x40000000 .* past "
     "the end of the file"),
    ("too-small", L1_SIZE, ">I", 0, "Snapshot L1 table too small for its disk size"),
]


@pytest.mark.parametrize(("field", "fmt", "value", "message"),
                         [case[1:] for case in BAD_L1], ids=[case[0] for case in BAD_L1])
def test_bad_snapshot_l1_tables(tmp_path: pathlib.Path, pristine: bytes, field: int,
                                fmt: str, value: int, message: str) -> None:
    """A snapshot whose L1 table is bad cannot be loaded; the others still can."""
    image = tmp_path / "bad.qcow2"
    good = tmp_path / "good.qcow2"
    good.write_bytes(pristine)
    image.write_bytes(_patched(pristine, [(_entries(pristine)[0] + field, fmt, value)]))
    for ref in (SnapshotRef(id="1"), SnapshotRef(name="2"), SnapshotRef(id="1", name="2")):
        with pytest.raises(SnapshotError, match=message):
            read_snapshot(image, ref)
    # -l 1: the id's snapshot fails to load, so it is tried as a name, as qemu does
    with pytest.raises(SnapshotError, match=r"^Can't find snapshot$"):
        read_snapshot(image, SnapshotRef(either="1"))
    assert read_snapshot(image, SnapshotRef(either="base")) == \
        read_snapshot(good, SnapshotRef(id="2"))


def test_table_size_is_bounded(tmp_path: pathlib.Path, pristine: bytes,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading stops at the table size limit (qemu's 64 MiB; lowered here)."""
    image = tmp_path / "a.qcow2"
    image.write_bytes(pristine)
    second = _entries(pristine)[1] - _entries(pristine)[0]
    monkeypatch.setattr(snapshots_module, "MAX_TABLE_BYTES", second + 8)
    with pytest.raises(Qcow2Error, match="snapshot table is too big"):
        read_snapshot(image, SnapshotRef(id="1"))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.integers(0, 159), st.integers(0, 255)), min_size=1,
                        max_size=12),
       count=st.sampled_from([None, 0, 1, 3, 65536]),
       either=st.sampled_from(["1", "2", "base", "x"]))
def test_mutated_tables_never_crash(pristine: bytes, changes: list[tuple[int, int]],
                                    count: int | None, either: str) -> None:
    """Random bytes in the table: the snapshot loads, or one ``Qcow2Error``; reads of
    a loaded one give data or EIO, never anything else."""
    data = bytearray(pristine)
    start = _entries(pristine)[0]
    for offset, value in changes:
        if start + offset < len(data):
            data[start + offset] = value
    if count is not None:
        struct.pack_into(">I", data, NB_SNAPSHOTS, count)
    node = MemoryNode(len(data))
    run(node.pwrite(bytes(data), 0))

    async def body() -> str:
        """What went wrong ("" if nothing did)."""
        try:
            qcow2 = await Qcow2Node.open(node, read_only=True,
                                         snapshot=SnapshotRef(either=either))
        except Qcow2Error as err:
            return f"refused: {err}"
        try:
            await read(qcow2, 0, 256 * KIB)
        except OSError as err:
            return f"read: {err}"
        finally:
            await qcow2.close()
        return ""

    problem = run(body())
    run(node.close())
    assert "\n" not in problem
    assert not problem or problem.startswith("refused: ") or (
        problem.startswith("read: ") and "qcow2: " in problem), problem
