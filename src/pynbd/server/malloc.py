"""glibc's allocator, set for a server whose buffers are hundreds of KiB each.

Every READ through Ceph's binding gets a new ``bytes`` of the request's size,
which librbd fills on its own threads, and it is freed once the reply has
gone.  glibc serves such sizes from the heap, but by default it hands the free
memory at the heap's top back to the kernel as soon as there is more than
``M_TRIM_THRESHOLD`` of it (twice the largest buffer freed so far: 512 KiB for
256 KiB reads).  With dozens of buffers in flight that happens all the time,
and every returned page is faulted in and zeroed again when the next buffer
takes it (docs/performance.md has the measurements, before and after).

``tune_malloc`` keeps up to ``TRIM_THRESHOLD`` free at the heap's top and
serves buffers up to ``MMAP_THRESHOLD`` from the heap (setting either stops
glibc adjusting both, so both are set).
A process whose environment already sets these (``GLIBC_TUNABLES``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``) keeps its own choice;
without glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

#: ``mallopt`` parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: free memory the heap may keep at its top before returning it to the kernel
TRIM_THRESHOLD = 64 * 1024 * 1024
#: larger allocations get their own mapping (glibc's default: 128 KiB, rising
#: with what is freed); 1 MiB reads and writes stay below it
MMAP_THRESHOLD = 4 * 1024 * 1024

_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_USER_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")


def user_has_chosen(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets glibc's trim or mmap threshold."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return (any(name in environ for name in _USER_SETTINGS)
            or any(name in tunables for name in _USER_TUNABLES))


def tune_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Set glibc's trim and mmap thresholds for this process; False if it did
    not (the user chose them, or there is no glibc ``mallopt``)."""
    if user_has_chosen(environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # glibc stops adjusting both once either is set: set the mmap one first
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
