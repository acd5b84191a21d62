"""Persistent dirty bitmaps of qcow2 images, with qemu-img as the oracle.

Bitmaps are made by ``qemu-img bitmap`` and filled by qemu-io's writes (qemu
records them in the enabled bitmaps); the node must load exactly those bits.
What the node stores must satisfy ``qemu-img check`` and ``qemu-img info``, and
qemu must be able to use it (``qemu-img bitmap --merge`` reads it; the bits it
merges are checked).  A crash at any moment leaves either the old bitmaps or
bitmaps flagged in_use, never corruption.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import struct
import subprocess
from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.block.qcow2.images import (
    assert_clean,
    close_node,
    create,
    in_new_loop,
    needs_qemu,
    open_file,
    qemu_img,
    qemu_io,
)
from tests.unit.block.qcow2.test_crash import Crash, CrashingFile, PowerCutFile
from tests.unit.block.support import pattern, run

from pynbd.block.bitmap import BitmapError, DirtyBitmap
from pynbd.block.file import FileNode
from pynbd.block.filter import FilterNode
from pynbd.block.qcow2 import Qcow2Error, Qcow2Node
from pynbd.block.qcow2.header import parse_header
from pynbd.block.tracking import TrackingFilter, bitmaps_of

if TYPE_CHECKING:
    import pathlib

    from pynbd.block.node import Data

pytestmark = needs_qemu
KIB, MIB = 1024, 1024 * 1024
Runs = list[tuple[int, int]]


def add(image: pathlib.Path, name: str, *options: str) -> None:
    qemu_img("bitmap", "--add", *options, str(image), name)


def info_bitmaps(image: pathlib.Path) -> list[dict[str, Any]]:
    """``qemu-img info``'s bitmaps (name, granularity, flags)."""
    done = subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                          capture_output=True, text=True, check=True)
    assert done.stderr == "", done.stderr  # no warning about the bitmaps
    data = json.loads(done.stdout)["format-specific"]["data"]
    bitmaps: list[dict[str, Any]] = data.get("bitmaps", [])
    return bitmaps


def flags(image: pathlib.Path) -> dict[str, list[str]]:
    return {b["name"]: b["flags"] for b in info_bitmaps(image)}


def expected(writes: list[tuple[int, int]], granularity: int, size: int) -> Runs:
    """The dirty runs a bitmap of ``granularity`` has after ``writes``."""
    dirty: set[int] = set()
    for offset, length in writes:
        dirty.update(range(offset // granularity, (offset + length - 1) // granularity + 1))
    runs: Runs = []
    for index in sorted(dirty):
        start, end = index * granularity, min(size, (index + 1) * granularity)
        if runs and sum(runs[-1]) == start:
            runs[-1] = (runs[-1][0], end - runs[-1][0])
        else:
            runs.append((start, end - start))
    return runs


def loaded(image: pathlib.Path) -> dict[str, DirtyBitmap]:
    """The bitmaps a read-only node loads from ``image``."""
    node = open_file(image, read_only=True)
    try:
        return {b.name: b for b in node.bitmaps or ()}
    finally:
        run(close_node(node))


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def io_writes(image: pathlib.Path, writes: list[tuple[int, int]]) -> None:
    qemu_io(image, *(f"write -P {i + 1} {o} {n}" for i, (o, n) in enumerate(writes)))


async def tracked_writes(node: Qcow2Node, writes: list[tuple[int, int]]) -> None:
    """Writes (every third a write-zeroes) through a tracking filter, then a flush."""
    top = TrackingFilter(node)
    for i, (offset, length) in enumerate(writes):
        if i % 3 == 2:
            await top.write_zeroes(offset, length)
        else:
            await top.pwrite(pattern(i, length), offset)
    await top.flush()


FIRST = [(0, 512), (70000, 3), (1 * MIB - 100, 300), (3 * MIB - 512, 512)]
SECOND = [(2 * MIB, 70000), (200 * KIB, 1)]


@pytest.mark.parametrize(("options", "size"), [
    ((), 3 * MIB),
    (("cluster_size=512",), 130 * MIB),  # a bitmap table of several clusters
    (("cluster_size=4k", "refcount_bits=1"), 3 * MIB + 512),
    (("extended_l2=on", "cluster_size=16k"), 3 * MIB),
], ids=["default", "c512-big", "c4k-rc1", "extl2"])
def test_qemu_img_bitmaps_load_with_exactly_their_bits(tmp_path: pathlib.Path,
                                                       options: tuple[str, ...],
                                                       size: int) -> None:
    image = create(tmp_path / "b.qcow2", size, *options)
    add(image, "g512", "-g", "512")
    add(image, "g64k", "-g", "64k")
    add(image, "g1m", "-g", "1M")
    add(image, "off", "-g", "4k")
    io_writes(image, FIRST)
    qemu_img("bitmap", "--disable", str(image), "off")
    io_writes(image, SECOND)
    before = digest(image)
    bitmaps = loaded(image)
    assert list(bitmaps) == ["g512", "g64k", "g1m", "off"]
    for name, granularity in (("g512", 512), ("g64k", 64 * KIB), ("g1m", MIB)):
        bitmap = bitmaps[name]
        assert (bitmap.granularity, bitmap.enabled, bitmap.persistent) == (granularity, True,
                                                                          True)
        assert bitmap.readonly
        assert not bitmap.inconsistent
        assert bitmap.dirty_runs(0, size) == expected(FIRST + SECOND, granularity, size)
    assert not bitmaps["off"].enabled
    assert bitmaps["off"].dirty_runs(0, size) == expected(FIRST, 4096, size)
    node = open_file(image)  # writable, nothing written: the image is not touched
    run(close_node(node))
    assert digest(image) == before


def test_writes_are_stored_and_qemu_reads_them(tmp_path: pathlib.Path) -> None:
    size = 8 * MIB
    image = create(tmp_path / "w.qcow2", size, "cluster_size=4k")
    add(image, "on", "-g", "64k")
    add(image, "fine", "-g", "512")
    add(image, "off", "--disable", "-g", "64k")
    add(image, "check", "--disable", "-g", "64k")
    io_writes(image, FIRST)
    qemu_img("bitmap", "--merge", "on", str(image), "off")  # "off" holds FIRST
    ours = [(5 * MIB, 4096), (6 * MIB + 1, 2), (7 * MIB, 300 * KIB), (4096, 1)]
    node = open_file(image)
    run(tracked_writes(node, ours))
    run(close_node(node))
    assert flags(image) == {"on": ["auto"], "fine": ["auto"], "off": [], "check": []}
    assert_clean(image)  # no leak: the old tables and data were freed
    bitmaps = loaded(image)
    assert bitmaps["on"].dirty_runs(0, size) == expected(FIRST + ours, 64 * KIB, size)
    assert bitmaps["fine"].dirty_runs(0, size) == expected(FIRST + ours, 512, size)
    assert bitmaps["off"].dirty_runs(0, size) == expected(FIRST, 64 * KIB, size)
    # qemu reads what was stored: it merges "fine" into the empty "check"
    qemu_img("bitmap", "--merge", "fine", str(image), "check")
    assert loaded(image)["check"].dirty_runs(0, size) == expected(FIRST + ours, 64 * KIB,
                                                                  size)
    qemu_img("bitmap", "--remove", str(image), "fine")
    assert_clean(image)
    assert [b["name"] for b in info_bitmaps(image)] == ["on", "off", "check"]


def test_full_bitmap_clusters_are_all_ones_entries(tmp_path: pathlib.Path) -> None:
    """A bitmap cluster with every bit set is stored as an "all ones" table entry
    (no data cluster): qemu reads it as such."""
    size = 6 * MIB
    image = create(tmp_path / "f.qcow2", size, "cluster_size=512")
    add(image, "b", "-g", "512")  # a 512-byte bitmap cluster covers 2 MiB
    add(image, "copy", "--disable", "-g", "512")
    node = open_file(image)
    run(tracked_writes(node, [(0, 2 * MIB), (4 * MIB, 2 * MIB)]))
    run(close_node(node))
    assert_clean(image)
    header = parse_header(image.read_bytes()[:512], image.stat().st_size)
    assert header.bitmaps is not None
    raw = image.read_bytes()
    table_offset, table_size = struct.unpack_from(">QI", raw, header.bitmaps.directory_offset)
    assert struct.unpack_from(f">{table_size}Q", raw, table_offset) == (1, 0, 1)
    qemu_img("bitmap", "--merge", "b", str(image), "copy")
    assert loaded(image)["copy"].dirty_runs(0, size) == [(0, 2 * MIB), (4 * MIB, 2 * MIB)]


def test_a_killed_writer_leaves_its_bitmaps_in_use(tmp_path: pathlib.Path) -> None:
    """The first write flags the bitmaps in_use in the image; a server that dies
    before closing leaves them so, and the next open finds them inconsistent
    (and keeps them, in_use, until removed)."""
    image = create(tmp_path / "k.qcow2", 4 * MIB)
    add(image, "b1")
    add(image, "b2", "--disable")
    node = open_file(image)
    assert flags(image) == {"b1": ["auto"], "b2": []}  # opening changes nothing
    run(tracked_writes(node, [(MIB, 4096)]))
    assert flags(image) == {"b1": ["in-use", "auto"], "b2": ["in-use"]}
    run(node.file.close())  # killed: the node never closes
    assert_clean(image, leaks_allowed=True)
    node = open_file(image)
    bitmaps = {b.name: b for b in node.bitmaps or ()}
    assert all(b.inconsistent and b.count() == 0 for b in bitmaps.values())
    assert bitmaps["b1"].enabled
    assert not bitmaps["b2"].enabled
    run(tracked_writes(node, [(0, 512)]))
    run(close_node(node))
    assert flags(image) == {"b1": ["in-use", "auto"], "b2": ["in-use"]}
    assert_clean(image, leaks_allowed=True)
    node = open_file(image)
    run(node.remove_persistent_bitmap("b1"))
    run(close_node(node))
    assert flags(image) == {"b2": ["in-use"]}
    qemu_img("bitmap", "--remove", str(image), "b2")  # qemu removes an in_use one
    assert_clean(image, leaks_allowed=True)


def test_new_persistent_bitmap_goes_into_an_image_with_a_backing_file(
        tmp_path: pathlib.Path) -> None:
    """The first bitmap adds the extension (moving the backing file name after it)."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * MIB)
    image = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(image), "1M")
    backing = FileNode(str(base), read_only=True)
    node = open_file(image, backing=backing)
    node.node_name = "top"
    node.check_persistent_bitmap("new", 4096)
    bitmaps_of(node).add(DirtyBitmap("new", node.size, 4096, persistent=True))
    bitmaps_of(node).add(DirtyBitmap("transient", node.size, 4096))
    run(tracked_writes(node, [(8192, 100)]))
    run(close_node(node))
    run(backing.close())
    assert flags(image) == {"new": ["auto"]}
    assert image.read_bytes()[95] & 1  # autoclear bit 0: the bitmaps are consistent
    assert json.loads(qemu_img("info", "--output=json", str(image)))["backing-filename"] \
        == "base.raw"
    assert_clean(image)
    qemu_io(image, "read -P 0x5a 0 8k", "read -P 0x5a 12k 1012k")
    assert loaded(image)["new"].dirty_runs(0, MIB) == [(8192, 4096)]


def test_remove_persistent_bitmap(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "r.qcow2", 4 * MIB)
    add(image, "a")
    add(image, "b")
    io_writes(image, [(0, MIB)])
    node = open_file(image)
    run(node.remove_persistent_bitmap("nothing"))  # not in the image: no error
    run(node.remove_persistent_bitmap("a"))
    assert [b["name"] for b in info_bitmaps(image)] == ["b"]
    assert_clean(image)
    run(node.remove_persistent_bitmap("b"))
    assert info_bitmaps(image) == []
    assert not image.read_bytes()[95] & 1  # no extension, no autoclear bit
    bitmaps_of(node).remove("a")
    bitmaps_of(node).remove("b")
    run(close_node(node))
    assert_clean(image)


def test_check_persistent_bitmap_words(tmp_path: pathlib.Path) -> None:
    v2 = open_file(create(tmp_path / "v2.qcow2", MIB, "compat=0.10"))
    v2.node_name = "n"
    with pytest.raises(BitmapError) as err:
        v2.check_persistent_bitmap("b", 65536)
    assert str(err.value) == ("Can't make bitmap 'b' persistent in 'n': Cannot store dirty "
                              "bitmaps in qcow2 v2 files")
    big = open_file(create(tmp_path / "big.qcow2", "3T"), read_only=True)
    big.node_name = "big"
    with pytest.raises(BitmapError, match=r"'big': Too much space will be occupied by the "
                       r"bitmap\. Use larger granularity$"):
        big.check_persistent_bitmap("b", 512)
    big.check_persistent_bitmap("b", 65536)  # read-only: qemu 7.2 accepts it too
    with pytest.raises(BitmapError, match=r"Name length exceeds maximum \(1023 characters\)"):
        big.check_persistent_bitmap("x" * 1024, 65536)
    for node in (v2, big):
        run(close_node(node))


def _directory(raw: bytes | bytearray) -> int:
    header = parse_header(bytes(raw[:65536]), len(raw))
    assert header.bitmaps is not None
    return header.bitmaps.directory_offset


def _extension(raw: bytes | bytearray) -> int:
    """Where the bitmaps extension's data lies."""
    pos = struct.unpack_from(">I", raw, 100)[0]
    while struct.unpack_from(">I", raw, pos)[0] != 0x23852875:
        pos += 8 + (struct.unpack_from(">I", raw, pos + 4)[0] + 7) // 8 * 8
    return int(pos + 8)


# (what, where: "dir" (the first entry) or "ext" or "table", offset, format, value)
MUTATIONS = [
    ("reserved flag", "dir", 12, ">I", 1 << 2 | 2),
    ("type", "dir", 16, ">B", 2),
    ("granularity 8", "dir", 17, ">B", 8),
    ("granularity 32", "dir", 17, ">B", 32),
    ("extra data", "dir", 20, ">I", 8),
    ("table size", "dir", 8, ">I", 2),
    ("unaligned table", "dir", 0, ">Q", 0x10200),
    ("more bitmaps", "ext", 0, ">I", 2),
    ("fewer bitmaps", "ext", 0, ">I", 0),
    ("reserved table bits", "table", 0, ">Q", 0x10002),
    ("name size", "dir", 18, ">H", 0),
]


@pytest.mark.parametrize(("what", "where", "offset", "fmt", "value"), MUTATIONS,
                         ids=[m[0] for m in MUTATIONS])
def test_bad_bitmap_metadata_is_refused_in_one_line(tmp_path: pathlib.Path, what: str,
                                                     where: str, offset: int, fmt: str,
                                                     value: int) -> None:
    image = create(tmp_path / "m.qcow2", 4 * MIB)
    add(image, "b")
    io_writes(image, [(0, 4096)])
    raw = bytearray(image.read_bytes())
    base = {"dir": _directory(raw), "ext": _extension(raw)}.get(where)
    if base is None:  # the first bitmap table
        base = struct.unpack_from(">Q", raw, _directory(raw))[0]
    struct.pack_into(fmt, raw, base + offset, value)
    image.write_bytes(raw)
    for read_only in (True, False):
        with pytest.raises(Qcow2Error) as err:
            open_file(image, read_only=read_only)
        assert "\n" not in str(err.value)
    done = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, check=False)
    assert done.returncode != 0, f"qemu-img accepts the image with a bad {what}"


def test_stale_extension_is_ignored_then_dropped(tmp_path: pathlib.Path) -> None:
    """A bitmaps extension without autoclear bit 0 (a program that does not keep
    bitmaps wrote the image): ignored, as qemu does, and dropped at the first write."""
    image = create(tmp_path / "s.qcow2", MIB)
    add(image, "b")
    raw = bytearray(image.read_bytes())
    raw[95] &= ~1
    image.write_bytes(raw)
    assert not loaded(image)
    node = open_file(image)
    assert not node.bitmaps
    run(node.pwrite(b"x", 0))
    run(close_node(node))
    assert info_bitmaps(image) == []  # and no warning on stderr
    assert_clean(image, leaks_allowed=True)  # the lost bitmap's clusters leak


class Recording(FilterNode):
    """A file node that logs its writes and flushes."""

    def __init__(self, child: FileNode) -> None:
        super().__init__(child)
        self.log: list[tuple[str, int, bytes]] = []

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        self.log.append(("write", offset, bytes(data)))
        await self.child.pwrite(data, offset, fua=fua)

    async def flush(self) -> None:
        self.log.append(("flush", 0, b""))
        await self.child.flush()

    async def grow(self, size: int) -> None:
        assert isinstance(self.child, FileNode)
        await self.child.grow(size)
        self.size = self.child.size


def test_concurrent_first_writes_wait_for_the_in_use_flags(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "c.qcow2", 4 * MIB)
    add(image, "b")
    file = Recording(FileNode(str(image)))
    node = in_new_loop(lambda: Qcow2Node.open(file))
    top = TrackingFilter(node)

    async def writes() -> None:
        await asyncio.gather(*(top.pwrite(bytes([0xA0 + i]) * 4096, i * MIB)
                               for i in range(3)))
    run(writes())
    first_data = next(i for i, (kind, _, data) in enumerate(file.log)
                      if kind == "write" and data[:1] in (b"\xa0", b"\xa1", b"\xa2"))
    header = max(i for i, (kind, offset, _) in enumerate(file.log[:first_data])
                 if kind == "write" and offset < 65536)
    assert ("flush", 0, b"") in file.log[header:first_data]
    run(close_node(node))
    assert_clean(image)


async def _bitmap_run(node: Qcow2Node) -> None:
    await tracked_writes(node, [(0, 5000), (3 * MIB, 70000), (MIB, 1)])
    bitmaps_of(node).add(DirtyBitmap("new", node.size, 4096, persistent=True))
    await tracked_writes(node, [(2 * MIB, 100)])
    await node.close()


def _states(image: pathlib.Path) -> dict[str, Runs | None]:
    """Each bitmap's runs as a node loads it, None for an inconsistent one."""
    return {name: None if b.inconsistent else b.dirty_runs(0, b.size)
            for name, b in loaded(image).items()}


@pytest.mark.parametrize("options", [("cluster_size=512",), ("cluster_size=4k",
                                                             "refcount_bits=2")],
                         ids=["c512", "c4k-ref2"])
def test_crash_at_every_write_leaves_old_or_in_use_bitmaps(tmp_path: pathlib.Path,
                                                          options: tuple[str, ...]) -> None:
    template = create(tmp_path / "t.qcow2", 4 * MIB, *options)
    add(template, "on", "-g", "4k")
    add(template, "off", "--disable")
    io_writes(template, [(MIB, 100)])
    data = template.read_bytes()
    old = _states(template)
    probe = tmp_path / "probe.qcow2"
    probe.write_bytes(data)
    counting = CrashingFile(FileNode(str(probe)), budget=1 << 30)
    run(_bitmap_run(in_new_loop(lambda: Qcow2Node.open(counting))))
    run(counting.file.close())
    new = _states(probe)
    assert new["on"] != old["on"]
    assert "new" in new
    image = tmp_path / "a.qcow2"
    rng = random.Random(5)
    seen: set[str] = set()
    for budget in range(counting.writes):
        image.write_bytes(data)
        file = PowerCutFile(FileNode(str(image)), budget, image)
        node = in_new_loop(lambda file=file: Qcow2Node.open(file))  # type: ignore[misc]
        with pytest.raises(Crash):
            run(_bitmap_run(node))
        run(file.file.close())
        for cut in (image.read_bytes(), file.lost_writes_image(rng)):
            image.write_bytes(cut)
            assert_clean(image, leaks_allowed=True)
            states = _states(image)
            kind = "old" if states == old else "new" if states == new else "in use"
            assert kind != "in use" or all(states[name] is None for name in old), \
                (budget, states)
            seen.add(kind)
    assert seen == {"old", "in use", "new"}
