"""OffsetBackend: the backend contract over memory and file, plus the window rules."""

from __future__ import annotations

import errno
import os
import tempfile
from typing import TYPE_CHECKING

import pytest
from tests.unit.backends.contract import (
    CHUNK,
    BackendContract,
    pattern,
    raises_errno,
    read,
    run,
)

from pynbd.backends import (
    Backend,
    Capabilities,
    Extent,
    ExtentFlags,
    FileBackend,
    MemoryBackend,
    OffsetBackend,
)

if TYPE_CHECKING:
    import pathlib

HOLE = ExtentFlags.HOLE | ExtentFlags.ZERO
DATA = ExtentFlags.DATA
#: where the window starts in the inner backend (unaligned on purpose)
START = 2 * CHUNK + 77
#: inner bytes after the window
TAIL = CHUNK + 5


class OffsetContract(BackendContract):
    has_raw_access = True

    def make_inner(self, tmp_path: pathlib.Path, size: int) -> Backend:
        raise NotImplementedError

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        return OffsetBackend(self.make_inner(tmp_path, START + size + TAIL), START, size)

    def read_raw(self, backend: Backend, offset: int, length: int) -> bytes:
        assert isinstance(backend, OffsetBackend)
        return run(read(backend.inner, START + offset, length))

    def write_raw(self, backend: Backend, offset: int, data: bytes) -> None:
        assert isinstance(backend, OffsetBackend)
        run(backend.inner.pwrite(data, START + offset))


class TestOffsetOverMemory(OffsetContract):
    def make_inner(self, tmp_path: pathlib.Path, size: int) -> Backend:
        return MemoryBackend(size)


class TestOffsetOverFile(OffsetContract):
    def make_inner(self, tmp_path: pathlib.Path, size: int) -> Backend:
        fd, path = tempfile.mkstemp(dir=tmp_path, suffix=".img")
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return FileBackend(path, discard=True)


def test_size_defaults_to_the_rest_of_inner() -> None:
    inner = MemoryBackend(1000)
    assert OffsetBackend(inner, 300).size == 700
    assert OffsetBackend(inner, 1000).size == 0
    assert OffsetBackend(inner, 0).size == 1000
    assert OffsetBackend(inner, 10, 990).size == 990


@pytest.mark.parametrize(("offset", "size"), [(1001, None), (-1, None), (10, 991),
                                              (0, 1001), (5, -1)])
def test_window_must_fit(offset: int, size: int | None) -> None:
    with pytest.raises(ValueError, match="inner backend"):
        OffsetBackend(MemoryBackend(1000), offset, size)


def test_capabilities_are_the_inner_ones(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    inner = FileBackend(str(path), read_only=True)
    window = OffsetBackend(inner, 512)
    assert window.capabilities is inner.capabilities
    assert not window.capabilities.can_write
    run(window.close())
    assert OffsetBackend(MemoryBackend(10), 1).capabilities == Capabilities(
        inline_reads=True, sendfile_reads=True)


def test_requests_land_at_the_offset() -> None:
    inner = MemoryBackend(4 * CHUNK)
    window = OffsetBackend(inner, CHUNK + 3, 2 * CHUNK)
    data = pattern(1, 100)

    async def body() -> None:
        await window.pwrite(data, 10, fua=True)
        assert await read(inner, CHUNK + 13, 100) == data
        await inner.pwrite(data, CHUNK + 3)
        assert await read(window, 0, 100) == data
        await window.write_zeroes(0, 50)
        assert await read(inner, CHUNK + 3, 100) == bytes(50) + data[50:]
        await window.trim(0, 100)
        assert await read(inner, CHUNK + 3, 100) == bytes(100)
        await window.cache(0, 10)
        await window.flush()

    run(body())


def test_block_status_is_clipped_to_the_window() -> None:
    inner = MemoryBackend(6 * CHUNK)
    run(inner.pwrite(b"\x01" * (6 * CHUNK), 0))
    run(inner.trim(CHUNK, CHUNK))
    window = OffsetBackend(inner, CHUNK // 2, 4 * CHUNK)
    assert run(window.block_status(0, window.size)) == [
        Extent(CHUNK // 2, DATA), Extent(CHUNK, HOLE), Extent(5 * CHUNK // 2, DATA)]
    assert run(window.block_status(window.size - 10, 10)) == [Extent(10, DATA)]
    assert run(window.block_status(CHUNK, 10)) == [Extent(10, HOLE)]


class _LongExtents(MemoryBackend):
    """An inner backend whose last extent runs past the request (allowed)."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(self.size - offset, HOLE | ExtentFlags.ZERO)]


def test_block_status_clips_long_inner_extents() -> None:
    window = OffsetBackend(_LongExtents(1000), 100, 500)
    assert run(window.block_status(0, 500)) == [Extent(500, HOLE)]
    assert run(window.block_status(490, 5)) == [Extent(5, HOLE)]


def test_close_closes_inner(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    inner = FileBackend(str(path))
    window = OffsetBackend(inner, 100)
    run(window.close())
    with raises_errno(errno.EBADF):
        run(read(inner, 0, 10))
