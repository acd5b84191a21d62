"""Listening sockets for the NBD server: one place that binds them.

Rules of this module:
- A socket returned here is bound, listening with ``SOMAXCONN`` and
  non-blocking, ready for ``Server.start``.
- On failure the socket is closed and the error is an ``OSError`` (a name
  that does not resolve is ``socket.gaierror``, one of them); callers word it.
- Nothing is logged or printed here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import Any

MAX_PORT = 65535


def listen_unix(path: str, *, replace_stale: bool = False) -> socket.socket:
    """Listen on the Unix socket ``path``.

    With ``replace_stale`` a socket file already at ``path`` is removed first
    (usually left by a server that is gone; it is not checked that none
    listens there); any other kind of file stays, and binding fails on it.
    """
    if replace_stale:
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
        except ValueError as err:  # os.stat of a path with a NUL byte
            raise OSError(errno.EINVAL, str(err)) from None
    return _listen(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), path)


def listen_tcp(host: str, port: int | str) -> socket.socket:
    """Listen on ``host``:``port`` (the first address ``host`` resolves to).

    ``port`` is a number or a service name, as ``getaddrinfo`` takes them; 0
    picks a free port.  ``SO_REUSEADDR`` is set so that a restarted server can
    bind while old connections linger in TIME_WAIT.
    """
    # getaddrinfo would silently wrap 65536 to 0
    if (isinstance(port, int) or port.isdecimal()) and not 0 <= int(port) <= MAX_PORT:
        raise OSError(errno.EINVAL, f"port {port} is out of range 0-{MAX_PORT}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except ValueError as err:  # UnicodeError: a host name IDNA cannot encode
        raise OSError(errno.EINVAL, str(err)) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError:
        sock.close()
        raise
    return _listen(sock, address)


def _listen(sock: socket.socket, address: str | tuple[Any, ...]) -> socket.socket:
    """Bind, listen and go non-blocking; close ``sock`` if any step fails."""
    try:
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    except (ValueError, OverflowError) as err:
        sock.close()
        raise OSError(errno.EINVAL, str(err)) from None
    return sock
