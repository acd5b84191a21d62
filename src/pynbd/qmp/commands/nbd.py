"""NBD server and export commands: nbd-server-start/stop, block-export-add/del,
query-block-exports, x-query-nbd-clients.

Rules of this module:
- One NBD server at a time; its connection limit counts every client of every
  export, and decides CAN_MULTI_CONN for every export (advertised unless the
  limit is 1).
- Several exports of one node share its one backend object, so the multi-conn
  promise holds across them.
- An export id is checked as qemu's ``blk_exp_add`` checks it: well-formed
  (``id_wellformed``), then not in use.
- ``block-export-del`` hides the export from new clients at once; the
  deletion event follows in the background, once its clients are gone.
- An export's dirty bitmaps (``bitmaps``: names, found on the node or down its
  backing chain, or ``{node, name}``) are found and checked as qemu's
  ``nbd_export_create`` does (``commands.bitmaps.export_bitmaps``) and stay busy
  until the export is forgotten (``Engine.forget_export``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...server import Export, Server
from ...server.listen import listen_tcp, listen_unix
from .. import schema as s
from ..protocol import generic_error
from ..state import ExportEntry, NbdServer
from . import JSON, NO_ARGS, Command, id_wellformed
from .bitmaps import check_refs, export_bitmaps

if TYPE_CHECKING:
    import socket

    from ..engine import Engine

#: the daemon's default connection limit (qemu 9.1+ and our reliability issue)
DEFAULT_MAX_CONNECTIONS = 100

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
     "description": str, "writable": bool, "writethrough": bool, "allocation-depth": bool,
     "bitmaps": s.ListOf(object)},
    frozenset({"name", "description", "writable", "writethrough", "allocation-depth",
               "bitmaps"}))
BLOCK_EXPORT_DEL = s.Struct({"id": str, "mode": s.Enum(("safe", "hard"))},
                            frozenset({"mode"}))


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
    unix = addr["type"] == "unix"
    try:
        sock = listen_unix(data["path"]) if unix else listen_tcp(data["host"], data["port"])
    except OSError as err:
        where = data["path"] if unix else f"{data['host']}:{data['port']}"
        raise generic_error(f"Failed to bind socket to {where}: "
                            f"{err.strerror or err}") from None
    return sock, data["path"] if unix else None


async def _nbd_server_stop(engine: Engine, args: dict[str, JSON]) -> JSON:
    if engine.nbd is None:
        raise generic_error("NBD server not running")
    await engine.stop_nbd()
    return {}


async def _block_export_add(engine: Engine, args: dict[str, JSON]) -> JSON:
    refs = check_refs(args.get("bitmaps", []), "bitmaps")
    if engine.nbd is None:
        raise generic_error("NBD server not running")
    export_id = args["id"]
    if not id_wellformed(export_id):
        raise generic_error("Invalid block export id")
    if export_id in engine.exports:
        raise generic_error(f"Block export id '{export_id}' is already in use")
    node = engine.node(args["node-name"])
    name = args.get("name", node.node_name)
    if engine.table.lookup(name) is not None:
        raise generic_error(f"NBD server already has export named '{name}'")
    writable = bool(args.get("writable", False))
    if writable and not node.capabilities.can_write:
        raise generic_error("Cannot export read-only node as writable")
    bitmaps, bitmap_nodes = export_bitmaps(engine, node, refs, read_only=not writable)
    try:
        export = Export(name, node, description=args.get("description", ""),
                        read_only=not writable,
                        multi_conn=engine.nbd.server.multi_conn,
                        allocation_depth=bool(args.get("allocation-depth", False)),
                        bitmaps=bitmaps)
    except ValueError as err:
        raise generic_error(str(err)) from None
    engine.table.add(export)
    engine.exports[export_id] = ExportEntry(export_id, node, export,
                                            bitmap_nodes=tuple(bitmap_nodes))
    return {}


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
    engine.in_background(_finish_export_del(engine, entry))
    return {}


async def _finish_export_del(engine: Engine, entry: ExportEntry) -> None:
    if engine.nbd is not None:
        await engine.nbd.server.drop_clients(entry.export)
    engine.forget_export(entry)


async def _query_block_exports(engine: Engine, args: dict[str, JSON]) -> JSON:
    return [{"id": e.id, "type": "nbd", "node-name": e.node.node_name,
             "shutting-down": e.shutting_down} for e in engine.exports.values()]


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


COMMANDS = (
    Command("nbd-server-start", NBD_SERVER_START, _nbd_server_start),
    Command("nbd-server-stop", NO_ARGS, _nbd_server_stop),
    Command("block-export-add", BLOCK_EXPORT_ADD, _block_export_add),
    Command("block-export-del", BLOCK_EXPORT_DEL, _block_export_del),
    Command("query-block-exports", NO_ARGS, _query_block_exports),
    Command("x-query-nbd-clients", NO_ARGS, _query_nbd_clients),
)
