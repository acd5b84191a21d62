"""A deliberately broken NBD server, for testing ``pynbd check``.

It is pynbd's own server, but every connection gets a write-back cache of its
own in front of the shared store, while the export still advertises
NBD_FLAG_CAN_MULTI_CONN.  A connection reads its own cached writes; other
connections see the store, which only learns of a connection's writes when
that same connection sends FLUSH (or writes with FUA, which writes through).
That is exactly the per-connection cache the multi-conn promise rules out.

With ``--cache off`` the same code path runs with the cache writing through at
once: a correct server (the control).

Run as a script (tests cannot import each other)::

    python tests/support/broken_server.py --socket PATH [--size 1M] [--cache on|off]

It prints the export's URI once it accepts connections and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import sys

from pynbd.block import MemoryNode, parse_size
from pynbd.block.node import Extent, ExtentFlags, Node
from pynbd.server import Export, ExportTable, Server
from pynbd.server.connection import Connection

SECTOR = 512


class PrivateCache(Node):
    """A write-back cache private to one connection, in front of the shared store."""

    driver = "x-private-cache"

    def __init__(self, store: Node, *, enabled: bool) -> None:
        self.store = store
        self.size = store.size
        self.capabilities = dataclasses.replace(store.capabilities, can_extents=False)
        self.enabled = enabled
        #: sector number -> its cached (dirty) content
        self.dirty: dict[int, bytes] = {}

    async def _sector(self, sector: int) -> bytes:
        cached = self.dirty.get(sector)
        if cached is not None:
            return cached
        buf = bytearray(SECTOR)
        await self.store.pread(memoryview(buf), sector * SECTOR)
        return bytes(buf)

    async def _put(self, data: bytes | bytearray | memoryview, offset: int) -> list[int]:
        """Put ``data`` in the cache; return the sectors it touched."""
        data = bytes(data)
        end = offset + len(data)
        touched = list(range(offset // SECTOR, (end + SECTOR - 1) // SECTOR))
        for sector in touched:
            start = sector * SECTOR
            lo, hi = max(offset, start), min(end, start + SECTOR)
            if lo == start and hi == start + SECTOR:
                self.dirty[sector] = data[lo - offset:hi - offset]
            else:
                old = bytearray(await self._sector(sector))
                old[lo - start:hi - start] = data[lo - offset:hi - offset]
                self.dirty[sector] = bytes(old)
        return touched

    async def _write_back(self, sectors: list[int]) -> None:
        # a sector leaves the cache only once the store has it (and unless it was
        # written again meanwhile): while the store's write is in flight, a read
        # on this connection must still see the connection's own write
        for sector in sorted(sectors):
            content = self.dirty.get(sector)
            if content is not None:
                await self.store.pwrite(content, sector * SECTOR)
                if self.dirty.get(sector) is content:
                    del self.dirty[sector]

    async def pread(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        # this connection's writes as the read begins: a write-back that lands
        # while the store is read below must not hide them
        cached = {sector: self.dirty.get(sector)
                  for sector in range(offset // SECTOR, (end + SECTOR - 1) // SECTOR)}
        await self.store.pread(buf, offset)
        for sector, content in cached.items():
            if content is not None:
                start = sector * SECTOR
                lo, hi = max(offset, start), min(end, start + SECTOR)
                buf[lo - offset:hi - offset] = content[lo - start:hi - start]

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        touched = await self._put(data, offset)
        if fua or not self.enabled:
            await self._write_back(touched)

    async def flush(self) -> None:
        await self._write_back(list(self.dirty))
        await self.store.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self.pwrite(bytes(length), offset, fua=fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length, ExtentFlags.DATA)]


class CachingConnection(Connection):
    """A connection whose export is wrapped in a cache of its own."""

    cache_enabled = True

    @property
    def export(self) -> Export | None:
        return self._private_export

    @export.setter
    def export(self, value: Export | None) -> None:
        if value is None:
            self._private_export: Export | None = None
            return
        cache = PrivateCache(value.node, enabled=self.cache_enabled)
        self._private_export = Export(value.name, cache, description=value.description,
                                      multi_conn=value.multi_conn)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--size", default="1M")
    parser.add_argument("--cache", choices=("on", "off"), default="on")
    args = parser.parse_args()
    size = parse_size(args.size)
    path = os.path.abspath(args.socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    sock.setblocking(False)
    CachingConnection.cache_enabled = args.cache == "on"

    async def serve() -> None:
        table = ExportTable()
        table.add(Export("", MemoryNode(size), multi_conn=True))
        server = Server(table, max_connections=0, persistent=True)
        server.connection_class = CachingConnection
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        await server.start([sock])
        print(f"nbd+unix:///?socket={path}", flush=True)
        await server.serve_until_stopped()

    try:
        asyncio.run(serve())
    finally:
        sock.close()
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
