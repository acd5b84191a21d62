"""The command handlers: requests that run as tasks (``Handlers``, a mixin of ``Connection``).

Rules of this module:
- One coroutine per command (``_do_read`` ... ``_do_block_status``) awaits
  the node and returns the reply the transmission core builds; ``_serve``
  runs one request as a task, counts it and hands the reply to the writer.
- A failing request becomes an error reply (an ``OSError`` with its errno
  mapped for the command; anything else, a node bug, as EIO and logged);
  it never ends the connection.
- Extents from ``block_status`` are cut to the request by one function
  (``clip_extents``), for BLOCK_STATUS replies and for sparse reads alike.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..block.node import ExtentFlags
from ..proto.constants import ALLOCATION_DEPTH, MAX_EXTENTS, Cmd, CmdFlag, Errno
from ..proto.errors import nbd_errno
from .connstate import ConnectionState

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ..block.node import Extent
    from ..proto.events import Request
    from ..proto.transmission import ServerTransmission
    from ..proto.wire import Buffer
    from .export import Export

log = logging.getLogger("pynbd.connection")


def clip_extents(extents: Iterable[Extent], offset: int, end: int,
                 ) -> list[tuple[int, ExtentFlags]]:
    """``(length, flags)`` of the extents ``block_status`` returned from ``offset``,
    up to ``end`` at most: the last one that reaches ``end`` is cut there and any
    after it dropped.  So every length returned fits the request's length field
    (32 bits, or 64 with extended headers) and the reply's descriptors,
    whatever the node reported.  May cover less than up to ``end`` (as
    ``block_status`` may)."""
    clipped: list[tuple[int, ExtentFlags]] = []
    pos = offset
    for extent in extents:
        length = min(extent.length, end - pos)
        clipped.append((length, extent.flags))
        pos += length
        if pos >= end:
            break
    return clipped


def clip_runs(runs: Iterable[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """``clip_extents`` for ``(length, value)`` runs: cut at ``length`` bytes."""
    clipped: list[tuple[int, int]] = []
    left = length
    for run_length, value in runs:
        take = min(run_length, left)
        clipped.append((take, value))
        left -= take
        if left <= 0:
            break
    return clipped


class Handlers(ConnectionState):
    """The task path: ``_serve`` and one handler per command."""

    def _error_reply(self, core: ServerTransmission, request: Request,
                     error: OSError | None) -> list[Buffer]:
        """The error reply for a request the node failed with ``error``."""
        assert error is not None
        return self._errno_reply(core, request,
                                 nbd_errno(error.errno, cmd=request.cmd, flags=request.flags),
                                 error.strerror or str(error))

    def _errno_reply(self, core: ServerTransmission, request: Request, errno: Errno,
                     message: str) -> list[Buffer]:
        """The error reply with its NBD errno (``server.metrics`` counts it here)."""
        return core.reply_error(request.cookie, errno, message)

    def _reject(self, core: ServerTransmission, cookie: int, cmd: int, errno: Errno,
                message: str) -> list[Buffer]:
        """The error reply for a request answered without the node (invalid, or
        the server is shutting down); ``server.metrics`` counts it."""
        return core.reply_error(cookie, errno, message)

    async def _serve(self, core: ServerTransmission, request: Request) -> bool:
        """Run one request as a task: its handler, then its reply (or error reply);
        True if it failed."""
        stats = self.stats
        stats.requests += 1
        failed = True
        try:
            reply = await self._handlers[request.cmd](request)
            failed = False
            if request.cmd == Cmd.READ:
                stats.bytes_read += request.length
            elif request.cmd == Cmd.WRITE:
                stats.bytes_written += request.length
                core.recycle(request.payload)  # the node is done with it
        except OSError as err:
            reply = self._error_reply(core, request, err)
        except Exception as err:  # a node bug must not kill the connection
            log.exception("%s: request %s failed", self.peer, Cmd(request.cmd).name)
            reply = self._error_reply(core, request, OSError(Errno.EIO, str(err)))
        self._send_if_open(reply)
        return failed

    # -- command handlers ---------------------------------------------------------------

    @property
    def _export_core(self) -> tuple[Export, ServerTransmission]:
        assert self.export is not None
        assert self._core is not None
        return self.export, self._core

    async def _do_read(self, request: Request) -> list[Buffer]:
        export, core = self._export_core
        if self._sparse(request):
            return await self._read_sparse(request)
        own_read = self._own_read
        if own_read is not None:
            data: bytes | bytearray = await own_read(request.offset, request.length)
        else:
            data = bytearray(request.length)
            await export.io.pread(memoryview(data), request.offset)
        return core.reply_read(request.cookie, request.offset, data)

    async def _read_sparse(self, request: Request) -> list[Buffer]:
        export, core = self._export_core
        node = export.io
        pieces: list[tuple[int, int, Buffer | None]] = []
        pos, end = request.offset, request.offset + request.length
        while pos < end:
            for length, flags in clip_extents(await node.block_status(pos, end - pos),
                                              pos, end):
                if flags & ExtentFlags.ZERO:
                    pieces.append((pos, length, None))
                else:
                    buf = bytearray(length)
                    await node.pread(memoryview(buf), pos)
                    pieces.append((pos, length, buf))
                pos += length
        return core.reply_read_sparse(request.cookie, pieces)

    async def _do_write(self, request: Request) -> list[Buffer]:
        export, core = self._export_core
        assert request.payload is not None
        await export.io.pwrite(request.payload, request.offset,
                                    fua=bool(request.flags & CmdFlag.FUA))
        return core.reply_ok(request.cookie)

    async def _do_flush(self, request: Request) -> list[Buffer]:
        export, core = self._export_core
        await export.io.flush()
        return core.reply_ok(request.cookie)

    async def _do_trim(self, request: Request) -> list[Buffer]:
        export, core = self._export_core
        await export.io.trim(request.offset, request.length,
                                  fua=bool(request.flags & CmdFlag.FUA))
        return core.reply_ok(request.cookie)

    async def _do_write_zeroes(self, request: Request) -> list[Buffer]:
        export, core = self._export_core
        await export.io.write_zeroes(
            request.offset, request.length,
            may_trim=not request.flags & CmdFlag.NO_HOLE,
            fast=bool(request.flags & CmdFlag.FAST_ZERO),
            fua=bool(request.flags & CmdFlag.FUA))
        return core.reply_ok(request.cookie)

    async def _do_cache(self, request: Request) -> list[Buffer]:
        export, core = self._export_core
        await export.io.cache(request.offset, request.length)
        return core.reply_ok(request.cookie)

    async def _do_block_status(self, request: Request) -> list[Buffer]:
        export, core = self._export_core
        selected = core.negotiated.meta_contexts
        ids = selected.keys() if request.contexts is None else request.contexts
        pos, end = request.offset, request.offset + request.length
        replies: list[tuple[int, Sequence[tuple[int, int]]]] = []
        for cid in ids:
            bitmap = export.bitmaps.get(cid)
            if bitmap is not None:  # qemu:dirty-bitmap:NAME (bit 0: dirty)
                runs = [(length, int(dirty)) for length, dirty in
                        bitmap.runs(pos, end - pos, MAX_EXTENTS)] or [(end - pos, 0)]
            elif selected[cid] == ALLOCATION_DEPTH:
                runs = clip_runs(await export.io.allocation_depth(pos, end - pos), end - pos)
            elif export.node.capabilities.can_extents:  # base:allocation
                runs = [(length, int(flags)) for length, flags in
                        clip_extents(await export.io.block_status(pos, end - pos),
                                     pos, end)]
            else:
                runs = [(request.length, 0)]
            replies.append((cid, runs[:1] if request.flags & CmdFlag.REQ_ONE else runs))
        return core.reply_block_status(request.cookie, replies)
