"""Request counters: what ``--metrics`` (Prometheus) and QMP ``query-blockstats`` report.

This module owns the counters and the connection variant that fills them;
it imports nothing of prometheus_client (``server.metricsexport`` turns the
counters into the Prometheus text format when scraped).

Rules of this module:
- Counting is a process-wide choice (``set_counting``): ``pynbd --metrics``
  turns it on before its server exists, ``pynbd daemon`` always (so that
  ``query-blockstats`` can answer).  A ``Server`` made while it is on serves
  every client with ``MeteredConnection`` (``server.runtime``: this module's
  ``Metered`` over ``Connection``); otherwise with the plain ``Connection``,
  whose request path has no counting code at all.
- The hot path only does plain arithmetic on the export's ``ExportMetrics``
  (int attributes, lists indexed by command number, a ``bisect`` into fixed
  histogram bounds); nothing is formatted, locked or allocated per request.
- Every request is counted once, when its reply is handed to the writer,
  whichever path answered it: direct (timed from ``start_read``/
  ``start_write`` to the completion), task (from the task's start to its
  reply), inline and sendfile (answered at once: not timed, no clock is
  read; counted as 0 ns, in the lowest bucket), or refused without touching
  the node (invalid, or during shutdown: 0 ns, the lowest bucket too).  So a
  command's histogram count always equals its ``requests`` count.
- Label values are bounded: commands by their NBD name (an unknown command
  number is ``UNKNOWN``), errors by the NBD errno name, handshake failures by
  one of ``HANDSHAKE_REASONS``, rbd nodes by name.
"""

from __future__ import annotations

import dataclasses
import weakref
from bisect import bisect_left
from time import perf_counter_ns
from typing import TYPE_CHECKING

from ..proto.constants import Cmd, Errno
from .connstate import READ, WRITE
from .fastpath import FastPath
from .handlers import Handlers

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ..block.node import Data, ReadDone, WriteDone
    from ..block.rbd import RbdNode
    from ..proto.events import Request
    from ..proto.transmission import ServerTransmission
    from ..proto.wire import Buffer
    from .export import Export

#: command names by number; the last one stands for any unknown command number
COMMAND_NAMES: tuple[str, ...] = (*(cmd.name for cmd in sorted(Cmd)), "UNKNOWN")
UNKNOWN = len(COMMAND_NAMES) - 1
#: the commands every export reports even before it has seen one
DATA_COMMANDS = (Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE,
                 Cmd.BLOCK_STATUS)
#: commands that move an export's highest written offset (as qemu's wr_highest_offset)
_WRITES = frozenset((Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM))

#: upper bounds of the duration histograms' buckets, in ns (then +Inf): 5 us .. 10 s
BOUNDS_NS: tuple[int, ...] = (
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000, 1_000_000_000, 2_500_000_000,
    5_000_000_000, 10_000_000_000)

#: why a handshake ended without transmission (``pynbd_handshake_failures_total``)
HANDSHAKE_REASONS = ("protocol_error", "refused", "timeout", "tls", "disconnected")


class Histogram:
    """Bucket counts over ``BOUNDS_NS`` and a sum (in ns)."""

    __slots__ = ("buckets", "sum_ns")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS_NS) + 1)
        self.sum_ns = 0

    def observe(self, ns: int) -> None:
        self.buckets[bisect_left(BOUNDS_NS, ns)] += 1
        self.sum_ns += ns


class ExportMetrics:
    """The counters of one export, shared by all its connections.

    Lists are indexed by command number (``COMMAND_NAMES``).  ``durations``
    holds the durations of the requests that were timed (task and direct ones)
    or refused (as 0); ``failed`` counts those the node failed,
    ``invalid`` those refused before reaching it, ``nbytes`` the lengths of the
    successful ones.  READs and WRITEs answered inline are not timed: they
    count in ``inline_*`` (read with the rest by ``requests``, ``histogram``
    and ``byte_count``, as requests of 0 ns, in the lowest bucket), so that
    the inline path only adds to two attributes.
    """

    __slots__ = ("_inline_seen", "_inline_seen_ns", "connections", "durations", "errors",
                 "failed", "inline_read_bytes", "inline_reads", "inline_write_bytes",
                 "inline_writes", "invalid", "last_ns", "nbytes", "wr_highest_offset")

    def __init__(self) -> None:
        count = len(COMMAND_NAMES)
        self.inline_reads = self.inline_read_bytes = 0
        self.inline_writes = self.inline_write_bytes = 0
        self.failed = [0] * count
        self.invalid = [0] * count
        self.nbytes = [0] * count
        self.durations = [Histogram() for _ in range(count)]
        #: (command, NBD errno) -> failed or refused requests
        self.errors: dict[tuple[int, int], int] = {}
        #: the end of the furthest successful write, zero or trim (qemu's wr_highest_offset)
        self.wr_highest_offset = 0
        #: ``perf_counter_ns`` when the last timed or refused request finished; 0: none
        self.last_ns = 0
        #: inline requests seen by ``last_activity_ns``, and when it saw them change
        self._inline_seen = self._inline_seen_ns = 0
        #: the metered connections in transmission on this export (for the gauges)
        self.connections: weakref.WeakSet[Metered] = weakref.WeakSet()

    def done(self, cmd: int, offset: int, length: int, start: int,
             failed: bool = False) -> None:
        """A request the node answered (``failed``: with an error), begun at ``start``."""
        now = perf_counter_ns()
        self.durations[cmd].observe(now - start)
        self.last_ns = now
        if failed:
            self.failed[cmd] += 1
            return
        self.nbytes[cmd] += length
        if cmd != READ and offset + length > self.wr_highest_offset and cmd in _WRITES:
            self.wr_highest_offset = offset + length

    def error(self, cmd: int, errno: int) -> None:
        """Count a request's error reply by its NBD errno."""
        key = (cmd if 0 <= cmd < UNKNOWN else UNKNOWN, errno)
        self.errors[key] = self.errors.get(key, 0) + 1

    def refused(self, cmd: int, errno: int) -> None:
        """A request answered with an error without reaching the node."""
        cmd = cmd if 0 <= cmd < UNKNOWN else UNKNOWN
        self.invalid[cmd] += 1
        self.durations[cmd].buckets[0] += 1
        self.last_ns = perf_counter_ns()
        self.error(cmd, errno)

    def last_activity_ns(self) -> int:
        """``perf_counter_ns`` of the export's last request (0: none yet), for
        query-blockstats' ``idle_time_ns``.  Inline requests read no clock: their
        last one is placed at the first call that sees their count changed, so
        within the time between two calls."""
        inline = self.inline_reads + self.inline_writes
        if inline != self._inline_seen:
            self._inline_seen, self._inline_seen_ns = inline, perf_counter_ns()
        return max(self.last_ns, self._inline_seen_ns)

    def _inline(self, cmd: int) -> tuple[int, int]:
        """Requests of ``cmd`` answered inline, and their bytes."""
        if cmd == READ:
            return self.inline_reads, self.inline_read_bytes
        if cmd == WRITE:
            return self.inline_writes, self.inline_write_bytes
        return 0, 0

    def requests(self, cmd: int) -> int:
        """Requests of command ``cmd`` answered so far."""
        return sum(self.durations[cmd].buckets) + self._inline(cmd)[0]

    def histogram(self, cmd: int) -> list[int]:
        """Requests of ``cmd`` by duration bucket (``BOUNDS_NS``, then +Inf)."""
        counts = list(self.durations[cmd].buckets)
        counts[0] += self._inline(cmd)[0]
        return counts

    def time_ns(self, cmd: int) -> int:
        """The summed durations of the timed requests of ``cmd``."""
        return self.durations[cmd].sum_ns

    def byte_count(self, cmd: int) -> int:
        """The lengths of the successful requests of ``cmd``."""
        return self.nbytes[cmd] + self._inline(cmd)[1]

    def in_flight(self) -> int:
        """Requests started and not yet answered, over every connection."""
        return sum(len(conn._tasks) for conn in list(self.connections)
                   if conn._core is not None)

    def open_connections(self) -> int:
        return sum(conn._core is not None for conn in list(self.connections))


@dataclasses.dataclass(frozen=True)
class ExportView:
    """One export as a scrape sees it."""

    name: str
    metrics: ExportMetrics
    connections: int
    in_flight: int


def export_views(exports: Iterable[Export]) -> list[ExportView]:
    """The exports' counters and gauges, now."""
    return [ExportView(export.name, export.metrics, export.metrics.open_connections(),
                       export.metrics.in_flight()) for export in exports]


# -- process-wide state -------------------------------------------------------------------

_counting = False
#: handshakes that ended without transmission, by reason (counted whether or not
#: counting is on: never on the request path)
HANDSHAKE_FAILURES: dict[str, int] = dict.fromkeys(HANDSHAKE_REASONS, 0)
#: librbd aio call durations by rbd node name (only while ``time_rbd_calls`` is on)
RBD_CALLS: dict[str, Histogram] = {}


def set_counting(on: bool) -> None:
    """Whether servers made from now on count their requests (``MeteredConnection``)."""
    global _counting
    _counting = on


def counting() -> bool:
    return _counting


def handshake_failed(reason: str) -> None:
    """Count a handshake that ended without transmission (``HANDSHAKE_REASONS``)."""
    HANDSHAKE_FAILURES[reason] = HANDSHAKE_FAILURES.get(reason, 0) + 1


def _rbd_call(node: RbdNode, ns: int) -> None:
    name = node.shown_name or node.node_name or node.filename
    histogram = RBD_CALLS.get(name)
    if histogram is None:
        histogram = RBD_CALLS[name] = Histogram()
    histogram.observe(ns)


def time_rbd_calls(on: bool) -> None:
    """Time every librbd aio call of every rbd node (``RBD_CALLS``), or stop."""
    from ..block import rbd

    rbd.call_timer = _rbd_call if on else None


# -- the counting connection ---------------------------------------------------------------

_choose_fast_paths = FastPath._choose_fast_paths
_try_inline = FastPath._try_inline
_serve = Handlers._serve
_errno_reply = Handlers._errno_reply
_reject = Handlers._reject


class Metered(FastPath, Handlers):
    """The request paths of a ``Connection``, counting into the export's
    ``ExportMetrics`` (``server.runtime.MeteredConnection`` puts it first)."""

    #: the export's counters, once transmission starts
    _metrics: ExportMetrics

    def _choose_fast_paths(self, export: Export, *, structured: bool,
                           plain_socket: bool) -> None:
        _choose_fast_paths(self, export, structured=structured, plain_socket=plain_socket)
        metrics = self._metrics = export.metrics
        metrics.connections.add(self)
        if self._start_read is not None:
            self._start_read = _timed_read(self._start_read, metrics)
        if self._start_write is not None:
            self._start_write = _timed_write(self._start_write, metrics)

    def _try_inline(self, core: ServerTransmission, request: Request,
                    out: list[Buffer]) -> bool:
        # answered at once, so not timed: no clock read, two additions
        if _try_inline(self, core, request, out):
            metrics = self._metrics
            if request.cmd == READ:
                metrics.inline_reads += 1
                metrics.inline_read_bytes += request.length
            else:  # a WRITE
                metrics.inline_writes += 1
                metrics.inline_write_bytes += request.length
                end = request.offset + request.length
                if end > metrics.wr_highest_offset:
                    metrics.wr_highest_offset = end
            return True
        return False

    async def _serve(self, core: ServerTransmission, request: Request) -> bool:
        start = perf_counter_ns()
        failed = await _serve(self, core, request)
        self._metrics.done(request.cmd, request.offset, request.length, start, failed)
        return failed

    def _errno_reply(self, core: ServerTransmission, request: Request, errno: Errno,
                     message: str) -> list[Buffer]:
        self._metrics.error(request.cmd, errno)
        return _errno_reply(self, core, request, errno, message)

    def _reject(self, core: ServerTransmission, cookie: int, cmd: int, errno: Errno,
                message: str) -> list[Buffer]:
        self._metrics.refused(cmd, errno)
        return _reject(self, core, cookie, cmd, errno, message)


def _timed_read(start_read: Callable[[int, int, ReadDone], bool],
                metrics: ExportMetrics) -> Callable[[int, int, ReadDone], bool]:
    """``start_read`` that counts each read when it completes."""

    def start(offset: int, length: int, done: ReadDone) -> bool:
        began = perf_counter_ns()

        def timed(data: bytes | bytearray | None, error: OSError | None) -> None:
            metrics.done(READ, offset, length, began, data is None)
            done(data, error)

        return start_read(offset, length, timed)

    return start


def _timed_write(start_write: Callable[[Data, int, bool, WriteDone], bool],
                 metrics: ExportMetrics) -> Callable[[Data, int, bool, WriteDone], bool]:
    """``start_write`` that counts each write when it completes."""

    def start(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
        began = perf_counter_ns()
        length = len(data)

        def timed(error: OSError | None) -> None:
            metrics.done(WRITE, offset, length, began, error is not None)
            done(error)

        return start_write(data, offset, fua, timed)

    return start
