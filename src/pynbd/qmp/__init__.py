"""QMP management for the daemon: a sans-IO session, a schema, the engine and its
commands (one module per area, in ``commands``), a socket."""

from __future__ import annotations

from .engine import Engine
from .protocol import QMPError, QMPSession

__all__ = ["Engine", "QMPError", "QMPSession"]
