"""Block-node commands: blockdev-add, blockdev-del, query-named-block-nodes.

Rules of this module:
- The nodes live in the engine's block graph (``pynbd.block.graph``) and are
  built by the one builder the command line uses too (``pynbd.block.blockdev``),
  which checks node names as qemu does.  This module adds QMP's part: the
  argument schema (inline children are checked against it as ``file``) and
  the error class.
- Every node the daemon makes is used (by its parents and exports) through two
  implicit filters, shown as the node under them: a ``TrackingFilter`` right
  over it, so that its dirty bitmaps (``commands.bitmaps``; they belong to the
  node) see every write whichever parent or export sent it, and a
  ``FaultFilter`` over that, so that ``x-fault-add`` can fail or delay requests
  of a node that exports already use (a failed injected write never reaches
  the node, nor its bitmaps).
- A failed ``blockdev-add`` leaves nothing behind, not even inline children.
- The drivers are a fixed table plus the storage plugins' own names, looked up
  when a command names a driver (``_Drivers``), so that an installed plugin's
  name works as a driver at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...block.blockdev import add_all, build
from ...block.faults import FaultFilter
from ...block.graph import GraphError, shown
from ...block.pluginload import is_plugin_driver, plugin_drivers
from ...block.tracking import TrackingFilter, bitmaps_of
from .. import schema as s
from ..protocol import generic_error
from . import JSON, NODE_NAME, Command
from .backup import jobs

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ...block.node import Node
    from ..engine import Engine

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
# qemu's BlockdevOptionsQcow2 members pynbd supports; backing: a node name, inline
# options, or null for no backing node at all
_QCOW2 = s.Struct({"file": object, "backing": object, "cache-size": int,
                   "lazy-refcounts": bool},
                  frozenset({"backing", "cache-size", "lazy-refcounts"}))
# qemu's BlockdevOptionsCbw (qemu 7.1+ members) and BlockdevOptionsGenericFormat for
# snapshot-access: the fleecing nodes (pynbd.block.fleece, pynbd.block.snapshotaccess)
_CBW = s.Struct({"file": object, "target": object,
                 "bitmap": s.Struct({"node": str, "name": str}),
                 "on-cbw-error": s.Enum(("break-guest-write", "break-snapshot")),
                 "cbw-timeout": int, "min-cluster-size": int},
                frozenset({"bitmap", "on-cbw-error", "cbw-timeout", "min-cluster-size"}))
_SNAPSHOT_ACCESS = s.Struct({"file": object})
# qemu's BlockdevOptionsThrottle, and pynbd's log filter (pynbd.block.logfilter)
_THROTTLE = s.Struct({"throttle-group": str, "file": object})
_LOG = s.Struct({"file": object, "logfile": str, "logappend": bool}, frozenset({"logappend"}))
_COMMON = {"node-name": str, "read-only": bool}
# storage plugins (pynbd.block.plugin): driver "python" names one in "plugin"; an
# installed plugin's own driver name (entry point group pynbd.plugins) takes the rest
_PLUGIN_KEYS: dict[str, s.Type] = {
    "options": object, "timeout": int, "discard": s.Enum(("ignore", "unmap")),
    "cache": _FILE.members["cache"]}
_PLUGIN = s.Struct(_PLUGIN_KEYS, frozenset(_PLUGIN_KEYS))
_PYTHON = s.Struct({"plugin": str, **_PLUGIN_KEYS}, frozenset(_PLUGIN_KEYS))


def _node_variant(extra: s.Struct) -> s.Struct:
    return s.Struct({**_COMMON, **extra.members}, frozenset({"read-only"}) | extra.optional)


class _Drivers(Mapping[str, s.Struct]):
    """The drivers blockdev-add takes: pynbd's own, then every installed plugin's
    name, looked up when asked (``pip install`` a plugin and its name works)."""

    def __init__(self, own: dict[str, s.Struct]) -> None:
        self._own = own
        self._plugin = _node_variant(_PLUGIN)

    def __getitem__(self, name: str) -> s.Struct:
        if name in self._own:
            return self._own[name]
        if is_plugin_driver(name):
            return self._plugin
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter([*self._own, *(name for name in plugin_drivers() if name not in self._own)])

    def __len__(self) -> int:
        return len(list(iter(self)))


BLOCKDEV_ADD = s.Union_("driver", _Drivers({
    "file": _node_variant(_FILE),
    "raw": _node_variant(_RAW),
    "memory": _node_variant(_MEMORY),
    "rbd": _node_variant(_RBD),
    "qcow2": _node_variant(_QCOW2),
    "copy-before-write": _node_variant(_CBW),
    "snapshot-access": _node_variant(_SNAPSHOT_ACCESS),
    "python": _node_variant(_PYTHON),
    "throttle": _node_variant(_THROTTLE),
    "log": _node_variant(_LOG),
}))


def _implicit_filters(node: Node) -> Node:
    """``node`` as its users see it: FaultFilter(TrackingFilter(node)).  The bitmaps
    belong to the node under any implicit filter of its own (cache.no-flush)."""
    node.bitmaps = bitmaps_of(shown(node))
    wrapper = FaultFilter(TrackingFilter(node))
    wrapper.implicit = True
    return wrapper


async def _blockdev_add(engine: Engine, args: dict[str, JSON]) -> JSON:
    opened: list[Node] = []
    def check_child(options: dict[str, JSON], role: str) -> dict[str, JSON]:
        return s.check(BLOCKDEV_ADD, options, role)

    async with engine.graph_lock:
        try:
            made = await build(engine.graph, args, opened, check_child=check_child,
                               wrap=_implicit_filters, throttle_groups=engine.throttle_groups)
        except BaseException as err:
            for node in reversed(opened):  # a failed command leaves nothing behind
                await node.close()
            if isinstance(err, GraphError):
                raise generic_error(str(err)) from None
            raise
        add_all(engine.graph, made)
    return {}


async def _blockdev_del(engine: Engine, args: dict[str, JSON]) -> JSON:
    name = args["node-name"]
    async with engine.graph_lock:
        node = engine.graph.get(name)
        if node is None:
            raise generic_error(f"Failed to find node with node-name='{name}'")
        if any(job.filter_name == name for job in jobs(engine).values()):
            # a job's filter is the job's, not the monitor's (qemu's words)
            raise generic_error(f"Node {name} is not owned by the monitor")
        users = engine.users(node)
        if users:
            raise generic_error(f"Node '{name}' is busy: in use by {', '.join(users)}")
        try:
            await engine.graph.remove(name)
        except GraphError as err:
            raise generic_error(str(err)) from None
    return {}


async def _query_named_block_nodes(engine: Engine, args: dict[str, JSON]) -> JSON:
    return engine.graph.query()


COMMANDS = (
    Command("blockdev-add", BLOCKDEV_ADD, _blockdev_add),
    Command("blockdev-del", NODE_NAME, _blockdev_del),
    Command("query-named-block-nodes", s.Struct({"flat": bool}, frozenset({"flat"})),
            _query_named_block_nodes),
)
