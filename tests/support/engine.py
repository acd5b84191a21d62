"""Helpers for unit tests that drive the daemon's QMP engine in-process (no socket).

``on_engine(body)`` runs ``body`` on a fresh ``Engine`` and closes it after;
``fails`` runs a command that must fail (with a GenericError unless told) and returns its text.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from pynbd.qmp.engine import Engine
from pynbd.qmp.protocol import QMPError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


def on_engine(body: Callable[[Engine], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = Engine()
        try:
            await body(engine)
        finally:
            await engine.close()

    asyncio.run(main())


async def fails(engine: Engine, command: str, args: dict[str, Any], *,
                error_class: str = "GenericError") -> str:
    with pytest.raises(QMPError) as info:
        await engine.execute(command, args)
    assert info.value.error_class == error_class
    return info.value.desc
