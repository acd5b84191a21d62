"""FilterNode: everything forwarded, and the child's fast paths kept only where they
cannot go around a request the filter changes."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tests.unit.block.support import DATA, HOLE, pattern, read, run

from pynbd.block import FilterNode, MemoryNode
from pynbd.block.node import Extent, FastPaths

if TYPE_CHECKING:
    from pynbd.block.node import Data, ReadDone, WriteDone

SIZE = 1 << 20


class Plain(FilterNode):
    driver = "x-plain"


class ChangesReads(FilterNode):
    """Reads come back inverted."""

    driver = "x-reads"

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.child.pread(buf, offset)
        buf[:] = bytes(255 - b for b in buf)


class ChangesWrites(FilterNode):
    """Writes land inverted."""

    driver = "x-writes"

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self.child.pwrite(bytes(255 - b for b in bytes(data)), offset, fua=fua)


class EveryPath(MemoryNode):
    """A memory node that also offers direct I/O and own-buffer reads."""

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        return False

    def start_write(self, data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
        return False

    async def read(self, offset: int, length: int) -> bytes:
        return await read(self, offset, length)


def offered(paths: FastPaths) -> set[str]:
    return {f.name for f in dataclasses.fields(paths) if getattr(paths, f.name) is not None}


ALL_PATHS = {f.name for f in dataclasses.fields(FastPaths)}
READ_PATHS = {"pread_nowait", "start_read", "sendfile_source", "read"}
WRITE_PATHS = {"pwrite_nowait", "start_write"}


def test_every_request_is_forwarded() -> None:
    child = MemoryNode(SIZE)
    node = Plain(child)
    assert (node.size, node.capabilities) == (child.size, child.capabilities)
    assert node.children == {"file": child}
    assert node.filename == child.filename
    assert Plain(child, role="image").children == {"image": child}

    async def body() -> None:
        await node.pwrite(pattern(1, 100), 65536 - 50, fua=True)
        assert await read(child, 65536 - 50, 100) == pattern(1, 100)
        assert await read(node, 65536 - 50, 100) == pattern(1, 100)
        assert await node.block_status(0, 3 * 65536) == await child.block_status(0, 3 * 65536)
        await node.write_zeroes(65536 - 50, 10)
        assert await read(child, 65536 - 50, 10) == bytes(10)
        await node.trim(0, 2 * 65536)
        assert await child.block_status(0, 3 * 65536) == [Extent(3 * 65536, HOLE)]
        await node.write_zeroes(0, 65536, may_trim=False)
        assert await child.block_status(0, 65536) == [Extent(65536, DATA)]
        await node.cache(0, 10)
        await node.flush()

    run(body())


def test_a_plain_filter_keeps_the_childs_fast_paths() -> None:
    child = EveryPath(SIZE)
    paths = Plain(child).fast_paths()
    assert offered(paths) == ALL_PATHS
    assert paths == child.fast_paths(), "the child's own callables: no cost per request"
    assert offered(Plain(MemoryNode(10)).fast_paths()) == offered(MemoryNode(10).fast_paths())


def test_a_changed_read_drops_every_read_fast_path() -> None:
    child = EveryPath(SIZE)
    run(child.pwrite(b"\x01" * 10, 0))
    node = ChangesReads(child)
    assert offered(node.fast_paths()) == ALL_PATHS - READ_PATHS
    assert run(read(node, 0, 10)) == b"\xfe" * 10


def test_a_changed_write_drops_every_write_fast_path() -> None:
    child = EveryPath(SIZE)
    node = ChangesWrites(child)
    assert offered(node.fast_paths()) == ALL_PATHS - WRITE_PATHS
    run(node.pwrite(b"\x01" * 10, 0))
    assert run(read(child, 0, 10)) == b"\xfe" * 10


def test_a_filter_takes_the_fast_paths_of_what_its_child_resolves_to() -> None:
    child = EveryPath(SIZE)
    over_plain = Plain(Plain(child))
    assert over_plain.fast_paths() == child.fast_paths()
    over_reads = Plain(ChangesReads(child))
    assert offered(over_reads.fast_paths()) == ALL_PATHS - READ_PATHS


def test_close_leaves_the_child_open() -> None:
    child = MemoryNode(SIZE)
    run(Plain(child).close())
    run(child.pwrite(b"x", 0))
    assert run(read(child, 0, 1)) == b"x"
    run(child.close())
