"""Extended headers over a real socket: every wire rule, against the whole shell.

A server runs in the test's own event loop on a Unix socket, serving a sparse
8 GiB file (so ranges above 4 GiB are real), and a raw client negotiates
NBD_OPT_EXTENDED_HEADERS and speaks 32-byte requests; every reply is parsed
as extended chunks, whose offset field must be the request's.  The inline,
sendfile, sparse-read and task paths all answer here.
"""

from __future__ import annotations

import asyncio
import os
import struct
from contextlib import suppress
from typing import TYPE_CHECKING

import pytest
from tests.support.inprocess import serving

from pynbd.block import FileNode
from pynbd.client import NBDClient
from pynbd.proto import wire
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    REQUEST_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from pynbd.proto.errors import LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

TIMEOUT = 20.0
GiB = 1 << 30
SIZE = 8 * GiB
PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
#: one parsed chunk: (flags, type, cookie, offset, payload)
Chunk = tuple[int, int, int, int, bytes]


class ExtClient:
    """A raw client that negotiates extended headers and base:allocation."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.flags = 0

    @classmethod
    async def connect(cls, path: str) -> ExtClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 26)
        client = cls(reader, writer)
        await reader.readexactly(wire.GREETING.size)
        writer.write(wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE
                                            | ClientFlag.C_NO_ZEROES))
        assert await client.option(Opt.EXTENDED_HEADERS) == [(Rep.ACK, b"")]
        query = BASE_ALLOCATION.encode()
        got = await client.option(Opt.SET_META_CONTEXT, struct.pack(">II", 0, 1)
                                  + struct.pack(">I", len(query)) + query)
        assert got[0] == (Rep.META_CONTEXT, struct.pack(">I", 0) + query)
        for rep, data in await client.option(Opt.GO, struct.pack(">IH", 0, 0)):
            if rep == Rep.INFO and struct.unpack_from(">H", data)[0] == 0:
                _, size, client.flags = wire.INFO_EXPORT.unpack(data)
                assert size == SIZE
        return client

    async def option(self, code: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; its replies up to the ACK or an error."""
        self.writer.write(wire.OPTION_HEADER.pack(IHAVEOPT, code, len(data)) + data)
        got = []
        while True:
            _, opt, rep, length = wire.OPTION_REPLY_HEADER.unpack(
                await self.reader.readexactly(wire.OPTION_REPLY_HEADER.size))
            assert opt == code
            got.append((rep, await self.reader.readexactly(length)))
            if rep == Rep.ACK or rep & (1 << 31):
                return got

    def send(self, cmd: int, offset: int = 0, length: int = 0, *, cookie: int = 1,
             flags: int = 0, payload: bytes = b"", magic: int = EXTENDED_REQUEST_MAGIC,
             ) -> None:
        self.writer.write(wire.EXTENDED_REQUEST.pack(magic, flags, cmd, cookie, offset,
                                                     length) + payload)

    async def chunk(self) -> Chunk:
        magic, flags, kind, cookie, offset, length = wire.EXTENDED_CHUNK.unpack(
            await self.reader.readexactly(wire.EXTENDED_CHUNK.size))
        assert magic == EXTENDED_REPLY_MAGIC
        return flags, kind, cookie, offset, await self.reader.readexactly(length)

    async def reply(self) -> list[Chunk]:
        """Chunks up to the one with DONE (replies here never interleave)."""
        chunks = [await self.chunk()]
        while not chunks[-1][0] & ReplyFlag.DONE:
            chunks.append(await self.chunk())
        return chunks

    async def request(self, cmd: int, offset: int = 0, length: int = 0, *, cookie: int = 1,
                      flags: int = 0, payload: bytes = b"") -> list[Chunk]:
        self.send(cmd, offset, length, cookie=cookie, flags=flags, payload=payload)
        chunks = await self.reply()
        for chunk in chunks:
            assert chunk[2] == cookie
            assert chunk[3] == offset  # every chunk names the request's offset
        return chunks

    async def ok(self, cmd: int, offset: int = 0, length: int = 0, *, cookie: int = 1,
                 flags: int = 0, payload: bytes = b"") -> None:
        assert await self.request(cmd, offset, length, cookie=cookie, flags=flags,
                                  payload=payload) == [
            (ReplyFlag.DONE, ReplyType.NONE, cookie, offset, b"")]

    async def error(self, cmd: int, offset: int = 0, length: int = 0, *,
                    payload: bytes = b"", flags: int = 0) -> int:
        chunks = await self.request(cmd, offset, length, payload=payload, flags=flags)
        assert len(chunks) == 1
        assert chunks[0][1] == ReplyType.ERROR
        return int(struct.unpack_from(">I", chunks[0][4])[0])

    async def write(self, offset: int, data: bytes, *, flags: int = 0) -> None:
        await self.ok(Cmd.WRITE, offset, len(data), flags=flags | PAYLOAD_LEN, payload=data)

    async def read(self, offset: int, length: int, *, flags: int = 0) -> bytes:
        """The data of a successful read, holes filled in."""
        out = bytearray(length)
        covered = 0
        for _, kind, _, _, payload in await self.request(Cmd.READ, offset, length,
                                                         flags=flags):
            if kind == ReplyType.OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", payload)
                out[at - offset:at - offset + len(payload) - 8] = payload[8:]
                covered += len(payload) - 8
            else:
                assert kind == ReplyType.OFFSET_HOLE
                covered += struct.unpack(">QI", payload)[1]
        assert covered == length
        return bytes(out)

    async def block_status(self, offset: int, length: int, *,
                           flags: int = 0) -> list[tuple[int, int]]:
        chunks = await self.request(Cmd.BLOCK_STATUS, offset, length, flags=flags)
        assert len(chunks) == 1
        _, kind, _, _, payload = chunks[0]
        assert kind == ReplyType.BLOCK_STATUS_EXT
        context, count = struct.unpack_from(">II", payload)
        assert context == 0
        assert len(payload) == 8 + 16 * count
        return [struct.unpack_from(">QQ", payload, 8 + 16 * i) for i in range(count)]

    async def closed(self) -> bool:
        """The server hung up (after any bytes still in flight)."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


def run(tmp_path: Path, test: Callable[[ExtClient], Awaitable[None]]) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)

    async def main() -> None:
        async with asyncio.timeout(TIMEOUT), serving(
                tmp_path, FileNode(str(image), discard=True)) as (_, path):
            client = await ExtClient.connect(path)
            try:
                await test(client)
            finally:
                await client.close()

    asyncio.run(main())


def test_flags_and_a_write_read_round_trip(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        assert c.flags & TransmissionFlag.SEND_DF
        assert c.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD  # a context was selected
        data = os.urandom(4096)
        await c.write(5 * GiB, data)
        assert await c.read(5 * GiB, 4096) == data
        await c.write(5 * GiB + 4096, data, flags=CmdFlag.FUA)
        await c.ok(Cmd.FLUSH)
        assert await c.read(5 * GiB, 8192, flags=CmdFlag.DF) == data * 2
    run(tmp_path, test)


def test_large_writes_and_reads_every_path(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        big = os.urandom(3 * 1024 * 1024 + 512)  # a direct payload, then a task read
        await c.write(GiB, big)
        assert await c.read(GiB, len(big)) == big
        # 256 KiB: inline or sendfile, with a hole after it for the sparse path
        assert await c.read(GiB + len(big) - 512, 256 * 1024) == big[-512:] + bytes(
            256 * 1024 - 512)
        chunks = await c.request(Cmd.READ, 6 * GiB, 1024 * 1024)
        assert [ch[1] for ch in chunks] == [ReplyType.OFFSET_HOLE]
    run(tmp_path, test)


def test_ranges_above_4_gib(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        await c.write(0, b"x" * 4096)
        await c.write(7 * GiB, b"y" * 4096)
        extents = await c.block_status(0, SIZE)
        assert extents[0] == (4096, 0)
        assert extents[1] == (7 * GiB - 4096, STATE_HOLE | STATE_ZERO)  # one 64-bit extent
        assert sum(length for length, _ in extents) == SIZE
        assert await c.block_status(4096, SIZE - 4096, flags=CmdFlag.REQ_ONE) == [
            (7 * GiB - 4096, STATE_HOLE | STATE_ZERO)]
        await c.ok(Cmd.CACHE, 0, SIZE)
        await c.ok(Cmd.WRITE_ZEROES, 0, SIZE - 4096)
        assert await c.read(7 * GiB, 4096) == bytes(4096)
        assert await c.read(SIZE - 4096, 4096) == bytes(4096)
        await c.write(SIZE - 4096, b"z" * 4096)
        await c.ok(Cmd.TRIM, 0, SIZE)
        assert (await c.block_status(0, SIZE))[0][0] > 4 * GiB
    run(tmp_path, test)


def test_block_status_payload_form(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        await c.write(0, b"x" * 4096)
        payload = struct.pack(">QI", SIZE, 0)
        chunks = await c.request(Cmd.BLOCK_STATUS, 0, len(payload), flags=PAYLOAD_LEN,
                                 payload=payload)
        assert [ch[1] for ch in chunks] == [ReplyType.BLOCK_STATUS_EXT]
        _, count = struct.unpack_from(">II", chunks[0][4])
        extents = [struct.unpack_from(">QQ", chunks[0][4], 8 + 16 * i) for i in range(count)]
        assert extents == [(4096, 0), (SIZE - 4096, STATE_HOLE | STATE_ZERO)]
        bad = struct.pack(">QII", SIZE, 0, 0)
        assert await c.error(Cmd.BLOCK_STATUS, 0, len(bad), flags=PAYLOAD_LEN,
                             payload=bad) == Errno.EINVAL
        assert await c.block_status(0, 4096) == [(4096, 0)]  # still in step
    run(tmp_path, test)


def test_zero_length_ranges(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        for cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE):
            await c.ok(cmd, 4096, 0)
        await c.write(4096, b"")
        assert await c.error(Cmd.BLOCK_STATUS, 0, 0) == Errno.EINVAL
    run(tmp_path, test)


def test_invalid_requests_get_error_chunks_and_the_stream_goes_on(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        assert await c.error(Cmd.TRIM, 0, 512, flags=PAYLOAD_LEN,
                             payload=b"p" * 512) == Errno.EINVAL
        assert await c.error(Cmd.BLOCK_STATUS, 0, 512, flags=PAYLOAD_LEN,
                             payload=bytes(512)) == Errno.EINVAL
        assert await c.error(Cmd.READ, 0, 64 * 1024 * 1024) == Errno.EINVAL
        assert await c.error(Cmd.READ, 0, 64 * 1024 * 1024,
                             flags=CmdFlag.DF) == Errno.EOVERFLOW
        assert await c.error(Cmd.WRITE_ZEROES, SIZE - 512, 1024) == Errno.ENOSPC
        assert await c.error(Cmd.TRIM, SIZE, 1 << 40) == Errno.EINVAL
        assert await c.error(99, 0, 0) == Errno.EINVAL
        await c.write(0, b"still in step")
        assert await c.read(0, 13) == b"still in step"
    run(tmp_path, test)


def test_a_write_without_payload_len_still_carries_its_payload(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        await c.ok(Cmd.WRITE, 8192, 5, payload=b"qemu!")  # as qemu 10 sends them
        assert await c.read(8192, 5) == b"qemu!"
    run(tmp_path, test)


def test_a_compact_request_ends_the_connection(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        c.writer.write(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 512))
        assert await c.reader.read(65536) == b""
    run(tmp_path, test)


def test_a_payload_over_the_limit_is_refused_then_the_connection_ends(
        tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        c.send(Cmd.WRITE, 4096, 64 * 1024 * 1024, cookie=5, flags=PAYLOAD_LEN)
        flags, kind, cookie, offset, payload = await c.chunk()
        assert (flags, kind, cookie, offset) == (ReplyFlag.DONE, ReplyType.ERROR, 5, 4096)
        assert struct.unpack_from(">I", payload)[0] == Errno.EINVAL
        assert await c.reader.read(65536) == b""
    run(tmp_path, test)


def test_pipelined_requests_all_get_their_offsets(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        for i in range(64):
            c.send(Cmd.WRITE, i * 4096, 4096, cookie=i, flags=PAYLOAD_LEN,
                   payload=bytes([i]) * 4096)
        seen = {}
        for _ in range(64):
            (chunk,) = await c.reply()
            seen[chunk[2]] = chunk[3]
        assert seen == {i: i * 4096 for i in range(64)}
        for i in range(64):
            c.send(Cmd.READ, i * 4096, 4096, cookie=100 + i)
        for _ in range(64):
            (chunk,) = await c.reply()
            i = chunk[2] - 100
            assert chunk[3] == i * 4096
            assert chunk[4] == struct.pack(">Q", i * 4096) + bytes([i]) * 4096
    run(tmp_path, test)


def test_disc_closes(tmp_path: Path) -> None:
    async def test(c: ExtClient) -> None:
        c.send(Cmd.DISC)
        assert await c.reader.read(65536) == b""
    run(tmp_path, test)


# -- pynbd's own client (what ``pynbd check`` uses) ------------------------------------------


def test_pynbd_client_negotiates_extended_headers(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)

    async def main() -> None:
        async with asyncio.timeout(TIMEOUT), serving(
                tmp_path, FileNode(str(image), discard=True)) as (_, path):
            uri = f"nbd+unix:///?socket={path}"
            async with await NBDClient.connect(uri) as client:
                assert client.extended
                assert client.structured
                await client.pwrite(b"a" * 4096, 6 * GiB)
                assert await client.pread(6 * GiB, 4096) == b"a" * 4096
                extents = await client.block_status(0, SIZE)
                assert extents[0] == (6 * GiB, STATE_HOLE | STATE_ZERO)
                await client.zero(0, SIZE)
                await client.trim(0, SIZE)
                assert await client.pread(6 * GiB, 4096) == bytes(4096)
            async with await NBDClient.connect(uri, extended_headers=False) as client:
                assert not client.extended
                assert client.structured
                assert (await client.block_status(0, GiB))[0] == (GiB, STATE_HOLE | STATE_ZERO)
                with pytest.raises(LocalProtocolError, match="extended"):
                    await client.trim(0, SIZE)

    asyncio.run(main())
