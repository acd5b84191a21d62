"""The server: listeners, the connection limit, lifetime and orderly shutdown.

Rules of this module:
- The connection limit counts every accepted client, negotiating or not.  A
  client over the limit is not left hanging: it is answered at once, every
  export-selecting option refused with NBD_REP_ERR_POLICY and a message.
- Without ``persistent`` the server stops after its last client that finished
  negotiation leaves (qemu-nbd's rule).
- Shutdown stops accepting, lets in-flight requests finish and reply (for up
  to ``SHUTDOWN_GRACE``) and closes connections.  The storage is not the
  server's: whoever built the block graph closes it after (the graph's final
  flush and close, awaited with ``wait_at_stop``, are never cut short: they
  are what makes completed writes durable).  Storage that keeps any of these
  waiting is reported on stderr: the signal handlers exit at once on a
  second signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, TypeVar

from ..proto.constants import MAX_PAYLOAD
from ..proto.handshake import TlsMode
from .connection import Connection
from .metrics import Metered, counting

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .export import Export, ExportTable
    from .tls import TlsCredentials

log = logging.getLogger("pynbd.server")

#: how long a connection may take to finish its requests once shutdown begins
SHUTDOWN_GRACE = 30.0
#: a final flush or close still running after this long is reported, and again
#: every STOP_WAIT_REPEAT seconds (a Ceph cluster gone away never answers)
STOP_WAIT_REPORT = 2.0
STOP_WAIT_REPEAT = 30.0

T = TypeVar("T")


async def wait_at_stop(step: Awaitable[T], what: str) -> T:
    """Await one step of an orderly stop (``what``: "the final flush of ...")
    to the end, warning while the storage keeps it waiting."""
    task = asyncio.ensure_future(step)
    waited, timeout = 0.0, STOP_WAIT_REPORT
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if done:
                return task.result()
            waited += timeout
            log.warning("stopping: still waiting for %s after %.0f s (storage not "
                        "answering?); a signal now exits without waiting", what, waited)
            timeout = STOP_WAIT_REPEAT
    finally:
        task.cancel()  # only if we are cancelled ourselves: it is done otherwise


def handle_stop_signals(stopping: Callable[[], bool], request_stop: Callable[[], None]) -> None:
    """SIGINT and SIGTERM on the running loop: the first one starts an orderly stop
    (``request_stop``); one that comes once ``stopping()`` is true exits at once
    with status 1, so storage that never answers (an rbd cluster gone away) cannot
    keep the process forever (``wait_at_stop`` tells the user so)."""

    def on_signal() -> None:
        if not stopping():
            request_stop()
            return
        logging.getLogger("pynbd").error("second signal: exiting without waiting for the "
                                         "storage (final flush and close)")
        os._exit(1)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)


class MeteredConnection(Metered, Connection):
    """A ``Connection`` counting its requests in its export's ``ExportMetrics``
    (``server.metrics``): what a ``Server`` made while counting is on serves with."""


class Server:
    """Serves an ``ExportTable`` on one or more listening sockets.

    Each accepted socket is served by a ``Connection``, which sees the server
    only as its ``ConnectionHost`` (``server.host``): the bookkeeping methods
    ``admit`` ... ``client_finished`` and the handshake's settings below.

    Args:
        exports: the exports on offer; may change while the server runs.
        max_connections: simultaneous clients allowed; 0 means no limit.
        persistent: keep running after the last client leaves.
        handshake_limit: seconds a client may take to negotiate; 0 = no limit.
        max_payload: the largest READ/WRITE payload, advertised as the maximum
            block size (``--max-payload``); what a connection's requests hold in
            memory stays capped all the same (reading pauses beyond the cap).
        tls: X.509 credentials for STARTTLS.
        tls_mode: off, on (optional) or require; defaults to require when
            credentials are given, off otherwise.
    """

    #: the protocol class that serves each accepted socket (a test hook)
    connection_class: type[Connection] = Connection

    def __init__(self, exports: ExportTable, *, max_connections: int = 1,
                 persistent: bool = False, handshake_limit: float = 10.0,
                 max_payload: int = MAX_PAYLOAD, tls: TlsCredentials | None = None,
                 tls_mode: TlsMode | None = None) -> None:
        self.exports = exports
        #: TLS credentials; with them the mode defaults to "require" (as qemu-nbd)
        self.tls = tls
        self.tls_mode = tls_mode or (TlsMode.REQUIRE if tls else TlsMode.OFF)
        if self.tls_mode is not TlsMode.OFF and tls is None:
            raise ValueError("TLS mode on/require needs credentials")
        #: built once, so unusable credentials fail at start-up (raises TlsError)
        self.tls_context = tls.server_context() if tls is not None else None
        self.max_connections = max_connections
        self.persistent = persistent
        self.handshake_limit = handshake_limit
        self.max_payload = max_payload
        if counting():
            self.connection_class = MeteredConnection
        #: admitted connections (they count against ``max_connections``)
        self.connections: set[Connection] = set()
        #: every open connection, refused ones included
        self._all: set[Connection] = set()
        self._servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._negotiated = 0

    @property
    def multi_conn(self) -> bool:
        """Whether exports may advertise CAN_MULTI_CONN (more than one client allowed)."""
        return self.max_connections != 1

    async def start(self, sockets: list[socket.socket]) -> None:
        """Start accepting on already bound and listening sockets."""
        loop = asyncio.get_running_loop()

        def factory() -> Connection:
            return self.connection_class(self)

        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(factory, sock=sock)
            else:
                server = await loop.create_server(factory, sock=sock)
            self._servers.append(server)

    async def serve_until_stopped(self) -> None:
        """Run until ``request_stop`` is called, then close every connection
        (in-flight requests finish first); the caller then closes its graph."""
        await self._stop.wait()
        await self.close()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- connections ------------------------------------------------------------------

    def admit(self, conn: Connection) -> str | None:
        """Called by each new connection: ``None`` to serve it, or why it is refused."""
        self._all.add(conn)
        if self._stop.is_set():
            return "server is shutting down"
        if self.max_connections and len(self.connections) >= self.max_connections:
            return (f"server connection limit reached ({self.max_connections} "
                    "simultaneous clients)")
        self.connections.add(conn)
        return None

    def connection_gone(self, conn: Connection) -> None:
        self._all.discard(conn)
        self.connections.discard(conn)

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
        """Stop listening and end every connection (in-flight requests finish first,
        for up to SHUTDOWN_GRACE seconds; storage that keeps them waiting is reported)."""
        self._stop.set()
        for server in self._servers:
            server.close()
        conns = set(self._all)
        requests = sum(conn.in_flight for conn in conns)
        what = (f"{_plural(requests, 'request')} in flight to finish (at most "
                f"{SHUTDOWN_GRACE:g} s)")
        if not await wait_at_stop(self._end_connections(conns), what):
            log.warning("stopping: gave up after %g s on requests still in flight; "
                        "their clients get no reply", SHUTDOWN_GRACE)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()

    async def drop_clients(self, export: Export) -> None:
        """End every connection using ``export`` (QMP ``block-export-del`` hard mode)."""
        await self._end_connections({c for c in self._all if c.export is export})

    async def _end_connections(self, conns: set[Connection]) -> bool:
        """Shut ``conns`` down; False if some were still busy after SHUTDOWN_GRACE."""
        for conn in conns:
            conn.shutdown()
        if conns:
            _, busy = await asyncio.wait([conn.closed for conn in conns],
                                         timeout=SHUTDOWN_GRACE)
            return not busy
        return True


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
