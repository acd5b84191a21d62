"""Writes through ``Qcow2Node`` over a ``FileNode``, mirrored on a raw bytearray, then
judged by qemu: ``qemu-img check`` finds nothing and ``qemu-img compare`` says identical."""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

import pytest
from tests.unit.block.qcow2.images import (
    assert_clean,
    close_node,
    create,
    needs_qemu,
    open_file,
    qemu_img,
    qemu_io,
    same_as_raw,
    to_raw,
)
from tests.unit.block.support import pattern, read, run

from pynbd.block.node import FastZeroUnsupported

if TYPE_CHECKING:
    import pathlib

    from pynbd.block.qcow2 import Qcow2Node

pytestmark = needs_qemu
KIB, MIB = 1024, 1024 * 1024
SIZE = 3 * MIB + 5 * KIB  # not a multiple of any cluster size

WRITE_SETS = [
    ("v3-64k", ()),
    ("v2", ("compat=0.10",)),
    ("c512-refbits1", ("cluster_size=512", "refcount_bits=1")),
    ("c512-refbits64", ("cluster_size=512", "refcount_bits=64")),
    ("c4k-refbits2", ("cluster_size=4k", "refcount_bits=2")),
    ("c4k-refbits4", ("cluster_size=4k", "refcount_bits=4")),
    ("refbits8", ("refcount_bits=8",)),
    ("refbits32", ("refcount_bits=32", "cluster_size=1k")),
    ("c2m", ("cluster_size=2M",)),
    ("extl2", ("extended_l2=on", "cluster_size=32k")),
    ("lazy", ("lazy_refcounts=on",)),
    ("prealloc", ("preallocation=metadata",)),
    ("v2-c1k", ("compat=0.10", "cluster_size=1k")),
]


async def random_ops(node: Qcow2Node, mirror: bytearray, seed: int, count: int) -> None:
    """``count`` random requests on ``node``, the same effect made on ``mirror``."""
    rng = random.Random(seed)
    size = node.size
    for step in range(count):
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, rng.choice((600, 5000, 70000, MIB))) + 1)
        op = rng.random()
        if op < 0.5:
            data = pattern(seed * 1000 + step, length)
            await node.pwrite(data, offset, fua=rng.random() < 0.1)
            mirror[offset:offset + length] = data
        elif op < 0.75:
            may_trim = rng.random() < 0.5
            try:
                await node.write_zeroes(offset, length, may_trim=may_trim,
                                        fast=rng.random() < 0.2)
            except FastZeroUnsupported:
                continue
            mirror[offset:offset + length] = bytes(length)
        elif op < 0.9:
            await node.trim(offset, length)
            got = await read(node, offset, length)
            for pos, byte in enumerate(got):  # trimmed: old data or zeroes
                assert byte in (0, mirror[offset + pos])
            mirror[offset:offset + length] = got
        else:
            await node.flush()
        if rng.random() < 0.2:
            start = rng.randrange(size)
            end = min(size, start + rng.randrange(1, 200000))
            assert await read(node, start, end - start) == mirror[start:end]


def finish(node: Qcow2Node, mirror: bytes, tmp_path: pathlib.Path,
           image: pathlib.Path) -> None:
    run(node.flush())
    assert run(read(node, 0, node.size)) == mirror
    run(close_node(node))
    raw = tmp_path / "mirror.raw"
    raw.write_bytes(mirror)
    assert_clean(image)
    assert same_as_raw(image, raw)


@pytest.mark.parametrize("options", [o for _, o in WRITE_SETS],
                         ids=[name for name, _ in WRITE_SETS])
def test_random_requests(tmp_path: pathlib.Path, options: tuple[str, ...]) -> None:
    image = create(tmp_path / "a.qcow2", SIZE, *options)
    qemu_io(image, "write -P 0x31 0 200k", "write -P 0x32 1m 1m", "write -z 2500k 64k")
    mirror = bytearray(to_raw(image, tmp_path / "start.raw"))
    node = open_file(image)
    run(random_ops(node, mirror, seed=len(options) * 7 + len("".join(options)), count=60))
    finish(node, bytes(mirror), tmp_path, image)


@pytest.mark.parametrize("options", [(), ("extended_l2=on",), ("compat=0.10",)],
                         ids=["v3", "extl2", "v2"])
def test_random_requests_over_backing(tmp_path: pathlib.Path,
                                      options: tuple[str, ...]) -> None:
    base = create(tmp_path / "base.qcow2", 2 * MIB, *options)
    qemu_io(base, "write -P 0x41 0 2m")
    image = create(tmp_path / "top.qcow2", SIZE, "backing_file=base.qcow2",
                   "backing_fmt=qcow2", *options)
    qemu_io(image, "write -P 0x42 100k 10k")
    mirror = bytearray(to_raw(image, tmp_path / "start.raw"))
    base_node = open_file(base, read_only=True)
    node = open_file(image, backing=base_node)
    run(random_ops(node, mirror, seed=11, count=60))
    run(node.flush())
    assert run(read(node, 0, node.size)) == mirror
    run(close_node(node))
    assert_clean(image)
    raw = tmp_path / "mirror.raw"
    raw.write_bytes(mirror)
    assert same_as_raw(image, raw)  # compare follows the backing chain


def test_writes_over_compressed_clusters(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "src.raw"
    source.write_bytes(b"".join(bytes([i % 200 + 1]) * 4000 for i in range(600)))
    image = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k",
             str(source), str(image))
    node = open_file(image)
    mirror = bytearray(source.read_bytes().ljust(node.size, b"\0"))
    run(random_ops(node, mirror, seed=5, count=40))
    finish(node, bytes(mirror), tmp_path, image)


def test_writes_keep_internal_snapshots(tmp_path: pathlib.Path) -> None:
    """Clusters shared with a snapshot (refcount 2) are copied, never written over."""
    image = create(tmp_path / "s.qcow2", 2 * MIB, "cluster_size=4k")
    qemu_io(image, "write -P 0x51 0 2m")
    qemu_img("snapshot", "-c", "snap", str(image))
    before = to_raw(image, tmp_path / "before.raw")
    mirror = bytearray(before)
    node = open_file(image)
    run(random_ops(node, mirror, seed=9, count=40))
    finish(node, bytes(mirror), tmp_path, image)
    qemu_img("convert", "-l", "snapshot.name=snap", "-f", "qcow2", "-O", "raw", str(image),
             str(tmp_path / "snap.raw"))
    assert (tmp_path / "snap.raw").read_bytes() == before


def test_refcount_table_grows(tmp_path: pathlib.Path) -> None:
    """512-byte clusters with 64-bit refcounts: each block counts 64 clusters, so
    a few MiB of writes need many refcount blocks and a larger refcount table."""
    image = create(tmp_path / "g.qcow2", 4 * MIB, "cluster_size=512", "refcount_bits=64")
    node = open_file(image)
    table_before = node.refcounts.table_offset
    data = pattern(3, 4 * MIB)
    run(node.pwrite(data, 0))
    assert node.refcounts.table_offset != table_before
    finish(node, data, tmp_path, image)


def test_concurrent_writes_share_clusters(tmp_path: pathlib.Path) -> None:
    """Many requests into the same unallocated clusters at once: each cluster is
    allocated once, and every write lands."""
    image = create(tmp_path / "p.qcow2", 4 * MIB, "cluster_size=4k")
    node = open_file(image)
    mirror = bytearray(4 * MIB)
    ranges = [(i * 1000, 900) for i in range(400)]  # many per cluster

    async def body() -> None:
        await asyncio.gather(*(node.pwrite(pattern(i, length), offset)
                               for i, (offset, length) in enumerate(ranges)))
        await asyncio.gather(*(node.write_zeroes(MIB + i * 8192, 8192) for i in range(50)),
                             *(node.pwrite(pattern(7, 3000), 2 * MIB + i * 3000)
                               for i in range(100)))

    run(body())
    for i, (offset, length) in enumerate(ranges):
        mirror[offset:offset + length] = pattern(i, length)
    for i in range(100):
        mirror[2 * MIB + i * 3000:2 * MIB + (i + 1) * 3000] = pattern(7, 3000)
    finish(node, bytes(mirror), tmp_path, image)


def test_images_written_here_read_back_in_qemu_io(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "q.qcow2", 2 * MIB, "extended_l2=on")
    node = open_file(image)

    async def body() -> None:
        await node.pwrite(b"\x61" * 5000, 1000)
        await node.pwrite(b"\x62" * 70000, MIB)
        await node.write_zeroes(MIB + 4096, 4096)
        await close_node(node)

    run(body())
    qemu_io(image, "read -P 0 0 1000", "read -P 0x61 1000 5000", "read -P 0x62 1m 4096",
            "read -P 0 1052672 4096", "read -P 0x62 1056768 61232")
    assert_clean(image)


def test_zero_clusters_keep_or_free_allocation(tmp_path: pathlib.Path) -> None:
    """v3 whole clusters: NO_HOLE keeps the host cluster under a zero flag,
    ``may_trim`` frees it; v2 has no zero flag and writes zero bytes."""
    image = create(tmp_path / "z.qcow2", MIB)
    node = open_file(image)

    async def body() -> None:
        await node.pwrite(pattern(1, 256 * KIB), 0)
        end = node.refcounts.end
        await node.write_zeroes(0, 128 * KIB, fast=True)
        await node.write_zeroes(128 * KIB, 128 * KIB, may_trim=True)
        assert node.refcounts.end == end
        flags = [e.flags for e in await node.block_status(0, 256 * KIB)]
        assert [int(f) for f in flags] == [2, 3]  # ZERO (kept), then HOLE|ZERO
        with pytest.raises(FastZeroUnsupported):
            await node.write_zeroes(1, 4096, fast=True)
        await close_node(node)

    run(body())
    check_map = qemu_img("map", "--output=json", str(image))
    assert '"offset"' in check_map
    assert_clean(image)


@pytest.mark.parametrize("options", [("cluster_size=4k",), ("extended_l2=on", "cluster_size=16k"),
                                     ("cluster_size=512", "refcount_bits=4")],
                         ids=["c4k", "extl2", "c512"])
def test_tiny_cache_evicts_and_reloads(tmp_path: pathlib.Path,
                                       options: tuple[str, ...]) -> None:
    """With room for two tables, L2 tables and refcount blocks are evicted and read
    again all the time, concurrent requests included; nothing is lost."""
    image = create(tmp_path / "e.qcow2", SIZE, *options)
    mirror = bytearray(SIZE)
    node = open_file(image, cache_size=1)
    assert node.l2_cache.capacity == 2
    run(random_ops(node, mirror, seed=21, count=40))

    async def concurrent() -> None:
        ranges = [(i * 37_000 % (SIZE - 9000), 9000) for i in range(60)]
        await asyncio.gather(*(node.pwrite(pattern(i, length), offset)
                               for i, (offset, length) in enumerate(ranges)))
        for i, (offset, length) in enumerate(ranges):
            mirror[offset:offset + length] = pattern(i, length)

    run(concurrent())
    finish(node, bytes(mirror), tmp_path, image)
