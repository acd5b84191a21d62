"""New empty qcow2 images (``pynbd.block.qcow2.create``), judged by qemu: ``qemu-img
check`` finds them clean, ``qemu-img info`` reads their size and backing file, and
``Qcow2Node`` opens them and writes to them."""

from __future__ import annotations

import json
import subprocess
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.block.qcow2.images import (
    assert_clean,
    close_node,
    in_new_loop,
    needs_qemu,
    qemu_io,
)
from tests.unit.block.support import read, run

from pynbd.block.file import FileNode
from pynbd.block.memory import MemoryNode
from pynbd.block.qcow2 import Qcow2Error, Qcow2Node, read_info
from pynbd.block.qcow2.create import (
    DEFAULT_CLUSTER_SIZE,
    REFCOUNT_ORDER,
    Layout,
    create_image,
    header_bytes,
    plan,
)
from pynbd.block.qcow2.header import MAX_L1_BYTES, parse_header

if TYPE_CHECKING:
    import pathlib

pytestmark = needs_qemu
KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def info(path: pathlib.Path) -> dict[str, Any]:
    done = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                          capture_output=True, text=True, check=True, timeout=60)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def make(path: pathlib.Path, size: int, **options: Any) -> Layout:
    """``create_image`` on a new ``FileNode`` at ``path`` (closed afterwards)."""
    path.touch()

    async def go() -> Layout:
        file = FileNode(str(path))
        try:
            return await create_image(file, size, **options)
        finally:
            await file.close()

    return run(go())


def fill(index: int, length: int) -> bytes:
    """What ``write_and_read`` writes at its ``index``-th offset (one byte value, so
    that ``qemu-io read -P`` can check it)."""
    return bytes([0x41 + index]) * length


async def write_and_read(path: pathlib.Path, offsets: list[int], length: int) -> None:
    """Open the image with ``Qcow2Node``, write ``fill`` at each offset, read it back."""
    node = await Qcow2Node.open(FileNode(str(path)))
    try:
        for index, offset in enumerate(offsets):
            await node.pwrite(fill(index, length), offset)
        await node.flush()
        for index, offset in enumerate(offsets):
            assert await read(node, offset, length) == fill(index, length)
    finally:
        await close_node(node)


# size, cluster size, L1 clusters expected
SIZES = [
    (0, DEFAULT_CLUSTER_SIZE, 0),
    (512, DEFAULT_CLUSTER_SIZE, 1),
    (3 * MIB + 5 * KIB, DEFAULT_CLUSTER_SIZE, 1),  # not cluster-aligned
    (64 * MIB, DEFAULT_CLUSTER_SIZE, 1),
    (1 * TIB, DEFAULT_CLUSTER_SIZE, 1),  # 2048 entries, 16 KiB
    (1 * TIB, 4 * KIB, 1024),  # L1 of 4 MiB
    (17 * TIB, DEFAULT_CLUSTER_SIZE, 5),  # 34816 entries
    (32 * GIB + 512, 512, 16385),  # many refcount blocks, a refcount table of 2 clusters
    (5 * GIB + 1536, 2 * MIB, 1),
]


@pytest.mark.parametrize(("size", "cluster_size", "l1_clusters"), SIZES,
                         ids=[f"{s}-c{c}" for s, c, _ in SIZES])
def test_new_image_is_clean_and_sized(tmp_path: pathlib.Path, size: int, cluster_size: int,
                                      l1_clusters: int) -> None:
    path = tmp_path / "new.qcow2"
    layout = make(path, size, cluster_size=cluster_size)
    assert -(-layout.l1_size * 8 // cluster_size) == l1_clusters
    assert path.stat().st_size == layout.file_size
    assert_clean(path)  # no corruption and no leak: every cluster counted once
    found = info(path)
    assert found["virtual-size"] == size
    assert found["cluster-size"] == cluster_size
    assert found["format-specific"]["data"]["compat"] == "1.1"
    assert found["format-specific"]["data"]["refcount-bits"] == 1 << REFCOUNT_ORDER
    assert "backing-filename" not in found
    header = parse_header(path.read_bytes()[:cluster_size], path.stat().st_size)
    assert (header.version, header.header_length, header.l1_size, header.incompatible,
            header.compatible, header.autoclear, header.nb_snapshots) == \
        (3, 104, layout.l1_size, 0, 0, 0, 0)


@pytest.mark.parametrize(("size", "cluster_size"), [
    (3 * MIB + 5 * KIB, DEFAULT_CLUSTER_SIZE),
    (1 * TIB, 4 * KIB),
    (17 * TIB, DEFAULT_CLUSTER_SIZE),
    (32 * GIB + 512, 512),
], ids=["small", "1T-c4k", "17T", "32G-c512"])
def test_new_image_takes_writes(tmp_path: pathlib.Path, size: int, cluster_size: int) -> None:
    """Qcow2Node opens the new image and writes at its start, in the middle and at its
    last bytes; qemu finds the image clean and reads the same data."""
    path = tmp_path / "new.qcow2"
    make(path, size, cluster_size=cluster_size)
    length = 3000
    offsets = [0, size // 2 + 123, size - length]
    run(write_and_read(path, offsets, length))
    assert_clean(path)
    qemu_io(path, *(f"read -P {0x41 + index} {offset} {length}"
                    for index, offset in enumerate(offsets)), f"read -P 0 {length} 1M")


def test_unaligned_size_is_kept_exactly(tmp_path: pathlib.Path) -> None:
    """A size that is not a whole number of sectors is stored as given: pynbd serves it
    exactly, qemu (which counts in 512-byte sectors) reads it rounded down."""
    path = tmp_path / "odd.qcow2"
    make(path, 1000)
    assert_clean(path)
    assert info(path)["virtual-size"] == 512
    node = in_new_loop(lambda: Qcow2Node.open(FileNode(str(path))))
    try:
        assert node.size == 1000
    finally:
        run(close_node(node))
    run(write_and_read(path, [0, 999], 1))


def test_backing_file_and_format(tmp_path: pathlib.Path) -> None:
    """The backing file name (after the end-of-extensions marker) and its format (an
    extension) are what qemu-img info shows, and qemu reads through the chain."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * (2 * MIB))
    path = tmp_path / "top.qcow2"
    make(path, 2 * MIB, backing_file="base.raw", backing_format="raw")
    assert_clean(path)
    found = info(path)
    assert found["backing-filename"] == "base.raw"
    assert found["backing-filename-format"] == "raw"
    assert found["full-backing-filename"] == str(base)
    qemu_io(path, "read -P 0x5a 0 2M")
    file = FileNode(str(path), read_only=True)
    try:
        image = run(read_info(file))
    finally:
        run(file.close())
    assert (image.backing_file, image.backing_format) == ("base.raw", "raw")


def test_backing_file_without_format(tmp_path: pathlib.Path) -> None:
    name = str(tmp_path / "base.raw")
    (tmp_path / "base.raw").write_bytes(bytes(MIB))
    path = tmp_path / "top.qcow2"
    make(path, MIB, backing_file=name)
    assert_clean(path)
    found = info(path)
    assert found["backing-filename"] == name
    assert "backing-filename-format" not in found


def test_on_a_memory_node() -> None:
    """Any empty growable node will do: a RAM disk grows to the image's length."""
    node = MemoryNode(0)

    async def go() -> None:
        layout = await create_image(node, 8 * MIB)
        assert node.size == layout.file_size
        image = await Qcow2Node.open(node)
        await image.pwrite(b"\x11" * 5000, 4 * MIB - 100)
        assert await read(image, 4 * MIB - 100, 5000) == b"\x11" * 5000
        assert await read(image, 0, 4096) == bytes(4096)
        await image.close()
        await node.close()

    run(go())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"backing_format": "raw"}, "Backing format cannot be used without backing file"),
    ({"backing_file": "x" * 1024}, "backing file name too long"),
    ({"backing_file": "x" * 401, "cluster_size": 512}, "do not fit in the first cluster"),
    ({"size": (1 << 63) - 1}, "too large for file format 'qcow2'"),
    ({"size": -1}, "invalid virtual size"),
], ids=["format-only", "long-name", "name-past-cluster", "too-large", "negative"])
def test_refused(kwargs: dict[str, Any], message: str) -> None:
    size = kwargs.pop("size", MIB)
    node = MemoryNode(0)
    with pytest.raises(Qcow2Error, match=message):
        run(create_image(node, size, **kwargs))
    assert node.size == 0, "nothing is written before the image is known to be valid"


def test_largest_name_that_fits_in_a_small_cluster() -> None:
    """With 512-byte clusters the name may use what the header and extensions leave."""
    free = 512 - 104 - 16 - 8  # header, backing format extension ("raw" padded), end
    node = MemoryNode(0)
    run(create_image(node, MIB, cluster_size=512, backing_file="n" * free,
                     backing_format="raw"))
    image = run(read_info(node))
    assert image.backing_file == "n" * free


@pytest.mark.parametrize("cluster_size", [256, 1000, 4 * MIB])
def test_bad_cluster_size(cluster_size: int) -> None:
    with pytest.raises(ValueError, match="cluster size"):
        run(create_image(MemoryNode(0), MIB, cluster_size=cluster_size))


def test_node_must_be_empty() -> None:
    with pytest.raises(ValueError, match="empty node"):
        run(create_image(MemoryNode(4096), MIB))


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 1 << 62), cluster_bits=st.integers(9, 21))
def test_layout(size: int, cluster_bits: int) -> None:
    """Every layout qemu could open: tables in separate clusters, the refcount blocks
    counting exactly the metadata clusters, the header accepted by the parser."""
    cluster_size = 1 << cluster_bits
    try:
        layout = plan(size, cluster_size)
    except Qcow2Error:
        entries = -(-size // (cluster_size * cluster_size // 8))
        assert entries * 8 > MAX_L1_BYTES
        return
    l1_clusters = -(-layout.l1_size * 8 // cluster_size)
    blocks = len(layout.refcount_block_offsets)
    assert layout.clusters == 1 + layout.refcount_table_clusters + blocks + l1_clusters
    per_block = cluster_size * 8 >> REFCOUNT_ORDER
    assert (blocks - 1) * per_block < layout.clusters <= blocks * per_block
    assert blocks * 8 <= layout.refcount_table_clusters * cluster_size
    starts = sorted([0, layout.refcount_table_offset, *layout.refcount_block_offsets]
                    + ([layout.l1_table_offset] if layout.l1_size else []))
    assert len(set(starts)) == len(starts)
    assert all(start % cluster_size == 0 for start in starts)
    header = parse_header(header_bytes(layout, size) + bytes(cluster_size),
                          layout.file_size)
    assert (header.size, header.l1_size, header.cluster_size) == \
        (size, layout.l1_size, cluster_size)
