"""DirectFileNode (``O_DIRECT``): the node contract under every layer, with the
hypothesis state machine's unaligned requests, plus what direct I/O changes:
the alignment, read-modify-write under concurrency, the tail of an unaligned
file, and file systems that refuse it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import pathlib
import struct
import tempfile
from typing import TYPE_CHECKING, ClassVar

import pytest
from tests.unit.block.contract import NodeContract
from tests.unit.block.support import MIB, pattern, raises_errno, read, run

from pynbd.block import FileNode
from pynbd.block import file as file_module
from pynbd.block.directfile import BOUNCE_SIZE, FALLBACK_ALIGN, DirectFileNode, dio_alignment
from pynbd.block.node import FastPaths

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pynbd.block.node import Node


def supports_direct(directory: pathlib.Path | str) -> bool:
    """Whether files in ``directory`` can be opened with ``O_DIRECT``."""
    try:
        fd, path = tempfile.mkstemp(dir=directory, suffix=".probe")
    except OSError:
        return False
    os.close(fd)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
    except OSError:
        return False
    finally:
        os.unlink(path)
    return True


def direct_dir(tmp_path: pathlib.Path) -> tuple[pathlib.Path, bool]:
    """Where O_DIRECT files can be made, and whether that is ``tmp_path`` (kept
    until pytest cleans it) rather than a shared directory (unlink after open)."""
    if supports_direct(tmp_path):
        return tmp_path, True
    for candidate in ("/var/tmp", "/work"):
        if os.path.isdir(candidate) and supports_direct(candidate):
            return pathlib.Path(candidate), False
    pytest.skip("no directory here supports O_DIRECT (tmp_path, /var/tmp, /work)")


def make_image(directory: pathlib.Path | str, size: int) -> str:
    fd, path = tempfile.mkstemp(dir=directory, suffix=".img")
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


class DirectContract(NodeContract):
    discard: ClassVar[bool] = False
    #: force this alignment (0: what the kernel reports)
    force_align: ClassVar[int] = 0
    #: pretend every optional kernel feature is missing (zeroing writes buffers)
    no_features: ClassVar[bool] = False
    has_raw_access = True

    def directory(self, tmp_path: pathlib.Path) -> tuple[pathlib.Path, bool]:
        return direct_dir(tmp_path)

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        directory, keep = self.directory(tmp_path)
        path = make_image(directory, size)
        node = DirectFileNode(path, discard=self.discard)
        if not keep:
            os.unlink(path)  # the fds keep the file; nothing is left behind
        if self.force_align:
            node.align = node.memory_align = self.force_align
            node._set_tail()
        if self.no_features:
            node._unsupported.update(file_module._Feature)
        return node

    def read_raw(self, protocol: Node, offset: int, length: int) -> bytes:
        assert isinstance(protocol, DirectFileNode)
        with open(protocol.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write_raw(self, protocol: Node, offset: int, data: bytes) -> None:
        assert isinstance(protocol, DirectFileNode)
        with open(protocol.path, "r+b") as f:
            f.seek(offset)
            f.write(data)


class TestDirectFileNode(DirectContract):
    pass


class TestDirectFileNodeDiscardAlign4096(DirectContract):
    """Page-sized blocks (as on file systems that report no alignment)."""

    discard = True
    force_align = 4096


class TestDirectFileNodeWithoutFeatures(DirectContract):
    """No fallocate and no SEEK_DATA: zeroing writes zero blocks, read-modify-write
    at the edges."""

    discard = True
    no_features = True


class TestDirectFileNodeOnTmpfs(DirectContract):
    """tmpfs (O_DIRECT since Linux 6.6) reports no alignment: the fallback."""

    has_raw_access = False

    def directory(self, tmp_path: pathlib.Path) -> tuple[pathlib.Path, bool]:
        if not os.path.isdir("/dev/shm") or not supports_direct("/dev/shm"):
            pytest.skip("no /dev/shm that supports O_DIRECT (tmpfs before Linux 6.6)")
        return pathlib.Path("/dev/shm"), False


# -- helpers ---------------------------------------------------------------


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Iterator[DirectFileNode]:
    directory, _ = direct_dir(tmp_path)
    node = DirectFileNode(make_image(directory, 4 * MIB + 1000), discard=True)
    try:
        yield node
    finally:
        run(node.close())
        with contextlib.suppress(OSError):
            os.unlink(node.path)


_SYS_CACHESTAT = 451 if os.uname().machine in ("x86_64", "aarch64", "riscv64") else -1


def cached_pages(path: str) -> int:
    """How many pages of the file are in the page cache (``cachestat(2)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    span = ctypes.create_string_buffer(struct.pack("=QQ", 0, 0))  # 0 length: to the end
    stat = ctypes.create_string_buffer(5 * 8)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYS_CACHESTAT < 0 or libc.syscall(ctypes.c_long(_SYS_CACHESTAT),
                                              ctypes.c_long(fd), span, stat,
                                              ctypes.c_long(0)):
            pytest.skip("no cachestat(2) here (Linux 6.5)")
    finally:
        os.close(fd)
    pages: int = struct.unpack_from("=Q", stat)[0]
    return pages


# -- opening ---------------------------------------------------------------


def test_fd_is_direct_and_offers_no_fast_path(node: DirectFileNode) -> None:
    assert fcntl.fcntl(node._fd, fcntl.F_GETFL) & os.O_DIRECT
    assert node.fast_paths() == FastPaths()
    assert node.resolve() is node
    assert (node.driver, node.filename) == ("file", node.path)
    assert node.capabilities.can_multi_conn


def test_alignment_is_what_the_kernel_reports(node: DirectFileNode) -> None:
    reported = dio_alignment(node._fd)
    if reported is None:
        assert (node.memory_align, node.align) == (FALLBACK_ALIGN, FALLBACK_ALIGN)
    else:
        assert (node.memory_align, node.align) == reported
    assert BOUNCE_SIZE % node.align == 0


def test_file_system_without_o_direct_is_refused() -> None:
    """procfs has regular files but no direct I/O: qemu's words, nothing left open."""
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="filesystem does not support O_DIRECT") as info:
        DirectFileNode("/proc/version", read_only=True)
    assert info.value.errno == errno.EINVAL
    assert info.value.strerror == "filesystem does not support O_DIRECT"
    assert info.value.filename == "/proc/version"
    assert set(os.listdir("/proc/self/fd")) <= before


def test_read_only(node: DirectFileNode) -> None:
    run(node.pwrite(pattern(1, 700), 3))
    ro = DirectFileNode(node.path, read_only=True)
    try:
        assert not ro.capabilities.can_write
        assert run(read(ro, 3, 700)) == pattern(1, 700)
        with raises_errno(errno.EBADF):
            run(ro.pwrite(b"x" * 4096, 0))
    finally:
        run(ro.close())


# -- direct I/O ------------------------------------------------------------


def test_data_bypasses_the_page_cache(tmp_path: pathlib.Path) -> None:
    """The same writes and reads leave pages cached through FileNode, none here."""
    directory, _ = direct_dir(tmp_path)
    counts = {}
    for kind in (FileNode, DirectFileNode):
        path = make_image(directory, 2 * MIB)
        each = kind(path)
        try:
            run(each.pwrite(pattern(2, MIB), 0))  # aligned
            run(each.pwrite(pattern(3, 5000), MIB + 7))  # unaligned: read-modify-write
            assert run(read(each, 0, MIB + 6000)) == (
                pattern(2, MIB) + bytes(7) + pattern(3, 5000) + bytes(6000 - 5007))
            counts[kind] = cached_pages(path)
        finally:
            run(each.close())
            os.unlink(path)
    assert counts[FileNode] >= MIB // 4096
    assert counts[DirectFileNode] == 0


@pytest.mark.parametrize(("offset", "length"), [
    (7, 3 * BOUNCE_SIZE + 5), (0, 2 * BOUNCE_SIZE), (BOUNCE_SIZE - 1, 2), (4096, 512)])
def test_large_and_small_requests_through_the_bounce_buffer(
        node: DirectFileNode, offset: int, length: int) -> None:
    data = pattern(4, length)
    before = run(read(node, 0, node.size))
    run(node.pwrite(memoryview(bytearray(data)), offset))
    got = run(read(node, 0, node.size))
    want = before[:offset] + data + before[offset + length:]
    assert got == want
    # into a buffer of any alignment
    for shift in (0, 1, 13):
        buf = bytearray(length + shift)
        run(node.pread(memoryview(buf)[shift:], offset))
        assert buf[shift:] == data


def test_tail_of_an_unaligned_file(node: DirectFileNode) -> None:
    """Writes into the last partial block neither grow the file nor lose bytes."""
    size = node.size
    assert size % node.align
    run(node.pwrite(pattern(5, 3000), size - 3000))
    run(node.write_zeroes(size - 10, 10))
    run(node.pwrite(b"\x01\x02", size - 2000))
    assert os.stat(node.path).st_size == size
    want = bytearray(pattern(5, 3000))
    want[-10:] = bytes(10)
    want[1000:1002] = b"\x01\x02"
    assert run(read(node, size - 3000, 3000)) == want
    with open(node.path, "rb") as f:
        f.seek(size - 3000)
        assert f.read() == want


def test_grow_moves_the_tail(node: DirectFileNode) -> None:
    size = node.size
    run(node.pwrite(pattern(6, 100), size - 100))
    run(node.grow(size + 3 * MIB + 17))
    assert node.size == size + 3 * MIB + 17
    assert node._direct_end == node.size - node.size % node.align
    run(node.pwrite(pattern(7, 5000), size - 50))
    assert run(read(node, size - 100, 5050)) == pattern(6, 50) + pattern(7, 5000)
    assert os.stat(node.path).st_size == node.size


# -- serialising read-modify-write -----------------------------------------


def test_unaligned_writes_into_one_block_keep_each_other(node: DirectFileNode) -> None:
    """Concurrent writes sharing blocks (each a read-modify-write) lose nothing,
    and an aligned write racing them is neither lost nor torn apart."""
    align = node.align
    base = 8 * align
    pieces = [(base + i * 7 + (i % 3), 5) for i in range(2 * align // 8)]
    whole = pattern(8, 2 * align)

    async def body() -> None:
        writes = [node.pwrite(bytes([1 + i % 250]) * length, offset)
                  for i, (offset, length) in enumerate(pieces)]
        writes.insert(len(writes) // 2, node.pwrite(whole, base))
        await asyncio.gather(*writes)
        got = await read(node, base, 2 * align)
        covered = bytearray(2 * align)
        for i, (offset, length) in enumerate(pieces):
            for pos in range(offset - base, offset - base + length):
                covered[pos] = 1
                assert got[pos] in (1 + i % 250, whole[pos]), f"byte {pos} lost"
        for pos in range(2 * align):
            if not covered[pos]:
                assert got[pos] == whole[pos], f"byte {pos} of the aligned write lost"

    run(body())
    # then the unaligned writes alone, all landing
    run(node.write_zeroes(base, 2 * align))

    async def again() -> None:
        await asyncio.gather(*(node.pwrite(bytes([1 + i % 250]), base + i)
                               for i in range(2 * align)))

    run(again())
    assert run(read(node, base, 2 * align)) == bytes(1 + i % 250 for i in range(2 * align))


def test_zeroing_and_writes_into_one_block(node: DirectFileNode) -> None:
    """write_zeroes serialises with read-modify-writes too (both fall back to writes)."""
    node._unsupported.update(file_module._Feature)
    align = node.align
    run(node.pwrite(b"\xff" * (4 * align), 0))

    async def body() -> None:
        await asyncio.gather(
            node.write_zeroes(align // 2, align),
            node.pwrite(b"\x11" * 8, 2 * align - 4),
            node.pwrite(b"\x22" * 8, align // 2 - 4),
            node.write_zeroes(3 * align - 1, 2))

    run(body())
    got = run(read(node, 0, 4 * align))
    want = bytearray(b"\xff" * (4 * align))
    want[align // 2 - 4:align // 2] = b"\x22" * 4
    want[align // 2:align // 2 + align] = bytes(align)
    for pos in range(align // 2, align // 2 + 4):  # the zeroes and this write overlap
        assert got[pos] in (0, 0x22)
        want[pos] = got[pos]
    want[2 * align - 4:2 * align + 4] = b"\x11" * 8
    want[3 * align - 1:3 * align + 1] = bytes(2)
    assert got == want


def test_a_cancelled_waiter_does_not_block_others(node: DirectFileNode) -> None:
    async def body() -> None:
        first = asyncio.ensure_future(node.pwrite(b"a" * 10, 5))
        waiter = asyncio.ensure_future(node.pwrite(b"b" * 10, 7))
        third = asyncio.ensure_future(node.pwrite(b"c" * 3, 9))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.wait_for(asyncio.gather(first, third, return_exceptions=True), 10)
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert not node._spans

    run(body())
    got = run(read(node, 5, 12))
    assert got[4:7] == b"ccc"
    assert got[:2] == b"aa"

