"""The sans-IO NBD protocol core: bytes in, events out; no sockets, no clocks."""

from __future__ import annotations

from .errors import LocalProtocolError, NBDError, ProtocolError, nbd_errno
from .events import (
    NEED_DATA,
    Disconnect,
    HandshakeClosed,
    HandshakeDone,
    InvalidRequest,
    Request,
    StartTLS,
)
from .extended import ExtendedTransmission
from .handshake import ServerHandshake
from .negotiated import BlockSizes, ExportCatalog, ExportView, Negotiated, transmission_flags
from .transmission import ServerTransmission

__all__ = [
    "NEED_DATA",
    "BlockSizes",
    "Disconnect",
    "ExportCatalog",
    "ExportView",
    "ExtendedTransmission",
    "HandshakeClosed",
    "HandshakeDone",
    "InvalidRequest",
    "LocalProtocolError",
    "NBDError",
    "Negotiated",
    "ProtocolError",
    "Request",
    "ServerHandshake",
    "ServerTransmission",
    "StartTLS",
    "nbd_errno",
    "transmission_flags",
]
