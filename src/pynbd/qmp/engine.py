"""The daemon's state, and the engine that runs QMP commands against it.

Rules of this module:
- The engine owns the block nodes, the exports, the export table, the one NBD
  server and the user-creatable objects; the command modules
  (``pynbd.qmp.commands``) change them through the public attributes and
  methods here, never through a private name.
- The command table is built per engine from an explicit list of command
  sets (``COMMAND_SETS``); nothing is registered at import time.
- Every command validates its arguments against its schema first; errors are
  ``QMPError`` with qemu's class and wording.
- ``close`` stops the NBD server, waits for background work, then closes the
  block graph (final flush of every writable node, every node closed once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..block.graph import BlockGraph
from ..server import ExportTable
from ..server.runtime import wait_at_stop
from ..server.tls import TlsCredentials, TlsError, TlsObjectError, credentials_from_objects
from . import schema as s
from .commands import (
    Command,
    backup,
    basic,
    bitmaps,
    block,
    faults,
    nbd,
    objects,
    stats,
    throttle,
)
from .commands.block import BLOCKDEV_ADD
from .commands.nbd import BLOCK_EXPORT_ADD
from .commands.objects import OBJECT_ADD
from .protocol import QMPError, generic_error

if TYPE_CHECKING:
    from ..block.node import Node
    from ..block.throttle import ThrottleGroup
    from ..server.metricsexport import MetricsServer
    from .state import ExportEntry, NbdServer

__all__ = ["BLOCKDEV_ADD", "BLOCK_EXPORT_ADD", "COMMAND_SETS", "OBJECT_ADD", "Engine"]

log = logging.getLogger("pynbd.qmp")

JSON = Any
EventSink = Callable[[str, dict[str, JSON]], None]

#: every command the daemon serves, by area
COMMAND_SETS: tuple[tuple[Command, ...], ...] = (
    basic.COMMANDS, block.COMMANDS, nbd.COMMANDS, objects.COMMANDS, faults.COMMANDS,
    bitmaps.COMMANDS, backup.COMMANDS, throttle.COMMANDS, stats.COMMANDS)


def _command_table(command_sets: Iterable[Iterable[Command]]) -> dict[str, Command]:
    table: dict[str, Command] = {}
    for commands in command_sets:
        for command in commands:
            if command.name in table:
                raise ValueError(f"QMP command {command.name!r} is defined twice")
            table[command.name] = command
    return table


class Engine:
    """Nodes, the NBD server and its exports, driven by QMP commands."""

    def __init__(self, emit: EventSink | None = None,
                 command_sets: Iterable[Iterable[Command]] = COMMAND_SETS) -> None:
        #: the block nodes, by node-name
        self.graph = BlockGraph()
        #: held by commands that change the graph (a build runs off the loop)
        self.graph_lock = asyncio.Lock()
        self.exports: dict[str, ExportEntry] = {}
        self.table = ExportTable()
        self.nbd: NbdServer | None = None
        self._emit = emit or (lambda name, data: None)
        self.quit_requested = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        #: user-creatable objects (object-add): id -> (qom-type, properties)
        self.objects: dict[str, tuple[str, dict[str, JSON]]] = {}
        #: the Prometheus exporter (x-pynbd-metrics-start, --metrics), while it runs
        self.metrics_exporter: MetricsServer | None = None
        #: the live throttle groups among them (``throttle-group``), by id
        self.throttle_groups: dict[str, ThrottleGroup] = {}
        #: the commands this engine runs, by name
        self.commands: Mapping[str, Command] = _command_table(command_sets)

    def tls_credentials(self, creds_id: str | None,
                        authz_id: str | None) -> TlsCredentials | None:
        """TLS settings from object ids (``nbd-server-start`` tls-creds/tls-authz)."""
        if creds_id is None:
            if authz_id is not None:
                raise generic_error("'tls-authz' is only valid with 'tls-creds'")
            return None
        try:
            creds = credentials_from_objects(self.objects, creds_id, authz_id)
        except TlsObjectError as err:
            raise generic_error(str(err)) from None
        try:
            creds.server_context()
        except TlsError as err:
            raise generic_error(f"TLS credentials '{creds_id}': {err}") from None
        return creds

    def set_event_sink(self, emit: EventSink) -> None:
        self._emit = emit

    def emit(self, name: str, data: dict[str, JSON]) -> None:
        """Send an event to the management clients."""
        self._emit(name, data)

    async def execute(self, name: str, arguments: dict[str, JSON]) -> JSON:
        """Run one command; raise ``QMPError`` on failure."""
        cmd = self.commands.get(name)
        if cmd is None:
            raise QMPError("CommandNotFound", f"The command {name} has not been found")
        args = s.check(cmd.schema, arguments)
        return await cmd.handler(self, args)

    async def close(self) -> None:
        """Stop the NBD server and close every node (daemon exit)."""
        if self.metrics_exporter is not None:
            await self.metrics_exporter.close()
            self.metrics_exporter = None
        if self.nbd is not None:
            await self.stop_nbd()
        for task in list(self._background):
            await task
        await self.graph.close(wait_at_stop)

    # -- for the commands ---------------------------------------------------------

    def node(self, name: str) -> Node:
        """The node called ``name``; qemu's error if there is none."""
        node = self.graph.get(name)
        if node is None:
            raise generic_error(f"Cannot find device={name} nor node-name={name}")
        return node

    def users(self, node: Node) -> list[str]:
        """What uses ``node`` (exports of it or of its bitmaps, nodes over it), as
        error-message phrases."""
        users = [f"block export '{e.id}'" for e in self.exports.values()
                 if e.node is node or any(n is node for n in e.bitmap_nodes)]
        users += [f"node '{n.node_name}'" for n in self.graph.parents(node)]
        return users

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that ``close`` waits for."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop_nbd(self) -> None:
        """Stop the running NBD server and forget every export."""
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
            self.forget_export(entry)

    def forget_export(self, entry: ExportEntry) -> None:
        """Drop an export for good (its bitmaps no longer busy because of it) and
        announce it (``BLOCK_EXPORT_DELETED``)."""
        self.exports.pop(entry.id, None)
        entry.export.release()
        if self.table.lookup(entry.export.name) is entry.export:
            self.table.remove(entry.export.name)
        self.emit("BLOCK_EXPORT_DELETED", {"id": entry.id})
