"""The state the parts of a connection share, declared once for all of them.

A ``Connection`` (``server.connection``) is one object built from parts kept
in modules of their own: the command handlers (``server.handlers``), the
inline, direct and sendfile paths (``server.fastpath``) and the socket writer
(``server.writer``), each a mixin of methods.  They share the connection's
attributes directly, as one class would: no object in between, no extra call
or lookup on the request path.

Rules of this module: ``ConnectionState`` only declares, for the type
checker, the attributes ``Connection.__init__`` sets and the methods one part
calls in another; it holds no values and no code that runs.  It also keeps
the per-connection counters and the plain-int command constants the parts use.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..proto.constants import Cmd, CmdFlag

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable

    from ..block.node import Data, ReadDone, WriteDone
    from ..proto.events import Request
    from ..proto.transmission import ServerTransmission
    from ..proto.wire import Buffer
    from .export import Export

    Handler = Callable[[Request], Awaitable[list[Buffer]]]

# plain ints for the per-request path: ``int & IntFlag`` builds a new flag object
READ, WRITE = int(Cmd.READ), int(Cmd.WRITE)
FUA, DF = int(CmdFlag.FUA), int(CmdFlag.DF)


@dataclasses.dataclass(slots=True)
class ConnectionStats:
    """Counters shown by QMP ``x-query-nbd-clients``."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class ConnectionState:
    """What every part of a ``Connection`` may use (see ``Connection.__init__``)."""

    peer: str
    export: Export | None
    stats: ConnectionStats
    _transport: asyncio.Transport | None
    _core: ServerTransmission | None
    #: the fast paths the export's node offers, fixed once transmission starts
    #: (``pynbd.block.node.FastPaths``; None: not offered)
    _pread_nowait: Callable[[memoryview, int], bool] | None
    _pwrite_nowait: Callable[[Data, int], bool] | None
    _start_read: Callable[[int, int, ReadDone], bool] | None
    _start_write: Callable[[Data, int, bool, WriteDone], bool] | None
    #: reads producing their own buffer (None: allocate and ``pread``)
    _own_read: Callable[[int, int], Awaitable[bytes | bytearray]] | None
    #: either direct path is offered
    _direct_io: bool
    _sparse_reads: bool
    #: the plain socket's fd replies may be written to directly, or -1 (TLS, or
    #: a transport without a socket)
    _fd: int
    #: where large reads may be sent from with sendfile (the node offers it, and
    #: the socket is plain); None: never
    _sendfile_source: Callable[[int, int, bool], tuple[int, int] | None] | None
    #: the command handlers by command number
    _handlers: dict[int, Handler]
    #: requests in flight (tasks, or tokens of direct ones), with their payload bytes
    _tasks: dict[object, int]
    #: reply bytes gathered by the current ``_process`` call
    _out_bytes: int
    #: replies of direct requests waiting for ``_flush_direct``, their tokens, size
    _direct_out: list[Buffer]
    _direct_tokens: list[object]
    _direct_bytes: int

    if TYPE_CHECKING:
        # -- provided by server.connection (flow control)
        def _track(self, token: object, cost: int) -> None: ...
        def _task_done(self, task: object) -> None: ...
        def _abort(self) -> None: ...

        # -- provided by server.writer
        def _send(self, buffers: list[Buffer]) -> None: ...
        def _send_if_open(self, buffers: list[Buffer]) -> None: ...

        # -- provided by server.handlers
        def _error_reply(self, core: ServerTransmission, request: Request,
                         error: OSError | None) -> list[Buffer]:
            raise NotImplementedError

        # -- provided by server.fastpath
        def _sparse(self, request: Request) -> bool:
            raise NotImplementedError
