"""MemoryNode: the node contract (under every layer) plus chunk-level allocation tracking."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

import pytest
from tests.unit.block.contract import NodeContract
from tests.unit.block.support import DATA, HOLE, pattern, read, run

from pynbd.block import memory as memory_module
from pynbd.block.memory import MemoryNode
from pynbd.block.node import Capabilities, Extent, Node, OwnBufferReads

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable

CHUNK = memory_module.CHUNK_SIZE


class TestMemoryNode(NodeContract):
    has_raw_access = True

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        return MemoryNode(size)

    def read_raw(self, protocol: Node, offset: int, length: int) -> bytes:
        assert isinstance(protocol, MemoryNode)
        return os.pread(protocol._fd, length, offset)

    def write_raw(self, protocol: Node, offset: int, data: bytes) -> None:
        assert isinstance(protocol, MemoryNode)
        protocol._mark(offset, len(data))
        os.pwrite(protocol._fd, data, offset)


def test_capabilities_are_all_true() -> None:
    assert MemoryNode(10).capabilities == Capabilities()


def test_fast_paths_offered() -> None:
    """Inline reads and writes and sendfile; no own-buffer reads, no direct I/O."""
    node = MemoryNode(10)
    paths = node.fast_paths()
    assert paths.pread_nowait == node.pread_nowait
    assert paths.pwrite_nowait == node.pwrite_nowait
    assert paths.sendfile_source == node.sendfile_source
    assert (paths.start_read, paths.start_write, paths.read) == (None, None, None)
    assert not isinstance(node, OwnBufferReads)
    assert node.resolve() is node
    assert (node.driver, node.filename, node.children) == ("memory", "", {})


def test_negative_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        MemoryNode(-1)


def test_empty_node() -> None:
    node = MemoryNode(0)
    assert node.size == 0
    run(node.pread(memoryview(bytearray(0)), 0))


def test_fresh_node_is_one_hole() -> None:
    node = MemoryNode(10 * CHUNK + 5)
    assert run(node.block_status(0, node.size)) == [Extent(node.size, HOLE)]
    assert run(node.block_status(3, 7)) == [Extent(7, HOLE)]


def test_writes_allocate_only_the_chunks_they_touch() -> None:
    node = MemoryNode(10 * CHUNK)
    run(node.pwrite(b"x" * 20, 2 * CHUNK - 10))
    assert sorted(node._present) == [1, 2]
    assert run(node.block_status(0, node.size)) == [
        Extent(CHUNK, HOLE), Extent(2 * CHUNK, DATA), Extent(7 * CHUNK, HOLE)]


def test_extents_merge_across_neighbouring_chunks() -> None:
    node = MemoryNode(10 * CHUNK)
    for index in (5, 3, 4, 8):
        run(node.pwrite(b"y", index * CHUNK))
    assert run(node.block_status(0, node.size)) == [
        Extent(3 * CHUNK, HOLE), Extent(3 * CHUNK, DATA), Extent(2 * CHUNK, HOLE),
        Extent(CHUNK, DATA), Extent(CHUNK, HOLE)]
    # a query starting and ending inside runs is clipped to the request
    assert run(node.block_status(3 * CHUNK + 5, 2 * CHUNK)) == [Extent(2 * CHUNK, DATA)]
    assert run(node.block_status(CHUNK, 2 * CHUNK + 1)) == [
        Extent(2 * CHUNK, HOLE), Extent(1, DATA)]


def test_block_status_never_passes_the_end() -> None:
    node = MemoryNode(2 * CHUNK + 100)
    run(node.pwrite(b"z", 2 * CHUNK))
    assert run(node.block_status(CHUNK, CHUNK + 100)) == [
        Extent(CHUNK, HOLE), Extent(100, DATA)]
    assert run(node.block_status(2 * CHUNK + 99, 1)) == [Extent(1, DATA)]


def test_block_status_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "MAX_EXTENTS", 3)
    node = MemoryNode(10 * CHUNK)
    for index in range(0, 10, 2):
        run(node.pwrite(b"w", index * CHUNK))
    assert run(node.block_status(0, node.size)) == [
        Extent(CHUNK, DATA), Extent(CHUNK, HOLE), Extent(CHUNK, DATA)]


def test_trim_drops_covered_chunks_and_zeroes_edges() -> None:
    node = MemoryNode(5 * CHUNK + 10)
    data = pattern(1, node.size)
    run(node.pwrite(data, 0))
    run(node.trim(CHUNK - 1, 3 * CHUNK + 2))
    assert sorted(node._present) == [0, 4, 5]
    got = run(read(node, 0, node.size))
    assert got[:CHUNK - 1] == data[:CHUNK - 1]
    assert got[CHUNK - 1:4 * CHUNK + 1].count(0) == 3 * CHUNK + 2
    assert got[4 * CHUNK + 1:] == data[4 * CHUNK + 1:]


def test_trim_to_the_end_drops_the_short_last_chunk() -> None:
    node = MemoryNode(2 * CHUNK + 10)
    run(node.pwrite(b"a" * 20, 2 * CHUNK - 5))
    run(node.trim(2 * CHUNK, 10))
    assert sorted(node._present) == [1]


def test_write_zeroes_without_trim_keeps_chunks_allocated() -> None:
    node = MemoryNode(4 * CHUNK)
    run(node.pwrite(b"b" * CHUNK, CHUNK))
    run(node.write_zeroes(0, 3 * CHUNK))
    assert sorted(node._present) == [0, 1, 2]
    assert run(node.block_status(0, node.size)) == [
        Extent(3 * CHUNK, DATA), Extent(CHUNK, HOLE)]
    assert run(read(node, 0, node.size)).count(0) == node.size


def test_write_zeroes_may_trim_drops_chunks() -> None:
    node = MemoryNode(4 * CHUNK)
    run(node.pwrite(b"c" * (4 * CHUNK), 0))
    run(node.write_zeroes(CHUNK // 2, 2 * CHUNK, may_trim=True, fast=True))
    assert sorted(node._present) == [0, 2, 3]


def test_huge_sparse_disk_is_cheap() -> None:
    node = MemoryNode(1 << 40)
    run(node.pwrite(b"d", (1 << 39) + 3))
    started = time.monotonic()
    assert run(node.block_status(0, node.size)) == [
        Extent(1 << 39, HOLE), Extent(CHUNK, DATA), Extent((1 << 39) - CHUNK, HOLE)]
    run(node.trim(0, node.size))
    run(node.write_zeroes(0, node.size, may_trim=True))
    assert time.monotonic() - started < 1.0
    assert node._present == set()
    assert node.allocated_bytes() == 0


def test_reading_holes_allocates_nothing() -> None:
    node = MemoryNode(64 * CHUNK)
    run(read(node, 0, node.size))  # through the mapping where marked, else preadv
    buf = bytearray(CHUNK)
    assert node.pread_nowait(memoryview(buf), 5 * CHUNK)
    source = node.sendfile_source(0, node.size, False)
    assert source is not None
    assert os.pread(source[0], CHUNK, source[1]) == bytes(CHUNK)
    assert node.allocated_bytes() == 0


def test_trim_and_zeroing_give_the_memory_back() -> None:
    node = MemoryNode(64 * CHUNK)
    run(node.pwrite(pattern(2, 16 * CHUNK), 0))
    assert node.allocated_bytes() >= 16 * CHUNK
    run(node.trim(0, 8 * CHUNK))
    run(node.write_zeroes(8 * CHUNK, 8 * CHUNK, may_trim=True))
    assert node.allocated_bytes() == 0
    run(node.write_zeroes(0, 4 * CHUNK))  # NO_HOLE: allocated zeroes
    assert node.allocated_bytes() >= 4 * CHUNK
    assert run(read(node, 0, 4 * CHUNK)) == bytes(4 * CHUNK)


def test_mapping_and_file_are_one_store() -> None:
    """A write through the mapping is what sendfile and preadv see, and back."""
    node = MemoryNode(4 * CHUNK)
    assert node._view is not None
    first, second = pattern(3, CHUNK), pattern(4, CHUNK)
    assert node.pwrite_nowait(first, CHUNK)   # unmarked: written with pwritev
    assert node.pwrite_nowait(second, CHUNK)  # marked: copied into the mapping
    assert node.sendfile_source(CHUNK, CHUNK, True) == (node._fd, CHUNK)
    assert os.pread(node._fd, CHUNK, CHUNK) == second
    os.pwrite(node._fd, first, CHUNK)
    assert run(read(node, CHUNK, CHUNK)) == first


def test_sendfile_source_only_for_marked_ranges_when_data_only() -> None:
    node = MemoryNode(4 * CHUNK)
    run(node.pwrite(b"x", CHUNK + 7))
    assert node.sendfile_source(CHUNK, CHUNK, True) == (node._fd, CHUNK)
    assert node.sendfile_source(CHUNK, CHUNK + 1, True) is None
    assert node.sendfile_source(0, 4 * CHUNK, False) == (node._fd, 0)


def test_large_requests_go_through_the_pool() -> None:
    size = 3 * memory_module.INLINE_MAX + 5
    node = MemoryNode(4 * memory_module.INLINE_MAX)
    data = pattern(5, size)
    assert not node.pwrite_nowait(data, 1)
    assert not node.pread_nowait(memoryview(bytearray(size)), 1)
    run(node.pwrite(data, 1))
    assert run(read(node, 1, size)) == data
    marked = -(-(size + 1) // CHUNK) * CHUNK
    assert run(node.block_status(0, node.size)) == [
        Extent(marked, DATA), Extent(node.size - marked, HOLE)]


def test_a_trim_during_a_pool_write_leaves_its_chunks_marked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool write that lands after a trim of its range punched the hole: its
    chunks are marked again, so data never lies in a chunk reported as a hole."""
    size = 2 * memory_module.INLINE_MAX
    trimmed = asyncio.Event()

    async def in_pool_after_the_trim(call: Callable[..., None], *args: object) -> None:
        await trimmed.wait()
        call(*args)

    monkeypatch.setattr(memory_module, "in_pool", in_pool_after_the_trim)

    async def scenario() -> MemoryNode:
        node = MemoryNode(size)
        write = asyncio.ensure_future(node.pwrite(pattern(6, size), 0))
        await asyncio.sleep(0)  # the write waits for its turn in the "pool"
        await node.trim(0, size)
        trimmed.set()
        await write
        return node

    node = run(scenario())
    assert run(read(node, 0, size)) == pattern(6, size)
    assert run(node.block_status(0, size)) == [Extent(size, DATA)]


def test_a_disk_too_large_to_map_still_works() -> None:
    node = MemoryNode(memory_module.MAP_MAX + CHUNK)
    assert node._view is None
    run(node.pwrite(b"edge", node.size - 4))
    assert run(read(node, node.size - 4, 4)) == b"edge"
    assert node.pread_nowait(memoryview(bytearray(4)), node.size - 4)


def test_sizes_past_the_nbd_limit_are_refused() -> None:
    assert MemoryNode((1 << 63) - 1).size == (1 << 63) - 1
    with pytest.raises(ValueError, match="too large"):
        MemoryNode(1 << 63)


def test_close_releases_the_memory() -> None:
    node = MemoryNode(4 * CHUNK)
    run(node.pwrite(pattern(7, CHUNK), 0))
    finalizer = node._finalizer
    assert finalizer.alive
    run(node.close())
    assert (finalizer.alive, node._view) == (False, None)  # the memfd is closed
