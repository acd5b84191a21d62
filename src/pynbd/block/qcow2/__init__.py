"""The qcow2 format node (read and write), after qemu's docs/interop/qcow2.rst.

The package owns its modules: ``header`` (parsing and validation),
``entries`` (L1/L2 entry layouts, decompression), ``cache`` (the LRU table
cache), ``refcount`` (refcounts and allocation), ``reads`` (lookup, reads,
block status) and ``node`` (opening and writes).
"""

from __future__ import annotations

from .header import ImageInfo, Qcow2Error, is_qcow2, read_info
from .node import Qcow2Node

__all__ = ["ImageInfo", "Qcow2Error", "Qcow2Node", "is_qcow2", "read_info"]
