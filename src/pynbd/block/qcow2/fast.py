"""The qcow2 node's fast paths: reads and in-place writes answered on the spot.

Owns ``Qcow2Fast`` (a base of ``Qcow2Node``): ``pread_nowait`` and
``pwrite_nowait`` (the ``NowaitIO`` protocol of ``pynbd.block.node``),
``sendfile_source`` (reads of one contiguous host run go from the file to the
socket), and ``in_place``, which the write path asks first.  A range whose
clusters follow each other in the file is found with one lookup
(``contiguous``), whatever its length.  A
request whose clusters are all described by L2 tables already in memory, and
that needs nothing but the file's bytes (reads: data, zero or unallocated
clusters without a backing node; writes: data clusters with refcount 1,
written in place), is done with the file's own nowait calls, with no task and
no await; anything else returns False and takes the ordinary path.

Rules of this module: nothing here awaits, so a lookup and the I/O it leads
to happen with no other request in between (no cluster can be freed or
reused under them); nothing here changes metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..fileio import as_bytes, fill_zeroes
from ..node import FastPaths
from .entries import OFFSET_MASK
from .reads import Qcow2Reader

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..node import Data


class Qcow2Fast(Qcow2Reader):
    """``NowaitIO`` for qcow2: see the module's docstring."""

    #: in-place writes are allowed (``Qcow2Node`` sets it once the image was prepared)
    _prepared: bool = False
    #: the file's own nowait calls (found by ``fast_paths``)
    _file_read: Callable[[memoryview, int], bool] | None = None
    _file_write: Callable[[Data, int], bool] | None = None

    _file_sendfile: Callable[[int, int, bool], tuple[int, int] | None] | None = None

    def _overlaps(self, host: int) -> bool:
        """Whether a data write to ``host`` would hit metadata (see ``Qcow2Metadata``)."""
        return False

    def _overlaps_range(self, host: int, length: int) -> bool:
        """``_overlaps`` for every cluster of a run (see ``Qcow2Metadata``)."""
        return False

    def in_place(self, offset: int, length: int) -> int:
        """Where a write of the range goes in place as one run (``contiguous`` with
        COPIED, inside the file, no metadata hit, the image prepared), or 0."""
        host = self.contiguous(offset, length, copied=True) if self._prepared else 0
        if not host or host + length > self.file.size or self._overlaps_range(host, length):
            return 0
        return host

    def fast_paths(self) -> FastPaths:
        """Nowait reads and writes where the file has them (a file, a RAM disk), and
        sendfile for reads of one contiguous run where the file offers it."""
        paths = self.file.fast_paths()
        self._file_read, self._file_write = paths.pread_nowait, paths.pwrite_nowait
        self._file_sendfile = paths.sendfile_source
        return FastPaths(
            pread_nowait=self.pread_nowait if paths.pread_nowait is not None else None,
            pwrite_nowait=self.pwrite_nowait if paths.pwrite_nowait is not None else None,
            sendfile_source=(self.sendfile_source if paths.sendfile_source is not None
                             else None))

    def sendfile_source(self, offset: int, length: int,
                        data_only: bool) -> tuple[int, int] | None:
        """The file's ``sendfile_source`` for the range's one contiguous host run.

        The server sends it, and reads what the socket did not take, in the same
        call, with no ``await`` after this lookup: no cluster can be freed or
        reused in between, so the epoch need not count it."""
        source = self._file_sendfile
        host = self.contiguous(offset, length, copied=False)
        if source is None or not host or host + length > self.file.size:
            return None
        return source(host, length, data_only)

    def _runs(self, offset: int, length: int, *, write: bool) -> list[list[int]] | None:
        """``[guest offset, length, host offset]`` runs covering the range (host 0:
        reads as zeroes; never for writes), merged where the host bytes follow
        each other; None when the range needs more than the file's bytes or a
        table is not in memory."""
        runs: list[list[int]] = []
        bits, sub_bits, size = self.cluster_bits, self.sub_bits, self.cluster_size
        limit = self.file.size
        pos, end = offset, offset + length
        span = self.l2_entries << bits
        while pos < end:
            l1_index = pos // span
            if l1_index >= len(self.l1):
                return None
            l2_offset = self.l1[l1_index] & OFFSET_MASK
            if not l2_offset:
                if write or self.backing is not None:
                    return None
                stop = min(end, (l1_index + 1) * span)
                _add(runs, pos, stop - pos, 0)
                pos = stop
                continue
            table = self.l2_cache.cached(l2_offset)
            if table is None:
                return None
            cluster_start = pos & ~(size - 1)
            stop = min(end, cluster_start + size)
            try:
                mapping = self.entry(table, (pos >> bits) % self.l2_entries)
            except OSError:
                return None  # the ordinary path reports it
            if mapping.compressed:
                return None
            first = (pos - cluster_start) >> sub_bits
            last = (stop - 1 - cluster_start) >> sub_bits
            touched = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
            if mapping.alloc & touched == touched:
                if (write and (not mapping.copied or self._overlaps(mapping.host))) \
                        or not mapping.host or mapping.host + size > limit:
                    return None
                _add(runs, pos, stop - pos, mapping.host + pos - cluster_start)
            elif write or self.backing is not None or mapping.alloc & touched:
                return None  # partly allocated, or reads from the backing node
            else:  # zero or unallocated without a backing node: zeroes
                _add(runs, pos, stop - pos, 0)
            pos = stop
        return runs

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        read = self._file_read
        view = as_bytes(buf)
        if read is None or not view:
            return False
        host = self.contiguous(offset, len(view), copied=False)
        if host and host + len(view) <= self.file.size:
            return read(view, host)
        runs = self._runs(offset, len(view), write=False)
        if runs is None:
            return False
        for pos, length, host in runs:
            part = view[pos - offset:pos - offset + length]
            if not host:
                fill_zeroes(part)
            elif not read(part, host):
                return False
        return True

    def pwrite_nowait(self, data: Data, offset: int) -> bool:
        write = self._file_write
        view = as_bytes(data)
        if write is None or not self._prepared or not view:
            return False
        host = self.in_place(offset, len(view))
        if host:
            return write(view, host)
        runs = self._runs(offset, len(view), write=True)
        if runs is None:
            return False
        for pos, length, host in runs:  # a prefix written, then False: allowed
            if not write(view[pos - offset:pos - offset + length], host):
                return False
        return True


def _add(runs: list[list[int]], pos: int, length: int, host: int) -> None:
    """Append a run, merged into the last one when it continues it."""
    if runs:
        last = runs[-1]
        if (host == 0) == (last[2] == 0) and (not host or last[2] + last[1] == host):
            last[1] += length
            return
    runs.append([pos, length, host])

