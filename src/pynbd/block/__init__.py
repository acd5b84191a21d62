"""Storage as a graph of nodes: protocol nodes (file, memory, rbd) hold data, format
nodes (raw) interpret a child, filter nodes (faults) change a child's requests.

``pynbd.block.node`` defines the interface every node implements,
``pynbd.block.filter`` the base of nodes over one child, ``pynbd.block.graph``
the named nodes of a server, and ``pynbd.block.blockdev`` how the command line
and QMP build them from qemu's blockdev options.
"""

from __future__ import annotations

from .file import FileNode
from .filter import FilterNode
from .graph import BlockGraph, GraphError, one_store
from .memory import MemoryNode
from .node import (
    Capabilities,
    Extent,
    ExtentFlags,
    FastPaths,
    FastZeroUnsupported,
    Node,
)
from .raw import RawNode
from .sizes import parse_size

__all__ = [
    "BlockGraph",
    "Capabilities",
    "Extent",
    "ExtentFlags",
    "FastPaths",
    "FastZeroUnsupported",
    "FileNode",
    "FilterNode",
    "GraphError",
    "MemoryNode",
    "Node",
    "RawNode",
    "one_store",
    "parse_size",
]
