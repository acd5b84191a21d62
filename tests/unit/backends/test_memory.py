"""MemoryBackend: the backend contract plus chunk-level allocation tracking."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

import pytest
from tests.unit.backends.contract import BackendContract, pattern, read, run

from pynbd.backends import Backend, Capabilities, Extent, ExtentFlags, MemoryBackend
from pynbd.backends import memory as memory_module

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable

CHUNK = memory_module.CHUNK_SIZE
HOLE = ExtentFlags.HOLE | ExtentFlags.ZERO
DATA = ExtentFlags.DATA


class TestMemoryBackend(BackendContract):
    has_raw_access = True

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        return MemoryBackend(size)

    def read_raw(self, backend: Backend, offset: int, length: int) -> bytes:
        assert isinstance(backend, MemoryBackend)
        return os.pread(backend._fd, length, offset)

    def write_raw(self, backend: Backend, offset: int, data: bytes) -> None:
        assert isinstance(backend, MemoryBackend)
        backend._mark(offset, len(data))
        os.pwrite(backend._fd, data, offset)


def test_capabilities_are_all_true() -> None:
    assert MemoryBackend(10).capabilities == Capabilities(inline_reads=True, sendfile_reads=True)


def test_negative_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        MemoryBackend(-1)


def test_empty_backend() -> None:
    backend = MemoryBackend(0)
    assert backend.size == 0
    run(backend.pread(memoryview(bytearray(0)), 0))


def test_fresh_backend_is_one_hole() -> None:
    backend = MemoryBackend(10 * CHUNK + 5)
    assert run(backend.block_status(0, backend.size)) == [Extent(backend.size, HOLE)]
    assert run(backend.block_status(3, 7)) == [Extent(7, HOLE)]


def test_writes_allocate_only_the_chunks_they_touch() -> None:
    backend = MemoryBackend(10 * CHUNK)
    run(backend.pwrite(b"x" * 20, 2 * CHUNK - 10))
    assert sorted(backend._present) == [1, 2]
    assert run(backend.block_status(0, backend.size)) == [
        Extent(CHUNK, HOLE), Extent(2 * CHUNK, DATA), Extent(7 * CHUNK, HOLE)]


def test_extents_merge_across_neighbouring_chunks() -> None:
    backend = MemoryBackend(10 * CHUNK)
    for index in (5, 3, 4, 8):
        run(backend.pwrite(b"y", index * CHUNK))
    assert run(backend.block_status(0, backend.size)) == [
        Extent(3 * CHUNK, HOLE), Extent(3 * CHUNK, DATA), Extent(2 * CHUNK, HOLE),
        Extent(CHUNK, DATA), Extent(CHUNK, HOLE)]
    # a query starting and ending inside runs is clipped to the request
    assert run(backend.block_status(3 * CHUNK + 5, 2 * CHUNK)) == [Extent(2 * CHUNK, DATA)]
    assert run(backend.block_status(CHUNK, 2 * CHUNK + 1)) == [
        Extent(2 * CHUNK, HOLE), Extent(1, DATA)]


def test_block_status_never_passes_the_end() -> None:
    backend = MemoryBackend(2 * CHUNK + 100)
    run(backend.pwrite(b"z", 2 * CHUNK))
    assert run(backend.block_status(CHUNK, CHUNK + 100)) == [
        Extent(CHUNK, HOLE), Extent(100, DATA)]
    assert run(backend.block_status(2 * CHUNK + 99, 1)) == [Extent(1, DATA)]


def test_block_status_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "MAX_EXTENTS", 3)
    backend = MemoryBackend(10 * CHUNK)
    for index in range(0, 10, 2):
        run(backend.pwrite(b"w", index * CHUNK))
    assert run(backend.block_status(0, backend.size)) == [
        Extent(CHUNK, DATA), Extent(CHUNK, HOLE), Extent(CHUNK, DATA)]


def test_trim_drops_covered_chunks_and_zeroes_edges() -> None:
    backend = MemoryBackend(5 * CHUNK + 10)
    data = pattern(1, backend.size)
    run(backend.pwrite(data, 0))
    run(backend.trim(CHUNK - 1, 3 * CHUNK + 2))
    assert sorted(backend._present) == [0, 4, 5]
    got = run(read(backend, 0, backend.size))
    assert got[:CHUNK - 1] == data[:CHUNK - 1]
    assert got[CHUNK - 1:4 * CHUNK + 1].count(0) == 3 * CHUNK + 2
    assert got[4 * CHUNK + 1:] == data[4 * CHUNK + 1:]


def test_trim_to_the_end_drops_the_short_last_chunk() -> None:
    backend = MemoryBackend(2 * CHUNK + 10)
    run(backend.pwrite(b"a" * 20, 2 * CHUNK - 5))
    run(backend.trim(2 * CHUNK, 10))
    assert sorted(backend._present) == [1]


def test_write_zeroes_without_trim_keeps_chunks_allocated() -> None:
    backend = MemoryBackend(4 * CHUNK)
    run(backend.pwrite(b"b" * CHUNK, CHUNK))
    run(backend.write_zeroes(0, 3 * CHUNK))
    assert sorted(backend._present) == [0, 1, 2]
    assert run(backend.block_status(0, backend.size)) == [
        Extent(3 * CHUNK, DATA), Extent(CHUNK, HOLE)]
    assert run(read(backend, 0, backend.size)).count(0) == backend.size


def test_write_zeroes_may_trim_drops_chunks() -> None:
    backend = MemoryBackend(4 * CHUNK)
    run(backend.pwrite(b"c" * (4 * CHUNK), 0))
    run(backend.write_zeroes(CHUNK // 2, 2 * CHUNK, may_trim=True, fast=True))
    assert sorted(backend._present) == [0, 2, 3]


def test_huge_sparse_disk_is_cheap() -> None:
    backend = MemoryBackend(1 << 40)
    run(backend.pwrite(b"d", (1 << 39) + 3))
    started = time.monotonic()
    assert run(backend.block_status(0, backend.size)) == [
        Extent(1 << 39, HOLE), Extent(CHUNK, DATA), Extent((1 << 39) - CHUNK, HOLE)]
    run(backend.trim(0, backend.size))
    run(backend.write_zeroes(0, backend.size, may_trim=True))
    assert time.monotonic() - started < 1.0
    assert backend._present == set()
    assert backend.allocated_bytes() == 0


def test_reading_holes_allocates_nothing() -> None:
    backend = MemoryBackend(64 * CHUNK)
    run(read(backend, 0, backend.size))  # through the mapping where marked, else preadv
    buf = bytearray(CHUNK)
    assert backend.pread_nowait(memoryview(buf), 5 * CHUNK)
    source = backend.sendfile_source(0, backend.size)
    assert source is not None
    assert os.pread(source[0], CHUNK, source[1]) == bytes(CHUNK)
    assert backend.allocated_bytes() == 0


def test_trim_and_zeroing_give_the_memory_back() -> None:
    backend = MemoryBackend(64 * CHUNK)
    run(backend.pwrite(pattern(2, 16 * CHUNK), 0))
    assert backend.allocated_bytes() >= 16 * CHUNK
    run(backend.trim(0, 8 * CHUNK))
    run(backend.write_zeroes(8 * CHUNK, 8 * CHUNK, may_trim=True))
    assert backend.allocated_bytes() == 0
    run(backend.write_zeroes(0, 4 * CHUNK))  # NO_HOLE: allocated zeroes
    assert backend.allocated_bytes() >= 4 * CHUNK
    assert run(read(backend, 0, 4 * CHUNK)) == bytes(4 * CHUNK)


def test_mapping_and_file_are_one_store() -> None:
    """A write through the mapping is what sendfile and preadv see, and back."""
    backend = MemoryBackend(4 * CHUNK)
    assert backend._view is not None
    first, second = pattern(3, CHUNK), pattern(4, CHUNK)
    assert backend.pwrite_nowait(first, CHUNK)   # unmarked: written with pwritev
    assert backend.pwrite_nowait(second, CHUNK)  # marked: copied into the mapping
    assert backend.sendfile_source(CHUNK, CHUNK, data_only=True) == (backend._fd, CHUNK)
    assert os.pread(backend._fd, CHUNK, CHUNK) == second
    os.pwrite(backend._fd, first, CHUNK)
    assert run(read(backend, CHUNK, CHUNK)) == first


def test_sendfile_source_only_for_marked_ranges_when_data_only() -> None:
    backend = MemoryBackend(4 * CHUNK)
    run(backend.pwrite(b"x", CHUNK + 7))
    assert backend.sendfile_source(CHUNK, CHUNK, data_only=True) == (backend._fd, CHUNK)
    assert backend.sendfile_source(CHUNK, CHUNK + 1, data_only=True) is None
    assert backend.sendfile_source(0, 4 * CHUNK) == (backend._fd, 0)


def test_large_requests_go_through_the_pool() -> None:
    size = 3 * memory_module.INLINE_MAX + 5
    backend = MemoryBackend(4 * memory_module.INLINE_MAX)
    data = pattern(5, size)
    assert not backend.pwrite_nowait(data, 1)
    assert not backend.pread_nowait(memoryview(bytearray(size)), 1)
    run(backend.pwrite(data, 1))
    assert run(read(backend, 1, size)) == data
    marked = -(-(size + 1) // CHUNK) * CHUNK
    assert run(backend.block_status(0, backend.size)) == [
        Extent(marked, DATA), Extent(backend.size - marked, HOLE)]


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

    async def scenario() -> MemoryBackend:
        backend = MemoryBackend(size)
        write = asyncio.ensure_future(backend.pwrite(pattern(6, size), 0))
        await asyncio.sleep(0)  # the write waits for its turn in the "pool"
        await backend.trim(0, size)
        trimmed.set()
        await write
        return backend

    backend = run(scenario())
    assert run(read(backend, 0, size)) == pattern(6, size)
    assert run(backend.block_status(0, size)) == [Extent(size, DATA)]


def test_a_disk_too_large_to_map_still_works() -> None:
    backend = MemoryBackend(memory_module.MAP_MAX + CHUNK)
    assert backend._view is None
    run(backend.pwrite(b"edge", backend.size - 4))
    assert run(read(backend, backend.size - 4, 4)) == b"edge"
    assert backend.pread_nowait(memoryview(bytearray(4)), backend.size - 4)


def test_sizes_past_the_nbd_limit_are_refused() -> None:
    assert MemoryBackend((1 << 63) - 1).size == (1 << 63) - 1
    with pytest.raises(ValueError, match="too large"):
        MemoryBackend(1 << 63)


def test_close_releases_the_memory() -> None:
    backend = MemoryBackend(4 * CHUNK)
    run(backend.pwrite(pattern(7, CHUNK), 0))
    finalizer = backend._finalizer
    assert finalizer.alive
    run(backend.close())
    assert (finalizer.alive, backend._view) == (False, None)  # the memfd is closed
