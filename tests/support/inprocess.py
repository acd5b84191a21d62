"""In-process servers for integration tests: a ``Server`` in the test's own loop.

Import as ``from tests.support.inprocess import open_raw, serving``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from pynbd.proto import wire
from pynbd.proto.constants import IHAVEOPT, ClientFlag, Opt, Rep
from pynbd.server import Export, ExportTable, Server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from pynbd.block import Node


@asynccontextmanager
async def serving(tmp_path: Path, backend: Node,
                  **server_args: Any) -> AsyncIterator[tuple[Server, str]]:
    """Serve ``backend`` as the default export (multi-conn, no connection limit) on a
    Unix socket in ``tmp_path``; yields the server and the socket's path."""
    table = ExportTable()
    table.add(Export("", backend, multi_conn=True))
    server = Server(table, max_connections=0, persistent=True, **server_args)
    path = str(tmp_path / "nbd.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    sock.setblocking(False)
    await server.start([sock])
    try:
        yield server, path
    finally:
        await server.close()
        sock.close()


async def open_raw(path: str, *, limit: int = 1 << 16,
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and negotiate the default export with GO (fixed newstyle, no
    structured replies), for tests that speak the wire protocol themselves."""
    reader, writer = await asyncio.open_unix_connection(path, limit=limit)
    await reader.readexactly(wire.GREETING.size)
    writer.write(wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))
    data = struct.pack(">IH", 0, 0)
    writer.write(wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, len(data)) + data)
    while True:
        _, _, rep, length = wire.OPTION_REPLY_HEADER.unpack(
            await reader.readexactly(wire.OPTION_REPLY_HEADER.size))
        await reader.readexactly(length)
        if rep == Rep.ACK:
            return reader, writer
        assert rep == Rep.INFO, f"GO failed: {rep:#x}"
