"""FileNode: the node contract (under every layer) plus file-system specifics (the
group commit and the durability latch are in ``test_file_sync.py``)."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from tests.unit.block.contract import NodeContract
from tests.unit.block.support import DATA, HOLE, MIB, pattern, raises_errno, read, run

from pynbd.block import FileNode
from pynbd.block import file as file_module
from pynbd.block.node import Extent, ExtentFlags, FastZeroUnsupported, Node

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator


def make_image(directory: pathlib.Path | str, size: int) -> str:
    """A new sparse file of ``size`` bytes (a unique name in ``directory``)."""
    fd, path = tempfile.mkstemp(dir=directory, suffix=".img")
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


class FileContract(NodeContract):
    has_raw_access = True
    discard: ClassVar[bool]

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        return FileNode(make_image(tmp_path, size), discard=self.discard)

    def read_raw(self, protocol: Node, offset: int, length: int) -> bytes:
        assert isinstance(protocol, FileNode)
        with open(protocol.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write_raw(self, protocol: Node, offset: int, data: bytes) -> None:
        assert isinstance(protocol, FileNode)
        with open(protocol.path, "r+b") as f:
            f.seek(offset)
            f.write(data)


class TestFileNode(FileContract):
    discard = False


class TestFileNodeDiscard(FileContract):
    discard = True


class TestFileNodeWithoutFastPaths(FileContract):
    """Every optional kernel feature "missing": all the fallback paths."""

    discard = True

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        node = super().make_protocol(tmp_path, size)
        assert isinstance(node, FileNode)
        node._unsupported.update(file_module._Feature)
        return node


class TestFileNodeOnTmpfs(FileContract):
    """tmpfs has no RWF_NOWAIT reads and no FALLOC_FL_ZERO_RANGE (Linux 6.x)."""

    discard = True
    has_raw_access = False

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        shm = "/dev/shm"
        if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
            pytest.skip("no writable /dev/shm")
        node = FileNode(make_image(shm, size), discard=self.discard)
        os.unlink(node.path)  # the fd keeps the file; nothing is left behind
        return node


# -- helpers ---------------------------------------------------------------


@pytest.fixture
def image(tmp_path: pathlib.Path) -> str:
    return make_image(tmp_path, 4 * MIB)


def opened(path: str, **kwargs: Any) -> Iterator[FileNode]:
    node = FileNode(path, **kwargs)
    try:
        yield node
    finally:
        run(node.close())


@pytest.fixture
def file_node(image: str) -> Iterator[FileNode]:
    yield from opened(image, discard=True)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


# -- opening ---------------------------------------------------------------


def test_missing_path_raises_file_not_found(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "absent.img")
    with pytest.raises(FileNotFoundError) as info:
        FileNode(path)
    assert info.value.filename == path


def test_directory_is_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(IsADirectoryError):
        FileNode(str(tmp_path))
    with pytest.raises(OSError, match="not a regular file or block device"):
        FileNode(str(tmp_path), read_only=True)


def test_size_and_existing_contents(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(1, 12_345))
    for node in opened(str(path)):
        assert node.size == 12_345
        assert run(read(node, 0, 12_345)) == pattern(1, 12_345)


def test_capabilities(image: str) -> None:
    for node in opened(image):
        caps = node.capabilities
        assert caps.can_write
        assert caps.can_fua
        assert caps.can_extents
        assert caps.can_multi_conn
        assert caps.can_fast_zero
        assert caps.sparse_reads
        assert not caps.can_trim
    for node in opened(image, discard=True):
        assert node.capabilities.can_trim


def test_graph_facing_parts(image: str) -> None:
    for node in opened(image):
        assert (node.driver, node.filename, node.children) == ("file", image, {})
        assert node.resolve() is node
        paths = node.fast_paths()
        assert paths.pread_nowait == node.pread_nowait
        assert paths.pwrite_nowait == node.pwrite_nowait
        assert paths.sendfile_source == node.sendfile_source
        assert (paths.start_read, paths.start_write, paths.read) == (None, None, None)


def test_read_only(image: str) -> None:
    os.chmod(image, 0o444)
    with open(image, "r+b") as f:
        f.write(b"ro")
    for node in opened(image, read_only=True, discard=True):
        caps = node.capabilities
        assert not caps.can_write
        assert not caps.can_trim
        assert not caps.can_fua
        assert not caps.can_fast_zero
        assert run(read(node, 0, 2)) == b"ro"
        with raises_errno(errno.EBADF):
            run(node.pwrite(b"x", 0))
        run(node.flush())


def test_close_is_idempotent(image: str) -> None:
    node = FileNode(image)
    run(node.close())
    run(node.close())


# -- holes and trim --------------------------------------------------------


def status_at(extents: list[Extent], position: int) -> ExtentFlags:
    """The flags of the extent (from offset 0) that holds ``position``."""
    start = 0
    for extent in extents:
        if start <= position < start + extent.length:
            return extent.flags
        start += extent.length
    raise AssertionError(f"no extent covers {position}")


def test_sparse_file_reports_holes(file_node: FileNode) -> None:
    run(file_node.pwrite(pattern(2, 4096), MIB))
    extents = run(file_node.block_status(0, file_node.size))
    assert sum(extent.length for extent in extents) == file_node.size
    assert status_at(extents, 0) == HOLE
    assert status_at(extents, MIB) == DATA
    assert status_at(extents, MIB + 4095) == DATA
    assert status_at(extents, file_node.size - 1) == HOLE
    assert run(file_node.block_status(MIB + 100, 10)) == [Extent(10, DATA)]


def test_block_status_is_capped(file_node: FileNode, monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(5):
        run(file_node.pwrite(b"x", 2 * index * 4096))
    monkeypatch.setattr(file_module, "MAX_EXTENTS", 3)
    extents = run(file_node.block_status(0, file_node.size))
    assert [extent.flags for extent in extents] == [DATA, HOLE, DATA]
    assert sum(extent.length for extent in extents) < file_node.size


def test_block_status_without_seek_data(file_node: FileNode,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_lseek = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how == os.SEEK_DATA:
            raise OSError(errno.EINVAL, "no SEEK_DATA here")
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    assert run(file_node.block_status(10, 100)) == [Extent(100, DATA)]
    monkeypatch.undo()
    # remembered: no more lseek calls, everything is data
    assert run(file_node.block_status(0, file_node.size)) == [Extent(file_node.size, DATA)]


def test_trim_with_discard_punches_a_hole(file_node: FileNode) -> None:
    run(file_node.pwrite(pattern(3, 2 * MIB), 0))
    run(file_node.flush())
    before = allocated(file_node.path)
    run(file_node.trim(0, 2 * MIB))
    assert allocated(file_node.path) <= before - 2 * MIB
    assert run(read(file_node, 0, 2 * MIB)).count(0) == 2 * MIB
    assert run(file_node.block_status(0, file_node.size)) == [Extent(file_node.size, HOLE)]


def test_trim_without_discard_keeps_data(image: str) -> None:
    for node in opened(image):
        data = pattern(4, MIB)
        run(node.pwrite(data, 0))
        run(node.trim(0, MIB, fua=True))
        assert run(read(node, 0, MIB)) == data


def test_write_zeroes_may_trim_punches_only_with_discard(tmp_path: pathlib.Path) -> None:
    for discard in (False, True):
        path = make_image(tmp_path, 2 * MIB)
        for node in opened(path, discard=discard):
            run(node.pwrite(pattern(5, 2 * MIB), 0))
            run(node.flush())
            before = allocated(path)
            run(node.write_zeroes(0, MIB, may_trim=True))
            assert run(read(node, 0, MIB)).count(0) == MIB
            if discard:
                assert allocated(path) <= before - MIB
            else:
                assert allocated(path) >= before


def test_write_zeroes_without_may_trim_keeps_allocation(file_node: FileNode) -> None:
    run(file_node.pwrite(pattern(6, 2 * MIB), 0))
    run(file_node.flush())
    before = allocated(file_node.path)
    run(file_node.write_zeroes(0, 2 * MIB, may_trim=False))
    assert allocated(file_node.path) >= before
    assert run(read(file_node, 0, 2 * MIB)).count(0) == 2 * MIB


# -- fallbacks -------------------------------------------------------------


def fail_fallocate(monkeypatch: pytest.MonkeyPatch, code: int) -> list[int]:
    """Make every fallocate fail with ``code``; returns the modes tried."""
    modes: list[int] = []

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(file_module, "fallocate", fallocate)
    return modes


def test_fast_zero_without_fallocate(file_node: FileNode,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    modes = fail_fallocate(monkeypatch, errno.EOPNOTSUPP)
    data = pattern(7, 3 * MIB)
    run(file_node.pwrite(data, 0))
    with pytest.raises(FastZeroUnsupported) as info:
        run(file_node.write_zeroes(100, 2 * MIB, may_trim=True, fast=True))
    assert info.value.errno == errno.ENOTSUP
    assert run(read(file_node, 0, len(data))) == data
    assert len(modes) == 2  # PUNCH_HOLE, then ZERO_RANGE; both now remembered
    # without fast, zero buffers are written (more than one 1 MiB chunk)
    run(file_node.write_zeroes(100, 2 * MIB + 5))
    assert len(modes) == 2
    got = run(read(file_node, 0, len(data)))
    assert got[:100] == data[:100]
    assert got[100:100 + 2 * MIB + 5].count(0) == 2 * MIB + 5
    assert got[100 + 2 * MIB + 5:] == data[100 + 2 * MIB + 5:]
    # trim is a hint: unsupported is fine
    run(file_node.trim(0, 4096))


def test_fallocate_einval_falls_back_each_time(file_node: FileNode,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    modes = fail_fallocate(monkeypatch, errno.EINVAL)
    run(file_node.pwrite(b"\xff" * 10, 0))
    run(file_node.write_zeroes(1, 5))
    run(file_node.write_zeroes(1, 5))
    assert len(modes) == 2  # EINVAL is not remembered
    assert run(read(file_node, 0, 10)) == b"\xff" + bytes(5) + b"\xff" * 4


def test_fallocate_errors_propagate(file_node: FileNode,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fail_fallocate(monkeypatch, errno.ENOSPC)
    with raises_errno(errno.ENOSPC):
        run(file_node.write_zeroes(0, 10))


def test_nowait_read_falls_back_to_the_pool(file_node: FileNode,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = pattern(8, 100_000)
    run(file_node.pwrite(data, 5))
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
    assert run(read(file_node, 5, len(data))) == data
    assert calls[0][0] == os.RWF_NOWAIT
    assert all(name.startswith("pynbd-io") for flags, name in calls[1:] if flags == 0)
    calls.clear()
    assert run(read(file_node, 5, len(data))) == data
    assert calls[0][0] == os.RWF_NOWAIT
    assert calls[1][0] == 0
    # the fast path says no where a read is only partly cached (the server then preads)
    calls.clear()
    assert not file_node.pread_nowait(memoryview(bytearray(len(data))), 5)
    assert [flags for flags, _ in calls] == [os.RWF_NOWAIT]


def test_nowait_unsupported_is_remembered(file_node: FileNode,
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
        run(file_node.pwrite(b"abc", 7))
        assert run(read(file_node, 7, 3)) == b"abc"
    assert flags_seen.count(os.RWF_NOWAIT) == 2
    assert len(flags_seen) == 8
    # the remembered fast path now declines at once, without a syscall
    assert not file_node.pread_nowait(memoryview(bytearray(3)), 7)
    assert len(flags_seen) == 8


def test_large_requests_skip_the_inline_attempt(file_node: FileNode,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv = os.preadv
    flags_seen: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        flags_seen.append(flags)
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    run(read(file_node, 0, file_module.INLINE_MAX + 1))
    assert flags_seen == [0]
    assert not file_node.pread_nowait(memoryview(bytearray(file_module.INLINE_MAX + 1)), 0)
    assert flags_seen == [0]


def test_read_past_end_of_shrunken_file_reads_zeroes(file_node: FileNode) -> None:
    run(file_node.pwrite(b"\x01" * 8192, 0))
    os.truncate(file_node.path, 4096)  # behind the node's back
    got = run(read(file_node, 0, 8192))
    assert got == b"\x01" * 4096 + bytes(4096)
    assert run(file_node.block_status(4096, 4096)) == [Extent(4096, HOLE)]


def test_sendfile_source_needs_cached_data(file_node: FileNode) -> None:
    """A source only where every page is cached (``cachestat``) and, with
    ``data_only``, no hole; never once the feature is found missing."""
    if file_module._Feature.CACHESTAT in file_node._unsupported:
        pytest.skip("no cachestat(2) on this kernel")
    data = pattern(9, 3 * 4096)
    run(file_node.pwrite(data, 4096))
    run(read(file_node, 4096, len(data)))
    source = file_node.sendfile_source(4096, len(data), True)
    if source is None:  # the kernel may lack cachestat: remembered by now
        assert file_module._Feature.CACHESTAT in file_node._unsupported
        return
    assert source == (file_node._fd, 4096)
    assert os.pread(source[0], len(data), source[1]) == data
    # a hole next to the data: fine for a plain send, not with data_only
    assert file_node.sendfile_source(4096, len(data) + 4096, True) is None
    file_node._unsupported.add(file_module._Feature.CACHESTAT)
    assert file_node.sendfile_source(4096, len(data), False) is None


# -- block devices ---------------------------------------------------------


def test_character_device_is_rejected() -> None:
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(OSError, match="not a regular file or block device"):
        FileNode("/dev/null")


def test_inline_writes_back_off_after_a_slow_one(file_node: FileNode,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Where buffered RWF_NOWAIT writes are missing, whole-page writes go inline
    until one is slow; then inline writes stop and the pool takes over."""
    file_node._unsupported.add(file_module._Feature.NOWAIT_WRITE)
    page = pattern(3, 4096)
    assert file_node.pwrite_nowait(page, 4096)
    assert run(read(file_node, 4096, 4096)) == page
    # partial pages and large writes are never done inline
    assert not file_node.pwrite_nowait(page[:512], 8192)
    assert not file_node.pwrite_nowait(page, 4096 + 512)
    assert not file_node.pwrite_nowait(bytes(file_module.INLINE_WRITE_MAX + 4096), 0)
    # a write slower than the threshold switches inline writes off
    monkeypatch.setattr(file_module, "INLINE_WRITE_SLOW_NS", -1)
    assert file_node.pwrite_nowait(page, 8192)
    assert not file_node.pwrite_nowait(page, 12288)
    assert run(read(file_node, 12288, 4096)) == bytes(4096)  # refused means untouched
    file_node._inline_writes_off_until = 0
    monkeypatch.setattr(file_module, "INLINE_WRITE_SLOW_NS", 10**12)
    assert file_node.pwrite_nowait(page, 12288)
