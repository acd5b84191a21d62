"""The asyncio shell in-process: shutdown order, concurrency and slow storage.

A server runs in the test's own event loop on a Unix socket, over backends the
test controls (a memory disk whose calls can be held back), and a small raw
client speaks the wire protocol, so the exact order of replies is visible.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import TYPE_CHECKING

from tests.support.inprocess import open_raw, serving

from pynbd.block import MemoryNode
from pynbd.proto import wire
from pynbd.proto.constants import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    Errno,
)
from pynbd.server import runtime

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    import pytest

TIMEOUT = 10.0


class HeldBackend(MemoryNode):
    """A memory disk whose reads and writes wait until the test releases them.

    Calls at offsets in ``slow`` go through the async path and block on
    ``gate``; everything else is answered at once.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.slow: set[int] = set()
        self.started = asyncio.Event()

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        return offset not in self.slow and super().pread_nowait(buf, offset)

    def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
        return offset not in self.slow and super().pwrite_nowait(data, offset)

    async def _hold(self, offset: int) -> None:
        if offset in self.slow:
            self.started.set()
            await self.gate.wait()

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._hold(offset)
        MemoryNode.pread_nowait(self, buf, offset)

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        await self._hold(offset)
        MemoryNode.pwrite_nowait(self, data, offset)


class RawClient:
    """Just enough of an NBD client: GO on the default export, simple replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        return cls(*await open_raw(path))

    def send(self, cmd: Cmd, cookie: int, offset: int, length: int,
             payload: bytes = b"") -> None:
        self.writer.write(wire.REQUEST.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length)
                          + payload)

    async def reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data) of the next simple reply."""
        magic, error, cookie = wire.SIMPLE_REPLY.unpack(
            await self.reader.readexactly(wire.SIMPLE_REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC
        data = await self.reader.readexactly(data_length) if data_length and not error else b""
        return cookie, error, data

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TIMEOUT):
            await test()

    asyncio.run(bounded())


def test_shutdown_finishes_in_flight_and_refuses_new_requests(tmp_path: Path) -> None:
    """SIGTERM's path: the slow write completes and replies, a later read gets
    ESHUTDOWN, then the server closes the connection; the write is in the store."""

    async def body() -> None:
        backend = HeldBackend(1 << 20)
        backend.slow.add(4096)
        async with serving(tmp_path, backend) as (server, path):
            client = await RawClient.connect(path)
            client.send(Cmd.WRITE, 1, 4096, 512, b"\xab" * 512)
            await backend.started.wait()
            closing = asyncio.create_task(server.close())
            await asyncio.sleep(0.05)
            client.send(Cmd.READ, 2, 0, 512)
            assert await client.reply() == (2, Errno.ESHUTDOWN, b"")
            assert not closing.done(), "closed before the write in flight finished"
            backend.gate.set()
            assert await client.reply() == (1, 0, b"")
            await closing
            assert await client.reader.read() == b"", "connection not closed"
            buf = bytearray(512)
            await backend.pread(memoryview(buf), 4096)
            assert bytes(buf) == b"\xab" * 512
            await client.close()

    run(body)


def test_shutdown_reports_requests_storage_keeps_and_gives_up_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Storage that never answers (a Ceph cluster gone away) does not make the
    stop silent: while requests are in flight it is reported, and after
    SHUTDOWN_GRACE the server stops waiting for them."""
    monkeypatch.setattr(runtime, "STOP_WAIT_REPORT", 0.05)
    monkeypatch.setattr(runtime, "SHUTDOWN_GRACE", 0.4)

    async def body() -> None:
        backend = HeldBackend(1 << 20)
        backend.slow.update({0, 4096})
        async with serving(tmp_path, backend) as (server, path):
            client = await RawClient.connect(path)
            client.send(Cmd.READ, 1, 0, 512)
            client.send(Cmd.WRITE, 2, 4096, 512, b"\x01" * 512)
            await backend.started.wait()
            await asyncio.sleep(0.05)
            assert [conn.in_flight for conn in server.connections] == [2]
            started = asyncio.get_running_loop().time()
            await server.close()
            assert asyncio.get_running_loop().time() - started >= 0.4
            backend.gate.set()
            await client.close()

    with caplog.at_level(logging.WARNING, logger="pynbd.server"):
        run(body)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("stopping: still waiting for 2 requests in flight to finish "
                            "(at most 0.4 s) after 0 s (storage not answering?)")
               for m in messages), messages
    assert ("stopping: gave up after 0.4 s on requests still in flight; their clients get "
            "no reply") in messages


def test_a_quick_shutdown_says_nothing(tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with serving(tmp_path, MemoryNode(1 << 20)) as (server, path):
            client = await RawClient.connect(path)
            client.send(Cmd.READ, 1, 0, 512)
            assert await client.reply(512) == (1, 0, bytes(512))
            await server.close()
            await client.close()

    with caplog.at_level(logging.WARNING, logger="pynbd.server"):
        run(body)
    assert [r.getMessage() for r in caplog.records] == []


def test_slow_storage_does_not_stall_other_connections(tmp_path: Path) -> None:
    """While one connection's reads wait on slow storage, another's keep completing."""

    async def body() -> None:
        backend = HeldBackend(1 << 20)
        backend.slow.update(range(0, 64 * 4096, 4096))
        async with serving(tmp_path, backend) as (_, path):
            slow = await RawClient.connect(path)
            for i in range(64):
                slow.send(Cmd.READ, i, i * 4096, 4096)
            await backend.started.wait()
            fast = await RawClient.connect(path)
            fast.send(Cmd.WRITE, 1000, 512 * 1024, 4096, b"\x5a" * 4096)
            assert await fast.reply() == (1000, 0, b"")
            for i in range(200):
                fast.send(Cmd.READ, i, 512 * 1024, 4096)
                cookie, error, data = await fast.reply(4096)
                assert (cookie, error, data) == (i, 0, b"\x5a" * 4096)
            backend.gate.set()
            replies = {(await slow.reply(4096))[0] for _ in range(64)}
            assert replies == set(range(64))
            await slow.close()
            await fast.close()

    run(body)


def test_replies_may_overtake_a_slow_request(tmp_path: Path) -> None:
    """Requests on one connection run concurrently: a fast read is answered
    while an earlier slow read on the same connection is still waiting."""

    async def body() -> None:
        backend = HeldBackend(1 << 20)
        backend.slow.add(0)
        async with serving(tmp_path, backend) as (_, path):
            client = await RawClient.connect(path)
            client.send(Cmd.READ, 1, 0, 4096)
            client.send(Cmd.READ, 2, 8192, 4096)
            assert (await client.reply(4096))[0] == 2
            backend.gate.set()
            assert (await client.reply(4096))[0] == 1
            await client.close()

    run(body)


def test_handshake_limit_drops_a_silent_client(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, MemoryNode(1 << 20),
                           handshake_limit=0.3) as (_server, path):
            reader, writer = await asyncio.open_unix_connection(path)
            await reader.readexactly(wire.GREETING.size)
            assert await reader.read() == b"", "silent client was not dropped"
            writer.close()
            client = await RawClient.connect(path)  # others are unaffected
            client.send(Cmd.READ, 7, 0, 512)
            assert await client.reply(512) == (7, 0, bytes(512))
            await client.close()

    run(body)
