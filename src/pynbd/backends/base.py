"""The backend interface: what an export needs from the storage behind it.

Rules of this module:
- Every I/O method is offset-explicit; no backend keeps a file position that
  concurrent requests could share.
- One backend object is shared by every connection of every export that serves
  it.  A backend must therefore keep no state private to a caller: a completed
  ``pwrite`` is visible to the next ``pread`` from anyone, and ``flush`` makes
  durable every write that completed before it, whoever issued it.  This is
  what lets the server advertise ``NBD_FLAG_CAN_MULTI_CONN``.
- Backends raise ``OSError`` with a real errno; the server maps errno values to
  NBD error codes in exactly one place (``pynbd.proto.errors.nbd_errno``).
- Ranges passed in are already validated against ``size`` by the server.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the export turns this into transmission flags."""

    #: writes, trims and write-zeroes are possible
    can_write: bool = True
    #: ``flush`` makes completed writes durable
    can_flush: bool = True
    #: ``pwrite(..., fua=True)`` is durable before it returns
    can_fua: bool = True
    #: ``trim`` may really discard (otherwise it is a no-op)
    can_trim: bool = True
    #: ``write_zeroes`` is supported (always true: the server can fall back)
    can_zero: bool = True
    #: ``write_zeroes(..., fast=True)`` can be fast for some requests
    can_fast_zero: bool = True
    #: ``cache`` does something useful
    can_cache: bool = True
    #: ``block_status`` reports real holes and zeroes
    can_extents: bool = True
    #: every caller sees one consistent store (no per-caller cache)
    can_multi_conn: bool = True
    #: ``block_status`` is cheap enough to ask before every large structured
    #: read, so that holes go out as OFFSET_HOLE chunks (False where it costs a
    #: round trip to remote storage, as on RBD)
    sparse_reads: bool = True
    #: ``pread_nowait`` can succeed (otherwise the server never tries it)
    inline_reads: bool = False
    #: ``start_read``/``start_write`` are offered (I/O completing on its own threads)
    direct_io: bool = False
    #: ``sendfile_source`` may name a file to send large reads from
    sendfile_reads: bool = False


class ExtentFlags(enum.IntFlag):
    """Status bits of ``base:allocation`` (NBD_STATE_*)."""

    DATA = 0
    #: not allocated in the backing storage
    HOLE = 1
    #: reads as zeroes
    ZERO = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Extent:
    """A run of ``length`` bytes (> 0) sharing one allocation status."""

    length: int
    flags: ExtentFlags

    def __post_init__(self) -> None:
        if self.length <= 0:
            raise ValueError(f"extent length must be positive, got {self.length}")


class FastZeroUnsupported(OSError):
    """Raised by ``write_zeroes(fast=True)`` when zeroing would not be fast.

    The server answers NBD_ENOTSUP; the data is left unchanged.
    """

    def __init__(self, message: str = "fast zero not possible here") -> None:
        import errno

        super().__init__(errno.ENOTSUP, message)


#: ``start_read``'s completion: the data, or the error
ReadDone = Callable[[bytes | bytearray | None, OSError | None], None]
#: ``start_write``'s completion: None, or the error
WriteDone = Callable[[OSError | None], None]


class Backend(abc.ABC):
    """Storage behind an export.

    Subclasses set ``size`` and ``capabilities`` in ``__init__``.  The server
    guarantees ``0 <= offset`` and ``offset + length <= size`` for every call.
    """

    size: int
    capabilities: Capabilities

    @abc.abstractmethod
    async def pread(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the data at ``offset`` (holes read as zeroes)."""

    @abc.abstractmethod
    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        """Write all of ``data`` at ``offset``; with ``fua``, durably before returning.

        ``data`` is only lent for the call: the server reuses the buffer for
        another request once this returns, so a backend that keeps the bytes
        (a cache, a queue) must copy them.  The same holds for
        ``pwrite_nowait``.
        """

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write that completed before this call durable."""

    @abc.abstractmethod
    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard the range if possible (a hint; contents are unspecified after)."""

    @abc.abstractmethod
    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        """Make the range read as zeroes.

        ``may_trim``: the range may become a hole (NBD: NO_HOLE not set).
        ``fast``: raise ``FastZeroUnsupported`` unless this can be done faster
        than writing zeroes, without changing anything.
        """

    @abc.abstractmethod
    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Describe the allocation from ``offset``.

        Returns at least one extent; the extents are consecutive from
        ``offset``, their total may be less than ``length`` but never extends
        past the end of the backend.
        """

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """The ``length`` bytes at ``offset``, in a buffer the caller may keep.

        The default allocates a buffer and calls ``pread``; a backend whose
        storage hands it a fresh buffer anyway (librbd) returns that instead
        of copying it.
        """
        buf = bytearray(length)
        await self.pread(memoryview(buf), offset)
        return buf

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        """Start a read that completes by itself; False: not offered, use ``read``.

        For storage that completes requests on threads of its own (librbd):
        the server then needs no task per request.  ``done(data, None)`` or
        ``done(None, error)`` is called exactly once, later, on the event
        loop's thread, never from within this call.  Raises ``OSError`` if
        the request cannot even be started.
        """
        return False

    def start_write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool,
                    done: WriteDone) -> bool:
        """Start a write that completes by itself; False: not offered, use ``pwrite``.

        As ``start_read``; ``done(None)`` or ``done(error)``.  ``data`` is lent
        until ``done`` is called.
        """
        return False

    def sendfile_source(self, offset: int, length: int, *,
                        data_only: bool = False) -> tuple[int, int] | None:
        """Where to ``os.sendfile`` the range from without blocking: ``(fd, position)``.

        None when the range is not all in memory (page cache, RAM disk) or,
        with ``data_only``, may hold a hole; the default is always None.  The
        server sends the reply header, then the data with ``sendfile``; if the
        socket fills part way, it reads the rest from the same fd and position
        on the loop's thread (just found in memory, so that does not block
        for long).  Only asked when ``capabilities.sendfile_reads`` is set.
        """
        return None

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` at once if that cannot block (e.g. a page-cache hit).

        Returns False, possibly after filling part of ``buf``, when the caller
        must use ``pread`` instead.  The server uses this to answer cheap
        reads without a task or a thread hop; the default never tries.
        """
        return False

    def pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> bool:
        """Write ``data`` at once if that cannot block; False: use ``pwrite``.

        Returning False must leave the store as if nothing happened, or with
        a prefix of ``data`` written (``pwrite`` then writes it all again).
        Never used for FUA writes.
        """
        return False

    async def cache(self, offset: int, length: int) -> None:  # noqa: B027 - optional hook
        """Prefetch the range (advisory); the default does nothing."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once when the last export using it is gone."""
