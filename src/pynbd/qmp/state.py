"""The records the QMP engine keeps: block exports and the NBD server.

Rules of this module: plain data, no behaviour.  The engine holds these
records and the command modules (``pynbd.qmp.commands``) build them, so they
live here, below both: a command module never needs the engine's module at
run time.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

    from ..block.node import Node
    from ..server import Export, Server


@dataclasses.dataclass
class ExportEntry:
    """A block export added with ``block-export-add``."""

    id: str
    node: Node
    export: Export
    shutting_down: bool = False
    #: other nodes whose dirty bitmaps the export offers (``bitmaps: [{node, name}]``)
    bitmap_nodes: tuple[Node, ...] = ()


@dataclasses.dataclass
class NbdServer:
    """The running NBD server (``nbd-server-start``) and the socket it listens on."""

    server: Server
    sock: socket.socket
    unix_path: str | None
