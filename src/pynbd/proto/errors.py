"""The NBD exception tree and the one errno mapping.

::

    NBDError
    ├── ProtocolError        the peer broke the protocol: the connection ends
    │                        (may carry a cookie and errno to answer first)
    └── LocalProtocolError   we misused the core: a bug

Option-level and request-level failures are not exceptions inside the core:
they are answered on the wire (``NBD_REP_ERR_*`` / ``NBD_E*``) and the
connection goes on.  Rules: ``receive_data`` and ``next_event`` raise only
``ProtocolError``; anything else escaping them is a bug.
"""

from __future__ import annotations

import errno as _errno

from .constants import Cmd, CmdFlag, Errno


class NBDError(Exception):
    """Root of every pynbd protocol exception."""


class ProtocolError(NBDError):
    """The peer broke the protocol badly enough that the stream cannot go on.

    If ``cookie`` is set, the server should answer that request with
    ``errno`` before it closes the connection (qemu does this for an
    oversized WRITE).
    """

    def __init__(self, message: str, *, cookie: int | None = None,
                 errno: Errno = Errno.EINVAL) -> None:
        super().__init__(message)
        self.message = message
        self.cookie = cookie
        self.errno = errno

    def __str__(self) -> str:
        return self.message


class LocalProtocolError(NBDError):
    """The caller used the core in a way the protocol does not allow."""


_ERRNO_MAP: dict[int, Errno] = {
    _errno.EPERM: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.ENOTSUP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(err: int | None, *, cmd: int | None = None, flags: int = 0) -> Errno:
    """Map an OS errno to the NBD error value a client should see.

    This is the one place errno values become NBD errors.  Values the
    protocol does not define become ``EIO``: the request failed, and the
    client must not assume anything about why.  Given the request's command
    and flags, ``ENOTSUP`` is kept only for a FAST_ZERO write-zeroes and
    ``EOVERFLOW`` only for a DF read (the spec reserves them for those);
    elsewhere they become ``EINVAL``, as qemu and nbdkit do.
    """
    errno = Errno.EIO if err is None else _ERRNO_MAP.get(err, Errno.EIO)
    if cmd is None:
        return errno
    if errno == Errno.ENOTSUP and not (cmd == Cmd.WRITE_ZEROES and flags & CmdFlag.FAST_ZERO):
        return Errno.EINVAL
    if errno == Errno.EOVERFLOW and not (cmd == Cmd.READ and flags & CmdFlag.DF):
        return Errno.EINVAL
    return errno
