"""The qcow2 format node (read and write), after qemu's docs/interop/qcow2.rst.

The package owns its modules: ``header`` (parsing and validation),
``entries`` (L1/L2 entry layouts, decompression), ``cache`` (the LRU table
cache), ``refcount`` (refcounts and allocation), ``reads`` (lookup, reads,
block status, allocation depth), ``fast`` (nowait reads and in-place writes),
``writeback`` (L1/L2 write-back, overlap check), ``node`` (opening and writes),
``rebuild`` (refcounts of a dirty image), ``snapshots`` (internal snapshots),
``create`` (new images), ``bitmaps`` and ``bitmapstore`` (persistent dirty
bitmaps).
"""

from __future__ import annotations

from .header import ImageInfo, Qcow2Error, is_qcow2, read_info
from .node import Qcow2Node

__all__ = ["ImageInfo", "Qcow2Error", "Qcow2Node", "is_qcow2", "read_info"]
