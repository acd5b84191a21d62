"""Offset-explicit I/O helpers shared by the nodes that keep data in a file.

``FileNode`` (an image file or block device) and ``MemoryNode`` (a
``memfd``) both read and write with ``os.preadv``/``os.pwritev`` at explicit
offsets and change allocation with ``fallocate(2)``; the loops that finish a
short transfer and the ctypes binding live here once.
"""

from __future__ import annotations

import ctypes
import errno
import os

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: One shared buffer of zeroes for zero fills and zero writes.
ZEROES = memoryview(bytes(1 << 20))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; raises ``OSError`` with the real errno."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def as_bytes(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``data`` (no copy)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def fill_zeroes(view: memoryview) -> None:
    for pos in range(0, len(view), len(ZEROES)):
        count = min(len(ZEROES), len(view) - pos)
        view[pos:pos + count] = ZEROES[:count]


def pread_all(fd: int, view: memoryview, offset: int) -> None:
    """Fill all of ``view`` from ``offset``; past the end of the file reads as zeroes."""
    pos = 0
    while pos < len(view):
        count = os.preadv(fd, [view[pos:]], offset + pos)
        if count == 0:
            # past the end of the file (it shrank under us): holes read as zeroes
            fill_zeroes(view[pos:])
            return
        pos += count


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset``."""
    pos = 0
    while pos < len(view):
        count = os.pwritev(fd, [view[pos:]], offset + pos)
        if count == 0:
            raise OSError(errno.ENOSPC, "write made no progress")
        pos += count
