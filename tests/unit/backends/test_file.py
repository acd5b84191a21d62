"""FileBackend: the backend contract plus file-system specifics, and parse_size."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from tests.unit.backends.contract import BackendContract, pattern, raises_errno, read, run

from pynbd.backends import (
    Backend,
    Extent,
    ExtentFlags,
    FastZeroUnsupported,
    FileBackend,
    parse_size,
)
from pynbd.backends import file as file_module

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

HOLE = ExtentFlags.HOLE | ExtentFlags.ZERO
DATA = ExtentFlags.DATA
MIB = 1 << 20


def make_image(directory: pathlib.Path | str, size: int) -> str:
    """A new sparse file of ``size`` bytes (a unique name in ``directory``)."""
    fd, path = tempfile.mkstemp(dir=directory, suffix=".img")
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


class FileContract(BackendContract):
    has_raw_access = True
    discard: ClassVar[bool]

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        return FileBackend(make_image(tmp_path, size), discard=self.discard)

    def read_raw(self, backend: Backend, offset: int, length: int) -> bytes:
        assert isinstance(backend, FileBackend)
        with open(backend.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write_raw(self, backend: Backend, offset: int, data: bytes) -> None:
        assert isinstance(backend, FileBackend)
        with open(backend.path, "r+b") as f:
            f.seek(offset)
            f.write(data)


class TestFileBackend(FileContract):
    discard = False


class TestFileBackendDiscard(FileContract):
    discard = True


class TestFileBackendWithoutFastPaths(FileContract):
    """Every optional kernel feature "missing": all the fallback paths."""

    discard = True

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        backend = super().make_backend(tmp_path, size)
        assert isinstance(backend, FileBackend)
        backend._unsupported.update(file_module._Feature)
        return backend


class TestFileBackendOnTmpfs(FileContract):
    """tmpfs has no RWF_NOWAIT reads and no FALLOC_FL_ZERO_RANGE (Linux 6.x)."""

    discard = True
    has_raw_access = False

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        shm = "/dev/shm"
        if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
            pytest.skip("no writable /dev/shm")
        backend = FileBackend(make_image(shm, size), discard=self.discard)
        os.unlink(backend.path)  # the fd keeps the file; nothing is left behind
        return backend


# -- helpers ---------------------------------------------------------------


@pytest.fixture
def image(tmp_path: pathlib.Path) -> str:
    return make_image(tmp_path, 4 * MIB)


def opened(path: str, **kwargs: Any) -> Iterator[FileBackend]:
    backend = FileBackend(path, **kwargs)
    try:
        yield backend
    finally:
        run(backend.close())


@pytest.fixture
def backend(image: str) -> Iterator[FileBackend]:
    yield from opened(image, discard=True)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


# -- opening ---------------------------------------------------------------


def test_missing_path_raises_file_not_found(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "absent.img")
    with pytest.raises(FileNotFoundError) as info:
        FileBackend(path)
    assert info.value.filename == path


def test_directory_is_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(IsADirectoryError):
        FileBackend(str(tmp_path))
    with pytest.raises(OSError, match="not a regular file or block device"):
        FileBackend(str(tmp_path), read_only=True)


def test_size_and_existing_contents(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(1, 12_345))
    for backend in opened(str(path)):
        assert backend.size == 12_345
        assert run(read(backend, 0, 12_345)) == pattern(1, 12_345)


def test_capabilities(image: str) -> None:
    for backend in opened(image):
        caps = backend.capabilities
        assert caps.can_write
        assert caps.can_fua
        assert caps.can_extents
        assert caps.can_multi_conn
        assert caps.can_fast_zero
        assert not caps.can_trim
    for backend in opened(image, discard=True):
        assert backend.capabilities.can_trim


def test_read_only(image: str) -> None:
    os.chmod(image, 0o444)
    with open(image, "r+b") as f:
        f.write(b"ro")
    for backend in opened(image, read_only=True, discard=True):
        caps = backend.capabilities
        assert not caps.can_write
        assert not caps.can_trim
        assert not caps.can_zero
        assert run(read(backend, 0, 2)) == b"ro"
        with raises_errno(errno.EBADF):
            run(backend.pwrite(b"x", 0))
        run(backend.flush())


def test_close_is_idempotent(image: str) -> None:
    backend = FileBackend(image)
    run(backend.close())
    run(backend.close())


# -- holes and trim --------------------------------------------------------


def status_at(extents: list[Extent], position: int) -> ExtentFlags:
    """The flags of the extent (from offset 0) that holds ``position``."""
    start = 0
    for extent in extents:
        if start <= position < start + extent.length:
            return extent.flags
        start += extent.length
    raise AssertionError(f"no extent covers {position}")


def test_sparse_file_reports_holes(backend: FileBackend) -> None:
    run(backend.pwrite(pattern(2, 4096), MIB))
    extents = run(backend.block_status(0, backend.size))
    assert sum(extent.length for extent in extents) == backend.size
    assert status_at(extents, 0) == HOLE
    assert status_at(extents, MIB) == DATA
    assert status_at(extents, MIB + 4095) == DATA
    assert status_at(extents, backend.size - 1) == HOLE
    assert run(backend.block_status(MIB + 100, 10)) == [Extent(10, DATA)]


def test_block_status_is_capped(backend: FileBackend,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(5):
        run(backend.pwrite(b"x", 2 * index * 4096))
    monkeypatch.setattr(file_module, "MAX_EXTENTS", 3)
    extents = run(backend.block_status(0, backend.size))
    assert [extent.flags for extent in extents] == [DATA, HOLE, DATA]
    assert sum(extent.length for extent in extents) < backend.size


def test_block_status_without_seek_data(backend: FileBackend,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_lseek = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how == os.SEEK_DATA:
            raise OSError(errno.EINVAL, "no SEEK_DATA here")
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    assert run(backend.block_status(10, 100)) == [Extent(100, DATA)]
    monkeypatch.undo()
    # remembered: no more lseek calls, everything is data
    assert run(backend.block_status(0, backend.size)) == [Extent(backend.size, DATA)]


def test_trim_with_discard_punches_a_hole(backend: FileBackend) -> None:
    run(backend.pwrite(pattern(3, 2 * MIB), 0))
    run(backend.flush())
    before = allocated(backend.path)
    run(backend.trim(0, 2 * MIB))
    assert allocated(backend.path) <= before - 2 * MIB
    assert run(read(backend, 0, 2 * MIB)).count(0) == 2 * MIB
    assert run(backend.block_status(0, backend.size)) == [Extent(backend.size, HOLE)]


def test_trim_without_discard_keeps_data(image: str) -> None:
    for backend in opened(image):
        data = pattern(4, MIB)
        run(backend.pwrite(data, 0))
        run(backend.trim(0, MIB, fua=True))
        assert run(read(backend, 0, MIB)) == data


def test_write_zeroes_may_trim_punches_only_with_discard(tmp_path: pathlib.Path) -> None:
    for discard in (False, True):
        path = make_image(tmp_path, 2 * MIB)
        for backend in opened(path, discard=discard):
            run(backend.pwrite(pattern(5, 2 * MIB), 0))
            run(backend.flush())
            before = allocated(path)
            run(backend.write_zeroes(0, MIB, may_trim=True))
            assert run(read(backend, 0, MIB)).count(0) == MIB
            if discard:
                assert allocated(path) <= before - MIB
            else:
                assert allocated(path) >= before


def test_write_zeroes_without_may_trim_keeps_allocation(backend: FileBackend) -> None:
    run(backend.pwrite(pattern(6, 2 * MIB), 0))
    run(backend.flush())
    before = allocated(backend.path)
    run(backend.write_zeroes(0, 2 * MIB, may_trim=False))
    assert allocated(backend.path) >= before
    assert run(read(backend, 0, 2 * MIB)).count(0) == 2 * MIB


# -- fallbacks -------------------------------------------------------------


def fail_fallocate(monkeypatch: pytest.MonkeyPatch, code: int) -> list[int]:
    """Make every fallocate fail with ``code``; returns the modes tried."""
    modes: list[int] = []

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(file_module, "fallocate", fallocate)
    return modes


def test_fast_zero_without_fallocate(backend: FileBackend,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    modes = fail_fallocate(monkeypatch, errno.EOPNOTSUPP)
    data = pattern(7, 3 * MIB)
    run(backend.pwrite(data, 0))
    with pytest.raises(FastZeroUnsupported) as info:
        run(backend.write_zeroes(100, 2 * MIB, may_trim=True, fast=True))
    assert info.value.errno == errno.ENOTSUP
    assert run(read(backend, 0, len(data))) == data
    assert len(modes) == 2  # PUNCH_HOLE, then ZERO_RANGE; both now remembered
    # without fast, zero buffers are written (more than one 1 MiB chunk)
    run(backend.write_zeroes(100, 2 * MIB + 5))
    assert len(modes) == 2
    got = run(read(backend, 0, len(data)))
    assert got[:100] == data[:100]
    assert got[100:100 + 2 * MIB + 5].count(0) == 2 * MIB + 5
    assert got[100 + 2 * MIB + 5:] == data[100 + 2 * MIB + 5:]
    # trim is a hint: unsupported is fine
    run(backend.trim(0, 4096))


def test_fallocate_einval_falls_back_each_time(backend: FileBackend,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    modes = fail_fallocate(monkeypatch, errno.EINVAL)
    run(backend.pwrite(b"\xff" * 10, 0))
    run(backend.write_zeroes(1, 5))
    run(backend.write_zeroes(1, 5))
    assert len(modes) == 2  # EINVAL is not remembered
    assert run(read(backend, 0, 10)) == b"\xff" + bytes(5) + b"\xff" * 4


def test_fallocate_errors_propagate(backend: FileBackend,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fail_fallocate(monkeypatch, errno.ENOSPC)
    with raises_errno(errno.ENOSPC):
        run(backend.write_zeroes(0, 10))


def test_nowait_read_falls_back_to_the_pool(backend: FileBackend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = pattern(8, 100_000)
    run(backend.pwrite(data, 5))
    real_preadv = os.preadv
    calls: list[tuple[int, str]] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        calls.append((flags, threading.current_thread().name))
        if flags & os.RWF_NOWAIT:
            if len(calls) == 1:
                raise BlockingIOError(errno.EAGAIN, "would block")
            # a short read: only part of it is cached
            return real_preadv(fd, [buffers[0][:1000]], offset, flags)
        return real_preadv(fd, [buffers[0][:4096]], offset, flags)  # short, loops

    monkeypatch.setattr(os, "preadv", preadv)
    assert run(read(backend, 5, len(data))) == data
    assert calls[0][0] == os.RWF_NOWAIT
    assert all(name.startswith("pynbd-io") for flags, name in calls[1:] if flags == 0)
    calls.clear()
    assert run(read(backend, 5, len(data))) == data
    assert calls[0][0] == os.RWF_NOWAIT
    assert calls[1][0] == 0


def test_nowait_unsupported_is_remembered(backend: FileBackend,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv, real_pwritev = os.preadv, os.pwritev
    flags_seen: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        flags_seen.append(flags)
        if flags & os.RWF_NOWAIT:
            raise OSError(errno.EOPNOTSUPP, "no nowait")
        return real_preadv(fd, buffers, offset, flags)

    def pwritev(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        flags_seen.append(flags)
        if flags & os.RWF_NOWAIT:
            raise OSError(errno.EOPNOTSUPP, "no nowait")
        return real_pwritev(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwritev", pwritev)
    for _ in range(3):
        run(backend.pwrite(b"abc", 7))
        assert run(read(backend, 7, 3)) == b"abc"
    assert flags_seen.count(os.RWF_NOWAIT) == 2
    assert len(flags_seen) == 8


def test_large_requests_skip_the_inline_attempt(backend: FileBackend,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv = os.preadv
    flags_seen: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        flags_seen.append(flags)
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    run(read(backend, 0, file_module.INLINE_MAX + 1))
    assert flags_seen == [0]


def test_read_past_end_of_shrunken_file_reads_zeroes(backend: FileBackend) -> None:
    run(backend.pwrite(b"\x01" * 8192, 0))
    os.truncate(backend.path, 4096)  # behind the backend's back
    got = run(read(backend, 0, 8192))
    assert got == b"\x01" * 4096 + bytes(4096)
    assert run(backend.block_status(4096, 4096)) == [Extent(4096, HOLE)]


# -- durability ------------------------------------------------------------


def test_failed_fdatasync_latches(backend: FileBackend,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "simulated writeback error")

    run(backend.pwrite(b"data", 0))
    run(backend.flush())
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with raises_errno(errno.EIO):
        run(backend.flush())
    monkeypatch.undo()
    for attempt in (backend.flush(), backend.pwrite(b"more", 0, fua=True),
                    backend.write_zeroes(0, 10, fua=True), backend.trim(0, 10, fua=True),
                    backend.flush()):
        with raises_errno(errno.EIO):
            run(attempt)
    # writes without FUA still work; only durability is refused
    run(backend.pwrite(b"more", 0))
    assert run(read(backend, 0, 4)) == b"more"
    # a new backend on the same file starts clean
    for fresh in opened(backend.path):
        run(fresh.flush())
        run(fresh.pwrite(b"x", 0, fua=True))


def test_every_sync_failure_latches(backend: FileBackend,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def fdatasync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "simulated")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(OSError, match="simulated"):
        run(backend.pwrite(b"x", 0, fua=True))
    monkeypatch.undo()
    with pytest.raises(OSError, match="earlier fdatasync failed"):
        run(backend.flush())


# -- block devices ---------------------------------------------------------


def test_character_device_is_rejected() -> None:
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(OSError, match="not a regular file or block device"):
        FileBackend("/dev/null")


# -- parse_size ------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0),
    ("1048576", 1 << 20),
    ("512", 512),
    ("512B", 512),
    ("512K", 512 << 10),
    ("512k", 512 << 10),
    ("64M", 64 << 20),
    ("64m", 64 << 20),
    ("1G", 1 << 30),
    ("1g", 1 << 30),
    ("2T", 2 << 40),
    ("2t", 2 << 40),
    ("1P", 1 << 50),
    ("64MiB", 64 << 20),
    ("64MB", 64 << 20),
    ("1GiB", 1 << 30),
    ("4kib", 4 << 10),
    (" 10M\n", 10 << 20),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "M", "-1", "+1", "1.5G", "1 G", "1X", "1iB", "1GG", "0x10", "1_000", "ten",
    "١٢", "64Mi", "1GiBs",
])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_inline_writes_back_off_after_a_slow_one(backend: FileBackend,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Where buffered RWF_NOWAIT writes are missing, whole-page writes go inline
    until one is slow; then inline writes stop and the pool takes over."""
    backend._unsupported.add(file_module._Feature.NOWAIT_WRITE)
    page = pattern(3, 4096)
    assert backend.pwrite_nowait(page, 4096)
    assert run(read(backend, 4096, 4096)) == page
    # partial pages and large writes are never done inline
    assert not backend.pwrite_nowait(page[:512], 8192)
    assert not backend.pwrite_nowait(page, 4096 + 512)
    assert not backend.pwrite_nowait(bytes(file_module.INLINE_WRITE_MAX + 4096), 0)
    # a write slower than the threshold switches inline writes off
    monkeypatch.setattr(file_module, "INLINE_WRITE_SLOW_NS", -1)
    assert backend.pwrite_nowait(page, 8192)
    assert not backend.pwrite_nowait(page, 12288)
    assert run(read(backend, 12288, 4096)) == bytes(4096)  # refused means untouched
    backend._inline_writes_off_until = 0
    monkeypatch.setattr(file_module, "INLINE_WRITE_SLOW_NS", 10**12)
    assert backend.pwrite_nowait(page, 12288)
