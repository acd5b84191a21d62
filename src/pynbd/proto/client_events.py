"""What the client handshake hands out: its events and their reply-type names.

Rules of this module: frozen, slotted dataclasses and naming only, so that
both client modules (``client``, which makes these events, and
``client_transmission``, which starts from ``HandshakeComplete``) can import
them without importing each other.  ``pynbd.proto.client`` re-exports them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .constants import Opt, Rep, TransmissionFlag
from .events import StartTLS, _Sentinel

if TYPE_CHECKING:
    from .negotiated import BlockSizes


def rep_name(rep: int) -> str:
    """``NBD_REP_ERR_UNKNOWN`` for a known reply type, else its number."""
    try:
        return f"NBD_REP_{Rep(rep).name}"
    except ValueError:
        return f"reply type {rep:#x}"


@dataclasses.dataclass(frozen=True, slots=True)
class OptionRefused:
    """The server refused an option the client can do without; negotiation goes on."""

    option: Opt
    #: the ``NBD_REP_ERR_*`` value
    rep: int
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The server refused what the client needs (the export, or TLS): close."""

    option: Opt
    rep: int
    message: str

    def __str__(self) -> str:
        text = f"{self.option.name} refused: {rep_name(self.rep)}"
        return f"{text}: {self.message}" if self.message else text


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The export is chosen; transmission starts with ``trailing`` already received."""

    size: int
    flags: TransmissionFlag
    structured: bool
    #: selected metadata contexts, name -> id
    meta_contexts: dict[str, int]
    #: ``None`` when the server sent no NBD_INFO_BLOCK_SIZE
    block_sizes: BlockSizes | None
    #: the canonical name and description, if the server sent them
    name: str | None = None
    description: str | None = None
    trailing: bytes = b""
    #: NBD_OPT_EXTENDED_HEADERS was acknowledged (``structured`` is then true too)
    extended: bool = False


ClientHandshakeEvent = HandshakeComplete | HandshakeFailed | OptionRefused | StartTLS | _Sentinel
