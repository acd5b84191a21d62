"""WritethroughFilter and NoFlushFilter (``--cache writethrough|directsync|unsafe``):
what reaches the node below, the fdatasync calls a file really makes, the fast
paths kept, and the node contract with each filter on top of every layer."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.block.contract import NodeContract
from tests.unit.block.support import MIB, Stack, pattern, read, run

from pynbd.block import BlockGraph, FileNode, FilterNode, MemoryNode
from pynbd.block.blockdev import BlockdevError, add_all, build
from pynbd.block.cachemode import NoFlushFilter, WritethroughFilter
from pynbd.block.detectzeroes import DetectZeroesFilter
from pynbd.block.directfile import DirectFileNode
from pynbd.block.graph import shown
from pynbd.block.rbdspec import parse_rbd_filename

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

    from tests.unit.block.support import Layer

    from pynbd.block.node import Data, FastPaths, Node


def make_image(directory: pathlib.Path, size: int) -> str:
    fd, path = tempfile.mkstemp(dir=directory, suffix=".img")
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def offered(paths: FastPaths) -> set[str]:
    return {f.name for f in dataclasses.fields(paths) if getattr(paths, f.name) is not None}


class Direct(MemoryNode):
    """A memory node offering direct writes, recording the FUA flag they get."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.fua: list[bool] = []

    def start_read(self, offset: int, length: int, done: Any) -> bool:
        return False

    def start_write(self, data: Data, offset: int, fua: bool, done: Any) -> bool:
        self.fua.append(fua)
        return False


class Recorder(FilterNode):
    """Records the FUA flag of every write-type request and every flush."""

    driver = "x-recorder"

    def __init__(self, child: Node) -> None:
        super().__init__(child)
        self.calls: list[tuple[str, bool]] = []

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        self.calls.append(("pwrite", fua))
        await self.child.pwrite(data, offset, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.calls.append(("trim", fua))
        await self.child.trim(offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        self.calls.append(("write_zeroes", fua))
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def flush(self) -> None:
        self.calls.append(("flush", False))
        await self.child.flush()


async def every_request(node: Node) -> None:
    await node.pwrite(pattern(1, 1000), 10)
    await node.pwrite(pattern(2, 1000), 2000, fua=True)
    await node.write_zeroes(100, 50)
    await node.write_zeroes(200, 50, may_trim=True, fua=True)
    await node.trim(4096, 4096)
    await node.flush()


class Syncs:
    """Counts a FileNode's fdatasync calls."""

    def __init__(self, node: FileNode) -> None:
        self.count = 0
        real = node._fdatasync

        def counted() -> None:
            self.count += 1
            real()

        node._fdatasync = counted  # type: ignore[method-assign]


@pytest.fixture
def file(tmp_path: pathlib.Path) -> Iterator[FileNode]:
    node = FileNode(make_image(tmp_path, 4 * MIB), discard=True)
    try:
        yield node
    finally:
        run(node.close())


# -- writethrough ------------------------------------------------------------


def test_writethrough_sends_every_write_with_fua() -> None:
    below = Recorder(MemoryNode(MIB))
    run(every_request(WritethroughFilter(below)))
    assert below.calls == [("pwrite", True), ("pwrite", True), ("write_zeroes", True),
                           ("write_zeroes", True), ("trim", True), ("flush", False)]


def test_writethrough_makes_each_write_durable(file: FileNode) -> None:
    syncs = Syncs(file)
    node = WritethroughFilter(file)
    for index in range(5):
        run(node.pwrite(pattern(index, 4096), index * 4096))
    assert syncs.count == 5
    assert run(read(file, 0, 5 * 4096)) == b"".join(pattern(i, 4096) for i in range(5))


def test_writethrough_fast_paths(file: FileNode) -> None:
    node = WritethroughFilter(file)
    assert shown(node) is file
    mine, below = node.fast_paths(), file.fast_paths()
    assert (mine.pread_nowait, mine.sendfile_source) == (below.pread_nowait,
                                                         below.sendfile_source)
    assert mine.pwrite_nowait is None, "the inline path cannot make a write durable"


def test_writethrough_keeps_direct_writes_with_fua() -> None:
    direct = Direct(MIB)
    start = WritethroughFilter(direct).fast_paths().start_write
    assert start is not None
    start(b"x", 0, False, lambda error: None)
    assert direct.fua == [True]


# -- no flush ----------------------------------------------------------------


def test_no_flush_drops_flushes_and_fua() -> None:
    below = Recorder(MemoryNode(MIB))
    run(every_request(NoFlushFilter(below)))
    assert below.calls == [("pwrite", False), ("pwrite", False), ("write_zeroes", False),
                           ("write_zeroes", False), ("trim", False)]


def test_no_flush_never_syncs_a_file(file: FileNode) -> None:
    syncs = Syncs(file)
    node = NoFlushFilter(file)
    run(every_request(node))
    assert syncs.count == 0
    run(file.flush())  # the file itself still can
    assert syncs.count == 1
    assert run(read(node, 10, 90)) == pattern(1, 1000)[:90]


def test_no_flush_keeps_every_fast_path(file: FileNode) -> None:
    node = NoFlushFilter(file)
    assert shown(node) is file
    assert node.fast_paths() == file.fast_paths()
    direct = Direct(MIB)
    start = NoFlushFilter(direct).fast_paths().start_write
    assert start is not None
    start(b"x", 0, True, lambda error: None)
    assert direct.fua == [False]


# -- blockdev options: cache.direct, cache.no-flush, aio ----------------------------


def built(options: dict[str, Any]) -> tuple[BlockGraph, Node]:
    graph = BlockGraph()
    opened: list[Node] = []
    return graph, add_all(graph, run(build(graph, options, opened)))


def test_cache_direct_opens_the_file_o_direct(tmp_path: pathlib.Path) -> None:
    path = make_image(tmp_path, MIB)
    graph, node = built({"driver": "raw", "node-name": "disk", "file": {
        "driver": "file", "filename": path, "cache": {"direct": True, "no-flush": False}}})
    try:
        file = node.children["file"]
        assert type(file) is DirectFileNode
        assert graph.describe("disk", node)["drv"] == "raw"
        # cache.direct was set on the file node: it shows there, not on raw (as qemu)
        assert graph.describe("disk", node)["cache"]["direct"] is False
        assert graph.describe("file", file)["cache"] == {
            "writeback": True, "direct": True, "no-flush": False}
        run(node.pwrite(pattern(1, 5000), 3))
        assert run(read(node, 3, 5000)) == pattern(1, 5000)
    finally:
        run(graph.close())
    graph, node = built({"driver": "file", "filename": path, "cache": {"direct": False}})
    try:
        assert type(node) is FileNode
    finally:
        run(graph.close())


@pytest.mark.parametrize("driver", ["file", "memory"])
def test_cache_no_flush_puts_an_implicit_filter_over_the_node(tmp_path: pathlib.Path,
                                                             driver: str) -> None:
    options: dict[str, Any] = (
        {"driver": "file", "filename": make_image(tmp_path, MIB)} if driver == "file"
        else {"driver": "memory", "size": MIB})
    graph, node = built({**options, "node-name": "disk", "cache": {"no-flush": True,
                                                                   "direct": True}})
    try:
        assert isinstance(node, NoFlushFilter)
        assert node.implicit
        below = shown(node)
        # a memory disk has nothing to bypass: direct is ignored there, as qemu does
        assert type(below) is (DirectFileNode if driver == "file" else MemoryNode)
        shown_entry = graph.describe("disk", node)
        assert shown_entry["drv"] == below.driver
        assert shown_entry["cache"] == {"writeback": True, "direct": driver == "file",
                                        "no-flush": True}
        assert shown_entry["detect_zeroes"] == "off"
    finally:
        run(graph.close())


@pytest.mark.parametrize("aio", ["native", "io_uring"])
def test_aio_other_than_threads_is_refused(tmp_path: pathlib.Path, aio: str) -> None:
    graph = BlockGraph()
    opened: list[Node] = []
    with pytest.raises(BlockdevError) as info:
        run(build(graph, {"driver": "file", "filename": make_image(tmp_path, MIB),
                          "aio": aio, "cache": {"direct": True}}, opened))
    assert str(info.value) == (f"aio={aio} is not supported: pynbd does its file I/O in a "
                               "thread pool (aio=threads)")
    assert opened == []
    graph, node = built({"driver": "file", "filename": make_image(tmp_path, MIB),
                         "aio": "threads"})
    try:
        assert type(node) is FileNode
    finally:
        run(graph.close())


def test_cache_direct_and_an_rbd_client_cache_clash() -> None:
    """Checked before anything connects to a cluster."""
    spec = parse_rbd_filename("rbd:pool/image:rbd_cache=true")
    graph = BlockGraph()
    opened: list[Node] = []
    with pytest.raises(BlockdevError) as info:
        run(build(graph, {"driver": "rbd", "x-spec": spec, "cache": {"direct": True}},
                  opened))
    assert str(info.value) == ("cache.direct=on keeps librbd's client cache off, but the "
                               "image sets rbd_cache=true")


# -- the contract ------------------------------------------------------------


class _FilterContract(NodeContract):
    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        return FileNode(make_image(tmp_path, size), discard=True)

    def wrap(self, node: Node) -> Node:
        raise NotImplementedError

    def make_stack(self, tmp_path: pathlib.Path, size: int, layer: Layer) -> Stack:
        stack = super().make_stack(tmp_path, size, layer)
        return Stack(self.wrap(stack.top), stack.protocol, stack.shift, stack.guards)


class TestWritethrough(_FilterContract):
    def wrap(self, node: Node) -> Node:
        return WritethroughFilter(node)

    def test_layers_keep_every_fast_path(self, stack: Stack) -> None:
        """All but the inline write, which cannot carry FUA."""
        want = offered(stack.protocol.fast_paths()) - {"pwrite_nowait"}
        assert offered(stack.top.resolve().fast_paths()) == want
        assert offered(stack.top.fast_paths()) == want


class TestNoFlush(_FilterContract):
    def wrap(self, node: Node) -> Node:
        return NoFlushFilter(node)


@pytest.mark.parametrize("unmap", [False, True])
def test_query_shows_the_implicit_filters_as_the_nodes_flags(unmap: bool) -> None:
    """query-named-block-nodes: writethrough and detect-zeroes over a node show as its
    ``cache.writeback`` and ``detect_zeroes``, as qemu shows those flags."""
    memory = MemoryNode(MIB)
    top = WritethroughFilter(DetectZeroesFilter(memory, unmap=unmap))
    entry = BlockGraph().describe("disk", top)
    assert entry["drv"] == "memory"
    assert entry["detect_zeroes"] == ("unmap" if unmap else "on")
    assert entry["cache"] == {"writeback": False, "direct": False, "no-flush": False}
    plain = BlockGraph().describe("disk", memory)
    assert plain["detect_zeroes"] == "off"
    assert plain["cache"] == {"writeback": True, "direct": False, "no-flush": False}
