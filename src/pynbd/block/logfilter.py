"""Request logging: the ``log`` filter node writes one line per request to a file.

In the spirit of nbdkit's log filter, in a format of pynbd's own (see
docs/filters.md): one line per request, written when it completes::

    2025-01-31T12:00:00.000123Z id=1 cmd=read offset=0x0 count=0x200 flags=none \
        result=ok elapsed=0.000015

(one line in the file; cut here).

Fields, always in this order and separated by single spaces: the time the
request reached the node (UTC, ISO 8601 with microseconds), then ``key=value``
pairs: ``id`` (1, 2, ... per node, in arrival order), ``cmd`` (``read``,
``write``, ``zero``, ``trim``, ``flush``, ``block-status``,
``allocation-depth``, ``cache``), ``offset`` and ``count`` (hexadecimal
bytes; 0x0 for a flush), ``flags`` (``fua``, ``may-trim``, ``fast`` joined by
``+``, or ``none``), ``result`` (``ok``, an errno name such as ``EIO``, or
``cancelled`` when the request was abandoned) and ``elapsed`` (seconds).
No value contains a space or an ``=``.

Rules of this module:
- The file is opened once, when the node is made (truncated, or appended to
  with ``logappend``), and closed when the node is closed.
- Lines are buffered in memory and written by the event loop's thread in one
  ``write`` when 64 KiB have gathered, one second after the first unwritten
  line at the latest, and at close: no request waits for the log, and the
  loop blocks only for a page-cache write now and then.  A failed write is
  reported once (logging) and its lines dropped; requests never fail
  because of the log.
- Every request of the node is logged, on every path: the inline and direct
  fast paths of the child are kept, adapted to log the requests they
  complete (a fast path that declines logs nothing: the request comes back
  on the task path and is logged there).  Sendfile reads are not offered
  (the server may still fall back after asking for a sendfile source, which
  would log one request twice), nor sparse reads (``sparse_reads=False``): a
  client READ is exactly one logged read, not a block-status probe and a
  read per data extent.
- Connection events are not logged: a node does not see connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import errno as _errno
import logging
import os
import time
from typing import TYPE_CHECKING, TypeVar

from .filter import FilterNode
from .node import FastPaths

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping

    from .node import Data, Extent, Node, ReadDone, WriteDone

log = logging.getLogger("pynbd.block")

_T = TypeVar("_T")

#: write the buffered lines once they reach this many bytes
FLUSH_BYTES = 64 * 1024
#: ... or this many seconds after the first unwritten line
FLUSH_SECONDS = 1.0


def _timestamp(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _result(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, OSError) and error.errno:
        return _errno.errorcode.get(error.errno, str(error.errno))
    return "EIO"  # what the server answers for anything else


def _flags(*, fua: bool = False, may_trim: bool = False, fast: bool = False) -> str:
    names = [name for name, on in (("fua", fua), ("may-trim", may_trim), ("fast", fast)) if on]
    return "+".join(names) if names else "none"


class LogNode(FilterNode):
    """``child`` with every request logged to ``logfile``.

    Raises:
        OSError: the log file cannot be opened.
    """

    driver = "log"

    def __init__(self, child: Node, logfile: str, *, append: bool = False,
                 read_only: bool = False) -> None:
        super().__init__(child)
        caps = child.capabilities
        self.capabilities = dataclasses.replace(
            caps, sparse_reads=False, can_write=caps.can_write and not read_only)
        self.logfile = logfile
        mode = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append
                                                            else os.O_TRUNC)
        self._fd: int | None = os.open(logfile, mode, 0o644)
        self._lines: list[str] = []
        self._buffered = 0
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False
        self._last_id = 0

    def __repr__(self) -> str:
        return f"LogNode({self.child!r}, logfile={self.logfile!r})"

    # -- the file ------------------------------------------------------------------

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def _log(self, request_id: int, cmd: str, offset: int, count: int, flags: str,
             error: BaseException | None, wall: float, started: float) -> None:
        line = (f"{_timestamp(wall)} id={request_id} cmd={cmd} offset={offset:#x} "
                f"count={count:#x} flags={flags} result={_result(error)} "
                f"elapsed={time.monotonic() - started:.6f}\n")
        self._lines.append(line)
        self._buffered += len(line)
        if self._buffered >= FLUSH_BYTES:
            self.write_out()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a tool calling the node directly)
                self.write_out()
                return
            self._timer = loop.call_later(FLUSH_SECONDS, self.write_out)

    def write_out(self) -> None:
        """Write the buffered lines to the file now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = memoryview("".join(self._lines).encode())
        self._lines.clear()
        self._buffered = 0
        try:
            while data and self._fd is not None:
                data = data[os.write(self._fd, data):]
        except OSError as err:
            if not self._failed:
                log.error("log node: cannot write %s: %s (lines dropped)", self.logfile,
                          err.strerror or err)
            self._failed = True

    async def close(self) -> None:
        self.write_out()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the requests ---------------------------------------------------------------

    async def _run(self, cmd: str, offset: int, count: int, flags: str,
                   work: Awaitable[_T]) -> _T:
        request_id, wall, started = self._next_id(), time.time(), time.monotonic()
        try:
            result = await work
        except BaseException as err:
            self._log(request_id, cmd, offset, count, flags, err, wall, started)
            raise
        self._log(request_id, cmd, offset, count, flags, None, wall, started)
        return result

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._run("read", offset, len(buf), "none", self.child.pread(buf, offset))

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self._run("write", offset, len(data), _flags(fua=fua),
                        self.child.pwrite(data, offset, fua=fua))

    async def flush(self) -> None:
        await self._run("flush", 0, 0, "none", self.child.flush())

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._run("trim", offset, length, _flags(fua=fua),
                        self.child.trim(offset, length, fua=fua))

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self._run("zero", offset, length, _flags(fua=fua, may_trim=may_trim, fast=fast),
                        self.child.write_zeroes(offset, length, may_trim=may_trim,
                                                fast=fast, fua=fua))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self._run("block-status", offset, length, "none",
                               self.child.block_status(offset, length))

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self._run("allocation-depth", offset, length, "none",
                               self.child.allocation_depth(offset, length))

    async def cache(self, offset: int, length: int) -> None:
        await self._run("cache", offset, length, "none", self.child.cache(offset, length))

    # -- fast paths: the child's, each logging what it completes ----------------------

    def fast_paths(self) -> FastPaths:
        inner = self.child.resolve().fast_paths()
        pread_nowait, pwrite_nowait = inner.pread_nowait, inner.pwrite_nowait
        start_read, start_write, own_read = inner.start_read, inner.start_write, inner.read
        logged = self._log

        def logged_pread_nowait(buf: memoryview, offset: int) -> bool:
            assert pread_nowait is not None
            wall, started = time.time(), time.monotonic()
            if not pread_nowait(buf, offset):
                return False
            logged(self._next_id(), "read", offset, len(buf), "none", None, wall, started)
            return True

        def logged_pwrite_nowait(data: Data, offset: int) -> bool:
            assert pwrite_nowait is not None
            wall, started = time.time(), time.monotonic()
            if not pwrite_nowait(data, offset):
                return False
            logged(self._next_id(), "write", offset, len(data), "none", None, wall, started)
            return True

        def logged_start_read(offset: int, length: int, done: ReadDone) -> bool:
            assert start_read is not None
            wall, started, request_id = time.time(), time.monotonic(), [0]

            def read_done(data: bytes | bytearray | None, error: OSError | None) -> None:
                logged(request_id[0], "read", offset, length, "none", error, wall, started)
                done(data, error)

            if not start_read(offset, length, read_done):
                return False
            request_id[0] = self._next_id()  # done is never called from within start_read
            return True

        def logged_start_write(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
            assert start_write is not None
            wall, started, request_id = time.time(), time.monotonic(), [0]

            def write_done(error: OSError | None) -> None:
                logged(request_id[0], "write", offset, len(data), _flags(fua=fua), error,
                       wall, started)
                done(error)

            if not start_write(data, offset, fua, write_done):
                return False
            request_id[0] = self._next_id()
            return True

        async def logged_read(offset: int, length: int) -> bytes | bytearray:
            assert own_read is not None
            return await self._run("read", offset, length, "none", own_read(offset, length))

        writable = self.capabilities.can_write
        return FastPaths(
            pread_nowait=logged_pread_nowait if pread_nowait is not None else None,
            pwrite_nowait=logged_pwrite_nowait if pwrite_nowait and writable else None,
            start_read=logged_start_read if start_read is not None else None,
            start_write=logged_start_write if start_write and writable else None,
            read=logged_read if own_read is not None else None,
        )


def log_node(options: Mapping[str, object], child: Node, read_only: bool) -> LogNode:
    """The ``log`` node blockdev ``options`` describe (``logfile``, ``logappend``).

    Raises:
        ValueError: the log file cannot be opened (qemu's wording for a file).
    """
    logfile = options.get("logfile")
    if not isinstance(logfile, str) or not logfile:
        raise ValueError("Parameter 'logfile' is missing")
    try:
        return LogNode(child, logfile, append=bool(options.get("logappend", False)),
                       read_only=read_only)
    except OSError as err:
        raise ValueError(f"Could not open '{logfile}': {err.strerror or err}") from None
