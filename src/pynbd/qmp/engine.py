"""The daemon's state and the QMP commands that change it.

Rules of this module:
- Block nodes own backends; exports borrow them.  Several exports of one node
  share its one backend object, so the multi-conn promise holds across them.
- One NBD server at a time (``nbd-server-start`` / ``nbd-server-stop``); its
  connection limit counts every client of every export, and decides
  CAN_MULTI_CONN for every export (advertised unless the limit is 1).
- Every command validates its arguments against its schema first; errors are
  ``QMPError`` with qemu's class and wording.
- Every node's backend is a ``FaultBackend`` (no rules: no cost) so that
  ``x-fault-add`` can fail or delay requests of a node that exports already use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..backends import FileBackend, MemoryBackend, OffsetBackend
from ..backends.faults import COMMANDS as FAULT_COMMANDS
from ..backends.faults import FaultBackend, FaultRule, parse_errno
from ..server import Export, ExportTable, Server
from ..server.runtime import wait_at_stop
from ..server.tls import TlsCredentials, TlsError
from . import schema as s
from .protocol import QMPError, generic_error

if TYPE_CHECKING:
    from ..backends.base import Backend

log = logging.getLogger("pynbd.qmp")

JSON = Any
EventSink = Callable[[str, dict[str, JSON]], None]

#: qemu release whose QMP behaviour we follow (reported by query-version)
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
#: the daemon's default connection limit (qemu 9.1+ and our reliability issue)
DEFAULT_MAX_CONNECTIONS = 100


@dataclasses.dataclass
class Node:
    """A block node: a named backend, possibly layered over another node."""

    name: str
    driver: str
    backend: Backend
    read_only: bool
    filename: str = ""
    child: Node | None = None
    #: an inline child given without a node-name: named by us, deleted with its parent
    implicit: bool = False


@dataclasses.dataclass
class ExportEntry:
    """A block export added with ``block-export-add``."""

    id: str
    node: Node
    export: Export
    shutting_down: bool = False


@dataclasses.dataclass
class NbdServer:
    server: Server
    sock: socket.socket
    unix_path: str | None


# -- schemas ---------------------------------------------------------------------

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
_INET = s.Struct({"host": str, "port": str, "ipv4": bool, "ipv6": bool},
                 frozenset({"ipv4", "ipv6"}))
_UNIX = s.Struct({"path": str})
SOCKET_ADDRESS_LEGACY = s.Union_("type", {
    "unix": s.Struct({"data": _UNIX}),
    "inet": s.Struct({"data": _INET}),
})
NBD_SERVER_START = s.Struct(
    {"addr": SOCKET_ADDRESS_LEGACY, "max-connections": int, "tls-creds": str,
     "tls-authz": str, "handshake-max-seconds": int},
    frozenset({"max-connections", "tls-creds", "tls-authz", "handshake-max-seconds"}))
BLOCK_EXPORT_ADD = s.Struct(
    {"type": s.Enum(("nbd",)), "id": str, "node-name": str, "name": str,
     "description": str, "writable": bool, "writethrough": bool},
    frozenset({"name", "description", "writable", "writethrough"}))
BLOCK_EXPORT_DEL = s.Struct({"id": str, "mode": s.Enum(("safe", "hard"))},
                            frozenset({"mode"}))
NO_ARGS = s.Struct({})
NODE_NAME = s.Struct({"node-name": str})


Handler = Callable[["Engine", dict[str, JSON]], Awaitable[JSON]]


@dataclasses.dataclass(frozen=True)
class Command:
    schema: s.Struct | s.Union_
    handler: Handler


COMMANDS: dict[str, Command] = {}


def command(name: str, schema: s.Struct | s.Union_) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(schema, handler)
        return handler
    return register


class Engine:
    """Nodes, the NBD server and its exports, driven by QMP commands."""

    def __init__(self, emit: EventSink | None = None) -> None:
        self.nodes: dict[str, Node] = {}
        self.exports: dict[str, ExportEntry] = {}
        self.table = ExportTable()
        self.nbd: NbdServer | None = None
        self._emit = emit or (lambda name, data: None)
        self.quit_requested = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._implicit_names = 0
        #: user-creatable objects (object-add): id -> (qom-type, properties)
        self.objects: dict[str, tuple[str, dict[str, JSON]]] = {}

    def tls_credentials(self, creds_id: str | None,
                        authz_id: str | None) -> TlsCredentials | None:
        """TLS settings from object ids (``nbd-server-start`` tls-creds/tls-authz)."""
        if creds_id is None:
            if authz_id is not None:
                raise generic_error("'tls-authz' is only valid with 'tls-creds'")
            return None
        kind, props = self.objects.get(creds_id, ("", {}))
        if kind != "tls-creds-x509":
            raise generic_error(f"No TLS credentials with id '{creds_id}'")
        if props.get("endpoint", "server") != "server":
            raise generic_error(f"TLS credentials '{creds_id}' are not for a server")
        allowed = None
        if authz_id is not None:
            kind, authz = self.objects.get(authz_id, ("", {}))
            if kind != "authz-simple":
                raise generic_error(f"No authorization object with id '{authz_id}'")
            allowed = frozenset({authz["identity"]})
        creds = TlsCredentials(props["dir"], verify_peer=bool(props.get("verify-peer")),
                               allowed_dns=allowed)
        try:
            creds.server_context()
        except TlsError as err:
            raise generic_error(f"TLS credentials '{creds_id}': {err}") from None
        return creds

    def set_event_sink(self, emit: EventSink) -> None:
        self._emit = emit

    async def execute(self, name: str, arguments: dict[str, JSON]) -> JSON:
        """Run one command; raise ``QMPError`` on failure."""
        cmd = COMMANDS.get(name)
        if cmd is None:
            raise QMPError("CommandNotFound", f"The command {name} has not been found")
        args = s.check(cmd.schema, arguments)
        return await cmd.handler(self, args)

    async def close(self) -> None:
        """Stop the NBD server and close every node (daemon exit)."""
        if self.nbd is not None:
            await self._stop_nbd()
        for task in list(self._background):
            await task
        for node in list(self.nodes.values()):
            if node.backend.capabilities.can_write and not node.read_only:
                try:
                    await wait_at_stop(node.backend.flush(),
                                       f"the final flush of node {node.name!r}")
                except OSError as err:
                    log.error("flush of node %s failed: %s", node.name, err)
        for node in self.nodes.values():
            if node.child is None:  # a node over another closes nothing of its own
                await wait_at_stop(node.backend.close(), f"node {node.name!r} to close")
        self.nodes.clear()

    # -- helpers --------------------------------------------------------------

    def node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise generic_error(f"Cannot find device={name} nor node-name={name}")
        return node

    def _users(self, node: Node) -> list[str]:
        users = [f"block export '{e.id}'" for e in self.exports.values() if e.node is node]
        users += [f"node '{n.name}'" for n in self.nodes.values() if n.child is node]
        return users

    async def _stop_nbd(self) -> None:
        assert self.nbd is not None
        nbd, self.nbd = self.nbd, None
        for entry in list(self.exports.values()):
            entry.shutting_down = True
        await nbd.server.close()
        nbd.sock.close()
        if nbd.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(nbd.unix_path)
        for entry in list(self.exports.values()):
            self._forget_export(entry)

    def _forget_export(self, entry: ExportEntry) -> None:
        self.exports.pop(entry.id, None)
        if self.table.lookup(entry.export.name) is entry.export:
            self.table.remove(entry.export.name)
        self._emit("BLOCK_EXPORT_DELETED", {"id": entry.id})


# -- commands ------------------------------------------------------------------------

@command("qmp_capabilities", s.Struct({"enable": s.ListOf(s.Enum(("oob",)))},
                                      frozenset({"enable"})))
async def _qmp_capabilities(engine: Engine, args: dict[str, JSON]) -> JSON:
    if args.get("enable"):
        raise generic_error("This monitor does not support out-of-band execution")
    return {}


@command("query-version", NO_ARGS)
async def _query_version(engine: Engine, args: dict[str, JSON]) -> JSON:
    return {"qemu": dict(QEMU_VERSION), "package": f"pynbd {__version__}"}


@command("query-commands", NO_ARGS)
async def _query_commands(engine: Engine, args: dict[str, JSON]) -> JSON:
    return [{"name": name} for name in sorted(COMMANDS)]


@command("quit", NO_ARGS)
async def _quit(engine: Engine, args: dict[str, JSON]) -> JSON:
    engine.quit_requested.set()
    return {}


@command("blockdev-add", BLOCKDEV_ADD)
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


async def _add_node(engine: Engine, args: dict[str, JSON]) -> Node:
    """Create a node from checked blockdev-add arguments."""
    name = args["node-name"]
    if not name or name in engine.nodes:
        raise generic_error(f"Duplicate nodes with node-name='{name}'" if name
                            else "Parameter 'node-name' must not be empty")
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
    from ..backends.rbd import RbdBackend, RbdSpec, RbdUnavailable

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
            engine._implicit_names += 1
            child_spec = {**child_spec, "node-name": f"#block{engine._implicit_names:03d}"}
        child = await _add_node(engine, s.check(BLOCKDEV_ADD, child_spec, "file"))
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


@command("blockdev-del", NODE_NAME)
async def _blockdev_del(engine: Engine, args: dict[str, JSON]) -> JSON:
    name = args["node-name"]
    node = engine.nodes.get(name)
    if node is None:
        raise generic_error(f"Failed to find node with node-name='{name}'")
    users = engine._users(node)
    if users:
        raise generic_error(f"Node '{name}' is busy: in use by {', '.join(users)}")
    del engine.nodes[name]
    # inline children we named go with their parent (as in qemu)
    while node.child is not None and node.child.implicit and not engine._users(node.child):
        node = node.child
        del engine.nodes[node.name]
    if node.child is None:
        await node.backend.close()
    return {}


@command("query-named-block-nodes", s.Struct({"flat": bool}, frozenset({"flat"})))
async def _query_named_block_nodes(engine: Engine, args: dict[str, JSON]) -> JSON:
    return [{"node-name": n.name, "drv": n.driver, "ro": n.read_only, "file": n.filename,
             "image": {"virtual-size": n.backend.size, "filename": n.filename,
                       "format": n.driver}}
            for n in engine.nodes.values()]


@command("nbd-server-start", NBD_SERVER_START)
async def _nbd_server_start(engine: Engine, args: dict[str, JSON]) -> JSON:
    if engine.nbd is not None:
        raise generic_error("NBD server already running")
    tls = engine.tls_credentials(args.get("tls-creds"), args.get("tls-authz"))
    limit = args.get("max-connections", DEFAULT_MAX_CONNECTIONS)
    if limit < 0:
        raise generic_error("Parameter 'max-connections' expects a value of 0 or more")
    handshake = args.get("handshake-max-seconds", 10)
    if handshake < 0:
        raise generic_error("Parameter 'handshake-max-seconds' expects a value of 0 or more")
    sock, unix_path = _listen(args["addr"])
    server = Server(engine.table, max_connections=limit, persistent=True,
                    handshake_limit=float(handshake), tls=tls)
    try:
        await server.start([sock])
    except OSError as err:
        sock.close()
        raise generic_error(f"Failed to start NBD server: {err}") from None
    engine.nbd = NbdServer(server, sock, unix_path)
    return {}


def _listen(addr: dict[str, JSON]) -> tuple[socket.socket, str | None]:
    data = addr["data"]
    try:
        if addr["type"] == "unix":
            path = data["path"]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError:
                sock.close()
                raise
            unix_path: str | None = path
        else:
            infos = socket.getaddrinfo(data["host"], data["port"], type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError:
                sock.close()
                raise
            unix_path = None
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except (OSError, ValueError) as err:
        where = data.get("path") or f"{data.get('host')}:{data.get('port')}"
        raise generic_error(f"Failed to bind socket to {where}: "
                            f"{getattr(err, 'strerror', None) or err}") from None
    return sock, unix_path


@command("nbd-server-stop", NO_ARGS)
async def _nbd_server_stop(engine: Engine, args: dict[str, JSON]) -> JSON:
    if engine.nbd is None:
        raise generic_error("NBD server not running")
    await engine._stop_nbd()
    return {}


@command("block-export-add", BLOCK_EXPORT_ADD)
async def _block_export_add(engine: Engine, args: dict[str, JSON]) -> JSON:
    if engine.nbd is None:
        raise generic_error("NBD server not running")
    export_id = args["id"]
    if export_id in engine.exports:
        raise generic_error(f"Block export id '{export_id}' is already in use")
    node = engine.node(args["node-name"])
    name = args.get("name", node.name)
    if engine.table.lookup(name) is not None:
        raise generic_error(f"NBD server already has export named '{name}'")
    writable = bool(args.get("writable", False))
    if writable and (node.read_only or not node.backend.capabilities.can_write):
        raise generic_error("Cannot export read-only node as writable")
    try:
        export = Export(name, node.backend, description=args.get("description", ""),
                        read_only=not writable,
                        multi_conn=engine.nbd.server.multi_conn)
    except ValueError as err:
        raise generic_error(str(err)) from None
    engine.table.add(export)
    engine.exports[export_id] = ExportEntry(export_id, node, export)
    return {}


@command("block-export-del", BLOCK_EXPORT_DEL)
async def _block_export_del(engine: Engine, args: dict[str, JSON]) -> JSON:
    entry = engine.exports.get(args["id"])
    if entry is None:
        raise generic_error(f"Export '{args['id']}' is not found")
    if entry.shutting_down:
        raise generic_error(f"Export '{entry.id}' is already shutting down")
    if args.get("mode", "safe") == "safe" and entry.export.clients:
        raise generic_error(f"export '{entry.id}' still in use")
    entry.shutting_down = True
    # hide it from new clients now; the deletion event follows once clients are gone
    if engine.table.lookup(entry.export.name) is entry.export:
        engine.table.remove(entry.export.name)
    task = asyncio.create_task(_finish_export_del(engine, entry))
    engine._background.add(task)
    task.add_done_callback(engine._background.discard)
    return {}


async def _finish_export_del(engine: Engine, entry: ExportEntry) -> None:
    if engine.nbd is not None:
        await engine.nbd.server.drop_clients(entry.export)
    engine._forget_export(entry)


@command("query-block-exports", NO_ARGS)
async def _query_block_exports(engine: Engine, args: dict[str, JSON]) -> JSON:
    return [{"id": e.id, "type": "nbd", "node-name": e.node.name,
             "shutting-down": e.shutting_down} for e in engine.exports.values()]


@command("x-query-nbd-clients", NO_ARGS)
async def _query_nbd_clients(engine: Engine, args: dict[str, JSON]) -> JSON:
    if engine.nbd is None:
        return []
    ids = {id(e.export): e.id for e in engine.exports.values()}
    out = []
    for conn in engine.nbd.server.connections:
        export = conn.export
        out.append({
            "export": export.name if export else None,
            "id": ids.get(id(export)) if export else None,
            "address": conn.peer,
            "negotiated": export is not None,
            "requests": conn.stats.requests,
            "bytes-read": conn.stats.bytes_read,
            "bytes-written": conn.stats.bytes_written,
        })
    return out


OBJECT_ADD = s.Union_("qom-type", {
    "tls-creds-x509": s.Struct(
        {"id": str, "dir": str, "endpoint": s.Enum(("server", "client")),
         "verify-peer": bool},
        frozenset({"endpoint", "verify-peer"})),
    "authz-simple": s.Struct({"id": str, "identity": str}),
})


@command("object-add", OBJECT_ADD)
async def _object_add(engine: Engine, args: dict[str, JSON]) -> JSON:
    object_id = args.pop("id")
    if object_id in engine.objects:
        raise generic_error(f"attempt to add duplicate property '{object_id}' to object "
                            "(type 'container')")
    kind = args.pop("qom-type")
    # a management command: a stat() here is fine
    if kind == "tls-creds-x509" and not os.path.isdir(args["dir"]):  # noqa: ASYNC240
        raise generic_error(f"Unable to access credentials {args['dir']}: "
                            "No such file or directory")
    engine.objects[object_id] = (kind, args)
    return {}


@command("object-del", s.Struct({"id": str}))
async def _object_del(engine: Engine, args: dict[str, JSON]) -> JSON:
    if args["id"] not in engine.objects:
        raise generic_error(f"object '{args['id']}' not found")
    del engine.objects[args["id"]]
    return {}


# -- fault injection (x-fault-*) ---------------------------------------------------------

X_FAULT_ADD = s.Struct(
    {"node-name": str, "command": s.Enum((*FAULT_COMMANDS, "all")), "errno": str,
     # numbers: checked by the handler (the schema module has no float type)
     "rate": object, "start": int, "end": int, "count": int, "delay": object, "seed": int},
    frozenset({"errno", "rate", "start", "end", "count", "delay", "seed"}))
X_FAULT_CLEAR = s.Struct({"node-name": str, "id": int}, frozenset({"id"}))


def _fault_backend(engine: Engine, name: str) -> FaultBackend:
    backend = engine.node(name).backend
    if not isinstance(backend, FaultBackend):
        raise generic_error(f"Node '{name}' does not support fault injection")
    return backend


def _number(args: dict[str, JSON], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise generic_error(f"Invalid parameter type for '{key}', expected: number")
    return float(value)


@command("x-fault-add", X_FAULT_ADD)
async def _x_fault_add(engine: Engine, args: dict[str, JSON]) -> JSON:
    backend = _fault_backend(engine, args["node-name"])
    rate = _number(args, "rate", 1.0)
    delay = _number(args, "delay", 0.0)
    errno: int | None = None
    if "errno" in args:
        try:
            errno = parse_errno(args["errno"])
        except ValueError:
            raise generic_error(
                f"Parameter 'errno' does not accept value '{args['errno']}'") from None
    elif not delay:
        errno = parse_errno("EIO")
    if not 0.0 <= rate <= 1.0:
        raise generic_error("Parameter 'rate' expects a value between 0 and 1")
    if not 0.0 <= delay < float("inf"):
        raise generic_error("Parameter 'delay' expects a value of 0 or more")
    if args.get("start", 0) < 0:
        raise generic_error("Parameter 'start' expects a value of 0 or more")
    if "end" in args and args["end"] <= args.get("start", 0):
        raise generic_error("Parameter 'end' expects a value greater than 'start'")
    if args.get("count", 1) < 1:
        raise generic_error("Parameter 'count' expects a value of 1 or more")
    command = args["command"]
    try:
        rule = FaultRule(frozenset(FAULT_COMMANDS if command == "all" else (command,)),
                         errno=errno, rate=rate, start=args.get("start", 0),
                         end=args.get("end"), count=args.get("count"), delay=delay,
                         seed=args.get("seed"))
    except ValueError as err:
        raise generic_error(f"Invalid fault: {err}") from None
    return {"id": backend.add_rule(rule)}


@command("x-fault-clear", X_FAULT_CLEAR)
async def _x_fault_clear(engine: Engine, args: dict[str, JSON]) -> JSON:
    backend = _fault_backend(engine, args["node-name"])
    try:
        backend.clear(args.get("id"))
    except KeyError:
        raise generic_error(f"Node '{args['node-name']}' has no fault with id "
                            f"{args['id']}") from None
    return {}


@command("x-query-faults", NODE_NAME)
async def _x_query_faults(engine: Engine, args: dict[str, JSON]) -> JSON:
    return _fault_backend(engine, args["node-name"]).describe()
