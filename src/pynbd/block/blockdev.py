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
- ``build`` is a coroutine: a qcow2 node reads its header to open, and an RBD
  image connects to its cluster in a thread (never on the event loop).
- A qcow2 node without an explicit ``backing`` opens the backing file its
  header names, as qemu does: relative to the image's directory, in the
  format the header gives (probed if none), read-only, recursively (at most
  ``MAX_BACKING_DEPTH`` deep); ``"backing": null`` opens none.
- ``wrap`` (the daemon: implicit fault and tracking filters) is put over every
  node built, and the wrapper is what parents and exports use.
- ``cache`` (qemu's ``{direct, no-flush}``) on a protocol node: ``direct``
  opens a file with ``O_DIRECT`` (``DirectFileNode``; nothing to bypass on a
  memory disk, and rbd images are opened without librbd's cache anyway),
  ``no-flush`` puts an implicit ``NoFlushFilter`` over the node.  A file's
  ``aio`` can only be ``threads``: pynbd has no Linux AIO or io_uring.
- Fleecing (``pynbd.block.fleece``): ``copy-before-write`` needs a tracking
  filter on its source's chain of filters (the daemon's wrapper has one) and
  a writable ``target``; ``snapshot-access`` a copy-before-write ``file``.
- ``python`` (and a plugin's own driver name) opens a storage plugin
  (``pynbd.block.plugin``), a protocol node; any other name is unknown.
- Filters over ``file``: ``throttle`` joins the group its ``throttle-group``
  names among the caller's ``throttle_groups`` (``pynbd.block.throttle``),
  ``log`` opens its ``logfile`` (``pynbd.block.logfilter``).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import TYPE_CHECKING, Any

from .cachemode import NoFlushFilter
from .directfile import DirectFileNode
from .file import FileNode
from .graph import BlockGraph, GraphError, shown
from .memory import MemoryNode
from .probe import probe_format
from .raw import RawNode

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .node import Node
    from .throttle import ThrottleGroup

#: the drivers ``build`` knows, by the kind of node they make
PROTOCOL_DRIVERS = ("file", "host_device", "memory", "rbd")
FORMAT_DRIVERS = ("raw", "qcow2")
#: every driver that is not a protocol node (plugins are protocol nodes)
FORMAT_AND_FILTER_DRIVERS = (*FORMAT_DRIVERS, "copy-before-write", "snapshot-access",
                             "throttle", "log")
#: how deep a backing chain opened from image headers may go
MAX_BACKING_DEPTH = 64

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


def _same(options: Options, role: str) -> Options:
    return options


class _Builder:
    def __init__(self, graph: BlockGraph, check_child: Callable[[Options, str], Options],
                 wrap: Callable[[Node], Node] | None, opened: list[Node],
                 throttle_groups: Mapping[str, ThrottleGroup] | None = None) -> None:
        self.graph = graph
        self.throttle_groups = throttle_groups or {}
        self.check_child = check_child
        self.wrap = wrap
        self.opened = opened
        #: (name, node) made so far, children first
        self.made: list[tuple[str, Node]] = []
        #: backing files opened from image headers so far (against loops)
        self.depth = 0

    def taken(self, name: str) -> bool:
        return name in self.graph or any(made == name for made, _ in self.made)

    async def node(self, options: Options, name: str, generated: bool) -> Node:
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
            # connecting to the cluster blocks: not on the event loop
            node = await asyncio.get_running_loop().run_in_executor(
                None, _rbd, options, read_only)
        elif driver == "raw":
            node = await self.raw(options, read_only)
        elif driver == "qcow2":
            node = await self.qcow2(options, read_only)
        elif driver in ("copy-before-write", "snapshot-access"):
            node = await self.fleece(options, read_only)
        elif driver in ("throttle", "log"):
            node = await self.filter(options, read_only)
        else:  # python, or a plugin's own driver name (pynbd.block.plugin)
            node = await _plugin(options, read_only)
        self.opened.append(node)
        protocol = driver in PROTOCOL_DRIVERS or driver not in FORMAT_AND_FILTER_DRIVERS
        if protocol and _cache(options).get("no-flush"):
            node = NoFlushFilter(node)  # qemu's cache.no-flush: a flag of the node
            self.opened.append(node)
        if self.taken(name):  # an inline child took the name
            raise BlockdevError(f"Duplicate nodes with node-name='{name}'")
        if self.wrap is not None:
            node = self.wrap(node)
            self.opened.append(node)
        self.made.append((name, node))
        return node

    async def child(self, options: Options, role: str, read_only: bool,
                    kind: str) -> Node:
        """The child ``options[role]`` names (a node name) or describes (inline)."""
        spec = options[role]
        if isinstance(spec, str):
            child = self.graph.get(spec)
            if child is None:
                raise BlockdevError(f"Cannot find device={spec} nor node-name={spec}")
            child_name = spec
        elif isinstance(spec, dict):
            generated = "node-name" not in spec
            child_name = self.graph.generated_name() if generated else spec["node-name"]
            child = await self.node(self.check_child({**spec, "node-name": child_name}, role),
                                    child_name, generated)
        else:
            raise BlockdevError(f"Invalid parameter type for '{role}', expected: object or "
                                "string")
        if not child.capabilities.can_write and not read_only:
            raise BlockdevError(f"Node '{child_name}' is read-only; add the {kind} node with "
                                "'read-only': true")
        return child

    async def raw(self, options: Options, read_only: bool) -> Node:
        child = await self.child(options, "file", read_only, "raw")
        if options.get("x-snapshot") is not None:  # -l: qemu-nbd's words
            raise BlockdevError("Failed to load snapshot: Block format 'raw' used by device "
                                "'' does not support temporarily loading internal snapshots")
        try:
            return RawNode(child, offset=options.get("offset", 0), size=options.get("size"),
                           read_only=read_only, probed=bool(options.get("x-probed")))
        except ValueError as err:
            raise BlockdevError(str(err)) from None

    async def qcow2(self, options: Options, read_only: bool) -> Node:
        from .qcow2 import Qcow2Error, Qcow2Node, read_info
        from .qcow2.snapshots import SnapshotError

        file = await self.child(options, "file", read_only, "qcow2")
        try:
            info = await read_info(file)
        except Qcow2Error as err:
            raise BlockdevError(f"Could not open '{file.filename}': {err}") from None
        backing: Node | None = None
        if options.get("backing") is not None:  # a node, or null for none at all
            backing = await self.child(options, "backing", True, "qcow2")
        elif "backing" not in options and info.backing_file:
            backing = await self.backing_file(file, info.backing_file, info.backing_format)
        try:
            # "x-snapshot" (the command line's -l, not in the QMP schema): a SnapshotRef
            return await Qcow2Node.open(file, backing=backing, read_only=read_only,
                                        cache_size=options.get("cache-size"),
                                        snapshot=options.get("x-snapshot"),
                                        lazy_refcounts=options.get("lazy-refcounts"))
        except SnapshotError as err:
            raise BlockdevError(f"Failed to load snapshot: {err}") from None
        except Qcow2Error as err:
            raise BlockdevError(f"Could not open '{file.filename}': {err}") from None

    async def fleece(self, options: Options, read_only: bool) -> Node:
        """``copy-before-write`` (over the source ``file``, copying to ``target``; the
        source's tracking filter found under it) or ``snapshot-access`` (over one)."""
        from .fleece import CopyBeforeWrite, lookup_bitmap
        from .snapshotaccess import SnapshotAccess

        driver = options["driver"]
        try:
            if driver == "snapshot-access":
                return SnapshotAccess(await self.child(options, "file", True, driver))
            source = await self.child(options, "file", read_only, driver)
            target = await self.child(options, "target", True, driver)
            if not target.capabilities.can_write:
                raise BlockdevError("The copy-before-write target must be writable")
            spec = options.get("bitmap")
            cbw = CopyBeforeWrite(
                source, target, on_cbw_error=options.get("on-cbw-error", "break-guest-write"),
                bitmap=None if spec is None else lookup_bitmap(self.graph, spec["node"],
                                                               spec["name"]),
                cbw_timeout=options.get("cbw-timeout", 0),
                min_cluster_size=options.get("min-cluster-size", 0))
            if cbw.tracking is not None:
                # the moment frozen is now: changes already past the hook land first
                await cbw.tracking.quiesce()
            return cbw
        except BlockdevError:
            raise
        except ValueError as err:
            raise BlockdevError(str(err)) from None

    async def filter(self, options: Options, read_only: bool) -> Node:
        """``throttle`` (a member of a throttle group) or ``log`` over ``file``."""
        from .logfilter import log_node
        from .throttle import throttle_node

        child = await self.child(options, "file", read_only, options["driver"])
        try:
            if options["driver"] == "throttle":
                return throttle_node(options, child, self.throttle_groups, read_only)
            return log_node(options, child, read_only)
        except ValueError as err:
            raise BlockdevError(str(err)) from None

    async def backing_file(self, file: Node, name: str, fmt: str | None) -> Node:
        """Open the image's backing file as qemu does: relative to the image's own
        directory, in ``fmt`` (probed if the image does not say), read-only."""
        path = name if os.path.isabs(name) or not file.filename else os.path.join(
            os.path.dirname(file.filename), name)
        self.depth += 1
        if self.depth > MAX_BACKING_DEPTH:
            raise BlockdevError(f"Backing chain of '{file.filename}' is deeper than "
                                f"{MAX_BACKING_DEPTH} images (a loop?)")
        protocol: Options = {"driver": "file", "filename": path, "read-only": True}
        if isinstance(shown(file), DirectFileNode):  # inherited, as qemu does
            protocol["cache"] = {"direct": True}
        if fmt is None:
            probe = _file(protocol, True)
            try:
                fmt = await probe_format(probe)
            finally:
                await probe.close()
        if fmt not in FORMAT_DRIVERS:
            raise BlockdevError(f"Backing file '{path}': unsupported format '{fmt}'")
        options: Options = {"driver": fmt, "read-only": True, "file": protocol}
        return await self.node(options, self.graph.generated_name(), True)


def _cache(options: Options) -> dict[str, bool]:
    cache: dict[str, bool] = options.get("cache") or {}
    return cache


def _file(options: Options, read_only: bool) -> Node:
    filename = options["filename"]
    direct = bool(_cache(options).get("direct"))
    aio = options.get("aio", "threads")
    if aio != "threads":
        raise BlockdevError(f"aio={aio} is not supported: pynbd does its file I/O in a "
                            "thread pool (aio=threads)")
    kind = DirectFileNode if direct else FileNode
    try:
        return kind(filename, read_only=read_only, discard=options.get("discard") == "unmap")
    except OSError as err:
        raise BlockdevError(f"Could not open '{filename}': {err.strerror or err}") from None


def _rbd(options: Options, read_only: bool) -> Node:
    from .rbd import RbdNode, RbdUnavailable
    from .rbdspec import RbdSpec

    spec = options.get("x-spec") or RbdSpec(
        pool=options["pool"], image=options["image"], namespace=options.get("namespace", ""),
        snapshot=options.get("snapshot"), conf=options.get("conf"), user=options.get("user"))
    if _cache(options).get("direct") and spec.cache_requested:
        raise BlockdevError("cache.direct=on keeps librbd's client cache off, but the image "
                            "sets rbd_cache=true")
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


async def _plugin(options: Options, read_only: bool) -> Node:
    from .plugin import open_plugin
    from .pluginload import PluginError, is_plugin_driver

    if options["driver"] != "python" and not is_plugin_driver(options["driver"]):
        raise BlockdevError(f"Unknown driver '{options['driver']}'")
    try:
        return await open_plugin(options, read_only)
    except PluginError as err:
        raise BlockdevError(str(err)) from None


async def build(graph: BlockGraph, options: Options, opened: list[Node], *,
          check_child: Callable[[Options, str], Options] = _same,
          wrap: Callable[[Node], Node] | None = None,
          throttle_groups: Mapping[str, ThrottleGroup] | None = None,
          ) -> list[tuple[str, Node]]:
    """Open the node ``options`` describe and its inline children, children first.

    Returns ``(name, node)`` pairs to add to the graph, the top node last.
    Nothing is added here; every node opened is appended to ``opened`` as soon
    as it exists (the caller closes them if anything fails).  Without a
    ``node-name`` the top node gets a generated one (the command line).

    Raises:
        BlockdevError: a node could not be made.
    """
    builder = _Builder(graph, check_child, wrap, opened, throttle_groups)
    generated = "node-name" not in options
    name = graph.generated_name() if generated else options["node-name"]
    await builder.node(options, name, generated)
    return builder.made


def add_all(graph: BlockGraph, made: list[tuple[str, Node]]) -> Node:
    """Put what ``build`` made into the graph; the top node."""
    for name, node in made:
        graph.add(node, name)
    return made[-1][1]
