"""Block-node commands: blockdev-add, blockdev-del, query-named-block-nodes.

Rules of this module:
- Block nodes own backends; exports borrow them.  Every node's backend is a
  ``FaultBackend`` (no rules: no cost) so that ``x-fault-add`` can fail or
  delay requests of a node that exports already use.
- A node name is checked as qemu's ``bdrv_assign_node_name`` checks it:
  well-formed (``id_wellformed``), then not taken, then at most
  ``MAX_NODE_NAME`` characters.  Names the daemon makes for inline children
  (``#block001``) are not user names and skip the well-formedness check.
- A failed ``blockdev-add`` leaves nothing behind, not even inline children.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from ...backends import FileBackend, MemoryBackend, OffsetBackend
from ...backends.faults import FaultBackend
from .. import schema as s
from ..protocol import QMPError, generic_error
from ..state import Node
from . import JSON, NODE_NAME, Command, id_wellformed

if TYPE_CHECKING:
    from ...backends.base import Backend
    from ..engine import Engine

#: qemu's BLOCK_NODE_NAME_MAX (32) less its terminating NUL
MAX_NODE_NAME = 31

_FILE = s.Struct({"filename": str, "discard": s.Enum(("ignore", "unmap")),
                  "cache": s.Struct({"direct": bool, "no-flush": bool},
                                    frozenset({"direct", "no-flush"})),
                  "aio": s.Enum(("threads", "native", "io_uring"))},
                 frozenset({"discard", "cache", "aio"}))
_RAW = s.Struct({"file": object, "offset": int, "size": int, "discard": s.Enum(
    ("ignore", "unmap"))}, frozenset({"offset", "size", "discard"}))
_MEMORY = s.Struct({"size": int})
# qemu's BlockdevOptionsRbd members pynbd supports, plus x-lock (pynbd's --rbd-lock)
_RBD = s.Struct({"pool": str, "namespace": str, "image": str, "conf": str, "snapshot": str,
                 "user": str, "discard": s.Enum(("ignore", "unmap")),
                 "x-lock": s.Enum(("auto", "exclusive"))},
                frozenset({"namespace", "conf", "snapshot", "user", "discard", "x-lock"}))
_COMMON = {"node-name": str, "read-only": bool}


def _node_variant(extra: s.Struct) -> s.Struct:
    return s.Struct({**_COMMON, **extra.members}, frozenset({"read-only"}) | extra.optional)


BLOCKDEV_ADD = s.Union_("driver", {
    "file": _node_variant(_FILE),
    "raw": _node_variant(_RAW),
    "memory": _node_variant(_MEMORY),
    "rbd": _node_variant(_RBD),
})


def check_node_name(engine: Engine, name: str, generated: bool = False) -> None:
    """Refuse a node name as qemu does: malformed, taken, then too long."""
    if not generated and not id_wellformed(name):
        raise generic_error(f"Invalid node-name: '{name}'")
    if name in engine.nodes:
        raise generic_error(f"Duplicate nodes with node-name='{name}'")
    if len(name) > MAX_NODE_NAME:
        raise generic_error("Node name too long")


async def _blockdev_add(engine: Engine, args: dict[str, JSON]) -> JSON:
    before = set(engine.nodes)
    try:
        await _add_node(engine, args)
    except QMPError:
        # a failed command leaves nothing behind, not even the inline children it made
        for name in [name for name in engine.nodes if name not in before]:
            node = engine.nodes.pop(name)
            if node.child is None:
                await node.backend.close()
        raise
    return {}


async def _add_node(engine: Engine, args: dict[str, JSON], generated: bool = False) -> Node:
    """Create a node from checked blockdev-add arguments."""
    name = args["node-name"]
    check_node_name(engine, name, generated)
    read_only = bool(args.get("read-only", False))
    driver = args["driver"]
    node: Node
    if driver == "file":
        try:
            backend: Backend = FileBackend(args["filename"], read_only=read_only,
                                           discard=args.get("discard") == "unmap")
        except OSError as err:
            raise generic_error(f"Could not open '{args['filename']}': "
                                f"{err.strerror or err}") from None
        node = Node(name, "file", backend, read_only, filename=args["filename"])
    elif driver == "memory":
        try:
            memory = MemoryBackend(args["size"])
        except ValueError as err:
            raise generic_error(f"Parameter 'size': {err}") from None
        node = Node(name, "memory", memory, read_only)
    elif driver == "rbd":
        node = await _rbd_node(name, args, read_only)
    else:
        node = await _raw_node(engine, name, args, read_only)
    if name in engine.nodes:  # an inline child took the name
        raise generic_error(f"Duplicate nodes with node-name='{name}'")
    node.backend = FaultBackend(node.backend)
    engine.nodes[name] = node
    return node


async def _rbd_node(name: str, args: dict[str, JSON], read_only: bool) -> Node:
    from ...backends.rbd import RbdBackend, RbdSpec, RbdUnavailable

    spec = RbdSpec(pool=args["pool"], image=args["image"], namespace=args.get("namespace", ""),
                   snapshot=args.get("snapshot"), conf=args.get("conf"), user=args.get("user"))
    if spec.snapshot is not None and not read_only:
        raise generic_error(f"Snapshot '{spec.snapshot}' is read-only; add the node with "
                            "'read-only': true")
    # connecting to the cluster blocks: keep the QMP loop (and every export) running
    opener = functools.partial(RbdBackend, spec, read_only=read_only,
                               lock=args.get("x-lock", "auto"),
                               discard=args.get("discard") == "unmap")
    try:
        backend = await asyncio.get_running_loop().run_in_executor(None, opener)
    except RbdUnavailable as err:
        raise generic_error(str(err)) from None
    except OSError as err:
        raise generic_error(str(err.strerror or err)) from None
    return Node(name, "rbd", backend, read_only, filename=f"rbd:{spec.name}")


async def _raw_node(engine: Engine, name: str, args: dict[str, JSON],
                    read_only: bool) -> Node:
    child_spec = args["file"]
    if isinstance(child_spec, str):
        child = engine.node(child_spec)
    elif isinstance(child_spec, dict):
        implicit = "node-name" not in child_spec
        if implicit:  # qemu names an inline child itself (the nbd-multiconn iotest relies on it)
            child_spec = {**child_spec, "node-name": engine.implicit_node_name()}
        child = await _add_node(engine, s.check(BLOCKDEV_ADD, child_spec, "file"),
                                generated=implicit)
        child.implicit = implicit
    else:
        raise generic_error("Invalid parameter type for 'file', expected: object or string")
    if child.read_only and not read_only:
        raise generic_error(f"Node '{child.name}' is read-only; add the raw node with "
                            "'read-only': true")
    backend: Backend = child.backend
    if "offset" in args or "size" in args:
        try:
            backend = OffsetBackend(backend, args.get("offset", 0), args.get("size"))
        except ValueError as err:
            raise generic_error(str(err)) from None
    return Node(name, "raw", backend, read_only, filename=child.filename, child=child)


async def _blockdev_del(engine: Engine, args: dict[str, JSON]) -> JSON:
    name = args["node-name"]
    node = engine.nodes.get(name)
    if node is None:
        raise generic_error(f"Failed to find node with node-name='{name}'")
    users = engine.users(node)
    if users:
        raise generic_error(f"Node '{name}' is busy: in use by {', '.join(users)}")
    del engine.nodes[name]
    # inline children we named go with their parent (as in qemu)
    while node.child is not None and node.child.implicit and not engine.users(node.child):
        node = node.child
        del engine.nodes[node.name]
    if node.child is None:
        await node.backend.close()
    return {}


async def _query_named_block_nodes(engine: Engine, args: dict[str, JSON]) -> JSON:
    return [{"node-name": n.name, "drv": n.driver, "ro": n.read_only, "file": n.filename,
             "image": {"virtual-size": n.backend.size, "filename": n.filename,
                       "format": n.driver}}
            for n in engine.nodes.values()]


COMMANDS = (
    Command("blockdev-add", BLOCKDEV_ADD, _blockdev_add),
    Command("blockdev-del", NODE_NAME, _blockdev_del),
    Command("query-named-block-nodes", s.Struct({"flat": bool}, frozenset({"flat"})),
            _query_named_block_nodes),
)
