"""The QMP management socket: an asyncio shell around ``QMPSession``.

Rules of this module: one task per attached client; commands of one client
run one at a time, in order; events go to every negotiated client.  A broken
client never affects the NBD server or the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .commands.basic import version
from .protocol import QMPError, QMPSession, generic_error

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("pynbd.qmp")


class QMPServer:
    """Serves QMP on a Unix socket for ``engine``."""

    def __init__(self, engine: Engine, path: str) -> None:
        self.engine = engine
        self.path = path
        self._server: asyncio.Server | None = None
        self._clients: dict[QMPSession, asyncio.StreamWriter] = {}
        engine.set_event_sink(self.emit)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._clients.values()):
            writer.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        for session, writer in list(self._clients.items()):
            session.send_event(name, data, seconds, micro)
            if not writer.is_closing():
                writer.write(session.data_to_send())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = QMPSession(version())
        self._clients[session] = writer
        try:
            writer.write(session.data_to_send())
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                session.receive_data(data)
                while (command := session.next_command()) is not None:
                    writer.write(session.data_to_send())
                    try:
                        result = await self.engine.execute(command.command, command.arguments)
                    except QMPError as err:
                        session.send_error(command, err)
                    except Exception as err:  # a command bug must not end the session
                        log.exception("QMP command %s failed", command.command)
                        session.send_error(command, generic_error(f"internal error: {err}"))
                    else:
                        session.send_return(command, result)
                    writer.write(session.data_to_send())
                writer.write(session.data_to_send())
                await writer.drain()
        except (ConnectionError, OSError) as err:
            log.info("QMP client lost: %s", err)
        finally:
            del self._clients[session]
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
