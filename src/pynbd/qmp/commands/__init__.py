"""The daemon's QMP commands, one module per area, each listed as data.

Rules of this package:
- Every module lists its commands in a ``COMMANDS`` tuple of ``Command``
  records; nothing registers itself anywhere at import time.  The engine
  (``pynbd.qmp.engine``) builds its command table from an explicit list of
  these tuples when it is created.
- A handler gets the engine and its arguments, already checked against the
  command's schema, and raises ``QMPError`` (qemu's class and wording) on
  failure.  It uses the engine's public attributes and methods only.
- The modules import the engine's module only for type checking: the engine
  imports them.  The records they build live in ``pynbd.qmp.state``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ...block.blockdev import id_wellformed
from .. import schema as s

if TYPE_CHECKING:
    from ..engine import Engine

JSON = Any
Handler = Callable[["Engine", dict[str, JSON]], Awaitable[JSON]]


@dataclasses.dataclass(frozen=True)
class Command:
    """A QMP command: its name, its argument schema and its handler."""

    name: str
    schema: s.Struct | s.Union_
    handler: Handler


NO_ARGS = s.Struct({})
NODE_NAME = s.Struct({"node-name": str})

__all__ = ["JSON", "NODE_NAME", "NO_ARGS", "Command", "Handler", "id_wellformed"]
