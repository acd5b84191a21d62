"""The ``grow`` methods added to the protocol nodes for format nodes that allocate
at the end of their storage (qcow2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from tests.unit.block.support import DATA, HOLE, pattern, read, run

from pynbd.block.file import FileNode
from pynbd.block.memory import CHUNK_SIZE, MemoryNode
from pynbd.block.node import Extent, Growable

if TYPE_CHECKING:
    import pathlib


def test_memory_node_grows_and_remaps() -> None:
    node = MemoryNode(CHUNK_SIZE)
    assert isinstance(node, Growable)
    run(node.pwrite(pattern(1, 100), CHUNK_SIZE - 100))
    run(node.grow(3 * CHUNK_SIZE + 7))
    assert node.size == 3 * CHUNK_SIZE + 7
    run(node.grow(5))  # never shrinks
    assert node.size == 3 * CHUNK_SIZE + 7
    assert run(read(node, CHUNK_SIZE - 100, 200)) == pattern(1, 100) + bytes(100)
    for _ in range(2):  # the second write goes through the new mapping
        run(node.pwrite(pattern(2, 1000), 2 * CHUNK_SIZE))
    assert node.pread_nowait(memoryview(bytearray(10)), node.size - 10)
    assert run(read(node, 2 * CHUNK_SIZE, 1000)) == pattern(2, 1000)
    assert run(node.block_status(0, node.size)) == [
        Extent(CHUNK_SIZE, DATA), Extent(CHUNK_SIZE, HOLE), Extent(CHUNK_SIZE, DATA),
        Extent(7, HOLE)]
    run(node.close())


def test_memory_node_refuses_absurd_sizes() -> None:
    node = MemoryNode(10)
    with pytest.raises(OSError, match="too large"):
        run(node.grow(1 << 63))
    run(node.close())


def test_file_node_grows(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(b"x" * 1000)
    node = FileNode(str(path))
    assert isinstance(node, Growable)
    run(node.grow(5000))
    run(node.grow(10))
    assert node.size == 5000 == path.stat().st_size
    run(node.pwrite(b"end", 4997))
    assert run(read(node, 995, 10)) == b"x" * 5 + bytes(5)
    assert run(read(node, 4997, 3)) == b"end"
    run(node.close())
