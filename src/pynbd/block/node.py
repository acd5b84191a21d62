"""The block node interface: what every node of the block graph implements.

A node is a piece of storage of ``size`` bytes.  Protocol nodes (file, memory,
rbd) hold data; format nodes (raw) interpret a ``file`` child and may have a
``backing`` child; filter nodes (faults) sit over one child and change some of
its requests.  The server talks to the node an export names, and only through
this interface.

Rules of this module:
- The core every node implements is small: ``pread``, ``pwrite``,
  ``write_zeroes``, ``trim``, ``flush``, ``block_status``, ``close``, plus
  ``size`` and ``capabilities``.  ``cache`` is an optional hook (a no-op).
- Fast paths are opt-in: a node that can do more implements one of the small
  protocols below (``NowaitIO``, ``DirectIO``, ``SendfileReads``,
  ``OwnBufferReads``); so is growing (``Growable``), which format nodes that
  allocate at the end of their file need.  ``Node.fast_paths`` turns what a node offers into a
  ``FastPaths`` of plain callables, once, when a connection starts; a filter
  composes its child's instead (see ``pynbd.block.filter``).
- Every I/O method is offset-explicit; no node keeps a file position that
  concurrent requests could share.
- One node object is shared by every connection of every export that uses it.
  A node keeps no state private to a caller: a completed ``pwrite`` is visible
  to the next ``pread`` from anyone, and ``flush`` makes durable every write
  that completed before it, whoever issued it.  A node that cannot promise
  that says so with ``capabilities.can_multi_conn = False``, and no export
  over it advertises ``NBD_FLAG_CAN_MULTI_CONN``.
- Nodes raise ``OSError`` with a real errno; the server maps errno values to
  NBD error codes in one place (``pynbd.proto.errors.nbd_errno``).
- Ranges passed in are already validated against ``size`` by the server.
- ``close`` releases what the node itself holds, never its children: the
  graph (``pynbd.block.graph``) closes every node once.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .bitmap import BitmapSet

#: what a write takes: any bytes-like buffer, lent for the call
Data = bytes | bytearray | memoryview
#: ``start_read``'s completion: the data, or the error
ReadDone = Callable[[bytes | bytearray | None, OSError | None], None]
#: ``start_write``'s completion: None, or the error
WriteDone = Callable[[OSError | None], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a node can do; the export turns this into transmission flags."""

    #: writes, trims and write-zeroes are possible
    can_write: bool = True
    #: ``flush`` makes completed writes durable
    can_flush: bool = True
    #: ``pwrite(..., fua=True)`` is durable before it returns
    can_fua: bool = True
    #: ``trim`` may really discard (otherwise it is a no-op)
    can_trim: bool = True
    #: ``write_zeroes(..., fast=True)`` can be fast for some requests
    can_fast_zero: bool = True
    #: ``block_status`` reports real holes and zeroes
    can_extents: bool = True
    #: every caller sees one consistent store (no cache private to a caller)
    can_multi_conn: bool = True
    #: ``block_status`` is cheap enough to ask before every large structured
    #: read, so that holes go out as OFFSET_HOLE chunks (False where it costs a
    #: round trip to remote storage, as on RBD)
    sparse_reads: bool = True


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
        super().__init__(errno.ENOTSUP, message)


# -- the optional fast paths ---------------------------------------------------------------

@runtime_checkable
class NowaitIO(Protocol):
    """Reads and writes answered at once when that cannot block (page-cache hits)."""

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` at once if that cannot block.

        Returns False, possibly after filling part of ``buf``, when the caller
        must use ``pread`` instead.
        """
        ...

    def pwrite_nowait(self, data: Data, offset: int) -> bool:
        """Write ``data`` at once if that cannot block; False: use ``pwrite``.

        Returning False must leave the store as if nothing happened, or with
        a prefix of ``data`` written (``pwrite`` then writes it all again).
        Never used for FUA writes.
        """
        ...


@runtime_checkable
class DirectIO(Protocol):
    """Reads and writes that complete on the storage's own threads (librbd)."""

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        """Start a read that completes by itself; False: not now, use ``pread``.

        ``done(data, None)`` or ``done(None, error)`` is called exactly once,
        later, on the event loop's thread, never from within this call.
        Raises ``OSError`` if the request cannot even be started.
        """
        ...

    def start_write(self, data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
        """As ``start_read``; ``done(None)`` or ``done(error)``.  ``data`` is lent
        until ``done`` is called."""
        ...


@runtime_checkable
class SendfileReads(Protocol):
    """Data that sits in a file in memory, sent to the socket with ``os.sendfile``."""

    def sendfile_source(self, offset: int, length: int,
                        data_only: bool) -> tuple[int, int] | None:
        """Where to ``os.sendfile`` the range from without blocking: ``(fd, position)``.

        None when the range is not all in memory or, with ``data_only``, may
        hold a hole.  If the socket fills part way, the server reads the rest
        from the same fd and position on the loop's thread.
        """
        ...


@runtime_checkable
class OwnBufferReads(Protocol):
    """Reads that produce a fresh buffer anyway (librbd): no copy into the server's."""

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """The ``length`` bytes at ``offset``, in a buffer the caller may keep."""
        ...


@runtime_checkable
class Growable(Protocol):
    """A node whose size can grow, for format nodes that allocate at the end of
    their file (qcow2): ``FileNode``, ``MemoryNode``, and filters over them."""

    async def grow(self, size: int) -> None:
        """Make the node at least ``size`` bytes long; the new bytes read as zeroes.
        Never shrinks.  ``OSError`` (ENOSPC) where it cannot grow."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class FastPaths:
    """The fast paths a connection may take, as plain callables (None: not offered).

    Resolved once when a connection starts (``Node.fast_paths``), so the
    request path makes no capability checks and no protocol lookups.
    """

    pread_nowait: Callable[[memoryview, int], bool] | None = None
    pwrite_nowait: Callable[[Data, int], bool] | None = None
    start_read: Callable[[int, int, ReadDone], bool] | None = None
    start_write: Callable[[Data, int, bool, WriteDone], bool] | None = None
    #: ``sendfile_source(offset, length, data_only)``
    sendfile_source: Callable[[int, int, bool], tuple[int, int] | None] | None = None
    read: Callable[[int, int], Awaitable[bytes | bytearray]] | None = None


def offered_fast_paths(node: object) -> FastPaths:
    """The fast paths ``node`` implements itself, found by their protocols."""
    nowait = node if isinstance(node, NowaitIO) else None
    direct = node if isinstance(node, DirectIO) else None
    return FastPaths(
        pread_nowait=nowait.pread_nowait if nowait is not None else None,
        pwrite_nowait=nowait.pwrite_nowait if nowait is not None else None,
        start_read=direct.start_read if direct is not None else None,
        start_write=direct.start_write if direct is not None else None,
        sendfile_source=node.sendfile_source if isinstance(node, SendfileReads) else None,
        read=node.read if isinstance(node, OwnBufferReads) else None,
    )


# -- the node --------------------------------------------------------------------------

class Node(abc.ABC):
    """A node of the block graph.

    Subclasses set ``driver`` (the name qemu's ``query-named-block-nodes``
    shows as ``drv``), and ``size`` and ``capabilities`` in ``__init__``.
    The server guarantees ``0 <= offset`` and ``offset + length <= size`` for
    every call.
    """

    #: qemu's name for the driver (``drv``); a class sets it, an instance may refine it
    driver: str
    size: int
    capabilities: Capabilities
    #: set by the graph when the node is added to it
    node_name: str = ""
    #: a filter the system put in on its own (as qemu's implicit filter nodes):
    #: queries show the node under it in its place
    implicit: bool = False
    #: the name the user gave the implicit filters over this node (messages only:
    #: the graph tells nodes apart by ``node_name``)
    shown_name: str = ""
    #: the node bypasses the host's page cache (qemu's ``cache.direct``)
    cache_direct: bool = False
    #: the node's dirty bitmaps (``pynbd.block.tracking``), None until it has one
    bitmaps: BitmapSet | None = None

    @property
    def children(self) -> dict[str, Node]:
        """Child nodes by role (``file``, ``backing``, ``image``); none by default."""
        return {}

    @property
    def filename(self) -> str:
        """What qemu shows as the node's ``file``: the storage it ends up in."""
        file = self.children.get("file")
        return file.filename if file is not None else ""

    def resolve(self) -> Node:
        """The node that does this node's I/O: itself, unless it adds nothing.

        A node that passes every request through unchanged (raw over a whole
        file) returns its child's ``resolve()``, so exports talk to the
        storage directly and the layer costs nothing per request.
        """
        return self

    def fast_paths(self) -> FastPaths:
        """The fast paths a connection may take on this node (asked once per connection)."""
        return offered_fast_paths(self)

    @abc.abstractmethod
    async def pread(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the data at ``offset`` (holes read as zeroes)."""

    @abc.abstractmethod
    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        """Write all of ``data`` at ``offset``; with ``fua``, durably before returning.

        ``data`` is only lent for the call: the server reuses the buffer for
        another request once this returns, so a node that keeps the bytes
        (a cache, a queue) must copy them.
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
        past the end of the node.
        """

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, depth)`` runs from ``offset``, as ``block_status`` (at least one,
        consecutive, never past the end): the depth in the backing chain of the
        layer that holds the bytes, 1 for this node, 0 for none (qemu's
        ``qemu:allocation-depth``).  A node without a backing chain holds all of
        itself: the default is depth 1 throughout."""
        return [(min(length, self.size - offset), 1)]

    async def cache(self, offset: int, length: int) -> None:  # noqa: B027 - optional hook
        """Prefetch the range (advisory); the default does nothing."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what this node holds (not its children); called once by the graph."""


async def read(node: Node, offset: int, length: int) -> bytearray:
    """``length`` bytes at ``offset`` of ``node``, in a new buffer."""
    buf = bytearray(length)
    await node.pread(memoryview(buf), offset)
    return buf
