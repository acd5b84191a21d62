"""systemd's start-up protocols: inherited listening sockets and readiness.

- ``inherited_sockets``: socket activation (``sd_listen_fds``).  A service
  started with ``LISTEN_PID`` equal to its pid and ``LISTEN_FDS`` = N finds N
  listening sockets at file descriptors 3 .. 3+N-1.  As qemu-nbd does, the
  variables (and ``LISTEN_FDNAMES``) are removed from the environment once
  read, so that children do not take them for their own, and the descriptors
  are marked close-on-exec.
- ``notify_ready``: ``sd_notify("READY=1")``, one datagram to the
  ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract
  name when it starts with ``@``), which a ``Type=notify`` unit waits for.

Rules of this module: it reads and changes only those environment
variables; errors are ``ActivationError`` (one line, the caller words it as
a usage error); nothing is logged or printed here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket

#: the first inherited descriptor (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """Socket activation was asked for but cannot be used; one line."""


def activation_count() -> int:
    """How many sockets systemd passed (0: not socket-activated), read as
    ``sd_listen_fds`` reads them: ``LISTEN_PID`` must be this process and
    ``LISTEN_FDS`` a number; anything else means no activation.  Does not
    change the environment."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or count is None:
        return 0
    try:
        if int(pid, 10) != os.getpid():
            return 0
        return max(int(count, 10), 0)
    except ValueError:
        return 0


def inherited_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed (empty if not socket-activated).

    The activation variables are removed from the environment whenever they
    named this process.  Each descriptor must be a listening stream socket;
    it is made close-on-exec and non-blocking.
    """
    count = activation_count()
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        for name in _LISTEN_VARIABLES:
            os.environ.pop(name, None)
    sockets: list[socket.socket] = []
    try:
        for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
            sockets.append(_adopt(fd))
    except ActivationError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _adopt(fd: int) -> socket.socket:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise ActivationError(f"Socket activation failed: invalid file descriptor fd = {fd}: "
                              f"{err.strerror or err}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ActivationError(f"Socket activation failed: fd {fd} is not a listening "
                              "stream socket")
    sock.setblocking(False)
    return sock


def notify_ready() -> bool:
    """Tell systemd the service is ready (``READY=1`` to ``$NOTIFY_SOCKET``).

    Returns whether a notification was sent; without ``$NOTIFY_SOCKET``, or
    when it cannot be reached, nothing happens (as ``sd_notify``, the service
    runs on).  The variable is removed so that children do not notify.
    """
    address = os.environ.pop("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    with contextlib.suppress(OSError), \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(b"READY=1\nMAINPID=%d\n" % os.getpid(), target)
        return True
    return False
