"""Freed clusters are reused before the file grows, and punched in the host file when
it can trim; qemu-img judges every image (``check`` with no leak after a clean
close, ``compare`` against a raw mirror).  Data is stamped per guest offset (every
8-byte word names the offset it was written at), so a read that ever returns
another offset's bytes is caught (races and power cuts: ``test_reuse_races``)."""

from __future__ import annotations

import array
import random
import sys
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.block.qcow2.images import (
    assert_clean,
    close_node,
    create,
    needs_qemu,
    same_as_raw,
)
from tests.unit.block.support import read, run

from pynbd.block.file import FileNode
from pynbd.block.node import FastZeroUnsupported
from pynbd.block.qcow2 import Qcow2Node
from pynbd.block.qcow2.refcount import find_free, find_used, get_entry, set_entry

if TYPE_CHECKING:
    import pathlib

    from pynbd.block.node import Node

KIB, MIB = 1024, 1 << 20
_MARK = 0xA5 << 56
_POS_MASK = (1 << 40) - 1


def stamp(offset: int, length: int, gen: int) -> bytes:
    """``length`` bytes for guest ``offset`` (both multiples of 8): each word holds
    its own guest offset and ``gen``, never zero."""
    words = array.array("Q", (_MARK | pos << 16 | (gen & 0xFFFF)
                              for pos in range(offset, offset + length, 8)))
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


def foreign(data: bytes, offset: int) -> list[int]:
    """Where ``data``, read at guest ``offset`` (a multiple of 8), holds a word that
    is neither zero nor stamped for its own offset."""
    words = array.array("Q")
    words.frombytes(data[:len(data) // 8 * 8])
    if sys.byteorder == "little":
        words.byteswap()
    return [offset + 8 * i for i, word in enumerate(words)
            if word and (word >> 16) & _POS_MASK != offset + 8 * i]


def blocks(path: pathlib.Path) -> int:
    """Bytes the file takes on disk (``du``)."""
    return path.stat().st_blocks * 512


async def opened(path: pathlib.Path, *, discard: bool = True, backing: Node | None = None,
                 file: Node | None = None) -> Qcow2Node:
    return await Qcow2Node.open(file or FileNode(str(path), discard=discard), backing=backing)


def write_raw(path: pathlib.Path, data: bytes | bytearray) -> pathlib.Path:
    path.write_bytes(bytes(data))
    return path


# -- the free-cluster scans --------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8, 16, 32, 64]), data=st.data())
def test_scans_find_what_a_plain_loop_finds(bits: int, data: st.DataObject) -> None:
    per_block = 32 * 8 // bits
    top = (1 << bits) - 1
    values = data.draw(st.lists(st.one_of(
        st.just(0), st.sampled_from([1, top, 256 & top or 1, 1 << (bits - 1)]),
        st.integers(0, top)), min_size=per_block, max_size=per_block))
    block = bytearray(32)
    for index, value in enumerate(values):
        set_entry(block, index, value, bits)
    assert [get_entry(block, i, bits) for i in range(per_block)] == values
    index = data.draw(st.integers(0, per_block))
    stop = data.draw(st.integers(index, per_block))
    want_free = next((i for i in range(index, stop) if values[i] == 0), stop)
    want_used = next((i for i in range(index, stop) if values[i] != 0), stop)
    assert find_free(block, index, stop, bits) == want_free
    assert find_used(block, index, stop, bits) == want_used


# -- reuse and punching, judged by qemu-img ------------------------------------------

REGION = 256 * KIB
REUSE_SETS = [
    ("v3-64k", (), False),
    ("v2", ("compat=0.10",), False),
    ("c512-ref1", ("cluster_size=512", "refcount_bits=1"), False),
    ("c4k-ref64", ("cluster_size=4k", "refcount_bits=64"), False),
    ("c1k-ref2", ("cluster_size=1k", "refcount_bits=2"), False),
    ("extl2", ("extended_l2=on", "cluster_size=16k"), False),
    ("v3-64k-backing", (), True),
    ("c512-ref64-backing", ("cluster_size=512", "refcount_bits=64"), True),
    ("extl2-backing", ("extended_l2=on", "cluster_size=32k", "refcount_bits=1"), True),
]


@pytest.mark.parametrize(("options", "with_backing"), [s[1:] for s in REUSE_SETS],
                         ids=[s[0] for s in REUSE_SETS])
@needs_qemu
def test_write_trim_write_reuses_and_punches(tmp_path: pathlib.Path, options: tuple[str, ...],
                                             with_backing: bool) -> None:
    """Rounds of: trim the region written last, flush, write the other one.  After the
    first round the file never grows, and each trim punches the host file."""
    size = 4 * REGION
    mirror = bytearray(size)
    extra: tuple[str, ...] = ()
    if with_backing:
        mirror[:] = stamp(0, size, 0xFFFF)
        write_raw(tmp_path / "base.raw", mirror)
        extra = ("backing_file=base.raw", "backing_fmt=raw")
    image = create(tmp_path / "r.qcow2", size, *options, *extra)
    regions = (0, 2 * REGION)  # a region between them stays as it was

    async def body() -> None:
        backing = FileNode(str(tmp_path / "base.raw"), read_only=True) if with_backing \
            else None
        node = await opened(image, backing=backing)
        sizes, written, trimmed = [], [], []
        for step in range(6):
            target, other = regions[step % 2], regions[(step + 1) % 2]
            if step:
                await node.trim(other, REGION)
                mirror[other:other + REGION] = bytes(REGION)
                assert await read(node, other, REGION) == bytes(REGION)
                await node.flush()
                trimmed.append(blocks(image))
            data = stamp(target, REGION, step)
            await node.pwrite(data, target)
            mirror[target:target + REGION] = data
            await node.flush()
            sizes.append(image.stat().st_size)
            written.append(blocks(image))
        assert sizes == [sizes[0]] * len(sizes), sizes
        for before, after in zip(written, trimmed, strict=False):
            assert after <= before - REGION // 2, (written, trimmed)
        await close_node(node)

    run(body())
    assert_clean(image)
    assert same_as_raw(image, write_raw(tmp_path / "mirror.raw", mirror))


@needs_qemu
def test_reuse_without_a_flush_and_without_discard(tmp_path: pathlib.Path) -> None:
    """No flush between trims and writes: the releases are applied when the spare
    clusters run out, and reused.  The file cannot trim: nothing is punched."""
    size = 4 * REGION
    image = create(tmp_path / "n.qcow2", size, "cluster_size=4k")
    mirror = bytearray(size)

    async def body() -> None:
        node = await opened(image, discard=False)
        assert not node.file.capabilities.can_trim
        sizes, on_disk = [], []
        for step in range(8):
            target = (step % 2) * 2 * REGION
            if step:
                other = 2 * REGION - target
                await node.trim(other, REGION)
                mirror[other:other + REGION] = bytes(REGION)
            data = stamp(target, REGION, step)
            await node.pwrite(data, target)
            mirror[target:target + REGION] = data
            sizes.append(image.stat().st_size)
            on_disk.append(blocks(image))
        assert sizes == [sizes[0]] * len(sizes), sizes
        assert on_disk == sorted(on_disk), on_disk  # never punched
        await close_node(node)

    run(body())
    assert_clean(image)
    assert same_as_raw(image, write_raw(tmp_path / "mirror.raw", mirror))


MIX_SETS = [
    ("v3-64k", ("cluster_size=64k",)),
    ("v2-c4k", ("compat=0.10", "cluster_size=4k")),
    ("c512-ref1", ("cluster_size=512", "refcount_bits=1")),
    ("c4k-ref64", ("cluster_size=4k", "refcount_bits=64")),
    ("c1k-ref4", ("cluster_size=1k", "refcount_bits=4")),
    ("extl2", ("extended_l2=on", "cluster_size=16k")),
]


async def mix(node: Qcow2Node, mirror: bytearray, seed: int, count: int) -> None:
    """``count`` random writes, zeroes, trims and flushes, mirrored; reads checked."""
    rng = random.Random(seed)
    size = node.size
    for step in range(count):
        offset = 8 * rng.randrange(size // 8)
        length = min(size - offset, 8 * rng.randrange(1, rng.choice((75, 1125, 8750)) + 1))
        op = rng.random()
        if op < 0.45:
            data = stamp(offset, length, step)
            await node.pwrite(data, offset, fua=rng.random() < 0.05)
            mirror[offset:offset + length] = data
        elif op < 0.65:
            try:
                await node.write_zeroes(offset, length, may_trim=rng.random() < 0.5,
                                        fast=rng.random() < 0.2)
            except FastZeroUnsupported:
                continue
            mirror[offset:offset + length] = bytes(length)
        elif op < 0.85:
            await node.trim(offset, length)
            got = await read(node, offset, length)
            for pos, byte in enumerate(got):  # trimmed: old data or zeroes
                assert byte in (0, mirror[offset + pos])
            mirror[offset:offset + length] = got
        else:
            await node.flush()
        if rng.random() < 0.15:
            start = rng.randrange(size)
            end = min(size, start + rng.randrange(1, 100_000))
            assert await read(node, start, end - start) == mirror[start:end]


@pytest.mark.parametrize("options", [s[1] for s in MIX_SETS], ids=[s[0] for s in MIX_SETS])
@needs_qemu
def test_random_mix_against_a_mirror(tmp_path: pathlib.Path, options: tuple[str, ...]) -> None:
    """Seeded writes, zeroes, trims and flushes over a small image: the image stays
    what the mirror says, and the file stays small: freed clusters are reused
    before a batch is taken at the end (without reuse, the small-cluster sets
    here end past 2 MiB)."""
    size = 256 * KIB
    image = create(tmp_path / "m.qcow2", size, *options)
    mirror = bytearray(size)

    bound = 0

    async def body() -> None:
        nonlocal bound
        node = await opened(image)
        cluster = node.cluster_size
        bound = 2 * size + max(16, MIB // cluster) * cluster + 16 * cluster  # + a batch
        await mix(node, mirror, seed=len(options) + 7, count=400)
        await close_node(node)

    run(body())
    assert_clean(image)
    assert same_as_raw(image, write_raw(tmp_path / "mirror.raw", mirror))
    assert image.stat().st_size <= bound


@needs_qemu
def test_refcount_table_moves_while_clusters_are_free(tmp_path: pathlib.Path) -> None:
    """512-byte clusters, 64-bit refcounts: a refcount table cluster covers 2 MiB of
    file.  Freed clusters are reused while the file grows past that: the table
    moves (its new clusters come from the end, the old ones are freed after the
    switch and reused); then a random mix runs on top."""
    size = 4 * MIB
    image = create(tmp_path / "t.qcow2", size, "cluster_size=512", "refcount_bits=64")
    mirror = bytearray(size)

    async def body() -> None:
        node = await opened(image)
        table = node.refcounts.table_offset
        for step in range(4):
            data = stamp(step * MIB, MIB, step)
            await node.pwrite(data, step * MIB)
            mirror[step * MIB:(step + 1) * MIB] = data
            await node.trim(step * MIB, MIB // 2)
            mirror[step * MIB:step * MIB + MIB // 2] = bytes(MIB // 2)
            await node.flush()
        assert node.refcounts.table_offset != table
        # the old table's cluster was freed after the switch, then reused
        assert await node.refcounts.get(table // node.cluster_size) == 1
        assert image.stat().st_size <= 4 * MIB  # without reuse: over 5 MiB
        await mix(node, mirror, seed=3, count=150)
        await close_node(node)

    run(body())
    assert_clean(image)
    assert same_as_raw(image, write_raw(tmp_path / "mirror.raw", mirror))
