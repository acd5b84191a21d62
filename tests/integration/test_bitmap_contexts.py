"""``qemu:dirty-bitmap:NAME`` contexts of an export, in-process: writes through the
tracking filter show up as dirty extents, several contexts answer one BLOCK_STATUS,
and an export keeps its bitmaps busy until it is released."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

from pynbd.block.bitmap import DirtyBitmap
from pynbd.block.memory import MemoryNode
from pynbd.block.tracking import TrackingFilter, bitmaps_of
from pynbd.client import NBDClient
from pynbd.proto.constants import ALLOCATION_DEPTH, BASE_ALLOCATION
from pynbd.server import Export, ExportTable, Server

if TYPE_CHECKING:
    from pathlib import Path

SIZE = 4 << 20
G = 65536


def test_bitmap_contexts_report_what_was_written(tmp_path: Path) -> None:
    async def body() -> None:
        disk = MemoryNode(SIZE)
        since_monday = DirtyBitmap("monday", SIZE, G)
        frozen = DirtyBitmap("frozen", SIZE, G, enabled=False)
        frozen.set(3 * G, 1)
        bitmaps_of(disk).add(since_monday)
        bitmaps_of(disk).add(frozen)
        tracked = TrackingFilter(disk)
        export = Export("", tracked, multi_conn=True, allocation_depth=True,
                        bitmaps=[since_monday, frozen])
        assert export.meta_contexts == (BASE_ALLOCATION, ALLOCATION_DEPTH,
                                        "qemu:dirty-bitmap:monday",
                                        "qemu:dirty-bitmap:frozen")
        assert (since_monday.busy, frozen.busy) == (1, 1)
        table = ExportTable()
        table.add(export)
        server = Server(table, max_connections=0, persistent=True)
        path = str(tmp_path / "nbd.sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path)
            sock.listen()
            sock.setblocking(False)
            await server.start([sock])
            try:
                uri = f"nbd+unix:///?socket={path}"
                async with await NBDClient.connect(uri) as writer:
                    await writer.pwrite(b"x" * 100, G + 10)  # marks granule 1
                    await writer.zero(2 * G, 2 * G)  # granules 2, 3
                contexts = [BASE_ALLOCATION, "qemu:dirty-bitmap:monday",
                            "qemu:dirty-bitmap:frozen", ALLOCATION_DEPTH]
                async with await NBDClient.connect(uri, meta_contexts=contexts) as reader:
                    assert set(reader.meta_contexts) == set(contexts)
                    monday = await reader.block_status(0, SIZE,
                                                       context="qemu:dirty-bitmap:monday")
                    assert monday == [(G, 0), (3 * G, 1), (SIZE - 4 * G, 0)]
                    frozen_map = await reader.block_status(
                        0, SIZE, context="qemu:dirty-bitmap:frozen")
                    assert frozen_map == [(3 * G, 0), (G, 1), (SIZE - 4 * G, 0)]
                    depth = await reader.block_status(0, SIZE, context=ALLOCATION_DEPTH)
                    assert depth == [(SIZE, 1)]
            finally:
                await server.close()
        export.release()
        assert (since_monday.busy, frozen.busy) == (0, 0)

    asyncio.run(body())
