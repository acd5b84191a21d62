"""The tracking filter: every change through it marks the node's enabled bitmaps (on the
fast paths too) and runs the before-write hooks first."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pynbd.block.bitmap import DirtyBitmap
from pynbd.block.file import FileNode
from pynbd.block.memory import MemoryNode
from pynbd.block.node import read
from pynbd.block.tracking import TrackingFilter, bitmaps_of

if TYPE_CHECKING:
    import pathlib

SIZE = 1 << 20
G = 4096


def tracked() -> tuple[MemoryNode, TrackingFilter, DirtyBitmap, DirtyBitmap]:
    node = MemoryNode(SIZE)
    on, off = DirtyBitmap("on", SIZE, G), DirtyBitmap("off", SIZE, G, enabled=False)
    bitmaps_of(node).add(on)
    bitmaps_of(node).add(off)
    return node, TrackingFilter(node), on, off


def test_every_change_marks_enabled_bitmaps() -> None:
    async def body() -> None:
        node, top, on, off = tracked()
        await top.pwrite(b"x" * 10, 5 * G + 1)
        await top.write_zeroes(10 * G, 2 * G)
        await top.trim(20 * G, 1)
        await top.pread(memoryview(bytearray(G)), 30 * G)  # reads mark nothing
        await top.flush()
        assert on.dirty_runs(0, SIZE) == [(5 * G, G), (10 * G, 2 * G), (20 * G, G)]
        assert off.count() == 0
        paths = top.fast_paths()
        assert paths.pwrite_nowait is not None
        assert paths.pwrite_nowait(b"y" * G, 40 * G)
        assert on.is_dirty(40 * G)
        assert await read(node, 40 * G, G) == b"y" * G
        assert paths.pread_nowait == node.fast_paths().pread_nowait  # reads untouched

    asyncio.run(body())


def test_trims_that_discard_nothing_mark_nothing(tmp_path: pathlib.Path) -> None:
    """A trim on a node that ignores trims (discard=ignore) changes no data, so no
    bitmap records it (qemu returns before its dirty bitmaps see the discard)."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"\1" * SIZE)

    async def body(discard: bool) -> list[tuple[int, int]]:
        file = FileNode(str(path), discard=discard)
        try:
            bitmap = DirtyBitmap("b", SIZE, G)
            bitmaps_of(file).add(bitmap)
            await TrackingFilter(file).trim(4 * G, 2 * G)
            return bitmap.dirty_runs(0, SIZE)
        finally:
            await file.close()

    assert asyncio.run(body(False)) == []
    assert asyncio.run(body(True)) == [(4 * G, 2 * G)]


def test_bitmaps_added_later_are_marked_through_old_fast_paths() -> None:
    """A connection resolves its fast paths once; a bitmap added after (QMP) still sees
    its writes."""
    node = MemoryNode(SIZE)
    top = TrackingFilter(node)
    paths = top.fast_paths()
    late = DirtyBitmap("late", SIZE, G)
    bitmaps_of(node).add(late)
    assert paths.pwrite_nowait is not None
    assert paths.pwrite_nowait(b"z" * 10, 3 * G)
    assert late.dirty_runs(0, SIZE) == [(3 * G, G)]


def test_hooks_run_before_the_change_and_turn_fast_writes_away() -> None:
    async def body() -> None:
        node, top, _, _ = tracked()
        await node.pwrite(b"old!" * G, 0)
        seen: list[tuple[int, int, bytes]] = []

        async def copy_before_write(offset: int, length: int) -> None:
            await asyncio.sleep(0)
            seen.append((offset, length, bytes(await read(node, offset, 4))))

        top.hooks.append(copy_before_write)
        paths = top.fast_paths()
        assert paths.pwrite_nowait is not None
        assert not paths.pwrite_nowait(b"new!", 0)  # a hook must run: the task path
        assert await read(node, 0, 4) == b"old!"
        await top.pwrite(b"new!", 0)
        await top.write_zeroes(8, 4)
        await top.trim(16, 4)
        assert seen == [(0, 4, b"old!"), (8, 4, b"old!"), (16, 4, b"old!")]
        assert await read(node, 0, 12) == b"new!old!\0\0\0\0"
        top.hooks.clear()
        assert paths.pwrite_nowait(b"fast", 0)

    asyncio.run(body())


def test_quiesce_waits_for_changes_already_in_flight() -> None:
    """A change that passed the filter before a hook was added is waited for; later
    ones are not part of the wait."""

    class Slow(MemoryNode):
        def __init__(self) -> None:
            super().__init__(SIZE)
            self.gate = asyncio.Event()

        def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
            return False

        async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                         fua: bool = False) -> None:
            await self.gate.wait()
            await super().pwrite(data, offset, fua=fua)

    async def body() -> None:
        node = Slow()
        top = TrackingFilter(node)
        early = asyncio.ensure_future(top.pwrite(b"e", 0))
        await asyncio.sleep(0)
        quiet = asyncio.ensure_future(top.quiesce())
        await asyncio.sleep(0)
        late = asyncio.ensure_future(top.pwrite(b"l", 1))
        await asyncio.sleep(0)
        assert not quiet.done()  # the early write is still in flight
        node.gate.set()
        await asyncio.wait_for(quiet, 5)
        await asyncio.gather(early, late)
        assert await read(node, 0, 2) == b"el"
        await asyncio.wait_for(top.quiesce(), 5)  # nothing in flight: at once

    asyncio.run(body())
