"""The contract every block node keeps, as tests a protocol node's module inherits
(``pynbd.testing``: pytest and hypothesis are needed; ``plugin_contract`` builds
the storage plugins' contract on it).

A protocol node's test module subclasses ``NodeContract`` (zarr ``StoreTests``
style) and provides:

- ``make_protocol(tmp_path, size)``: a *fresh* node of ``size`` bytes whose
  contents read as zeroes (called again for every state-machine run, so it must
  not reuse a file or image name);
- optionally ``has_raw_access = True`` with ``read_raw``/``write_raw``, which
  reach the protocol node's storage without its own methods (ground truth);
- optionally ``initial_contents(stack)``, for a read-only node that does not
  start as zeroes (writes are only tried on nodes that can write).

Every test then runs once per layer of ``support.LAYERS``: on the protocol node
itself, under a raw node (with and without a window), under a fault filter
(without rules, and with rules that cannot pick) and under a stack of both.
The tests run the coroutines with ``asyncio.run``; the state machine
(``machine.NodeMachine``) owns one event loop per run.

Rules checked: data round-trips at any offset, trimmed bytes read as the old
data or zeroes, zeroed ranges read as zeroes with their neighbours untouched,
``fast`` zeroing either works or changes nothing, every extent that
``block_status`` reports with ``ZERO`` really reads as zeroes, every fast path
the resolved node offers agrees with the requests, and the parts the graph
uses (``children``, ``filename``, ``driver``, ``resolve``, ``fast_paths``)
have the right shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from typing import TYPE_CHECKING, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from ..block.graph import close_subtree
from ..block.node import Capabilities, FastPaths, FastZeroUnsupported, Node
from .machine import NodeMachine
from .support import (
    CHUNK,
    KIB,
    LAYERS,
    MODEL_SIZE,
    Layer,
    Stack,
    assert_no_hole,
    assert_old_or_zero,
    check_extents,
    check_guards,
    first_difference,
    pattern,
    read,
    run,
    start_read,
    start_write,
)

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

#: (name, offset, length) for round trips; negative offsets count from the end,
#: a length of None means "to the end"
ROUNDTRIP_CASES = [
    ("aligned", 0, 4 * KIB),
    ("aligned-two-chunks", CHUNK, 2 * CHUNK),
    ("unaligned", 1, 1000),
    ("unaligned-across-chunk-edge", CHUNK - 6, 20),
    ("unaligned-many-chunks", 3, 3 * CHUNK + 77),
    ("end-of-device", -777, None),
    ("last-byte", -1, None),
    ("whole-device", 0, None),
]


def _require_write(node: Node) -> None:
    if not node.capabilities.can_write:
        pytest.skip("node is read-only")


def _offered(paths: FastPaths) -> set[str]:
    return {field.name for field in dataclasses.fields(paths)
            if getattr(paths, field.name) is not None}


class NodeContract:
    """Tests every protocol node inherits, under every layer; see the module docstring."""

    #: the size most tests ask for (not a multiple of 512 or of any chunk)
    size: ClassVar[int] = 1024 * KIB + 4 * KIB + 123
    #: whether ``read_raw``/``write_raw`` are implemented
    has_raw_access: ClassVar[bool] = False

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        raise NotImplementedError

    def read_raw(self, protocol: Node, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def write_raw(self, protocol: Node, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def make_stack(self, tmp_path: pathlib.Path, size: int, layer: Layer) -> Stack:
        return layer.build(functools.partial(self.make_protocol, tmp_path), size)

    def initial_contents(self, stack: Stack) -> bytes:
        """What a fresh stack's top reads before any write: zeroes."""
        return bytes(stack.top.size)

    @pytest.fixture(params=LAYERS, ids=[layer.name for layer in LAYERS])
    def layer(self, request: pytest.FixtureRequest) -> Layer:
        param: Layer = request.param
        return param

    @pytest.fixture
    def stack(self, tmp_path: pathlib.Path, layer: Layer) -> Iterator[Stack]:
        stack = self.make_stack(tmp_path, self.size, layer)
        try:
            yield stack
            run(check_guards(stack))
        finally:
            run(close_subtree(stack.top))

    @pytest.fixture
    def node(self, stack: Stack) -> Node:
        return stack.top

    def _range(self, offset: int, length: int | None) -> tuple[int, int]:
        if offset < 0:
            offset += self.size
        return offset, self.size - offset if length is None else length

    # -- basics ------------------------------------------------------------

    def test_size(self, node: Node) -> None:
        assert node.size == self.size

    def test_capabilities(self, node: Node) -> None:
        assert isinstance(node.capabilities, Capabilities)

    def test_graph_facing_parts(self, stack: Stack) -> None:
        node = stack.top
        assert isinstance(node.driver, str)
        assert node.driver
        assert isinstance(node.filename, str)
        assert node.filename == stack.protocol.filename, "a layer shows its storage's file"
        children = node.children
        assert isinstance(children, dict)
        assert all(isinstance(child, Node) for child in children.values())
        assert bool(children) == (node is not stack.protocol)
        resolved = node.resolve()
        assert isinstance(resolved, Node)
        assert resolved.size == node.size
        assert resolved.resolve() is resolved
        for paths in (node.fast_paths(), resolved.fast_paths()):
            assert isinstance(paths, FastPaths)
            for field in dataclasses.fields(paths):
                value = getattr(paths, field.name)
                assert value is None or callable(value), field.name

    def test_layers_keep_every_fast_path(self, stack: Stack) -> None:
        """No layer here overrides a request without adapting the fast paths over it."""
        offered = _offered(stack.protocol.fast_paths())
        assert _offered(stack.top.resolve().fast_paths()) == offered
        assert _offered(stack.top.fast_paths()) == offered

    def test_fresh_node_reads_zeroes(self, stack: Stack) -> None:
        got = run(read(stack.top, 0, stack.top.size))
        want = self.initial_contents(stack)
        assert got == want, first_difference(got, want)

    @pytest.mark.parametrize(("name", "offset", "length"), ROUNDTRIP_CASES,
                             ids=[case[0] for case in ROUNDTRIP_CASES])
    def test_roundtrip(self, stack: Stack, name: str, offset: int,
                       length: int | None) -> None:
        node = stack.top
        _require_write(node)
        offset, length = self._range(offset, length)
        data = pattern(offset, length)
        before = min(offset, 100)
        after = min(node.size - offset - length, 100)

        async def body() -> None:
            await node.pwrite(data, offset)
            assert await read(node, offset, length) == data
            # the bytes around the write are untouched
            got = await read(node, offset - before, before + length + after)
            assert got == bytes(before) + data + bytes(after)

        run(body())
        if self.has_raw_access:
            assert self.read_raw(stack.protocol, stack.shift + offset, length) == data

    def test_pwrite_accepts_every_buffer_type(self, node: Node) -> None:
        _require_write(node)
        data = pattern(5, 3000)

        async def body() -> None:
            await node.pwrite(data, 10)
            await node.pwrite(bytearray(data), 5000)
            await node.pwrite(memoryview(data)[1000:2000], 9000)
            assert await read(node, 10, 3000) == data
            assert await read(node, 5000, 3000) == data
            assert await read(node, 9000, 1000) == data[1000:2000]

        run(body())

    def test_raw_write_is_read_back(self, stack: Stack) -> None:
        if not self.has_raw_access:
            pytest.skip("no out-of-band access to this node's storage")
        data = pattern(9, 70_001)
        self.write_raw(stack.protocol, stack.shift + CHUNK - 5, data)
        assert run(read(stack.top, CHUNK - 5, len(data))) == data

    def test_write_is_visible_to_other_callers(self, node: Node) -> None:
        """Another task (another connection) sees a completed write at once."""
        _require_write(node)
        first, second = pattern(1, 5000), pattern(2, 5000)

        async def body() -> None:
            await asyncio.create_task(node.pwrite(first, 70_000))
            assert await asyncio.create_task(read(node, 70_000, 5000)) == first
            # qemu's nbd-multiconn test: write on A, flush on B, read on C
            await asyncio.create_task(node.pwrite(second, 70_000))
            await asyncio.create_task(node.flush())
            assert await asyncio.create_task(read(node, 70_000, 5000)) == second

        run(body())

    # -- fast paths --------------------------------------------------------

    def test_nowait_fast_path(self, node: Node) -> None:
        """pread_nowait/pwrite_nowait either do the whole job at once or say no."""
        io = node.resolve()
        paths = io.fast_paths()
        if paths.pread_nowait is None and paths.pwrite_nowait is None:
            pytest.skip("no nowait fast path")
        data = pattern(11, 9000)
        if paths.pwrite_nowait is None or not paths.pwrite_nowait(data, CHUNK - 100):
            run(io.pwrite(data, CHUNK - 100))
        buf = bytearray(9000)
        if paths.pread_nowait is not None and paths.pread_nowait(memoryview(buf), CHUNK - 100):
            assert bytes(buf) == data
        assert run(read(node, CHUNK - 100, 9000)) == data

    def test_read_returns_what_pread_fills(self, node: Node) -> None:
        own_read = node.resolve().fast_paths().read
        if own_read is None:
            pytest.skip("no own-buffer reads")
        data = pattern(7, 3 * CHUNK + 5)

        async def body() -> None:
            await node.pwrite(data, CHUNK - 1)
            got = await own_read(CHUNK - 1, len(data))
            assert bytes(got) == data
            assert await read(node, CHUNK - 1, len(data)) == data
            # a hole reads as zeroes; an empty read is empty
            assert bytes(await own_read(node.size - 10, 10)) == bytes(10)
            assert len(await own_read(0, 0)) == 0

        run(body())

    def test_sendfile_source(self, node: Node) -> None:
        """What would be sent from a returned source is the data; ``data_only``
        never returns a source over a hole."""
        source_of = node.resolve().fast_paths().sendfile_source
        if source_of is None:
            pytest.skip("no sendfile reads")
        data = pattern(12, 3 * CHUNK + 5)
        run(node.pwrite(data, CHUNK - 1))
        run(read(node, CHUNK - 1, len(data)))  # cached now, where the node asks
        want = bytearray(node.size)
        want[CHUNK - 1:CHUNK - 1 + len(data)] = data
        for offset, length in [(CHUNK - 1, len(data)), (CHUNK, 10), (0, 3 * CHUNK),
                               (node.size - 10, 10), (0, node.size)]:
            for data_only in (False, True):
                source = source_of(offset, length, data_only)
                if source is None:
                    continue
                fd, position = source
                got = os.pread(fd, length, position)
                assert got == want[offset:offset + length], (
                    f"sendfile source of [{offset}, +{length}): "
                    + first_difference(got, want[offset:offset + length]))
                if data_only:
                    run(assert_no_hole(node, offset, length))

    def test_direct_io(self, node: Node) -> None:
        """start_read/start_write complete on the loop, never within the call, and
        agree with pread/pwrite."""
        io = node.resolve()
        paths = io.fast_paths()
        if paths.start_read is None and paths.start_write is None:
            pytest.skip("no direct I/O")
        first, second = pattern(13, 5000), pattern(14, 3000)

        async def write(data: bytes, offset: int, fua: bool) -> None:
            if paths.start_write is None or not await start_write(
                    paths.start_write, data, offset, fua):
                await io.pwrite(data, offset, fua=fua)

        async def read_back(offset: int, length: int) -> bytes:
            got = None
            if paths.start_read is not None:
                got = await start_read(paths.start_read, offset, length)
            return got if got is not None else await read(io, offset, length)

        async def body() -> None:
            await write(first, CHUNK - 3, False)
            await write(second, 2 * CHUNK + 1, True)
            assert await read_back(CHUNK - 3, len(first)) == first
            assert await read(node, CHUNK - 3, len(first)) == first
            assert await read_back(2 * CHUNK + 1, len(second)) == second
            assert await read_back(node.size - 10, 10) == bytes(10)

        run(body())

    # -- trim and zero -----------------------------------------------------

    @pytest.mark.parametrize(("start", "length"), [
        (1000, 200_001), (0, CHUNK - 1), (1, CHUNK - 1), (CHUNK, CHUNK), (CHUNK + 1, CHUNK)])
    def test_trim(self, node: Node, start: int, length: int) -> None:
        _require_write(node)
        data = pattern(3, 300_000)

        async def body() -> None:
            await node.pwrite(data, 0)
            await node.trim(start, length)
            got = await read(node, 0, len(data))
            assert got[:start] == data[:start]
            assert_old_or_zero(got[start:start + length], data[start:start + length], start)
            assert got[start + length:] == data[start + length:]
            # writing into the trimmed range works as usual
            new = pattern(4, 100_000)
            await node.pwrite(new, start + 50_000)
            assert await read(node, start + 50_000, len(new)) == new

        run(body())

    @pytest.mark.parametrize("may_trim", [False, True])
    @pytest.mark.parametrize(("offset", "length"), [
        (4097, 200_003), (CHUNK, CHUNK), (0, CHUNK - 1), (1, CHUNK - 1), (CHUNK + 1, CHUNK),
        (-100, None), (0, None)])
    def test_write_zeroes(self, node: Node, may_trim: bool, offset: int,
                          length: int | None) -> None:
        _require_write(node)
        offset, length = self._range(offset, length)
        data = pattern(6, node.size)

        async def body() -> None:
            await node.pwrite(data, 0)
            await node.write_zeroes(offset, length, may_trim=may_trim)
            got = await read(node, 0, node.size)
            assert got[:offset] == data[:offset], first_difference(got[:offset], data[:offset])
            zeroed = got[offset:offset + length]
            assert zeroed.count(0) == length, first_difference(zeroed, bytes(length))
            assert got[offset + length:] == data[offset + length:]

        run(body())

    def test_write_zeroes_on_fresh_range(self, node: Node) -> None:
        _require_write(node)

        async def body() -> None:
            await node.write_zeroes(123, 3 * CHUNK)
            await node.write_zeroes(5 * CHUNK, CHUNK, may_trim=True)
            assert (await read(node, 0, node.size)).count(0) == node.size

        run(body())

    @pytest.mark.parametrize("may_trim", [False, True])
    def test_fast_zero(self, node: Node, may_trim: bool) -> None:
        _require_write(node)
        data = pattern(8, 400_000)
        offset, length = 511, 300_000

        async def body() -> None:
            await node.pwrite(data, 0)
            try:
                await node.write_zeroes(offset, length, may_trim=may_trim, fast=True)
            except FastZeroUnsupported:
                assert await read(node, 0, len(data)) == data, "fast zero changed data"
                return
            got = await read(node, 0, len(data))
            assert got[:offset] == data[:offset]
            assert got[offset:offset + length].count(0) == length
            assert got[offset + length:] == data[offset + length:]

        run(body())

    def test_flush_and_fua(self, node: Node) -> None:
        _require_write(node)
        data = pattern(10, 10_000)

        async def body() -> None:
            await node.flush()
            await node.pwrite(data, 333, fua=True)
            assert await read(node, 333, len(data)) == data
            await node.trim(0, 4096, fua=True)
            await node.write_zeroes(5000, 1000, fua=True)
            await node.write_zeroes(CHUNK, CHUNK, may_trim=True, fua=True)
            await node.flush()
            got = await read(node, 333, len(data))
            assert_old_or_zero(got[:4096 - 333], data[:4096 - 333], 333)
            assert got[4096 - 333:5000 - 333] == data[4096 - 333:5000 - 333]
            assert got[5000 - 333:6000 - 333].count(0) == 1000
            assert got[6000 - 333:] == data[6000 - 333:]

        run(body())

    def test_cache(self, node: Node) -> None:
        run(node.cache(0, node.size))
        run(node.cache(CHUNK + 1, 10))

    # -- block status ------------------------------------------------------

    @pytest.mark.parametrize(("offset", "length"), [(0, None), (1, 4096), (CHUNK - 1, 2),
                                                    (-1, None), (-1000, None)])
    def test_block_status_fresh(self, node: Node, offset: int, length: int | None) -> None:
        offset, length = self._range(offset, length)
        run(check_extents(node, offset, length))

    def test_block_status_after_writes(self, node: Node) -> None:
        _require_write(node)

        async def body() -> None:
            await node.pwrite(pattern(1, 10), 0)
            await node.pwrite(pattern(2, 3 * CHUNK), CHUNK + 17)
            await node.pwrite(pattern(3, 1), node.size - 1)
            await node.write_zeroes(2 * CHUNK, CHUNK, may_trim=True)
            await node.trim(8 * CHUNK, 2 * CHUNK)
            await node.pwrite(pattern(4, 5), 8 * CHUNK + 100)
            for offset, length in [(0, node.size), (5, 100), (2 * CHUNK - 3, CHUNK + 6),
                                   (node.size - 10, 10)]:
                await _walk_extents(node, offset, length)

        run(body())

    # -- concurrency -------------------------------------------------------

    def test_concurrent_distinct_ranges(self, node: Node) -> None:
        _require_write(node)
        tasks = 64
        stride = node.size // tasks
        ranges = [(i * stride + i % 7, min(stride - 7, 1000 + 397 * i)) for i in range(tasks)]

        async def body() -> None:
            await asyncio.gather(*(node.pwrite(pattern(i, length), offset)
                                   for i, (offset, length) in enumerate(ranges)))
            got = await asyncio.gather(*(read(node, offset, length)
                                         for offset, length in ranges))
            for i, ((_, length), data) in enumerate(zip(ranges, got, strict=True)):
                assert data == pattern(i, length), f"range {i}"
            # writers of one half race readers of the other half
            half = tasks // 2
            writes = asyncio.gather(*(node.pwrite(pattern(i + 100, length), offset)
                                      for i, (offset, length) in enumerate(ranges[:half])))
            reads = asyncio.gather(*(read(node, offset, length)
                                     for offset, length in ranges[half:]))
            _, results = await asyncio.gather(writes, reads)
            for i, data in enumerate(results, start=half):
                assert data == pattern(i, ranges[i][1]), f"range {i}"
            for i, (offset, length) in enumerate(ranges[:half]):
                assert await read(node, offset, length) == pattern(i + 100, length)

        run(body())

    # -- model-based -------------------------------------------------------

    def test_state_machine(self, tmp_path: pathlib.Path, layer: Layer) -> None:
        contract = self

        class Machine(NodeMachine):
            def make_stack(self) -> Stack:
                return contract.make_stack(tmp_path, MODEL_SIZE, layer)

            def initial_contents(self, stack: Stack) -> bytes:
                return contract.initial_contents(stack)

        run_state_machine_as_test(Machine, settings=settings(
            max_examples=layer.examples, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow]))


async def _walk_extents(node: Node, offset: int, length: int) -> None:
    """Ask again from where each reply stopped, as a client does."""
    end = offset + length
    while offset < end:
        extents = await check_extents(node, offset, end - offset)
        offset += sum(extent.length for extent in extents)
