"""Exports: the shared object every connection to one name goes through.

Rules of this module: an ``Export`` owns no per-connection state.  All
connections of an export (and every export of the same node) call the same
node of the block graph, so a completed write is visible to every other
connection and one flush covers every connection's completed writes.  That is
the whole basis of ``NBD_FLAG_CAN_MULTI_CONN``, which an export advertises
when the server lets more than one client in and no node under the export
keeps data private to a caller (``pynbd.block.graph.one_store``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pynbd.block.graph import one_store
from pynbd.proto.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    MAX_STRING,
    TransmissionFlag,
)
from pynbd.proto.negotiated import transmission_flags

from .metrics import ExportMetrics

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from pynbd.block.bitmap import DirtyBitmap
    from pynbd.block.node import FastPaths, Node


class Export:
    """One named export of a node.

    Args:
        name: the export name clients ask for ("" is the default export).
        node: the node of the block graph it serves; shared, never copied per
            connection.
        description: text for NBD_INFO_DESCRIPTION and LIST.
        read_only: refuse write-type commands even if the node can write.
        multi_conn: the server lets more than one client connect, so the
            export may advertise CAN_MULTI_CONN (if every node under it keeps
            one store).
        allocation_depth: offer qemu's ``qemu:allocation-depth`` context
            (qemu-nbd ``-A``).
        bitmaps: dirty bitmaps to offer as ``qemu:dirty-bitmap:NAME`` contexts
            (qemu-nbd ``-B``); each is busy while the export exists (``release``).
    """

    def __init__(self, name: str, node: Node, *, description: str = "",
                 read_only: bool = False, multi_conn: bool = False,
                 allocation_depth: bool = False,
                 bitmaps: Sequence[DirtyBitmap] = ()) -> None:
        for label, text in (("export name", name), ("description", description)):
            if len(text.encode("utf-8")) > MAX_STRING:
                raise ValueError(f"{label} is longer than {MAX_STRING} bytes")
            if "\0" in text:
                raise ValueError(f"{label} contains a NUL character")
        self._name = name
        self._description = description
        self.node = node
        #: the node that does the I/O (``node`` itself unless it adds nothing)
        self.io = node.resolve()
        self.read_only = read_only or not node.capabilities.can_write
        self.multi_conn = multi_conn and one_store(node)
        #: connections currently in the transmission phase on this export
        self.clients = 0
        #: its request counters (``server.metrics``; filled only while counting is on)
        self.metrics = ExportMetrics()
        #: the metadata contexts offered; a context's id is its index
        self.meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,) + (
            (ALLOCATION_DEPTH,) if allocation_depth else ()) + tuple(
            DIRTY_BITMAP_PREFIX + bitmap.name for bitmap in bitmaps)
        #: the bitmap behind each bitmap context, by context id
        self.bitmaps = {len(self.meta_contexts) - len(bitmaps) + i: bitmap
                        for i, bitmap in enumerate(bitmaps)}
        for bitmap in bitmaps:
            bitmap.busy += 1

    def release(self) -> None:
        """The export is gone: its bitmaps are no longer busy because of it."""
        for bitmap in self.bitmaps.values():
            bitmap.busy -= 1
        self.bitmaps = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def size(self) -> int:
        return self.node.size

    def fast_paths(self) -> FastPaths:
        """The fast paths a new connection may take (asked once per connection)."""
        return self.io.fast_paths()

    def transmission_flags(self, *, structured: bool) -> TransmissionFlag:
        caps = self.node.capabilities
        return transmission_flags(
            read_only=self.read_only,
            can_flush=caps.can_flush,
            can_fua=caps.can_fua,
            can_fast_zero=caps.can_fast_zero,
            multi_conn=self.multi_conn,
            structured=structured,
        )


class ExportTable:
    """The exports of one server, by name (the handshake's catalog)."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"export {export.name!r} already exists")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        return self._exports.pop(name)

    def lookup(self, name: str) -> Export | None:
        return self._exports.get(name)

    def list_exports(self) -> list[Export]:
        return list(self._exports.values())

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))
