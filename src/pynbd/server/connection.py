"""One client connection: an ``asyncio.BufferedProtocol`` that drives the protocol cores.

This module owns the connection's lifecycle and flow control: accepting,
the handshake, STARTTLS, the start of transmission, the loop that takes
requests as they are parsed (``_process``), pausing and resuming reading,
counting requests in flight, shutdown and abort.  The other parts of a
``Connection`` are mixins from modules of their own: the command handlers
(``server.handlers``), the inline, direct and sendfile paths
(``server.fastpath``) and the socket writer (``server.writer``); the state
they share is declared in ``server.connstate``.  The server that accepted the
connection is seen only through ``server.host.ConnectionHost``.

Rules of the connection (all its parts):
- Protocol decisions live in ``pynbd.proto``; this module only moves bytes,
  calls the export's node and writes the replies the core builds.
- Bytes are received straight into buffers the transmission core owns
  (``get_buffer``), so a large WRITE payload lands where the request carries
  it, with no copy.
- Every request parsed from a received chunk is handled before the next
  chunk is read.  Cheap requests (a READ the node can serve without
  blocking, a plain WRITE the node can take without blocking) are answered
  inline with no task at all; a READ or WRITE the node completes by
  itself (``start_read``/``start_write``: librbd's aio) is started with a
  completion callback, also without a task; every other request runs as a
  task.  Replies produced while handling one chunk leave in one write.
- At most ``MAX_IN_FLIGHT`` requests in flight per connection; reading pauses
  while that many are outstanding, and while the socket's send buffer is full.
- Each reply is written whole with one ``transport.write``, so replies never
  interleave; they may leave in any order.
- A failing request becomes an error reply; it never ends the connection.
  Only ``ProtocolError`` does.
- On disconnect or shutdown, requests already in flight finish and get their
  replies before the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING, cast

from ..proto.constants import Cmd, Errno
from ..proto.errors import ProtocolError
from ..proto.events import (
    NEED_DATA,
    Disconnect,
    HandshakeClosed,
    HandshakeDone,
    InvalidRequest,
    Request,
    StartTLS,
)
from ..proto.extended import ExtendedTransmission
from ..proto.handshake import ServerHandshake
from ..proto.negotiated import BlockSizes
from ..proto.transmission import ServerTransmission
from .connstate import READ, WRITE, ConnectionStats
from .fastpath import FastPath
from .handlers import Handlers
from .metrics import handshake_failed
from .writer import Writer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..block.node import Data, ReadDone, WriteDone
    from ..proto.wire import Buffer
    from .export import Export
    from .host import ConnectionHost

log = logging.getLogger("pynbd.connection")

#: requests one connection may have running as tasks before we stop reading
MAX_IN_FLIGHT = 64
#: READ/WRITE payload bytes those tasks may hold before we stop reading
MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024
#: replies handled inline leave in batches of about this many bytes
REPLY_BATCH_BYTES = 4 * 1024 * 1024
#: socket buffer sizes we ask for, so a 1 MiB reply usually leaves in one send
SOCKET_BUFFER = 4 * 1024 * 1024
#: how long closing a TLS connection waits for the client's close_notify (asyncio's
#: default, 30 s, held up every server stop while an idle TLS client was connected)
TLS_SHUTDOWN_TIMEOUT = 2.0
#: receive buffer for the handshake (options are short; longer ones arrive in pieces)
HANDSHAKE_BUFFER = 4096
#: ... one for every connection: ``buffer_updated`` copies what lands there into
#: the handshake core at once, and asyncio calls ``get_buffer`` and
#: ``buffer_updated`` back to back for one connection at a time
_HANDSHAKE_BUFFER = bytearray(HANDSHAKE_BUFFER)


class Connection(FastPath, Handlers, Writer, asyncio.BufferedProtocol):
    """Serves one accepted client until it leaves or the server stops.

    Args:
        host: the server that accepted it (``server.runtime.Server``).
    """

    def __init__(self, host: ConnectionHost) -> None:
        self.host = host
        self.peer = "unknown"
        self.export: Export | None = None
        #: the fast paths the export's node offers, fixed once transmission starts
        #: (``FastPath._choose_fast_paths``): reads and writes inline, I/O
        #: completing by itself, own-buffer reads, and structured reads probed for
        #: holes (``_sparse`` decides per request)
        self._pread_nowait: Callable[[memoryview, int], bool] | None = None
        self._pwrite_nowait: Callable[[Data, int], bool] | None = None
        self._start_read: Callable[[int, int, ReadDone], bool] | None = None
        self._start_write: Callable[[Data, int, bool, WriteDone], bool] | None = None
        self._own_read: Callable[[int, int], Awaitable[bytes | bytearray]] | None = None
        self._direct_io = False
        self._sparse_reads = False
        self.stats = ConnectionStats()
        self.refusal: str | None = None
        self._transport: asyncio.Transport | None = None
        self._handshake: ServerHandshake | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Future[None] | None = None
        self._core: ServerTransmission | None = None
        #: the plain socket's fd replies may be written to directly, or -1 (TLS, or
        #: a transport without a socket)
        self._fd = -1
        #: where large reads may be sent from with sendfile (the node offers it, and
        #: the socket is plain); None: never
        self._sendfile_source: Callable[[int, int, bool], tuple[int, int] | None] | None = None
        #: where handshake bytes are received (the transmission core has its own)
        self._handshake_buf = _HANDSHAKE_BUFFER
        #: requests in flight (tasks, or tokens of direct ones), with the payload bytes
        #: each holds
        self._tasks: dict[object, int] = {}
        self._inflight_bytes = 0
        #: reply bytes gathered by the current ``_process`` call
        self._out_bytes = 0
        #: replies of direct requests waiting for ``_flush_direct``, with their
        #: tokens (still counted in flight) and size
        self._direct_out: list[Buffer] = []
        self._direct_tokens: list[object] = []
        self._direct_bytes = 0
        #: reading stopped: too many tasks, a full send buffer, or closing
        self._paused_for_tasks = False
        self._paused_for_writes = False
        #: no more requests will be read (DISC, EOF, end of shutdown, protocol error)
        self._closing = False
        #: shutdown began: new requests get ESHUTDOWN until the in-flight ones finish
        self._shutting_down = False
        self._lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handlers = {
            Cmd.READ: self._do_read,
            Cmd.WRITE: self._do_write,
            Cmd.FLUSH: self._do_flush,
            Cmd.TRIM: self._do_trim,
            Cmd.WRITE_ZEROES: self._do_write_zeroes,
            Cmd.CACHE: self._do_cache,
            Cmd.BLOCK_STATUS: self._do_block_status,
        }

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses)
        self._transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):  # best effort: the kernel caps it
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.peer = _describe_peer(transport.get_extra_info("peername"))
        self.refusal = self.host.admit(self)
        log.info("%s: connected%s", self.peer,
                 f" (refused: {self.refusal})" if self.refusal else "")
        # the maximum block size it advertises is the transmission core's payload
        # limit too (MAX_IN_FLIGHT_BYTES still bounds what a connection's requests
        # hold: beyond it reading pauses)
        self._handshake = ServerHandshake(
            self.host.exports, refusal=self.refusal, tls=self.host.tls_mode,
            block_sizes=BlockSizes(maximum=self.host.max_payload))
        self._transport.write(self._handshake.data_to_send())
        limit = self.host.handshake_limit
        if limit:
            self._handshake_timer = asyncio.get_running_loop().call_later(
                limit, self._handshake_expired)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._core is not None:
            return self._core.get_buffer()
        return memoryview(self._handshake_buf)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._core is not None:
                self._core.buffer_updated(nbytes)
                self._process()
            elif self._handshake is not None:
                self._handshake.receive_data(self._handshake_buf[:nbytes])
                self._negotiate()
        except ProtocolError as err:
            log.info("%s: protocol error: %s", self.peer, err)
            self._handshake_failed("protocol_error")
            self._abort()

    def eof_received(self) -> bool | None:
        self._stop_reading()
        self._maybe_close()
        if self._transport is not None and self._transport.get_extra_info("sslcontext"):
            return None  # TLS transports close on EOF; the in-flight replies are lost
        return True  # keep the transport open until in-flight replies are sent

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return  # _start_tls may have reported it already
        self._lost = True
        self._handshake_failed("disconnected")
        self._closing = True
        self._cancel_handshake_timer()
        if self._core is not None:
            self._core = None
            self.host.client_finished(self)
        self.host.connection_gone(self)
        log.info("%s: disconnected%s", self.peer, f" ({exc})" if exc else "")
        if not self._tasks and not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused_for_writes = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_for_writes = False
        self._update_reading()
        self._resume_processing()
        self._maybe_close()

    def _resume_processing(self) -> None:
        """Handle requests that were parsed-ready while processing was paused."""
        if self._core is not None and not self._closing and not self._paused:
            try:
                self._process()
            except ProtocolError as err:
                log.info("%s: protocol error: %s", self.peer, err)
                self._abort()

    @property
    def in_flight(self) -> int:
        """Requests started and not yet answered."""
        return len(self._tasks)

    @property
    def _paused(self) -> bool:
        return self._paused_for_tasks or self._paused_for_writes

    # -- control from the server -------------------------------------------------

    def shutdown(self) -> None:
        """End the connection in order: requests in flight finish and reply,
        requests that arrive meanwhile get NBD_ESHUTDOWN, then the socket closes.
        A client still negotiating is simply disconnected."""
        if self._core is None:
            self._abort()
            return
        self._shutting_down = True
        try:
            self._process()
        except ProtocolError:
            self._abort()

    # -- handshake ------------------------------------------------------------------

    def _negotiate(self) -> None:
        core = self._handshake
        assert core is not None
        assert self._transport is not None
        event = core.next_event()
        self._transport.write(core.data_to_send())
        if event is NEED_DATA:
            return
        if isinstance(event, StartTLS):
            # nothing more is read as plaintext: the TLS layer takes the socket over
            self._transport.pause_reading()
            self._tls_task = asyncio.ensure_future(self._start_tls(core))
            return
        self._handshake = None
        self._cancel_handshake_timer()
        if isinstance(event, HandshakeClosed):
            log.info("%s: %s", self.peer, event.reason)
            if not event.graceful:
                handshake_failed("refused")
            self._transport.close()
        elif isinstance(event, HandshakeDone):
            self._start_transmission(event)
        else:
            raise ProtocolError(f"unexpected handshake event {event!r}")

    async def _start_tls(self, core: ServerHandshake) -> None:
        transport = self._transport
        context = self.host.tls_context
        assert transport is not None
        assert context is not None
        try:
            tls_transport = await asyncio.get_running_loop().start_tls(
                transport, self, context, server_side=True,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as err:
            log.info("%s: TLS handshake failed: %s", self.peer, err)
            self._handshake_failed("tls")
            transport.abort()
            # asyncio does not tell the protocol when the peer resets the
            # connection mid-handshake: without this it would keep its slot
            self.connection_lost(err)
            return
        if tls_transport is None:  # the connection went away meanwhile
            self.connection_lost(None)
            return
        self._transport = tls_transport
        credentials = self.host.tls
        problem = credentials.authorize(tls_transport.get_extra_info("peercert")) \
            if credentials is not None else None
        if problem is not None:
            log.info("%s: %s", self.peer, problem)
            self._handshake_failed("tls")
            tls_transport.abort()
            return
        core.tls_started()
        try:
            self._negotiate()
        except ProtocolError as err:
            log.info("%s: protocol error: %s", self.peer, err)
            self._handshake_failed("protocol_error")
            self._abort()

    def _handshake_expired(self) -> None:
        log.info("%s: did not negotiate within %s s", self.peer, self.host.handshake_limit)
        self._handshake_failed("timeout")
        self._abort()

    def _handshake_failed(self, reason: str) -> None:
        """Count a handshake that ends without transmission (once: it is over)."""
        if self._handshake is not None:
            self._handshake = None
            handshake_failed(reason)

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    # -- transmission ----------------------------------------------------------------

    def _start_transmission(self, done: HandshakeDone) -> None:
        assert self._transport is not None
        export = self.host.exports.lookup(done.negotiated.export.name)
        if export is None or self._closing:  # removed between GO and now
            self._transport.close()
            return
        self.export = export
        # the compact and the extended parser are separate classes, so neither
        # connection's per-request path looks at which one it has
        if done.negotiated.extended:
            self._core = ExtendedTransmission(done.negotiated)
            log.info("%s: extended headers", self.peer)
        else:
            self._core = ServerTransmission(done.negotiated)
        sock = self._transport.get_extra_info("socket")
        plain_socket = sock is not None and self._transport.get_extra_info("sslcontext") is None
        if plain_socket:
            self._fd = sock.fileno()
            # processing pauses as soon as anything waits on the transport, and
            # resumes once it has all gone (see _send)
            self._transport.set_write_buffer_limits(high=0)
        # the export as this connection sees it (a subclass may have wrapped it)
        self._choose_fast_paths(self.export, structured=done.negotiated.structured,
                                plain_socket=plain_socket)
        self.host.client_started(self)
        self._core.receive_data(done.trailing)
        self._process()

    def _process(self) -> None:
        """Handle every complete request received so far (until reading pauses)."""
        core = self._core
        transport = self._transport
        assert core is not None
        assert transport is not None
        out: list[Buffer] = []
        try:
            self._out_bytes = 0
            while not (self._closing or self._paused):
                if self._out_bytes >= REPLY_BATCH_BYTES:  # replies leave in bounded batches
                    self._send(out)
                    out = []
                    self._out_bytes = 0
                    continue  # writing may have paused us (the send buffer is full)
                event = core.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Request):
                    if self._shutting_down:
                        out += self._reject(core, event.cookie, event.cmd, Errno.ESHUTDOWN,
                                            "server is shutting down")
                    elif not (self._try_inline(core, event, out)
                              or (self._direct_io and self._try_direct(core, event))):
                        self._spawn(core, event)
                elif isinstance(event, InvalidRequest):
                    out += self._reject(core, event.cookie, event.cmd, event.errno, event.message)
                elif isinstance(event, Disconnect):
                    self._stop_reading()
        except ProtocolError as err:
            if err.cookie is not None:
                out += core.reply_error(err.cookie, err.errno, err.message)
            raise
        finally:
            if out and not transport.is_closing():
                self._send(out)
        self._maybe_close()

    # -- requests in flight -----------------------------------------------------------

    def _spawn(self, core: ServerTransmission, request: Request) -> None:
        """Run a request as a task (``Handlers._serve``), counted in flight."""
        task = asyncio.ensure_future(self._serve(core, request))
        self._track(task, request.length if request.cmd in (READ, WRITE) else 0)
        task.add_done_callback(self._task_done)

    def _track(self, token: object, cost: int) -> None:
        """Count a request in flight (a task, or a token for a direct one)."""
        self._tasks[token] = cost
        self._inflight_bytes += cost
        if len(self._tasks) >= MAX_IN_FLIGHT or self._inflight_bytes >= MAX_IN_FLIGHT_BYTES:
            self._paused_for_tasks = True
            self._update_reading()

    def _task_done(self, task: object) -> None:
        self._inflight_bytes -= self._tasks.pop(task, 0)
        if (self._paused_for_tasks and len(self._tasks) < MAX_IN_FLIGHT // 2
                and self._inflight_bytes < MAX_IN_FLIGHT_BYTES // 2):
            self._paused_for_tasks = False
            self._update_reading()
            self._resume_processing()
        self._maybe_close()

    # -- reading and closing ------------------------------------------------------------

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._closing or self._paused_for_tasks or self._paused_for_writes:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _stop_reading(self) -> None:
        self._closing = True
        self._update_reading()

    def _maybe_close(self) -> None:
        """Close once no more requests will come (or shutdown began) and none is in flight."""
        if self._shutting_down and not self._tasks:
            self._closing = True
        if self._closing and not self._tasks and self._transport is not None:
            if not self._transport.is_closing():
                if self._paused_for_writes and self._transport.get_extra_info("sslcontext"):
                    # resume_writing comes back here: the TLS close gives up after
                    # TLS_SHUTDOWN_TIMEOUT, so let the replies drain first
                    return
                self._transport.close()
            if self._lost and not self.closed.done():
                self.closed.set_result(None)

    def _abort(self) -> None:
        """Hard disconnect: nothing more is read; what was queued is still sent."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()


def _describe_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unix-client"
