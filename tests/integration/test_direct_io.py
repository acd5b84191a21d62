"""Backends that complete READ and WRITE by themselves (``start_read``/``start_write``).

librbd completes requests on its own threads; for such backends the server
starts a request with a completion callback instead of a task.  Here a memory
backend imitates that (its completions come from another thread, through the
loop's ``call_soon_threadsafe``), and pynbd's own client checks, over several
connections with many requests in flight: data, error replies (the connection
stays up), the FUA fallback to the task path, and that every request is
accounted for (the connection drains and closes cleanly).  Replies of
requests that complete together leave together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import random
import threading
from typing import TYPE_CHECKING

import pytest
from tests.support.inprocess import serving

from pynbd.block import FastPaths, MemoryNode
from pynbd.block.memory import INLINE_MAX
from pynbd.client import NBDClient, RequestError
from pynbd.server.connection import Connection
from pynbd.server.fastpath import DIRECT_BATCH_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from pynbd.block.node import ReadDone, WriteDone

MIB = 1 << 20
SIZE = 8 * MIB
TIMEOUT = 30.0


class ThreadedBackend(MemoryNode):
    """Completes reads and writes after a hop through another thread, like librbd's aio.

    The work itself runs on the loop's thread (the memory store is not thread
    safe); what matters is that completions arrive later, through
    ``call_soon_threadsafe``.  The inline path is refused, so that every plain
    READ and WRITE goes through ``start_read``/``start_write``.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        # like rbd: no block-status probe before large reads (so they come here too)
        self.capabilities = dataclasses.replace(self.capabilities, sparse_reads=False)
        self.started = {"read": 0, "write": 0}
        #: set once 8 writes have started
        self.in_flight = asyncio.Event()
        #: offsets whose direct requests fail with this errno
        self.fail: dict[int, int] = {}
        self.pwrite_calls = 0

    def fast_paths(self) -> FastPaths:
        """Like rbd: no inline or sendfile paths, only I/O that completes by itself."""
        return FastPaths(start_read=self.start_read, start_write=self.start_write)

    @staticmethod
    def _later(work: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=loop.call_soon_threadsafe, args=(work,), daemon=True).start()

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        self.started["read"] += 1

        def work() -> None:
            if offset in self.fail:
                done(None, OSError(self.fail[offset], "injected read error"))
                return
            buf = bytearray(length)
            self._read_now(memoryview(buf), offset)
            done(buf, None)

        self._later(work)
        return True

    def start_write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool,
                    done: WriteDone) -> bool:
        if fua:
            return False  # the server falls back to the task path (pwrite)
        self.started["write"] += 1
        if self.started["write"] >= 8:
            self.in_flight.set()

        def work() -> None:
            if offset in self.fail:
                done(OSError(self.fail[offset], "injected write error"))
                return
            # data is lent until done(): read it only now
            self._write_now(bytes(data), offset)
            done(None)

        self._later(work)
        return True

    # MemoryNode's own store, in pieces its nowait methods take at once (the
    # overrides below refuse on purpose)
    def _read_now(self, buf: memoryview, offset: int) -> None:
        for pos in range(0, len(buf), INLINE_MAX):
            piece = buf[pos:pos + INLINE_MAX]
            assert MemoryNode.pread_nowait(self, piece, offset + pos)

    def _write_now(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        for pos in range(0, len(view), INLINE_MAX):
            assert MemoryNode.pwrite_nowait(self, view[pos:pos + INLINE_MAX], offset + pos)

    # the task path (sparse reads, FUA writes)
    async def pread(self, buf: memoryview, offset: int) -> None:
        self._read_now(buf, offset)

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        self.pwrite_calls += 1
        self._write_now(data, offset)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        return False

    def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
        return False


def uri(path: str) -> str:
    return f"nbd+unix:///?socket={path}"


def test_many_direct_requests_over_several_connections(tmp_path: Path) -> None:
    backend = ThreadedBackend(SIZE)
    model = bytearray(SIZE)

    async def worker(target: str, seed: int) -> None:
        rng = random.Random(seed)
        async with await NBDClient.connect(target) as client:
            # each worker owns its own quarter: its reads must see its writes
            base = seed * (SIZE // 4)
            pending = []
            for i in range(64):
                length = rng.choice([512, 4096, 65536, 300_000])
                offset = base + rng.randrange(0, SIZE // 4 - length)
                data = rng.randbytes(length)
                model[offset:offset + length] = data
                await client.pwrite(data, offset)
                pending.append(client.pread(offset, length))
                if i % 8 == 7:
                    for got in await asyncio.gather(*pending):
                        assert len(got) > 0
                    pending = []
            await asyncio.gather(*pending)
            assert await client.pread(base, SIZE // 4) == bytes(model[base:base + SIZE // 4])

    async def body() -> None:
        async with serving(tmp_path, backend) as (_, path):
            await asyncio.wait_for(asyncio.gather(*(worker(uri(path), s) for s in range(4))),
                                   TIMEOUT)

    asyncio.run(body())
    assert backend.started["read"] == 4 * 64 + 4
    assert backend.started["write"] == 256
    assert backend.pwrite_calls == 0


def test_direct_errors_become_error_replies(tmp_path: Path) -> None:
    backend = ThreadedBackend(SIZE)
    backend.fail = {4096: errno.EIO, 8192: errno.ENOSPC}

    async def body() -> None:
        async with serving(tmp_path, backend) as (_, path), \
                await NBDClient.connect(uri(path)) as client:
            with pytest.raises(RequestError) as read_error:
                await client.pread(4096, 512)
            assert read_error.value.errno == errno.EIO
            with pytest.raises(RequestError) as write_error:
                await client.pwrite(b"x" * 512, 8192)
            assert write_error.value.errno == errno.ENOSPC
            # the connection is still up, and the data is untouched
            backend.fail.clear()
            await client.pwrite(b"y" * 512, 0)
            assert await client.pread(0, 1024) == b"y" * 512 + bytes(512)
            assert await client.pread(8192, 512) == bytes(512)

    asyncio.run(asyncio.wait_for(body(), TIMEOUT))


def test_fua_write_falls_back_to_the_task_path(tmp_path: Path) -> None:
    backend = ThreadedBackend(SIZE)

    async def body() -> None:
        async with serving(tmp_path, backend) as (_, path), \
                await NBDClient.connect(uri(path)) as client:
            await client.pwrite(b"f" * 4096, 0, fua=True)
            assert await client.pread(0, 4096) == b"f" * 4096

    asyncio.run(asyncio.wait_for(body(), TIMEOUT))
    assert backend.pwrite_calls == 1
    assert backend.started["write"] == 0


def test_server_stop_waits_for_direct_requests(tmp_path: Path) -> None:
    """Requests in flight when the server stops still get their replies."""
    backend = ThreadedBackend(SIZE)

    async def body() -> None:
        async with serving(tmp_path, backend) as (server, path):
            client = await NBDClient.connect(uri(path))
            writes = [asyncio.ensure_future(client.pwrite(bytes([i]) * 4096, i * 4096))
                      for i in range(1, 33)]
            await backend.in_flight.wait()  # some are in flight in the server
            await server.close()
            results = await asyncio.gather(*writes, return_exceptions=True)
            done = [r for r in results if r is None]
            assert len(done) >= 8, results  # in flight at the stop: answered
            for i, result in enumerate(results, start=1):
                if result is None:
                    assert MemoryNode.pread_nowait(backend, memoryview(buf := bytearray(4096)),
                                                      i * 4096)
                    assert buf == bytes([i]) * 4096

    asyncio.run(asyncio.wait_for(body(), TIMEOUT))


class BatchedBackend(ThreadedBackend):
    """Completes reads ``batch`` at a time, all from one loop callback, as librbd's
    completions reach the loop in batches."""

    def __init__(self, size: int, batch: int) -> None:
        super().__init__(size)
        self.batch = batch
        self.held: list[tuple[int, int, ReadDone]] = []

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        self.started["read"] += 1
        self.held.append((offset, length, done))
        if len(self.held) == self.batch:
            held, self.held = self.held, []
            asyncio.get_running_loop().call_soon(self._complete, held)
        return True

    def _complete(self, held: list[tuple[int, int, ReadDone]]) -> None:
        for offset, length, done in held:
            buf = bytearray(length)
            self._read_now(memoryview(buf), offset)
            done(buf, None)


@pytest.mark.parametrize(("batch", "length", "writes"), [
    (8, 4096, 1),        # completed together: one write for all 8 replies
    (8, 64 * 1024, 2),   # ... up to DIRECT_BATCH_BYTES a write
    (1, 4096, 8),        # one at a time: each reply at once
])
def test_replies_completed_together_leave_together(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   batch: int, length: int,
                                                   writes: int) -> None:
    backend = BatchedBackend(SIZE, batch)
    sent: list[int] = []  # bytes of each write of replies
    real_send = Connection._send

    def send(self: Connection, buffers: list[bytes | bytearray | memoryview]) -> None:
        sent.append(sum(len(buf) for buf in buffers))
        real_send(self, buffers)

    monkeypatch.setattr(Connection, "_send", send)

    async def body() -> None:
        async with serving(tmp_path, backend) as (_, path), \
                await NBDClient.connect(uri(path)) as client:
            backend._write_now(b"d" * (8 * length), 0)
            sent.clear()
            if batch == 1:
                got = [await client.pread(i * length, length) for i in range(8)]
            else:
                got = list(await asyncio.gather(
                    *(client.pread(i * length, length) for i in range(8))))
            assert got == [b"d" * length] * 8

    asyncio.run(asyncio.wait_for(body(), TIMEOUT))
    assert len(sent) == writes, sent
    assert sum(sent) >= 8 * length
    assert max(sent) < DIRECT_BATCH_BYTES + length + 64
