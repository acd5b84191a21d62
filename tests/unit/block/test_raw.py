"""RawNode: the window rules, resolving to the child, and shifted fast paths.

The node contract runs over a raw node (with and without a window) for every
protocol node, in those nodes' modules (``support.LAYERS``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.block.support import CHUNK, DATA, HOLE, pattern, read, run

from pynbd.block import FileNode, MemoryNode, RawNode
from pynbd.block.node import Capabilities, Extent, ExtentFlags

if TYPE_CHECKING:
    import pathlib

    from pynbd.block.node import Data, ReadDone, WriteDone


def test_size_defaults_to_the_rest_of_the_file() -> None:
    child = MemoryNode(1000)
    assert RawNode(child, offset=300).size == 700
    assert RawNode(child, offset=1000).size == 0
    assert RawNode(child).size == 1000
    assert RawNode(child, offset=10, size=990).size == 990


@pytest.mark.parametrize(("offset", "size"), [(1001, None), (-1, None), (10, 991),
                                              (0, 1001), (5, -1)])
def test_window_must_fit(offset: int, size: int | None) -> None:
    qemu_words = (r"(cannot be greater than|has to be smaller or equal to the  actual) "
                  r"size of the containing file \(1000\)")
    with pytest.raises(ValueError, match=qemu_words):
        RawNode(MemoryNode(1000), offset=offset, size=size)


def test_graph_facing_parts(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    child = FileNode(str(path))
    try:
        for raw in (RawNode(child), RawNode(child, offset=512)):
            assert raw.driver == "raw"
            assert raw.children == {"file": child}
            assert raw.filename == str(path)
    finally:
        run(child.close())
    assert RawNode(MemoryNode(10)).filename == ""


def test_capabilities_are_the_child_ones(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    child = FileNode(str(path), read_only=True)
    window = RawNode(child, offset=512)
    assert window.capabilities is child.capabilities
    assert not window.capabilities.can_write
    run(child.close())
    assert RawNode(MemoryNode(10), offset=1).capabilities == Capabilities()


def test_read_only_over_a_writable_child() -> None:
    child = MemoryNode(1000)
    raw = RawNode(child, read_only=True)
    caps = raw.capabilities
    assert (caps.can_write, caps.can_fua, caps.can_trim, caps.can_fast_zero) == (
        False, False, False, False)
    assert (caps.can_flush, caps.can_extents, caps.can_multi_conn) == (True, True, True)
    assert child.capabilities.can_write, "the child is not changed"


def test_without_a_window_the_node_resolves_to_the_child() -> None:
    child = MemoryNode(4 * CHUNK)
    raw = RawNode(child)
    assert not raw.windowed
    assert raw.resolve() is child
    assert RawNode(raw).resolve() is child, "resolving goes all the way down"
    assert RawNode(child, offset=0, size=child.size).resolve() is child
    paths = raw.fast_paths()
    assert paths == child.fast_paths(), "no layer in between: the child's own callables"
    for window in (RawNode(child, offset=1), RawNode(child, size=child.size - 1)):
        assert window.windowed
        assert window.resolve() is window
        assert RawNode(window).resolve() is window


def test_requests_land_at_the_offset() -> None:
    child = MemoryNode(4 * CHUNK)
    window = RawNode(child, offset=CHUNK + 3, size=2 * CHUNK)
    data = pattern(1, 100)

    async def body() -> None:
        await window.pwrite(data, 10, fua=True)
        assert await read(child, CHUNK + 13, 100) == data
        await child.pwrite(data, CHUNK + 3)
        assert await read(window, 0, 100) == data
        await window.write_zeroes(0, 50)
        assert await read(child, CHUNK + 3, 100) == bytes(50) + data[50:]
        await window.trim(0, 100)
        assert await read(child, CHUNK + 3, 100) == bytes(100)
        await window.cache(0, 10)
        await window.flush()

    run(body())


def test_block_status_is_clipped_to_the_window() -> None:
    child = MemoryNode(6 * CHUNK)
    run(child.pwrite(b"\x01" * (6 * CHUNK), 0))
    run(child.trim(CHUNK, CHUNK))
    window = RawNode(child, offset=CHUNK // 2, size=4 * CHUNK)
    assert run(window.block_status(0, window.size)) == [
        Extent(CHUNK // 2, DATA), Extent(CHUNK, HOLE), Extent(5 * CHUNK // 2, DATA)]
    assert run(window.block_status(window.size - 10, 10)) == [Extent(10, DATA)]
    assert run(window.block_status(CHUNK, 10)) == [Extent(10, HOLE)]


class _LongExtents(MemoryNode):
    """A child whose last extent runs past the request (allowed)."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(self.size - offset, HOLE | ExtentFlags.ZERO)]


def test_block_status_clips_long_child_extents() -> None:
    window = RawNode(_LongExtents(1000), offset=100, size=500)
    assert run(window.block_status(0, 500)) == [Extent(500, HOLE)]
    assert run(window.block_status(490, 5)) == [Extent(5, HOLE)]


def test_close_leaves_the_child_open(tmp_path: pathlib.Path) -> None:
    """A node closes only what it holds: the graph closes the child, once."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x07" * 4096)
    child = FileNode(str(path))
    window = RawNode(child, offset=100)
    run(window.close())
    assert run(read(child, 0, 10)) == b"\x07" * 10
    run(child.close())


# -- fast paths through a window ---------------------------------------------------------


class _Direct(MemoryNode):
    """A memory node that also offers direct I/O and own-buffer reads, recording them."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.calls: list[tuple[str, int, int]] = []

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        self.calls.append(("start_read", offset, length))
        return offset != 0  # declines at its own offset 0

    def start_write(self, data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
        self.calls.append(("start_write", offset, len(data)))
        return True

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self.calls.append(("read", offset, length))
        return await read_bytes(self, offset, length)


async def read_bytes(node: MemoryNode, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await MemoryNode.pread(node, memoryview(buf), offset)
    return bytes(buf)


def _ignore(*_: Any) -> None:
    return None


def test_a_window_shifts_every_fast_path() -> None:
    child = _Direct(4 * CHUNK)
    run(child.pwrite(pattern(2, 4 * CHUNK), 0))
    shift = CHUNK + 7
    window = RawNode(child, offset=shift, size=2 * CHUNK)
    paths = window.resolve().fast_paths()
    offered = {f.name for f in dataclasses.fields(paths) if getattr(paths, f.name) is not None}
    assert offered == {f.name for f in dataclasses.fields(paths)}, "every path is kept"
    buf = bytearray(100)
    assert paths.pread_nowait is not None
    assert paths.pread_nowait(memoryview(buf), 10)
    assert bytes(buf) == pattern(2, 4 * CHUNK)[shift + 10:shift + 110]
    assert paths.pwrite_nowait is not None
    assert paths.pwrite_nowait(b"\xee" * 5, 3)
    assert run(read(child, shift + 3, 5)) == b"\xee" * 5
    assert paths.sendfile_source is not None
    source = paths.sendfile_source(20, 30, False)
    assert source is not None
    assert source[1] == shift + 20
    assert os.pread(source[0], 30, source[1]) == run(read(window, 20, 30))
    assert paths.start_read is not None
    assert paths.start_read(5, 10, _ignore)
    assert paths.start_write is not None
    assert paths.start_write(b"x" * 4, 6, False, _ignore)
    assert paths.read is not None
    assert run(paths.read(8, 12)) == run(read(window, 8, 12))
    assert child.calls == [("start_read", shift + 5, 10), ("start_write", shift + 6, 4),
                           ("read", shift + 8, 12)]


def test_a_declining_child_fast_path_declines_through_the_window() -> None:
    child = _Direct(4 * CHUNK)
    window = RawNode(child, offset=CHUNK, size=CHUNK)
    paths = window.fast_paths()
    assert paths.start_read is not None
    assert paths.start_read(0, 10, _ignore), "window offset 0 is child offset CHUNK"
    direct = child.fast_paths().start_read
    assert direct is not None
    assert not direct(0, 10, _ignore)
