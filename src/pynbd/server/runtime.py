"""The server: listeners, the connection limit, lifetime and orderly shutdown.

Rules of this module:
- The connection limit counts every accepted client, negotiating or not.  A
  client over the limit is not left hanging: it is answered at once, every
  export-selecting option refused with NBD_REP_ERR_POLICY and a message.
- Without ``persistent`` the server stops after its last client that finished
  negotiation leaves (qemu-nbd's rule).
- Shutdown stops accepting, lets in-flight requests finish and reply, closes
  connections, flushes every backend once, then closes the backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

from .connection import Connection

if TYPE_CHECKING:
    from .export import Export, ExportTable

log = logging.getLogger("pynbd.server")

#: how long a connection may take to finish its requests once shutdown begins
SHUTDOWN_GRACE = 30.0


class Server:
    """Serves an ``ExportTable`` on one or more listening sockets.

    Args:
        exports: the exports on offer; may change while the server runs.
        max_connections: simultaneous clients allowed; 0 means no limit.
        persistent: keep running after the last client leaves.
        handshake_limit: seconds a client may take to negotiate; 0 = no limit.
    """

    def __init__(self, exports: ExportTable, *, max_connections: int = 1,
                 persistent: bool = False, handshake_limit: float = 10.0) -> None:
        self.exports = exports
        self.max_connections = max_connections
        self.persistent = persistent
        self.handshake_limit = handshake_limit
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._negotiated = 0

    @property
    def multi_conn(self) -> bool:
        """Whether exports may advertise CAN_MULTI_CONN (more than one client allowed)."""
        return self.max_connections != 1

    async def start(self, sockets: list[socket.socket]) -> None:
        """Start accepting on already bound and listening sockets."""
        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(
                    self._accept, sock=sock, limit=1 << 20)
            else:
                server = await asyncio.start_server(self._accept, sock=sock, limit=1 << 20)
            self._servers.append(server)

    async def serve_until_stopped(self) -> None:
        """Run until ``request_stop`` is called, then shut down in order.

        Used by the plain ``pynbd IMAGE`` command, which owns its backends:
        after the connections are gone every backend is flushed and closed.
        """
        await self._stop.wait()
        await self.close()
        for backend in self.exports.backends():
            try:
                if backend.capabilities.can_flush and backend.capabilities.can_write:
                    await backend.flush()
            except OSError as err:
                log.error("final flush failed: %s", err)
            await backend.close()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- connections ------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = _describe_peer(writer.get_extra_info("peername"))
        refusal = None
        if self._stop.is_set():
            refusal = "server is shutting down"
        elif self.max_connections and len(self.connections) >= self.max_connections:
            refusal = (f"server connection limit reached ({self.max_connections} "
                       "simultaneous clients)")
        conn = Connection(self, reader, writer, peer)
        if refusal is None:
            self.connections.add(conn)
        log.info("%s: connected%s", peer, f" (refused: {refusal})" if refusal else "")
        task = conn.task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run(refusal)
        finally:
            self.connections.discard(conn)
            if task is not None:
                self._tasks.discard(task)
            log.info("%s: disconnected", peer)

    def client_started(self, conn: Connection) -> None:
        """A connection finished negotiating and entered transmission."""
        self._negotiated += 1
        if conn.export is not None:
            conn.export.clients += 1

    def client_finished(self, conn: Connection) -> None:
        self._negotiated -= 1
        if conn.export is not None:
            conn.export.clients -= 1
        if self._negotiated == 0 and not self.persistent:
            self.request_stop()

    # -- shutdown ----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop listening and end every connection (in-flight requests finish first)."""
        self._stop.set()
        for server in self._servers:
            server.close()
        await self._end_connections(set(self._tasks))
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()

    async def drop_clients(self, export: Export) -> None:
        """End every connection using ``export`` (QMP ``block-export-del`` hard mode)."""
        await self._end_connections({conn.task for conn in self.connections
                                     if conn.export is export and conn.task is not None})

    async def _end_connections(self, tasks: set[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)


def _describe_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unix-client"
