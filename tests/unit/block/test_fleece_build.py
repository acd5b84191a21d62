"""Fleecing, continued: failed and slow copies (``on-cbw-error``, ``cbw-timeout``), the
two drivers built from blockdev options over the daemon's wrappers, and copies that
land in a qcow2 image ``qemu-img check`` finds clean."""

from __future__ import annotations

import asyncio
import errno
import random
import time
from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.block.fleecing import (
    SIZE,
    G,
    Gate,
    bounded,
    check_frozen,
    content,
    copied,
    fleece_run,
    random_ops,
    source_with,
)
from tests.unit.block.qcow2.images import assert_clean, create, memory_copy, needs_qemu, to_raw
from tests.unit.block.support import raises_errno, read, run

from pynbd.block.bitmap import DirtyBitmap
from pynbd.block.blockdev import BlockdevError, add_all, build
from pynbd.block.faults import FaultFilter, FaultRule
from pynbd.block.fleece import CopyBeforeWrite
from pynbd.block.graph import BlockGraph, GraphError, shown
from pynbd.block.memory import MemoryNode
from pynbd.block.qcow2 import Qcow2Node
from pynbd.block.snapshotaccess import SnapshotAccess
from pynbd.block.tracking import TrackingFilter, bitmaps_of

if TYPE_CHECKING:
    import pathlib

    from pynbd.block.node import Node

COPIES = frozenset({"write", "zero"})


def failing_target(**rule: Any) -> tuple[FaultFilter, int]:
    target = FaultFilter(MemoryNode(SIZE), seed=1)
    return target, target.add_rule(FaultRule(COPIES, **rule))


@pytest.mark.parametrize("timeout", [0, 5])
def test_break_guest_write_fails_the_write_and_keeps_the_snapshot(timeout: int) -> None:
    async def body() -> None:
        original = content(random.Random(1))
        base, source = await source_with(original, 1)
        target, rule = failing_target(errno=errno.ENOSPC, start=3 * G, end=4 * G)
        cbw = CopyBeforeWrite(source, target, cbw_timeout=timeout)
        snap = SnapshotAccess(cbw)
        with raises_errno(errno.ENOSPC):
            await source.pwrite(b"x" * 10, 3 * G + 5)
        assert await read(base, 3 * G, G) == original[3 * G:4 * G], "the write went on"
        assert not cbw.done.is_dirty(3 * G)
        await check_frozen(snap, original, 0, SIZE)
        target.clear(rule)
        await source.pwrite(b"x" * 10, 3 * G + 5)  # copies it now
        assert copied(cbw) == [3]
        await check_frozen(snap, original, 0, SIZE)
        await cbw.close()

    bounded(body())


def test_break_snapshot_lets_writes_through_and_fails_the_snapshot() -> None:
    async def body() -> None:
        original = content(random.Random(2))
        base = MemoryNode(SIZE)
        await base.pwrite(original, 0)
        gate = Gate(base)
        source = TrackingFilter(gate)
        target, _ = failing_target(errno=errno.EIO, start=3 * G, end=4 * G)
        cbw = CopyBeforeWrite(source, target, on_cbw_error="break-snapshot")
        snap = SnapshotAccess(cbw)
        release = gate.arm("read")
        reading = asyncio.create_task(read(snap, 6 * G, 10))  # from the source, held
        await gate.arrived["read"].wait()
        await source.pwrite(b"x" * 10, 3 * G + 5)  # the copy fails: the write goes on
        assert await read(base, 3 * G + 5, 10) == b"x" * 10
        assert cbw.snapshot_error is not None
        assert cbw.snapshot_error.errno == errno.EIO
        assert source.hooks == [], "a broken snapshot copies nothing more"
        await source.pwrite(b"y" * 10, 6 * G)  # lands under the held read
        release.set()
        with raises_errno(errno.EACCES):
            await reading  # it may have read new data: it fails
        with raises_errno(errno.EACCES):
            await read(snap, 0, 1)
        with raises_errno(errno.EACCES):
            await snap.block_status(0, SIZE)
        await cbw.close()

    bounded(body())


def test_a_copy_that_takes_too_long_fails_the_write_and_goes_on() -> None:
    async def body() -> None:
        original = content(random.Random(4))
        base, source = await source_with(original, 4)
        target, _ = failing_target(delay=0.3, count=1)
        cbw = CopyBeforeWrite(source, target, cbw_timeout=0.05)
        snap = SnapshotAccess(cbw)
        started = time.monotonic()
        with raises_errno(errno.ETIMEDOUT):
            await source.pwrite(b"x" * 10, 3 * G)
        assert time.monotonic() - started < 0.25
        assert await read(base, 3 * G, 10) == original[3 * G:3 * G + 10]
        while not cbw.done.is_dirty(3 * G):  # noqa: ASYNC110 - the copy goes on meanwhile
            await asyncio.sleep(0.01)
        await source.pwrite(b"x" * 10, 3 * G)
        await check_frozen(snap, original, 0, SIZE)
        await cbw.close()

    bounded(body())


def test_a_timeout_with_break_snapshot_breaks_it_and_close_stops_the_copy() -> None:
    async def body() -> None:
        original = content(random.Random(6))
        base, source = await source_with(original, 6)
        target, _ = failing_target(delay=30, count=1)
        cbw = CopyBeforeWrite(source, target, cbw_timeout=0.05, on_cbw_error="break-snapshot")
        await source.pwrite(b"x" * 10, 3 * G)  # waits 0.05 s, then lands
        assert await read(base, 3 * G, 10) == b"x" * 10
        assert cbw.snapshot_error is not None
        assert cbw.snapshot_error.errno == errno.ETIMEDOUT
        started = time.monotonic()
        await cbw.close()  # does not wait 30 s for the copy left running
        assert time.monotonic() - started < 5

    bounded(body())


# -- the drivers, built as the daemon builds them -------------------------------------

def daemon_wrap(node: Node) -> Node:
    """The daemon's wrapper: an implicit fault filter over a tracking filter."""
    wrapper = FaultFilter(TrackingFilter(node), seed=1)
    wrapper.implicit = True
    return wrapper


async def add(graph: BlockGraph, options: dict[str, Any], wrap: Any = daemon_wrap) -> Node:
    opened: list[Node] = []
    try:
        return add_all(graph, await build(graph, options, opened, wrap=wrap))
    except BlockdevError:
        for node in reversed(opened):
            await node.close()
        raise


async def disks(graph: BlockGraph, original: bytes, wrap: Any = daemon_wrap) -> None:
    source = await add(graph, {"driver": "memory", "node-name": "src", "size": SIZE}, wrap)
    await source.pwrite(original, 0)
    await add(graph, {"driver": "memory", "node-name": "tgt", "size": SIZE}, wrap)


def test_blockdev_builds_both_drivers_over_the_daemons_wrappers() -> None:
    async def body() -> None:
        original = content(random.Random(8))
        graph = BlockGraph()
        await disks(graph, original)
        source = graph.get("src")
        assert source is not None
        bitmaps_of(shown(source)).add(DirtyBitmap("b", SIZE, G))
        await add(graph, {"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                          "target": "tgt", "min-cluster-size": 4 * G})
        snap = await add(graph, {"driver": "snapshot-access", "node-name": "snap",
                                 "file": "cbw"})
        fleece, cbw = shown(snap), shown(graph.get("cbw") or snap)
        assert isinstance(fleece, SnapshotAccess)
        assert isinstance(cbw, CopyBeforeWrite)
        assert fleece.cbw is cbw
        assert cbw.granule == 4 * G
        for name, drv, ro in (("cbw", "copy-before-write", False),
                              ("snap", "snapshot-access", True)):
            node = graph.get(name)
            assert node is not None
            assert (graph.describe(name, node)["drv"], graph.describe(name, node)["ro"]) == (
                drv, ro)
        await source.pwrite(b"x" * SIZE, 0)  # every writer of src passes the hook
        await check_frozen(fleece, original, 0, SIZE)
        with pytest.raises(GraphError, match="in use by node 'snap'"):
            await graph.remove("cbw")
        await add(graph, {"driver": "copy-before-write", "node-name": "only", "file": "src",
                          "target": {"driver": "memory", "size": SIZE},
                          "bitmap": {"node": "src", "name": "b"},
                          "on-cbw-error": "break-snapshot", "cbw-timeout": 1})
        await graph.remove("snap")
        await graph.remove("cbw")
        await graph.remove("only")
        assert [len(tracking.hooks) for tracking in _trackings(source)] == [0]
        await graph.close()

    bounded(body())


def _trackings(node: Node) -> list[TrackingFilter]:
    found = []
    while True:
        if isinstance(node, TrackingFilter):
            found.append(node)
        children = list(node.children.values())
        if len(children) != 1:
            return found
        node = children[0]


def plain_faults(node: Node) -> Node:
    wrapper = FaultFilter(node, seed=1)
    wrapper.implicit = True
    return wrapper


@pytest.mark.parametrize(("options", "message"), [
    ({"file": "src", "target": "src"}, "target cannot be its source"),
    ({"file": "src", "target": "tgt", "bitmap": {"node": "nope", "name": "b"}},
     "Node 'nope' not found"),
    ({"file": "src", "target": "tgt", "bitmap": {"node": "src", "name": "b"}},
     "Dirty bitmap 'b' not found"),
    ({"file": "src", "target": "tgt", "min-cluster-size": 3 * G},
     "min-cluster-size needs to be a power of 2"),
    ({"file": "src", "target": {"driver": "memory", "size": G}}, "is smaller than the source"),
    ({"file": "src", "target": {"driver": "raw", "read-only": True,
                                "file": {"driver": "memory", "size": SIZE}}},
     "target must be writable"),
    ({"file": "nope", "target": "tgt"}, "Cannot find device=nope nor node-name=nope"),
    ({"driver": "snapshot-access", "file": "src"}, "must be a copy-before-write node"),
])
def test_blockdev_refuses_what_cannot_work(options: dict[str, Any], message: str) -> None:
    async def body() -> None:
        graph = BlockGraph()
        await disks(graph, bytes(SIZE))
        with pytest.raises(BlockdevError, match=message):
            await add(graph, {"driver": "copy-before-write", "node-name": "n", **options})
        assert "n" not in graph
        await graph.close()

    bounded(body())


def test_blockdev_refuses_a_source_whose_writes_are_not_tracked() -> None:
    async def body() -> None:
        graph = BlockGraph()
        await disks(graph, bytes(SIZE), plain_faults)
        with pytest.raises(BlockdevError, match="passes a tracking filter"):
            await add(graph, {"driver": "copy-before-write", "node-name": "n", "file": "src",
                              "target": "tgt"}, plain_faults)
        await graph.close()

    bounded(body())


# -- a qcow2 target ---------------------------------------------------------------------

@needs_qemu
def test_copies_land_in_a_qcow2_image_that_qemu_img_finds_clean(tmp_path: pathlib.Path) -> None:
    cluster = 128 * 1024
    image = create(tmp_path / "fleece.qcow2", SIZE, f"cluster_size={cluster}")
    disk = memory_copy(image)
    rng = random.Random(12)
    original = content(rng)
    plans = [random_ops(rng, 20) for _ in range(3)]

    async def body() -> tuple[bytes, list[int]]:
        _, source = await source_with(original, 12)
        target = await Qcow2Node.open(disk)
        cbw = await asyncio.wait_for(fleece_run(12, source, target, original, plans), 60)
        assert cbw.granule == cluster  # the target's cluster size
        done = copied(cbw)
        await cbw.close()
        await target.close()
        return await read(disk, 0, disk.size), done

    data, done = run(body())
    assert done
    out = tmp_path / "out.qcow2"
    out.write_bytes(data)
    assert_clean(out)
    raw = to_raw(out, tmp_path / "out.raw")
    for index in range(-(-SIZE // cluster)):
        span = slice(index * cluster, min(SIZE, (index + 1) * cluster))
        want = original[span] if index in done else bytes(span.stop - span.start)
        assert raw[span] == want, f"granule {index} of the image"
