"""What the handshake hands to the transmission phase, and the export view.

Rules of this module: data only.  ``ExportView`` and ``ExportCatalog`` are the
protocol core's window onto the server's exports; they are plain protocols so
the core never imports the shell.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

from .constants import MAX_PAYLOAD, PREFERRED_BLOCK, TransmissionFlag

if TYPE_CHECKING:
    from collections.abc import Iterable


class ExportView(Protocol):
    """What the handshake needs to know about one export."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def meta_contexts(self) -> tuple[str, ...]:
        """The metadata contexts this export offers, ``base:allocation`` first; a
        context's id is its index here."""
        ...

    def transmission_flags(self, *, structured: bool) -> TransmissionFlag:
        """The flags to advertise to a client with this negotiated state."""
        ...


class ExportCatalog(Protocol):
    """The exports a server offers, looked up at option time."""

    def lookup(self, name: str) -> ExportView | None: ...

    def list_exports(self) -> Iterable[ExportView]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Size constraints advertised in NBD_INFO_BLOCK_SIZE."""

    minimum: int = 1
    preferred: int = PREFERRED_BLOCK
    maximum: int = MAX_PAYLOAD


@dataclasses.dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of a successful handshake."""

    export: ExportView
    flags: TransmissionFlag
    structured: bool = False
    #: NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte request and reply
    #: headers (``structured`` is then true as well)
    extended: bool = False
    #: selected metadata contexts, id -> name
    meta_contexts: dict[int, str] = dataclasses.field(default_factory=dict)
    block_sizes: BlockSizes = BlockSizes()

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)


def transmission_flags(*, read_only: bool, can_flush: bool, can_fua: bool,
                       can_fast_zero: bool, multi_conn: bool,
                       structured: bool) -> TransmissionFlag:
    """The one place export flags are computed (qemu's policy).

    Every export: HAS_FLAGS, SEND_CACHE, and FLUSH/FUA where the backend can.
    Read-only exports: READ_ONLY.  Writable ones: TRIM, WRITE_ZEROES and
    FAST_ZERO (TRIM is advertised even when discards are ignored, as qemu
    does).  CAN_MULTI_CONN when the export allows more than one client and the
    backend keeps one consistent store.  DF only with structured replies.
    """
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_CACHE
    if can_flush:
        flags |= TransmissionFlag.SEND_FLUSH
    if can_fua:
        flags |= TransmissionFlag.SEND_FUA
    if read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
        if can_fast_zero:
            flags |= TransmissionFlag.SEND_FAST_ZERO
    if multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    if structured:
        flags |= TransmissionFlag.SEND_DF
    return flags
