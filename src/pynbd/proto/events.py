"""Events the protocol cores hand to the I/O shell.

Rules of this module: frozen, slotted dataclasses only; an event that exists
is valid.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .constants import Errno
    from .negotiated import Negotiated


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: returned by ``next_event`` when more bytes must be received first
NEED_DATA = _Sentinel.NEED_DATA


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeDone:
    """The client chose an export; transmission starts.

    ``trailing`` holds bytes the client already sent after the handshake;
    they belong to the transmission phase.
    """

    negotiated: Negotiated
    trailing: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeClosed:
    """The handshake ended without an export: close the connection."""

    reason: str
    #: the client asked to leave (NBD_OPT_ABORT) rather than being dropped
    graceful: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class StartTLS:
    """The client asked for TLS and was told yes; upgrade the stream now."""


class Request(NamedTuple):
    """A valid transmission request, ready for the backend.

    A ``NamedTuple`` rather than a frozen dataclass like the other events:
    one is built per request, and a frozen dataclass costs about three times
    as much to create.
    """

    #: a ``Cmd`` value (kept a plain int: enum construction costs on every request)
    cmd: int
    #: ``CmdFlag`` bits, as a plain int
    flags: int
    cookie: int
    offset: int
    length: int
    #: WRITE data (exactly ``length`` bytes); ``None`` for other commands
    payload: bytes | bytearray | memoryview | None = None
    #: BLOCK_STATUS in its payload form (extended headers): the ids of the
    #: contexts to report; ``None``: every negotiated context
    contexts: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class InvalidRequest:
    """A request to answer with an error without touching the backend."""

    cookie: int
    cmd: int
    errno: Errno
    message: str
    offset: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish outstanding requests, then close."""


HandshakeEvent = HandshakeDone | HandshakeClosed | StartTLS | _Sentinel
TransmissionEvent = Request | InvalidRequest | Disconnect | _Sentinel
