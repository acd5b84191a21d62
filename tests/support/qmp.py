"""QMP helpers for tests that drive ``pynbd daemon`` with qemu's own client (qemu.qmp).

Import as ``from tests.support.qmp import qmp, qmp_open, qmp_session``.  Every
call is bounded, so a daemon that stops answering fails the test instead of
hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

#: bound for connecting, one command, and disconnecting
QMP_TIMEOUT = 20.0


async def qmp_open(path: str) -> QMPClient:
    client = QMPClient("pynbd-test")
    async with asyncio.timeout(QMP_TIMEOUT):
        await client.connect(path)
    return client


@contextlib.asynccontextmanager
async def qmp_session(path: str) -> AsyncIterator[QMPClient]:
    client = await qmp_open(path)
    try:
        yield client
    finally:
        async with asyncio.timeout(QMP_TIMEOUT):
            await client.disconnect()


async def qmp(client: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
    async with asyncio.timeout(QMP_TIMEOUT):
        return await client.execute(cmd, args)
