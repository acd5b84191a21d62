"""Fleecing: a copy-before-write node and the snapshot-access node over it keep the
moment the copy-before-write node was made, byte for byte, while writers go on
(the filters and checks: ``tests.unit.block.fleecing``)."""

from __future__ import annotations

import asyncio
import errno
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.block.fleecing import (
    SIZE,
    Counting,
    G,
    Gate,
    Op,
    bounded,
    check_frozen,
    content,
    copied,
    fleece_run,
    random_ops,
    source_with,
)
from tests.unit.block.support import raises_errno, read

from pynbd.block.bitmap import DirtyBitmap
from pynbd.block.fleece import CopyBeforeWrite, find_tracking
from pynbd.block.memory import MemoryNode
from pynbd.block.node import ExtentFlags
from pynbd.block.snapshotaccess import SnapshotAccess
from pynbd.block.tracking import TrackingFilter


@pytest.mark.parametrize("seed", range(8))
def test_the_snapshot_stays_frozen_while_writers_go_on(seed: int) -> None:
    async def body() -> None:
        rng = random.Random(seed)
        original = content(rng)
        _, source = await source_with(original, seed)
        target = Counting(MemoryNode(SIZE))
        plans = [random_ops(rng, 25) for _ in range(4)]
        cbw = await fleece_run(seed, source, target, original, plans)
        assert set(target.writes.values()) == {1}, "a granule was copied twice"
        assert sorted(target.writes) == copied(cbw)
        await cbw.close()

    bounded(body())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(("write", "zero", "trim")),
                              st.integers(0, SIZE - 1), st.integers(1, 3 * G)),
                    min_size=1, max_size=24),
       seed=st.integers(0, 2**32 - 1), writers=st.integers(1, 4))
def test_any_writes_leave_the_snapshot_frozen(ops: list[Op], seed: int, writers: int) -> None:
    ops = [(kind, offset, min(length, SIZE - offset)) for kind, offset, length in ops]

    async def body() -> None:
        original = content(random.Random(seed))
        _, source = await source_with(original, seed)
        target = Counting(MemoryNode(SIZE))
        cbw = await fleece_run(seed, source, target, original,
                               [ops[k::writers] for k in range(writers)])
        assert set(target.writes.values()) <= {1}
        await cbw.close()

    bounded(body())


def test_a_write_waits_for_a_snapshot_read_of_the_source() -> None:
    """The frozen-read rule: a read of a granule not yet copied reads the source, and a
    write there lands only after that read is over."""
    async def body() -> None:
        base = MemoryNode(SIZE)
        await base.pwrite(b"o" * SIZE, 0)
        gate = Gate(base)
        source = TrackingFilter(gate)
        cbw = CopyBeforeWrite(source, MemoryNode(SIZE))
        snap = SnapshotAccess(cbw)
        release = gate.arm("read")
        reading = asyncio.create_task(read(snap, 3 * G + 10, 100))
        await gate.arrived["read"].wait()
        writing = asyncio.create_task(source.pwrite(b"n" * 100, 3 * G + 50))
        for _ in range(50):
            await asyncio.sleep(0)
        assert cbw.done.is_dirty(3 * G), "the copy goes ahead"
        assert not writing.done(), "the write must wait for the read of the source"
        assert await read(base, 3 * G + 50, 1) == b"o"
        release.set()
        assert await reading == b"o" * 100
        await writing
        assert await read(base, 3 * G + 50, 100) == b"n" * 100
        assert await read(snap, 3 * G, G) == b"o" * G
        await cbw.close()

    bounded(body())


def test_a_write_waits_for_a_snapshot_block_status_of_the_source() -> None:
    """The same rule for block status: the source's answer stays true until it is out."""
    async def body() -> None:
        base = MemoryNode(SIZE)
        await base.pwrite(b"o" * SIZE, 0)
        gate = Gate(base)
        source = TrackingFilter(gate)
        cbw = CopyBeforeWrite(source, MemoryNode(SIZE))
        snap = SnapshotAccess(cbw)
        release = gate.arm("status")
        asking = asyncio.create_task(snap.block_status(2 * G, 2 * G))
        await gate.arrived["status"].wait()
        zeroing = asyncio.create_task(source.write_zeroes(2 * G, 2 * G, may_trim=True))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not zeroing.done(), "the zeroing must wait for the status of the source"
        release.set()
        assert [extent.flags for extent in await asking] == [ExtentFlags.DATA]
        await zeroing
        await check_frozen(snap, b"o" * SIZE, 0, SIZE)
        await cbw.close()

    bounded(body())


def test_writers_of_one_granule_wait_for_its_one_copy() -> None:
    async def body() -> None:
        base = MemoryNode(SIZE)
        await base.pwrite(b"o" * SIZE, 0)
        source = TrackingFilter(base)
        gate = Gate(MemoryNode(SIZE))
        target = Counting(gate)
        cbw = CopyBeforeWrite(source, target)
        snap = SnapshotAccess(cbw)
        release = gate.arm("write")
        first = asyncio.create_task(source.pwrite(b"a" * 10, 5 * G + 1))
        await gate.arrived["write"].wait()  # the copy of granule 5 is under way
        others = [asyncio.create_task(source.pwrite(b"b" * 10, 5 * G + 100)),
                  asyncio.create_task(source.write_zeroes(5 * G + 4096, G)),  # and granule 6
                  asyncio.create_task(source.trim(5 * G, 1))]
        for _ in range(50):
            await asyncio.sleep(0)
        assert not first.done()
        assert not any(task.done() for task in others)
        assert await read(base, 5 * G, G) == b"o" * G, "a write landed before its copy"
        assert await read(snap, 5 * G, G) == b"o" * G  # read meanwhile: the source
        release.set()
        await asyncio.gather(first, *others)
        assert target.writes == {5: 1, 6: 1}
        assert await read(snap, 5 * G, 2 * G) == b"o" * 2 * G
        assert await read(base, 5 * G + 1, 10) == b"a" * 10
        assert await read(base, 5 * G + 100, 10) == b"b" * 10
        await cbw.close()

    bounded(body())


def test_closing_takes_the_hook_off_and_lets_go_of_the_nodes() -> None:
    async def body() -> None:
        base = MemoryNode(SIZE)
        source = TrackingFilter(base)
        target = Counting(MemoryNode(SIZE))
        cbw = CopyBeforeWrite(source, target)
        paths = source.fast_paths()
        assert paths.pwrite_nowait is not None
        assert not paths.pwrite_nowait(b"x", 0), "writes must take the path with the hook"
        await source.pwrite(b"x", 0)
        assert target.writes == {0: 1}
        await cbw.close()
        assert source.hooks == []
        assert cbw.children == {}
        assert all(value is not source and value is not target for value in vars(cbw).values())
        await source.pwrite(b"y", 3 * G)
        assert paths.pwrite_nowait(b"z", 4 * G)
        assert target.writes == {0: 1}, "writes copy nothing after close"
        with raises_errno(errno.ENODEV):
            await read(cbw, 0, 1)

    bounded(body())


def test_the_filter_reads_the_source_and_its_writes_copy_first() -> None:
    async def body() -> None:
        base = MemoryNode(SIZE)
        await base.pwrite(b"o" * SIZE, 0)
        source = TrackingFilter(base)
        cbw = CopyBeforeWrite(source, MemoryNode(SIZE))
        snap = SnapshotAccess(cbw)
        assert cbw.children == {"file": source, "target": cbw.children["target"]}
        assert snap.children == {"file": cbw}
        assert find_tracking(cbw.children["file"]) is source
        await cbw.pwrite(b"n" * 3, 2 * G - 1)
        await cbw.write_zeroes(7 * G, 5)
        assert await read(cbw, 2 * G - 1, 3) == b"nnn"  # the source, as it is now
        assert await read(snap, 2 * G - 1, 3) == b"ooo"
        assert await read(snap, 7 * G, 5) == b"ooooo"
        assert copied(cbw) == [1, 2, 7]
        await cbw.close()

    bounded(body())


def test_read_paths_and_block_status_over_copied_and_uncopied_runs() -> None:
    async def body() -> None:
        rng = random.Random(5)
        original = content(rng)
        _, source = await source_with(original, 5)
        cbw = CopyBeforeWrite(source, MemoryNode(SIZE))
        snap = SnapshotAccess(cbw)
        assert snap.size == SIZE
        assert not snap.capabilities.can_write
        # copied: granules 1, 3, 4 and the short last one; the rest is read from the source
        for granule in (1, 3, 4, 16):
            await source.trim(granule * G, 1)
        await source.pwrite(b"\xff" * 7, SIZE - 7)
        await source.write_zeroes(0, G, may_trim=True)  # granule 0 too, zeroed now
        for offset, length in ((0, SIZE), (G - 3, 3 * G + 6), (SIZE - 5, 5), (4 * G, 1)):
            await check_frozen(snap, original, offset, length)
        extents = await snap.block_status(0, SIZE)
        assert sum(extent.length for extent in extents) == SIZE  # all in one answer
        with raises_errno(errno.EROFS):
            await snap.pwrite(b"x", 0)
        with raises_errno(errno.EROFS):
            await snap.write_zeroes(0, 1)
        await snap.flush()
        await cbw.close()

    bounded(body())


def test_a_copy_bitmap_limits_what_is_copied_and_readable() -> None:
    async def body() -> None:
        original = content(random.Random(9))
        _, source = await source_with(original, 9)
        target = Counting(MemoryNode(SIZE))
        bitmap = DirtyBitmap("b", SIZE, 4096)
        bitmap.set(2 * G + 5, 10)  # granule 2 (whole granules are copied)
        bitmap.set(9 * G - 1, 2)  # granules 8 and 9
        cbw = CopyBeforeWrite(source, target, bitmap=bitmap)
        snap = SnapshotAccess(cbw)
        await source.pwrite(b"x" * (10 * G), 0)
        assert target.writes == {2: 1, 8: 1, 9: 1}
        await check_frozen(snap, original, 2 * G, G)
        await check_frozen(snap, original, 8 * G + 3, 2 * G - 3)
        for offset, length in ((0, 1), (2 * G, G + 1), (10 * G, 5)):
            with raises_errno(errno.EACCES):
                await read(snap, offset, length)
        extents = await snap.block_status(8 * G, 4 * G)
        assert sum(extent.length for extent in extents) == 2 * G  # up to the unreadable
        with raises_errno(errno.EACCES):
            await snap.block_status(7 * G, G)
        await cbw.close()

    bounded(body())


def test_discarding_the_snapshot_stops_copying_there() -> None:
    async def body() -> None:
        original = content(random.Random(11))
        _, source = await source_with(original, 11)
        target = Counting(MemoryNode(SIZE))
        cbw = CopyBeforeWrite(source, target)
        snap = SnapshotAccess(cbw)
        await snap.trim(G + 1, 3 * G)  # granules 2 and 3 only (whole ones)
        await source.pwrite(b"x" * (5 * G), 0)
        assert target.writes == {0: 1, 1: 1, 4: 1}
        with raises_errno(errno.EACCES):
            await read(snap, 2 * G, 1)
        await check_frozen(snap, original, 0, 2 * G)
        await check_frozen(snap, original, 4 * G, SIZE - 4 * G)
        await snap.trim(16 * G, SIZE - 16 * G)  # the short last granule, to the end
        with raises_errno(errno.EACCES):
            await read(snap, SIZE - 1, 1)
        await cbw.close()

    bounded(body())
