"""``http``: a remote disk image, read-only, with HTTP range requests.

``pynbd plugin:http:url=http://host:8000/disk.img``; options: ``url`` (``http://``
or ``https://``), ``connections`` (how many requests may be in flight at once,
default 4).

Rules of this module:
- Every request is HTTP/1.1 over asyncio streams: ``size()`` asks ``HEAD`` for
  the ``Content-Length``; a read is one ``GET`` with ``Range: bytes=A-B`` that
  must come back ``206`` with exactly those bytes (a server that ignores
  ranges is refused, not read whole).
- Connections are kept alive and reused from a pool of at most ``connections``;
  a pooled connection the server closed meanwhile is retried once on a new one.
  A request that fails or is cancelled (the node's timeout) closes its
  connection, whose state is unknown.
- Failures are ``OSError``: EIO with the status or what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import urllib.parse

#: the longest status line and headers accepted (and the streams' buffer limit)
MAX_HEAD = 1 << 20

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class HttpDisk:
    """The image at ``url``, read with range requests over a pool of connections."""

    #: the constructor only parses the URL: no thread needed
    blocking = False

    def __init__(self, url: str, connections: str = "4") -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://HOST[:PORT]/PATH or https://..., not {url!r}")
        self._url = url
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if parts.port is None else f"{host}:{parts.port}"
        try:
            self._limit = int(connections)
        except ValueError:
            raise ValueError(f"connections must be a number, not {connections!r}") from None
        if self._limit < 1:
            raise ValueError("connections must be at least 1")
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[_Connection] = []
        self._size = -1

    def _error(self, what: str) -> OSError:
        return OSError(errno.EIO, f"{self._url}: {what}")

    async def _connect(self) -> _Connection:
        try:
            return await asyncio.open_connection(self._host, self._port, ssl=self._ssl,
                                                 limit=MAX_HEAD)
        except OSError as err:
            raise self._error(f"cannot connect: {err.strerror or err}") from None

    async def _exchange(self, conn: _Connection, method: str,
                        headers: dict[str, str]) -> _Reply:
        reader, writer = conn
        lines = [f"{method} {self._target} HTTP/1.1", f"Host: {self._host_header}",
                 "User-Agent: pynbd", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise self._error("the reply's headers are too long") from None
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            raise self._error(f"bad status line {status_line!r}") from None
        fields: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        if fields.get("transfer-encoding", "identity").lower() != "identity":
            raise self._error("chunked replies are not supported")
        try:
            length = int(fields.get("content-length", "0"))
        except ValueError:
            raise self._error("bad Content-Length") from None
        if method == "HEAD":
            return _Reply(status, fields, b"")
        if status == 200 and headers.get("Range"):
            raise self._error("the server ignores range requests")
        return _Reply(status, fields, await reader.readexactly(length))

    async def _request(self, method: str, headers: dict[str, str]) -> _Reply:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._limit)
        async with self._slots:
            for attempt in (0, 1):
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                try:
                    reply = await self._exchange(conn, method, headers)
                except (ConnectionError, asyncio.IncompleteReadError) as err:
                    conn[1].close()
                    if reused and attempt == 0:
                        continue  # the server closed an idle connection: a new one
                    raise self._error(f"connection lost: {err}") from None
                except BaseException:
                    conn[1].close()  # in an unknown state (an error, or cancelled)
                    raise
                if reply.headers.get("connection", "").lower() == "close":
                    conn[1].close()
                else:
                    self._idle.append(conn)
                return reply
        raise AssertionError("unreachable")

    async def size(self) -> int:
        reply = await self._request("HEAD", {})
        if reply.status != 200:
            raise self._error(f"HEAD answered {reply.status}")
        try:
            self._size = int(reply.headers["content-length"])
        except (KeyError, ValueError):
            raise self._error("the server gives no Content-Length") from None
        return self._size

    async def read(self, offset: int, length: int) -> bytes:
        reply = await self._request("GET", {"Range": f"bytes={offset}-{offset + length - 1}"})
        if reply.status != 206:
            raise self._error(f"GET of bytes {offset}-{offset + length - 1} answered "
                              f"{reply.status}")
        if not reply.headers.get("content-range", "").startswith(f"bytes {offset}-"):
            raise self._error(f"asked for bytes {offset}-, got "
                              f"{reply.headers.get('content-range')!r}")
        if len(reply.body) != length:
            raise self._error(f"asked for {length} bytes at {offset}, got {len(reply.body)}")
        return reply.body

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
