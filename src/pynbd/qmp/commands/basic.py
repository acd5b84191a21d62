"""Session and daemon commands: qmp_capabilities, query-version, query-commands, quit.

Rules of this module: ``version()`` is what both the QMP greeting and
``query-version`` report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import __version__
from .. import schema as s
from ..protocol import generic_error
from . import JSON, NO_ARGS, Command

if TYPE_CHECKING:
    from ..engine import Engine

#: qemu release whose QMP behaviour we follow (reported by query-version)
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


def version() -> dict[str, JSON]:
    """The greeting's and ``query-version``'s version object."""
    return {"qemu": dict(QEMU_VERSION), "package": f"pynbd {__version__}"}


async def _qmp_capabilities(engine: Engine, args: dict[str, JSON]) -> JSON:
    if args.get("enable"):
        raise generic_error("This monitor does not support out-of-band execution")
    return {}


async def _query_version(engine: Engine, args: dict[str, JSON]) -> JSON:
    return version()


async def _query_commands(engine: Engine, args: dict[str, JSON]) -> JSON:
    return [{"name": name} for name in sorted(engine.commands)]


async def _quit(engine: Engine, args: dict[str, JSON]) -> JSON:
    engine.quit_requested.set()
    return {}


COMMANDS = (
    Command("qmp_capabilities",
            s.Struct({"enable": s.ListOf(s.Enum(("oob",)))}, frozenset({"enable"})),
            _qmp_capabilities),
    Command("query-version", NO_ARGS, _query_version),
    Command("query-commands", NO_ARGS, _query_commands),
    Command("quit", NO_ARGS, _quit),
)
