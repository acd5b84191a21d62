"""The inline, direct and sendfile paths: requests answered without a task
(``FastPath``, a mixin of ``Connection``).

Rules of this module:
- Every fast-path decision lives here: which paths a connection may take
  (``_choose_fast_paths``, once, from the ``FastPaths`` the export's node
  offers: ``pynbd.block.node``) and, per request, ``pread_nowait``/
  ``pwrite_nowait`` (inline), ``sendfile_source`` (sendfile) and
  ``start_read``/``start_write`` (direct), called as the plain callables
  chosen at the start: no capability check or lookup on the request path.
- A path that cannot take a request says so (False) before anything was
  sent, and the request runs as a task instead (``server.handlers``), which
  also reports any error; only sendfile, once its reply has begun, must
  finish it or drop the connection.
- Direct requests count in flight like tasks (a token each) until their
  reply has been handed to the writer; replies completed together leave in
  one write (``_direct_done``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from ..block.fileio import pread_all
from .connstate import DF, FUA, READ, WRITE, ConnectionState
from .writer import queue_on_transport

if TYPE_CHECKING:
    from ..proto.events import Request
    from ..proto.transmission import ServerTransmission
    from ..proto.wire import Buffer
    from .export import Export

log = logging.getLogger("pynbd.connection")

#: replies of direct requests (``start_read``/``start_write``) that complete
#: together leave in one write while the batch is smaller than this
DIRECT_BATCH_BYTES = 256 * 1024
#: larger reads always run as tasks (their buffers count against the in-flight cap)
INLINE_READ_MAX = 1024 * 1024
#: structured reads at least this large look for holes to send as OFFSET_HOLE
SPARSE_READ_MIN = 64 * 1024
#: reads at least this large go straight from the file with sendfile when they can
SENDFILE_MIN = 64 * 1024


class FastPath(ConnectionState):
    """Inline READ/WRITE, sendfile READ and direct (self-completing) READ/WRITE."""

    def _choose_fast_paths(self, export: Export, *, structured: bool,
                           plain_socket: bool) -> None:
        """Fix, as transmission starts, which paths this connection's requests may
        take: reads and writes inline (``pread_nowait``), I/O completing by itself
        (``start_read``), own-buffer reads, structured reads probed for holes
        (``_sparse`` decides per request), large reads sent from a file (only on
        a plain socket)."""
        paths = export.fast_paths()
        caps = export.node.capabilities
        self._pread_nowait = paths.pread_nowait
        self._pwrite_nowait = paths.pwrite_nowait
        self._start_read = paths.start_read
        self._start_write = paths.start_write
        self._own_read = paths.read
        self._direct_io = paths.start_read is not None or paths.start_write is not None
        self._sparse_reads = structured and caps.can_extents and caps.sparse_reads
        self._sendfile_source = paths.sendfile_source if plain_socket else None

    def _try_inline(self, core: ServerTransmission, request: Request,
                    out: list[Buffer]) -> bool:
        """Answer a cheap READ or WRITE now, without a task; False if it is not cheap."""
        if request.cmd == READ:
            if request.length > INLINE_READ_MAX:
                return False
            # small reads (most of them) skip the method call: neither applies
            sparse = request.length >= SPARSE_READ_MIN and self._sparse(request)
            pread_nowait = self._pread_nowait
            if (request.length >= SENDFILE_MIN and self._sendfile_source is not None
                    and self._send_from_file(core, request, out, sparse=sparse)):
                self._out_bytes = 0
            elif sparse or pread_nowait is None:
                return False
            else:
                buf = bytearray(request.length)
                try:
                    if not pread_nowait(memoryview(buf), request.offset):
                        return False
                except OSError:
                    return False  # the task path retries and reports the error
                out += core.reply_read(request.cookie, request.offset, buf)
                self._out_bytes += request.length
            self.stats.bytes_read += request.length
        elif request.cmd == WRITE and not request.flags & FUA:
            assert request.payload is not None
            pwrite_nowait = self._pwrite_nowait
            if pwrite_nowait is None:
                return False
            try:
                if not pwrite_nowait(request.payload, request.offset):
                    return False
            except OSError:
                return False
            out += core.reply_ok(request.cookie)
            core.recycle(request.payload)
            self.stats.bytes_written += request.length
        else:
            return False
        self.stats.requests += 1
        return True

    def _sparse(self, request: Request) -> bool:
        """Whether this READ is answered with holes as OFFSET_HOLE chunks (after a
        block-status probe) rather than as plain data."""
        return (self._sparse_reads and request.length >= SPARSE_READ_MIN
                and not request.flags & DF)

    def _send_from_file(self, core: ServerTransmission, request: Request,
                        out: list[Buffer], *, sparse: bool) -> bool:
        """Answer a READ with its reply header and then ``sendfile`` from the
        node's file (no copy through Python), if that cannot block on
        storage; replies gathered in ``out`` leave first.  With ``sparse``
        only a range without holes qualifies.  False: this reply was not sent."""
        transport = self._transport
        assert transport is not None
        assert self._sendfile_source is not None
        offset, length = request.offset, request.length
        source = self._sendfile_source(offset, length, sparse)
        if source is None:
            return False
        src, position = source
        if out:
            self._send(out)
            out.clear()
        if transport.get_write_buffer_size():
            return False  # replies are queued on the transport: this one goes after them
        head = core.reply_read_head(request.cookie, offset, length)
        head_size = sum(len(piece) for piece in head)
        fd = self._fd
        done = 0
        try:
            sent = os.writev(fd, head)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = -1  # the transport meets the error below and reports it
        if sent == head_size:
            while done < length:
                try:
                    count = os.sendfile(fd, src, position + done, length - done)
                except OSError:  # the socket is full (or broken): the rest goes below
                    break
                if count == 0:
                    break  # the file shrank: the rest reads as zeroes below
                done += count
            if done == length:
                return True
        # the socket took only part of it: queue the rest, read the ordinary way
        rest = bytearray(length - done)
        try:
            pread_all(src, memoryview(rest), position + done)
        except OSError as err:
            # the reply has begun and cannot become an error reply: the stream is lost
            log.info("%s: read failed after its reply began: %s", self.peer, err)
            self._abort()
            return True
        queue_on_transport(transport, [b"".join(head)[max(sent, 0):], rest])
        return True

    def _try_direct(self, core: ServerTransmission, request: Request) -> bool:
        """Start a READ or WRITE that the node completes by itself (``start_read``,
        ``start_write``: librbd), without a task; False if the node does not offer it."""
        token = object()
        if request.cmd == READ:
            start_read = self._start_read
            if start_read is None or self._sparse(request):
                return False

            def read_done(data: bytes | bytearray | None, error: OSError | None) -> None:
                if data is not None:
                    self.stats.bytes_read += request.length
                    self._direct_done(token, core.reply_read(request.cookie, request.offset,
                                                             data))
                else:
                    self._direct_done(token, self._error_reply(core, request, error))

            try:
                started = start_read(request.offset, request.length, read_done)
            except OSError:
                return False  # the task path retries and reports the error
        elif request.cmd == WRITE and self._start_write is not None:
            start_write = self._start_write
            payload = request.payload
            assert payload is not None

            def write_done(error: OSError | None) -> None:
                core.recycle(payload)  # the node is done with it
                if error is None:
                    self.stats.bytes_written += request.length
                    self._direct_done(token, core.reply_ok(request.cookie))
                else:
                    self._direct_done(token, self._error_reply(core, request, error))

            try:
                started = start_write(payload, request.offset, bool(request.flags & FUA),
                                      write_done)
            except OSError:
                return False
        else:
            return False
        if started:
            self.stats.requests += 1
            self._track(token, request.length)
        return started

    def _direct_done(self, token: object, reply: list[Buffer]) -> None:
        """Send a direct request's reply.

        librbd hands its completions over in batches: while other requests of
        this connection are in flight, a reply waits for the end of the
        current loop iteration (``call_soon``) so that the replies completed
        together leave in one ``writev`` (docs/performance.md has the gain).
        A lone request's reply, or a batch that has grown large, goes at once.
        """
        tokens = self._direct_tokens
        if not tokens and len(self._tasks) == 1:  # alone (depth 1): nothing to gather
            self._send_if_open(reply)
            self._task_done(token)
            return
        self._direct_out += reply
        tokens.append(token)
        if len(tokens) >= len(self._tasks):  # no other one could join
            self._flush_direct()
            return
        for buf in reply:
            self._direct_bytes += len(buf)
        if self._direct_bytes >= DIRECT_BATCH_BYTES:
            self._flush_direct()
        elif len(tokens) == 1:  # the batch's first reply: flush at the iteration's end
            asyncio.get_running_loop().call_soon(self._flush_direct)

    def _flush_direct(self) -> None:
        out, tokens = self._direct_out, self._direct_tokens
        if not tokens:
            return  # flushed already (the batch grew large, or the last one came)
        self._direct_out, self._direct_tokens, self._direct_bytes = [], [], 0
        self._send_if_open(out)
        for token in tokens:
            self._task_done(token)

