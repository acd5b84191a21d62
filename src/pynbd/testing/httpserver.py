"""``RangeServer``: a small HTTP/1.1 file server on 127.0.0.1 that honours ``Range``,
for testing plugins that read over HTTP (``python -m http.server`` ignores ranges).

Rules of this module: it serves the files of one directory, ``GET`` and ``HEAD``
only, one ``bytes=A-B`` range per request (``206`` with ``Content-Range``; a
range past the end is ``416``), with keep-alive; each connection is served on
its own daemon thread.  It counts the connections and requests it saw, so that
tests can tell a pooled client from one that reconnects.  Started with
``start()`` (or ``with``), stopped with ``stop()``.
"""

from __future__ import annotations

import http.server
import os
import re
import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pathlib

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this the body waits for
        # the client's delayed ACK of the headers
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.counts_lock:
            self.server.connections += 1

    def _file(self) -> str | None:
        name = self.path.split("?", 1)[0].lstrip("/")
        path = os.path.join(self.server.root, name)
        if "/" in name or not name or not os.path.isfile(path):
            self.send_error(404)
            return None
        return path

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        with self.server.counts_lock:
            self.server.requests += 1
            self.server.ranges += bool(self.headers.get("Range"))
        path = self._file()
        if path is None:
            return
        size = os.path.getsize(path)
        first, last, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if wanted is not None:
            match = _RANGE.fullmatch(wanted.strip())
            if match is None or int(match.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first = int(match.group(1))
            last = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            status = 206
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(last - first + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as fh:
                self.wfile.write(os.pread(fh.fileno(), last - first + 1, first))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: str
    counts_lock: threading.Lock
    connections: int
    requests: int
    ranges: int


class RangeServer:
    """Serve the files of ``root`` on 127.0.0.1 (a free port)."""

    def __init__(self, root: str | pathlib.Path) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.root = str(root)
        self._server.counts_lock = threading.Lock()
        self._server.connections = self._server.requests = self._server.ranges = 0
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> str:
        """The directory served."""
        return self._server.root

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def url(self, name: str) -> str:
        """The URL of the file ``name`` in the root directory."""
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return self._server.connections

    @property
    def requests(self) -> int:
        """Requests answered so far (``ranges`` of them with a Range header)."""
        return self._server.requests

    @property
    def ranges(self) -> int:
        return self._server.ranges

    def start(self) -> RangeServer:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="range-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
