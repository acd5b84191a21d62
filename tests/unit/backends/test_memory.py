"""MemoryBackend: the backend contract plus chunk-level behaviour."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from tests.unit.backends.contract import BackendContract, pattern, read, run

from pynbd.backends import Backend, Capabilities, Extent, ExtentFlags, MemoryBackend
from pynbd.backends import memory as memory_module

if TYPE_CHECKING:
    import pathlib

CHUNK = memory_module.CHUNK_SIZE
HOLE = ExtentFlags.HOLE | ExtentFlags.ZERO
DATA = ExtentFlags.DATA


class TestMemoryBackend(BackendContract):
    has_raw_access = True

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        return MemoryBackend(size)

    def read_raw(self, backend: Backend, offset: int, length: int) -> bytes:
        assert isinstance(backend, MemoryBackend)
        out = bytearray(length)
        for pos in range(offset, offset + length):
            chunk = backend._chunks.get(pos // CHUNK)
            if chunk is not None:
                out[pos - offset] = chunk[pos % CHUNK]
        return bytes(out)

    def write_raw(self, backend: Backend, offset: int, data: bytes) -> None:
        assert isinstance(backend, MemoryBackend)
        for pos, value in enumerate(data, start=offset):
            backend._chunk_for_write(pos // CHUNK)[pos % CHUNK] = value


def test_capabilities_are_all_true() -> None:
    assert MemoryBackend(10).capabilities == Capabilities(inline_reads=True)


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
    assert sorted(backend._chunks) == [1, 2]
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
    assert sorted(backend._chunks) == [0, 4, 5]
    got = run(read(backend, 0, backend.size))
    assert got[:CHUNK - 1] == data[:CHUNK - 1]
    assert got[CHUNK - 1:4 * CHUNK + 1].count(0) == 3 * CHUNK + 2
    assert got[4 * CHUNK + 1:] == data[4 * CHUNK + 1:]


def test_trim_to_the_end_drops_the_short_last_chunk() -> None:
    backend = MemoryBackend(2 * CHUNK + 10)
    run(backend.pwrite(b"a" * 20, 2 * CHUNK - 5))
    run(backend.trim(2 * CHUNK, 10))
    assert sorted(backend._chunks) == [1]


def test_write_zeroes_without_trim_keeps_chunks_allocated() -> None:
    backend = MemoryBackend(4 * CHUNK)
    run(backend.pwrite(b"b" * CHUNK, CHUNK))
    run(backend.write_zeroes(0, 3 * CHUNK))
    assert sorted(backend._chunks) == [0, 1, 2]
    assert run(backend.block_status(0, backend.size)) == [
        Extent(3 * CHUNK, DATA), Extent(CHUNK, HOLE)]
    assert run(read(backend, 0, backend.size)).count(0) == backend.size


def test_write_zeroes_may_trim_drops_chunks() -> None:
    backend = MemoryBackend(4 * CHUNK)
    run(backend.pwrite(b"c" * (4 * CHUNK), 0))
    run(backend.write_zeroes(CHUNK // 2, 2 * CHUNK, may_trim=True, fast=True))
    assert sorted(backend._chunks) == [0, 2, 3]


def test_huge_sparse_disk_is_cheap() -> None:
    backend = MemoryBackend(1 << 40)
    run(backend.pwrite(b"d", (1 << 39) + 3))
    started = time.monotonic()
    assert run(backend.block_status(0, backend.size)) == [
        Extent(1 << 39, HOLE), Extent(CHUNK, DATA), Extent((1 << 39) - CHUNK, HOLE)]
    run(backend.trim(0, backend.size))
    run(backend.write_zeroes(0, backend.size, may_trim=True))
    assert time.monotonic() - started < 1.0
    assert backend._chunks == {}
