"""DetectZeroesFilter: zero payloads become write_zeroes (holes with unmap), the
node contract with the filter on top of every layer (its state machine also
writes zeroes), and the fast paths it keeps."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test
from tests.unit.block.contract import NodeContract
from tests.unit.block.machine import NodeMachine, ranges
from tests.unit.block.support import MIB, MODEL_SIZE, Stack, pattern, read, run

from pynbd.block import FileNode, FilterNode, MemoryNode
from pynbd.block.detectzeroes import DetectZeroesFilter, is_zero
from pynbd.block.graph import shown

if TYPE_CHECKING:
    import pathlib

    from tests.unit.block.support import Layer

    from pynbd.block.node import Data, Node


def make_image(directory: pathlib.Path, size: int) -> str:
    fd, path = tempfile.mkstemp(dir=directory, suffix=".img")
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


# -- the check -------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"", bytes(1), bytes(4096), bytearray(MIB), memoryview(bytes(3 * MIB + 5)),
    memoryview(bytearray(MIB + 10))[3:], bytes(MIB)])
def test_zeroes_are_zero(data: Data) -> None:
    assert is_zero(data)


@pytest.mark.parametrize(("length", "where"), [
    (1, 0), (4096, 0), (4096, 4095), (4096, 2000), (MIB, MIB - 1), (MIB + 1, MIB),
    (3 * MIB + 5, 3 * MIB + 4), (3 * MIB + 5, 2 * MIB), (2 * MIB, MIB - 1)])
def test_one_non_zero_byte_anywhere_is_seen(length: int, where: int) -> None:
    buf = bytearray(length)
    buf[where] = 0x80
    assert not is_zero(buf)
    assert not is_zero(bytes(buf))
    assert not is_zero(memoryview(buf))
    assert not is_zero(memoryview(bytearray(7) + buf)[7:])


# -- the filter ------------------------------------------------------------


class Recorder(FilterNode):
    """Records what reaches the node under the filter."""

    driver = "x-recorder"

    def __init__(self, child: Node) -> None:
        super().__init__(child)
        self.calls: list[tuple[str, int, int, dict[str, Any]]] = []

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        self.calls.append(("pwrite", offset, len(data), {"fua": fua}))
        await self.child.pwrite(data, offset, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        self.calls.append(("write_zeroes", offset, length,
                           {"may_trim": may_trim, "fast": fast, "fua": fua}))
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)


@pytest.mark.parametrize("unmap", [False, True])
def test_zero_writes_become_write_zeroes(unmap: bool) -> None:
    below = Recorder(MemoryNode(4 * MIB))
    node = DetectZeroesFilter(below, unmap=unmap)
    run(node.pwrite(pattern(1, 3 * MIB), 0))
    run(node.pwrite(bytes(5000), 17, fua=True))
    run(node.pwrite(memoryview(bytearray(2 * MIB + 3)), MIB + 1))
    run(node.pwrite(b"\0" * 99 + b"\1", 100))
    run(node.pwrite(b"", 7))
    assert below.calls == [
        ("pwrite", 0, 3 * MIB, {"fua": False}),
        ("write_zeroes", 17, 5000, {"may_trim": unmap, "fast": False, "fua": True}),
        ("write_zeroes", MIB + 1, 2 * MIB + 3, {"may_trim": unmap, "fast": False,
                                                "fua": False}),
        ("pwrite", 100, 100, {"fua": False}),
        ("pwrite", 7, 0, {"fua": False}),
    ]
    want = bytearray(pattern(1, 3 * MIB) + bytes(MIB))
    want[17:5017] = bytes(5000)
    want[MIB + 1:3 * MIB + 4] = bytes(2 * MIB + 3)
    want[100:200] = b"\0" * 99 + b"\1"
    assert run(read(node, 0, 4 * MIB)) == want


@pytest.mark.parametrize("unmap", [False, True])
def test_unmap_punches_holes_in_a_file(tmp_path: pathlib.Path, unmap: bool) -> None:
    """With unmap (and a file that may discard) a zero write frees the blocks;
    without it they stay allocated."""
    path = make_image(tmp_path, 4 * MIB)
    file = FileNode(path, discard=True)
    node = DetectZeroesFilter(file, unmap=unmap)
    try:
        run(node.pwrite(pattern(2, 4 * MIB), 0))
        run(node.flush())
        before = os.stat(path).st_blocks * 512
        run(node.pwrite(bytes(2 * MIB), MIB))
        run(node.flush())
        after = os.stat(path).st_blocks * 512
        assert run(read(node, MIB, 2 * MIB)).count(0) == 2 * MIB
        assert run(read(node, 0, MIB)) == pattern(2, 4 * MIB)[:MIB]
        if unmap:
            assert after <= before - 2 * MIB
        else:
            assert after >= before
    finally:
        run(file.close())


def test_the_filter_is_implicit_and_keeps_the_fast_paths(tmp_path: pathlib.Path) -> None:
    file = FileNode(make_image(tmp_path, MIB))
    node = DetectZeroesFilter(file)
    try:
        assert shown(node) is file
        assert node.filename == file.filename
        assert node.resolve() is node
        mine, below = node.fast_paths(), file.fast_paths()
        assert mine.pread_nowait == below.pread_nowait
        assert mine.sendfile_source == below.sendfile_source
        assert mine.pwrite_nowait is not None
        assert below.pwrite_nowait is not None
        assert mine.pwrite_nowait != below.pwrite_nowait
        run(node.pwrite(pattern(3, 8192), 0))
        # a zero payload declines the inline path and leaves the data alone ...
        assert not mine.pwrite_nowait(bytes(4096), 0)
        assert run(read(file, 0, 8192)) == pattern(3, 8192)
        # ... any other takes it as the file would (a whole page: inline on ext4 too)
        taken = mine.pwrite_nowait(pattern(4, 4096), 4096)
        assert taken == below.pwrite_nowait(pattern(4, 4096), 4096)
        if taken:
            assert run(read(file, 4096, 4096)) == pattern(4, 4096)
    finally:
        run(file.close())


def test_direct_writes_are_adapted() -> None:
    """start_write (rbd) is kept for data and declined for zeroes."""
    calls: list[int] = []

    class Direct(MemoryNode):
        def start_write(self, data: Data, offset: int, fua: bool, done: Any) -> bool:
            calls.append(offset)
            return False

        def start_read(self, offset: int, length: int, done: Any) -> bool:
            return False

    node = DetectZeroesFilter(Direct(MIB))
    start = node.fast_paths().start_write
    assert start is not None
    assert node.fast_paths().start_read is not None
    assert not start(bytes(10), 5, False, lambda error: None)
    assert calls == []
    assert not start(b"\1", 6, False, lambda error: None)
    assert calls == [6]


# -- the contract, with the filter on top of every layer ----------------------


class _ZeroWritingMachine(NodeMachine):
    """The node machine, also writing zeroes through pwrite and the inline path."""

    @precondition(lambda self: self.node.capabilities.can_write)
    @rule(where=ranges(), fua=st.booleans())
    def pwrite_zeroes(self, where: tuple[int, int], fua: bool) -> None:
        offset, length = where
        self.run(self.node.pwrite(bytes(length), offset, fua=fua))
        self._set(offset, bytes(length))

    @precondition(lambda self: self.paths.pwrite_nowait is not None)
    @rule(where=ranges())
    def pwrite_nowait_zeroes(self, where: tuple[int, int]) -> None:
        offset, length = where
        assert self.paths.pwrite_nowait is not None
        if not self.paths.pwrite_nowait(bytes(length), offset):
            self.run(self.io.pwrite(bytes(length), offset))
        self._set(offset, bytes(length))


class DetectZeroesContract(NodeContract):
    unmap: ClassVar[bool]

    def make_stack(self, tmp_path: pathlib.Path, size: int, layer: Layer) -> Stack:
        stack = super().make_stack(tmp_path, size, layer)
        return Stack(DetectZeroesFilter(stack.top, unmap=self.unmap), stack.protocol,
                     stack.shift, stack.guards)

    def test_state_machine(self, tmp_path: pathlib.Path, layer: Layer) -> None:
        contract = self

        class Machine(_ZeroWritingMachine):
            def make_stack(self) -> Stack:
                return contract.make_stack(tmp_path, MODEL_SIZE, layer)

        run_state_machine_as_test(Machine, settings=settings(
            max_examples=layer.examples, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow]))


class TestOverFileUnmap(DetectZeroesContract):
    unmap = True

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        return FileNode(make_image(tmp_path, size), discard=True)


class TestOverMemory(DetectZeroesContract):
    unmap = False

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        return MemoryNode(size)
