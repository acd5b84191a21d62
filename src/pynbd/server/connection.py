"""One client connection: drives the protocol cores over an asyncio stream.

Rules of this module:
- Protocol decisions live in ``pynbd.proto``; this module only moves bytes,
  calls the backend and writes the replies the core builds.
- Requests run concurrently (at most ``MAX_IN_FLIGHT`` per connection; reading
  pauses while that many are outstanding).  Each reply is written with one
  ``writelines`` call, so replies never interleave.
- A failing request becomes an error reply; it never ends the connection.
  Only ``ProtocolError`` does.
- On disconnect or shutdown, requests already in flight finish and get their
  replies before the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pynbd.backends.base import ExtentFlags
from pynbd.proto.constants import Cmd, CmdFlag, Errno
from pynbd.proto.errors import ProtocolError, nbd_errno
from pynbd.proto.events import (
    NEED_DATA,
    Disconnect,
    HandshakeClosed,
    HandshakeDone,
    InvalidRequest,
    Request,
)
from pynbd.proto.handshake import ServerHandshake
from pynbd.proto.transmission import Buffer, ServerTransmission

if TYPE_CHECKING:
    from .export import Export
    from .runtime import Server

log = logging.getLogger("pynbd.connection")

#: requests one connection may have outstanding before we stop reading
MAX_IN_FLIGHT = 64
#: reads at least this large look for holes to send as OFFSET_HOLE chunks
SPARSE_READ_MIN = 64 * 1024
#: how much we ask the stream for at once
READ_CHUNK = 256 * 1024

Handler = Callable[[Request], Awaitable[list[Buffer]]]


@dataclasses.dataclass(slots=True)
class ConnectionStats:
    """Counters shown by QMP ``x-query-nbd-clients``."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class Connection:
    """Serves one accepted client until it leaves or the server stops."""

    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: str) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.export: Export | None = None
        #: the task serving this connection (set by the server)
        self.task: asyncio.Task[None] | None = None
        self.stats = ConnectionStats()
        self._core: ServerTransmission | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._handlers: dict[Cmd, Handler] = {
            Cmd.READ: self._do_read,
            Cmd.WRITE: self._do_write,
            Cmd.FLUSH: self._do_flush,
            Cmd.TRIM: self._do_trim,
            Cmd.WRITE_ZEROES: self._do_write_zeroes,
            Cmd.CACHE: self._do_cache,
            Cmd.BLOCK_STATUS: self._do_block_status,
        }

    # -- lifecycle ---------------------------------------------------------------

    async def run(self, refusal: str | None) -> None:
        """Negotiate, then serve requests; always closes the stream."""
        try:
            done = await self._handshake(refusal)
            if done is not None:
                await self._transmission(done)
        except ProtocolError as err:
            log.info("%s: protocol error: %s", self.peer, err)
        except (ConnectionError, TimeoutError) as err:
            log.info("%s: connection lost: %s", self.peer, err)
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    # -- handshake -------------------------------------------------------------------

    async def _handshake(self, refusal: str | None) -> HandshakeDone | None:
        core = ServerHandshake(self.server.exports, refusal=refusal)
        limit = self.server.handshake_limit or None
        async with asyncio.timeout(limit):
            while True:
                event = core.next_event()
                # replies to the options just processed go out before we wait
                self.writer.write(core.data_to_send())
                if event is NEED_DATA:
                    await self.writer.drain()
                    data = await self.reader.read(READ_CHUNK)
                    if not data:
                        return None
                    core.receive_data(data)
                    continue
                await self.writer.drain()
                if isinstance(event, HandshakeClosed):
                    log.info("%s: %s", self.peer, event.reason)
                    return None
                if isinstance(event, HandshakeDone):
                    return event
                raise ProtocolError(f"unexpected handshake event {event!r}")

    # -- transmission ----------------------------------------------------------------

    async def _transmission(self, done: HandshakeDone) -> None:
        export = self.server.exports.lookup(done.negotiated.export.name)
        if export is None:  # removed between GO and now
            return
        self.export = export
        core = self._core = ServerTransmission(done.negotiated)
        core.receive_data(done.trailing)
        self.server.client_started(self)
        try:
            await self._serve_requests(core)
        finally:
            self.server.client_finished(self)

    async def _serve_requests(self, core: ServerTransmission) -> None:
        while True:
            try:
                event = core.next_event()
            except ProtocolError as err:
                if err.cookie is not None:
                    self._send(core.reply_error(err.cookie, err.errno, err.message))
                raise
            if event is NEED_DATA:
                data = await self.reader.read(max(READ_CHUNK, core.bytes_wanted))
                if not data:
                    return
                core.receive_data(data)
            elif isinstance(event, Request):
                await self._slots.acquire()
                task = asyncio.create_task(self._serve(core, event))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
            elif isinstance(event, InvalidRequest):
                self._send(core.reply_error(event.cookie, event.errno, event.message))
            elif isinstance(event, Disconnect):
                return

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    def _send(self, buffers: list[Buffer]) -> None:
        if not self.writer.is_closing():
            self.writer.writelines(buffers)

    async def _serve(self, core: ServerTransmission, request: Request) -> None:
        stats = self.stats
        stats.requests += 1
        try:
            reply = await self._handlers[request.cmd](request)
            if request.cmd == Cmd.READ:
                stats.bytes_read += request.length
            elif request.cmd == Cmd.WRITE:
                stats.bytes_written += request.length
        except OSError as err:
            errno = _reply_errno(request, err.errno)
            reply = core.reply_error(request.cookie, errno, err.strerror or str(err))
        except Exception as err:  # a backend bug must not kill the connection
            log.exception("%s: request %s failed", self.peer, request.cmd.name)
            reply = core.reply_error(request.cookie, Errno.EIO, str(err))
        self._send(reply)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    # -- command handlers ------------------------------------------------------------

    @property
    def _backend_core(self) -> tuple[Export, ServerTransmission]:
        assert self.export is not None
        assert self._core is not None
        return self.export, self._core

    async def _do_read(self, request: Request) -> list[Buffer]:
        export, core = self._backend_core
        if (core.negotiated.structured and request.length >= SPARSE_READ_MIN
                and not request.flags & CmdFlag.DF
                and export.backend.capabilities.can_extents):
            return await self._read_sparse(request)
        buf = bytearray(request.length)
        await export.backend.pread(memoryview(buf), request.offset)
        return core.reply_read(request.cookie, request.offset, buf)

    async def _read_sparse(self, request: Request) -> list[Buffer]:
        export, core = self._backend_core
        backend = export.backend
        pieces: list[tuple[int, int, Buffer | None]] = []
        pos, end = request.offset, request.offset + request.length
        while pos < end:
            for extent in await backend.block_status(pos, end - pos):
                length = min(extent.length, end - pos)
                if extent.flags & ExtentFlags.ZERO:
                    pieces.append((pos, length, None))
                else:
                    buf = bytearray(length)
                    await backend.pread(memoryview(buf), pos)
                    pieces.append((pos, length, buf))
                pos += length
                if pos >= end:
                    break
        return core.reply_read_sparse(request.cookie, pieces)

    async def _do_write(self, request: Request) -> list[Buffer]:
        export, core = self._backend_core
        assert request.payload is not None
        await export.backend.pwrite(request.payload, request.offset,
                                    fua=bool(request.flags & CmdFlag.FUA))
        return core.reply_ok(request.cookie)

    async def _do_flush(self, request: Request) -> list[Buffer]:
        export, core = self._backend_core
        await export.backend.flush()
        return core.reply_ok(request.cookie)

    async def _do_trim(self, request: Request) -> list[Buffer]:
        export, core = self._backend_core
        await export.backend.trim(request.offset, request.length,
                                  fua=bool(request.flags & CmdFlag.FUA))
        return core.reply_ok(request.cookie)

    async def _do_write_zeroes(self, request: Request) -> list[Buffer]:
        export, core = self._backend_core
        await export.backend.write_zeroes(
            request.offset, request.length,
            may_trim=not request.flags & CmdFlag.NO_HOLE,
            fast=bool(request.flags & CmdFlag.FAST_ZERO),
            fua=bool(request.flags & CmdFlag.FUA))
        return core.reply_ok(request.cookie)

    async def _do_cache(self, request: Request) -> list[Buffer]:
        export, core = self._backend_core
        await export.backend.cache(request.offset, request.length)
        return core.reply_ok(request.cookie)

    async def _do_block_status(self, request: Request) -> list[Buffer]:
        export, core = self._backend_core
        extents: list[tuple[int, int]] = [(request.length, 0)]
        if export.backend.capabilities.can_extents:
            extents = []
            pos, end = request.offset, request.offset + request.length
            for extent in await export.backend.block_status(pos, end - pos):
                length = min(extent.length, end - pos)
                extents.append((length, int(extent.flags)))
                pos += length
                if pos >= end:
                    break
        if request.flags & CmdFlag.REQ_ONE:
            extents = extents[:1]
        return core.reply_block_status(
            request.cookie, [(cid, extents) for cid in core.negotiated.meta_contexts])


def _reply_errno(request: Request, err: int | None) -> Errno:
    """The NBD error for a backend failure, keeping ENOTSUP/EOVERFLOW where allowed."""
    errno = nbd_errno(err)
    if errno == Errno.ENOTSUP and not (request.cmd == Cmd.WRITE_ZEROES
                                       and request.flags & CmdFlag.FAST_ZERO):
        return Errno.EINVAL
    if errno == Errno.EOVERFLOW and not (request.cmd == Cmd.READ
                                         and request.flags & CmdFlag.DF):
        return Errno.EINVAL
    return errno
