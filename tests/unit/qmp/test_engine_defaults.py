"""Defaults of the daemon's NBD server (qemu 9.1+ policy)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pynbd.qmp.engine import Engine

if TYPE_CHECKING:
    from pathlib import Path


def test_default_connection_limit_is_100_and_multi_conn_is_advertised(tmp_path: Path) -> None:
    async def body() -> None:
        engine = Engine()
        await engine.execute("blockdev-add", {"driver": "memory", "node-name": "n0",
                                              "size": 1 << 20})
        await engine.execute("nbd-server-start", {"addr": {
            "type": "unix", "data": {"path": str(tmp_path / "s.sock")}}})
        await engine.execute("block-export-add", {"type": "nbd", "id": "e0",
                                                  "node-name": "n0", "writable": True})
        assert engine.nbd is not None
        assert engine.nbd.server.max_connections == 100
        assert engine.nbd.server.handshake_limit == 10
        export = engine.table.lookup("n0")
        assert export is not None
        assert export.transmission_flags(structured=False) & 0x100  # CAN_MULTI_CONN
        await engine.close()

    asyncio.run(body())
