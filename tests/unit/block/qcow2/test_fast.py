"""The qcow2 node's fast paths (``pread_nowait``, ``pwrite_nowait``): taken exactly
where the clusters are mapped in memory and need nothing but the file's bytes,
declined (False, nothing changed) everywhere else; qemu-img checks the result."""

from __future__ import annotations

import asyncio
import shutil
from typing import TYPE_CHECKING

import pytest
from tests.unit.block.qcow2.images import (
    assert_clean,
    create,
    needs_qemu,
    qemu_img,
    qemu_io,
    same_as_raw,
)
from tests.unit.block.support import read

from pynbd.block.file import FileNode
from pynbd.block.memory import MemoryNode
from pynbd.block.qcow2 import Qcow2Node

if TYPE_CHECKING:
    import pathlib

pytestmark = needs_qemu

KIB, MIB = 1024, 1 << 20
CLUSTER = 64 * KIB


def image_with_everything(tmp_path: pathlib.Path, *options: str) -> pathlib.Path:
    """Data at 0-1M, a zero cluster at 1M, unallocated from 2M, a compressed cluster at
    3M, data again at 4M-5M (4 MiB + 1 MiB image of 6 MiB)."""
    image = create(tmp_path / "img.qcow2", 6 * MIB, *options)
    qemu_io(image, "write -P 0x61 0 1M", "write -z 1M 64k", "write -P 0x62 4M 1M",
            "write -c -P 0x63 3M 64k")
    return image


async def _opened(image: pathlib.Path, *, backing: Qcow2Node | None = None) -> Qcow2Node:
    node = await Qcow2Node.open(FileNode(str(image)), backing=backing)
    await read(node, 0, node.size)  # every L2 table in memory
    paths = node.fast_paths()  # as a connection starts: the file's calls found
    assert (paths.pread_nowait, paths.pwrite_nowait) == (node.pread_nowait,
                                                         node.pwrite_nowait)
    return node


async def _close(node: Qcow2Node) -> None:
    await node.close()
    await node.file.close()


async def _in_memory(data: bytes) -> Qcow2Node:
    """An image's bytes in a RAM disk (whose nowait writes never decline, unlike a
    file's on filesystems without RWF_NOWAIT for writes), its L2 tables in memory."""
    file = MemoryNode(len(data))
    await file.pwrite(data, 0)
    node = await Qcow2Node.open(file)
    await read(node, 0, node.size)
    node.fast_paths()
    return node


async def _closed_bytes(node: Qcow2Node) -> bytes:
    """Close the node; its file's bytes."""
    await node.close()
    data = bytes(await read(node.file, 0, node.file.size))
    await node.file.close()
    return data


def test_reads_taken_where_mapped_and_declined_elsewhere(tmp_path: pathlib.Path) -> None:
    image = image_with_everything(tmp_path)
    raw = tmp_path / "img.raw"
    qemu_img("convert", "-O", "raw", str(image), str(raw))
    expected = raw.read_bytes()

    async def body() -> None:
        node = await _opened(image)
        for offset, length, taken in [
                (0, 4 * KIB, True), (1000, 100 * KIB, True),  # data, across clusters
                (0, MIB + 64 * KIB, True),  # data then the zero cluster
                (MIB + 64 * KIB, 2 * MIB - 64 * KIB, True),  # unallocated, no backing
                (3 * MIB + 100, 10, False),  # compressed
                (3 * MIB - 10, 20, False),  # zeroes into the compressed cluster
                (4 * MIB, MIB, True), (6 * MIB - 512, 512, True)]:
            buf = bytearray(length)
            assert node.pread_nowait(memoryview(buf), offset) is taken, (offset, length)
            if taken:
                assert buf == expected[offset:offset + length], (offset, length)
        await _close(node)

    asyncio.run(body())


def test_reads_need_the_tables_in_memory(tmp_path: pathlib.Path) -> None:
    image = image_with_everything(tmp_path)

    async def body() -> None:
        node = await Qcow2Node.open(FileNode(str(image)))
        node.fast_paths()
        buf = bytearray(4096)
        assert node.pread_nowait(memoryview(buf), 0) is False  # L2 table not read yet
        await read(node, 0, 1)
        assert node.pread_nowait(memoryview(buf), 0) is True
        assert buf == b"\x61" * 4096
        await _close(node)

    asyncio.run(body())


def test_reads_with_a_backing_node_decline_what_it_holds(tmp_path: pathlib.Path) -> None:
    base = create(tmp_path / "base.qcow2", 6 * MIB)
    qemu_io(base, "write -P 0x71 0 6M")
    top = create(tmp_path / "top.qcow2", 6 * MIB, "backing_file=base.qcow2",
                 "backing_fmt=qcow2")
    qemu_io(top, "write -P 0x72 0 64k")

    async def body() -> None:
        backing = await Qcow2Node.open(FileNode(str(base), read_only=True), read_only=True)
        node = await _opened(top, backing=backing)
        buf = bytearray(CLUSTER)
        assert node.pread_nowait(memoryview(buf), 0) is True
        assert buf == b"\x72" * CLUSTER
        assert node.pread_nowait(memoryview(buf), CLUSTER) is False  # the backing's
        await _close(node)
        await _close(backing)

    asyncio.run(body())


@pytest.mark.parametrize("options", [(), ("extended_l2=on",), ("compat=0.10",)],
                         ids=["v3", "extl2", "v2"])
def test_writes_in_place_only(tmp_path: pathlib.Path, options: tuple[str, ...]) -> None:
    image = image_with_everything(tmp_path, *options)
    raw = tmp_path / "mirror.raw"

    async def body() -> bytes:
        node = await _in_memory(data)
        # not before the image was prepared for writing (the first ordinary write)
        assert node.pwrite_nowait(b"\x01" * 512, 0) is False
        await node.pwrite(b"\x02" * 512, 0)
        for offset, length, taken in [
                (4096, 8192, True), (CLUSTER - 100, 200, True),  # in place, across
                (4 * MIB + 5, 3 * CLUSTER, True),
                (MIB, 512, False),  # zero cluster: needs allocation
                (2 * MIB, 512, False),  # unallocated
                (3 * MIB, 512, False),  # compressed: copied out
                (MIB - 100, 200, False)]:  # half in place, half zero cluster
            before = await read(node, 0, node.size)
            got = node.pwrite_nowait(b"\x5a" * length, offset)
            assert got is taken, (offset, length)
            after = await read(node, 0, node.size)
            if not taken:
                assert after == before, (offset, length)  # nothing changed
            else:
                assert after[offset:offset + length] == b"\x5a" * length
        return await _closed_bytes(node)

    data = image.read_bytes()
    image.write_bytes(asyncio.run(body()))
    assert_clean(image)
    qemu_img("convert", "-O", "raw", str(image), str(raw))
    mirror = bytearray(raw.read_bytes())
    assert mirror[4096:4096 + 8192] == b"\x5a" * 8192
    assert same_as_raw(image, raw)


def test_writes_decline_clusters_a_snapshot_shares(tmp_path: pathlib.Path) -> None:
    image = image_with_everything(tmp_path)
    qemu_img("snapshot", "-c", "before", str(image))
    saved = tmp_path / "saved.qcow2"
    shutil.copy(image, saved)

    async def body() -> bytes:
        node = await _in_memory(data)
        await node.pwrite(b"\x02" * 512, 5 * MIB)  # prepared (unallocated: new cluster)
        assert node.pwrite_nowait(b"\x5a" * 512, 0) is False  # refcount 2: COW
        await node.pwrite(b"\x5a" * 512, 0)  # the ordinary path copies it
        assert node.pwrite_nowait(b"\x5b" * 512, 0) is True  # now its own cluster
        return await _closed_bytes(node)

    data = image.read_bytes()
    image.write_bytes(asyncio.run(body()))
    assert_clean(image)
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=before", "-O", "raw", str(image), str(snap))
    assert snap.read_bytes()[:MIB] == b"\x61" * MIB  # the snapshot kept its data
