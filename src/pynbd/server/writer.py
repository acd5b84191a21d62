"""The socket writer: how a connection's replies leave (``Writer``, a mixin of ``Connection``).

Rules of this module:
- Replies are written whole and in the order given; a list handed over at
  once leaves as one ``writev`` when the socket takes it.
- On a plain socket, while the transport has nothing queued, the buffers go
  straight to the socket's fd with ``os.writev`` (one system call, no joining
  copy); whatever the socket does not take at once is queued on the
  transport, and everything goes through the transport until it has drained.
- A connection without a plain socket's fd (TLS, or a transport with no
  socket at all, as in tests) always writes through the transport
  (``queue_on_transport``): ``write`` only, so any stream transport serves.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .connstate import ConnectionState

if TYPE_CHECKING:
    import asyncio

    from ..proto.wire import Buffer

#: reply payloads at least this large are written without joining (no extra copy)
LARGE_WRITE = 64 * 1024
#: most buffers one writev takes (Linux UIO_MAXIOV)
IOV_MAX = 1024


class Writer(ConnectionState):
    """``_send`` and ``_send_if_open``: whole replies to the socket."""

    def _send_if_open(self, buffers: list[Buffer]) -> None:
        """``_send``, unless the connection is gone or closing (a late reply)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._send(buffers)

    def _send(self, buffers: list[Buffer]) -> None:
        """Write whole replies, in order.

        While the transport has nothing queued, the buffers go straight to the
        socket with ``writev`` (one system call, no joining copy); whatever
        the socket does not take at once is queued on the transport, after
        which everything goes through the transport until it has drained.
        Connections without a plain socket (TLS) always use the transport.
        """
        transport = self._transport
        assert transport is not None
        fd = self._fd
        if fd < 0 or transport.get_write_buffer_size():
            queue_on_transport(transport, buffers)
            return
        start = 0
        while start < len(buffers):
            group = buffers[start:start + IOV_MAX] if start or len(buffers) > IOV_MAX \
                else buffers
            try:
                sent = os.writev(fd, group)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                # a broken connection: let the transport meet the error and report it
                queue_on_transport(transport, buffers[start:])
                return
            for i, buf in enumerate(group):
                size = len(buf)
                if sent < size:
                    rest = memoryview(buf).cast("B")[sent:] if sent else buf
                    queue_on_transport(transport, [rest, *group[i + 1:],
                                                   *buffers[start + len(group):]])
                    return
                sent -= size
            start += len(group)


def queue_on_transport(transport: asyncio.Transport, buffers: list[Buffer]) -> None:
    """Queue replies on the transport: small pieces joined, large payloads on their own.

    Joining costs a copy of everything joined; for a large READ payload that
    copy is worth more than the extra system call it saves.  Views are
    copied: the transport may keep what it is given until it is sent, and a
    view may show storage that later writes change.
    """
    small: list[Buffer] = []
    for buf in buffers:
        if len(buf) >= LARGE_WRITE:
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(bytes(buf) if isinstance(buf, memoryview) else buf)
        else:
            small.append(buf)
    if small:
        transport.write(b"".join(small))
