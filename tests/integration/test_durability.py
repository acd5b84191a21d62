"""Durability across connections: FLUSH on one connection covers writes
completed on the others; FUA writes are durable before their reply.

A test backend simulates power loss: writes land in a volatile layer that
reads see at once; only FLUSH (or a FUA write) moves data to the durable
store; a "crash" is a snapshot of the durable store.  Three connections
write, a fourth flushes, and crashes happen at seeded random moments.  Each
crash image must hold every write that was acknowledged and then covered by
a completed FLUSH, and every acknowledged FUA write, and no block may hold
anything but one whole version that was written to it (or zeroes).

Also a real server killed with SIGKILL mid-load: the image file holds every
acknowledged write (the page cache outlives the process) and no torn block.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import pytest

from pynbd.block import MemoryNode
from pynbd.client import NBDClient
from pynbd.server import Export, ExportTable, Server

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

BLOCK = 4096
BLOCKS = 96
SIZE = BLOCK * BLOCKS
WRITERS = 3


class PowerLossBackend(MemoryNode):
    """Writes stay volatile until flushed; ``crash_image`` is what survives."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.durable = bytearray(size)
        self.dirty: set[int] = set()

    def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
        super().pwrite_nowait(data, offset)
        self.dirty.update(range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1))
        return True

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        await asyncio.sleep(0)  # let other requests interleave
        self.pwrite_nowait(data, offset)
        if fua:
            self._persist(range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1))

    async def flush(self) -> None:
        await asyncio.sleep(0)
        self._persist(list(self.dirty))

    def _persist(self, blocks: Any) -> None:
        for index in blocks:
            buf = bytearray(BLOCK)
            MemoryNode.pread_nowait(self, memoryview(buf), index * BLOCK)
            self.durable[index * BLOCK:(index + 1) * BLOCK] = buf
            self.dirty.discard(index)

    def crash_image(self) -> bytes:
        return bytes(self.durable)


def tagged(write_id: int, block: int) -> bytes:
    head = struct.pack(">QQ", write_id, block)
    return head + bytes([write_id % 251 + 1]) * (BLOCK - len(head))


class Ledger:
    """What the clients know: acknowledged writes and completed flushes, in time order."""

    def __init__(self) -> None:
        self.clock = 0
        #: block -> [(write id, ack time, fua)] in the order the writes were made
        self.versions: dict[int, list[tuple[int, int, bool]]] = {b: [] for b in range(BLOCKS)}
        #: (send time, completion time) of each flush
        self.flushes: list[tuple[int, int]] = []

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def required(self, block: int, crash_time: int) -> int:
        """Index into versions[block] of the newest version that must survive, or -1."""
        need = -1
        for i, (_, acked, fua) in enumerate(self.versions[block]):
            if acked > crash_time:
                continue
            if fua or any(sent > acked and done <= crash_time for sent, done in self.flushes):
                need = i
        return need

    def check(self, image: bytes, crash_time: int) -> None:
        for block in range(BLOCKS):
            data = image[block * BLOCK:(block + 1) * BLOCK]
            versions = self.versions[block]
            need = self.required(block, crash_time)
            if data == bytes(BLOCK):
                assert need < 0, (f"block {block}: lost write #{versions[need][0]} "
                                  f"(crash at t={crash_time})")
                continue
            write_id, tagged_block = struct.unpack(">QQ", data[:16])
            assert tagged_block == block, f"block {block} holds block {tagged_block}'s data"
            assert data == tagged(write_id, block), f"block {block} is torn"
            ids = [v[0] for v in versions]
            assert write_id in ids, f"block {block} holds write #{write_id}, never made to it"
            assert ids.index(write_id) >= need, (
                f"block {block}: holds write #{write_id}, but write #{versions[need][0]} "
                f"was acknowledged and made durable before the crash at t={crash_time}")


def test_flush_on_any_connection_covers_every_connection(tmp_path: Path) -> None:
    async def body() -> None:
        rng = random.Random(20261127)
        backend = PowerLossBackend(SIZE)
        table = ExportTable()
        table.add(Export("", backend, multi_conn=True))
        server = Server(table, max_connections=0, persistent=True)
        path = str(tmp_path / "s.sock")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.listen()
        sock.setblocking(False)
        await server.start([sock])
        uri = f"nbd+unix:///?socket={path}"
        ledger = Ledger()
        crashes: list[tuple[int, bytes]] = []
        clients = [await NBDClient.connect(uri) for _ in range(WRITERS + 1)]
        stop = asyncio.Event()
        next_id = iter(range(1, 10**9))

        async def writer(n: int) -> None:
            client = clients[n]
            mine = [b for b in range(BLOCKS) if b % WRITERS == n]
            while not stop.is_set():
                batch = rng.sample(mine, 4)
                async def one(block: int) -> None:
                    write_id, fua = next(next_id), rng.random() < 0.2
                    await client.pwrite(tagged(write_id, block), block * BLOCK, fua=fua)
                    ledger.versions[block].append((write_id, ledger.tick(), fua))
                await asyncio.gather(*(one(b) for b in batch))

        async def flusher() -> None:
            while not stop.is_set():
                sent = ledger.tick()
                await clients[WRITERS].flush()
                ledger.flushes.append((sent, ledger.tick()))
                await asyncio.sleep(rng.random() * 0.003)

        async def crasher() -> None:
            for _ in range(40):
                await asyncio.sleep(rng.random() * 0.01)
                crashes.append((ledger.tick(), backend.crash_image()))
            stop.set()

        await asyncio.gather(*(writer(n) for n in range(WRITERS)), flusher(), crasher())
        for client in clients:
            await client.close()
        await server.close()
        sock.close()
        assert len(ledger.flushes) > 5
        assert sum(len(v) for v in ledger.versions.values()) > 200
        for crash_time, image in crashes:
            ledger.check(image, crash_time)
        # the crashes really tested something: many blocks had a write that must survive
        required = sum(ledger.required(b, t) >= 0 for t, _ in crashes for b in range(BLOCKS))
        assert required > 100

    asyncio.run(asyncio.wait_for(body(), 60))


def test_ledger_catches_a_lost_flushed_write() -> None:
    """The check itself can fail: a flushed write missing from the image is reported."""
    ledger = Ledger()
    ledger.versions[3].append((7, ledger.tick(), False))
    sent = ledger.tick()
    ledger.flushes.append((sent, ledger.tick()))
    image = bytearray(SIZE)
    with pytest.raises(AssertionError, match="lost write #7"):
        ledger.check(bytes(image), ledger.tick())
    image[3 * BLOCK:4 * BLOCK] = tagged(7, 3)
    ledger.check(bytes(image), ledger.tick())
    image[3 * BLOCK + 100] ^= 1
    with pytest.raises(AssertionError, match="torn"):
        ledger.check(bytes(image), ledger.tick())


def test_sigkill_mid_load_keeps_every_acknowledged_write(
        pynbd_server: Callable[..., Any], raw_image: Callable[[int], Path]) -> None:
    image = raw_image(SIZE)
    srv = pynbd_server("-e", "0", str(image))
    uri = srv.uri
    acked: dict[int, int] = {}

    async def load() -> None:
        clients = [await NBDClient.connect(uri) for _ in range(WRITERS)]
        write_ids = iter(range(1, 10**9))

        async def writer(n: int) -> None:
            client = clients[n]
            mine = [b for b in range(BLOCKS) if b % WRITERS == n]
            try:
                for round_ in range(10**6):
                    block = mine[round_ % len(mine)]
                    write_id = next(write_ids)
                    await client.pwrite(tagged(write_id, block), block * BLOCK)
                    acked[block] = write_id
            except Exception:  # the server was killed under us
                return

        async def killer() -> None:
            await asyncio.sleep(0.3)
            os.kill(srv.proc.pid, signal.SIGKILL)

        await asyncio.gather(*(writer(n) for n in range(WRITERS)), killer())

    asyncio.run(asyncio.wait_for(load(), 60))
    srv.proc.wait(10)
    time.sleep(0.1)
    assert len(acked) > BLOCKS // 2
    data = image.read_bytes()
    for block in range(BLOCKS):
        got = data[block * BLOCK:(block + 1) * BLOCK]
        if block not in acked:
            continue
        write_id, tagged_block = struct.unpack(">QQ", got[:16])
        assert tagged_block == block
        assert got == tagged(write_id, block), f"block {block} is torn"
        # the last acknowledged write, or one still in flight when the server died
        assert write_id >= acked[block], f"block {block} lost acknowledged write"
