"""Building nodes from blockdev options: the one way both the command line and QMP
make storage.

The options are qemu's ``blockdev-add`` arguments, already checked against
their schema: ``driver``, ``node-name``, ``read-only`` and the driver's own
keys; a format node's ``file`` is a node name or the options of an inline
child.  ``pynbd IMAGE`` builds the same options qemu-nbd would
(``raw`` over ``file``/``host_device``/``memory``/``rbd``).

Rules of this module:
- ``build`` opens every node the options describe, children first, and adds
  nothing to the graph; ``BlockdevError`` (qemu's wording) if anything fails.
  Every node it opens goes into the caller's ``opened`` list at once, so the
  caller can close them whatever fails.  So a failed command leaves the graph
  as it was.
- Node names are checked as qemu's ``bdrv_assign_node_name`` checks them:
  well-formed (a letter, then letters, digits, ``-``, ``.``, ``_``), not
  taken, at most 31 characters.  Names generated for nodes given without one
  (``#block001``) skip the first check, and no user name can look like them.
- ``build`` may block (an RBD image connects to its cluster): the daemon runs
  it in a thread, the command line before its event loop starts.
- ``wrap`` (the daemon: an implicit fault filter) is put over every node
  built, and the wrapper is what parents and exports use.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .file import FileNode
from .graph import BlockGraph, GraphError
from .memory import MemoryNode
from .raw import RawNode

if TYPE_CHECKING:
    from collections.abc import Callable

    from .node import Node

#: the drivers ``build`` knows, by the kind of node they make
PROTOCOL_DRIVERS = ("file", "host_device", "memory", "rbd")
FORMAT_DRIVERS = ("raw",)

Options = dict[str, Any]

#: qemu's BLOCK_NODE_NAME_MAX (32) less its terminating NUL
MAX_NODE_NAME = 31
#: qemu's ``id_wellformed``: a letter, then letters, digits, '-', '.' or '_' (ASCII)
_WELLFORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def id_wellformed(name: str) -> bool:
    """Whether ``name`` is a valid user-given id or node name, as qemu judges it."""
    return _WELLFORMED.fullmatch(name) is not None


class BlockdevError(GraphError):
    """A node that cannot be made (qemu's wording)."""


def _same(options: Options) -> Options:
    return options


class _Builder:
    def __init__(self, graph: BlockGraph, check_child: Callable[[Options], Options],
                 wrap: Callable[[Node], Node] | None, opened: list[Node]) -> None:
        self.graph = graph
        self.check_child = check_child
        self.wrap = wrap
        self.opened = opened
        #: (name, node) made so far, children first
        self.made: list[tuple[str, Node]] = []

    def taken(self, name: str) -> bool:
        return name in self.graph or any(made == name for made, _ in self.made)

    def node(self, options: Options, name: str, generated: bool) -> Node:
        if not generated and not id_wellformed(name):
            raise BlockdevError(f"Invalid node-name: '{name}'")
        if self.taken(name):
            raise BlockdevError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > MAX_NODE_NAME:
            raise BlockdevError("Node name too long")
        read_only = bool(options.get("read-only", False))
        driver = options["driver"]
        node: Node
        if driver in ("file", "host_device"):
            node = _file(options, read_only)
        elif driver == "memory":
            try:
                node = MemoryNode(options["size"])
            except ValueError as err:
                raise BlockdevError(f"Parameter 'size': {err}") from None
        elif driver == "rbd":
            node = _rbd(options, read_only)
        elif driver == "raw":
            node = self.raw(options, name, read_only)
        else:
            raise BlockdevError(f"Unknown driver '{driver}'")
        self.opened.append(node)
        if self.taken(name):  # an inline child took the name
            raise BlockdevError(f"Duplicate nodes with node-name='{name}'")
        if self.wrap is not None:
            node = self.wrap(node)
            self.opened.append(node)
        self.made.append((name, node))
        return node

    def raw(self, options: Options, name: str, read_only: bool) -> Node:
        spec = options["file"]
        if isinstance(spec, str):
            child = self.graph.get(spec)
            if child is None:
                raise BlockdevError(f"Cannot find device={spec} nor node-name={spec}")
            child_name = spec
        elif isinstance(spec, dict):
            generated = "node-name" not in spec
            child_name = self.graph.generated_name() if generated else spec["node-name"]
            child = self.node(self.check_child({**spec, "node-name": child_name}), child_name,
                              generated)
        else:
            raise BlockdevError("Invalid parameter type for 'file', expected: object or string")
        if not child.capabilities.can_write and not read_only:
            raise BlockdevError(f"Node '{child_name}' is read-only; add the raw node with "
                                "'read-only': true")
        try:
            return RawNode(child, offset=options.get("offset", 0), size=options.get("size"),
                           read_only=read_only)
        except ValueError as err:
            raise BlockdevError(str(err)) from None


def _file(options: Options, read_only: bool) -> Node:
    filename = options["filename"]
    try:
        return FileNode(filename, read_only=read_only, discard=options.get("discard") == "unmap")
    except OSError as err:
        raise BlockdevError(f"Could not open '{filename}': {err.strerror or err}") from None


def _rbd(options: Options, read_only: bool) -> Node:
    from .rbd import RbdNode, RbdUnavailable
    from .rbdspec import RbdSpec

    spec = options.get("x-spec") or RbdSpec(
        pool=options["pool"], image=options["image"], namespace=options.get("namespace", ""),
        snapshot=options.get("snapshot"), conf=options.get("conf"), user=options.get("user"))
    if spec.snapshot is not None and not read_only:
        raise BlockdevError(f"Snapshot '{spec.snapshot}' is read-only; add the node with "
                            "'read-only': true")
    try:
        return RbdNode(spec, read_only=read_only, lock=options.get("x-lock", "auto"),
                       discard=options.get("discard") == "unmap")
    except RbdUnavailable as err:
        raise BlockdevError(str(err)) from None
    except OSError as err:
        raise BlockdevError(str(err.strerror or err)) from None


def build(graph: BlockGraph, options: Options, opened: list[Node], *,
          check_child: Callable[[Options], Options] = _same,
          wrap: Callable[[Node], Node] | None = None) -> list[tuple[str, Node]]:
    """Open the node ``options`` describe and its inline children, children first.

    Returns ``(name, node)`` pairs to add to the graph, the top node last.
    Nothing is added here; every node opened is appended to ``opened`` as soon
    as it exists (the caller closes them if anything fails).  Without a
    ``node-name`` the top node gets a generated one (the command line).

    Raises:
        BlockdevError: a node could not be made.
    """
    builder = _Builder(graph, check_child, wrap, opened)
    generated = "node-name" not in options
    name = graph.generated_name() if generated else options["node-name"]
    builder.node(options, name, generated)
    return builder.made


def add_all(graph: BlockGraph, made: list[tuple[str, Node]]) -> Node:
    """Put what ``build`` made into the graph; the top node."""
    for name, node in made:
        graph.add(node, name)
    return made[-1][1]
