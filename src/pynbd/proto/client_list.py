"""Client side of the NBD protocol, sans I/O: listing a server's exports.

``ClientLister`` does what ``qemu-nbd -L`` and ``nbdinfo --list`` do: after
the greeting it asks for STARTTLS (if wanted), extended headers, structured
replies, then NBD_OPT_LIST, and for each export NBD_OPT_INFO (name,
description, block sizes) and NBD_OPT_LIST_META_CONTEXT (every context the
server offers on it), and ends with NBD_OPT_ABORT.  The outcome is one
``ExportList`` event.

Rules of this module: as ``client``: no I/O imports; bytes in through
``receive_data``, out through ``data_to_send``, outcomes through
``next_event`` (``NEED_DATA``, ``StartTLS``, ``HandshakeFailed``,
``ExportList``); a server that breaks the protocol raises ``ProtocolError``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from . import wire
from .client_events import HandshakeFailed, rep_name
from .client_options import ERROR_BIT, parse_info, take_option_reply
from .constants import (
    IHAVEOPT,
    NBDMAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from .errors import LocalProtocolError, ProtocolError
from .events import NEED_DATA, StartTLS, _Sentinel
from .negotiated import BlockSizes

if TYPE_CHECKING:
    from .wire import Buffer

#: the infos asked for with NBD_OPT_INFO
_INFO_REQUESTS = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportDetails:
    """One export as NBD_OPT_LIST, NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT tell it."""

    name: str
    description: str
    size: int
    flags: TransmissionFlag
    #: ``None`` when the server sent no NBD_INFO_BLOCK_SIZE
    block_sizes: BlockSizes | None
    #: the contexts the server offers, in its order
    meta_contexts: tuple[str, ...]
    #: whether the connection used extended headers (64-bit transaction sizes)
    extended: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ExportList:
    """The listing is complete (NBD_OPT_ABORT is queued: send it and close)."""

    exports: tuple[ExportDetails, ...]
    tls: bool


ListerEvent = ExportList | HandshakeFailed | StartTLS | _Sentinel


class ClientLister:
    """Lists the exports of one server over one connection."""

    def __init__(self, *, tls: bool = False, extended: bool = True) -> None:
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._greeted = False
        self._tls_wait = False
        self._done = False
        self._tls_active = False
        self._steps: list[Opt] = [Opt.STARTTLS] if tls else []
        if extended:
            self._steps.append(Opt.EXTENDED_HEADERS)
        self._steps += [Opt.STRUCTURED_REPLY, Opt.LIST]
        self._option = Opt.ABORT
        self._extended = False
        self._structured = False
        #: (name, description) from NBD_OPT_LIST, and the ones still to ask about
        self._listed: list[tuple[str, str]] = []
        self._todo: list[tuple[str, str]] = []
        self._exports: list[ExportDetails] = []
        #: what NBD_OPT_INFO told of the export being asked about
        self._export: tuple[int, int] | None = None
        self._description: str | None = None
        self._sizes: BlockSizes | None = None
        self._contexts: list[str] = []

    # -- I/O side -------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the server."""
        self._buf += data

    def data_to_send(self) -> bytes:
        """Everything queued for the server since the last call."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ListerEvent:
        """Process what has arrived; return an outcome or ``NEED_DATA``."""
        if self._done:
            raise LocalProtocolError("the listing is over")
        if self._tls_wait:
            return NEED_DATA
        if not self._greeted and not self._parse_greeting():
            return NEED_DATA
        while True:
            event = self._parse_reply()
            if event is not None:
                return event

    def tls_started(self) -> None:
        """The shell finished the TLS handshake: go on, now over TLS."""
        if not self._tls_wait:
            raise LocalProtocolError("tls_started() without a StartTLS event")
        self._tls_wait = False
        self._tls_active = True
        self._next_step()

    # -- sending --------------------------------------------------------------------

    def _send(self, option: Opt, data: bytes = b"") -> None:
        self._option = option
        self._out.append(wire.OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data)

    def _next_step(self) -> None:
        option = self._steps.pop(0)
        if option is Opt.STRUCTURED_REPLY and self._extended:
            option = self._steps.pop(0)
        self._send(option)

    def _ask_next_export(self) -> ExportList | None:
        if not self._todo:
            self._send(Opt.ABORT)
            self._done = True
            return ExportList(tuple(self._exports), self._tls_active)
        name = self._todo[0][0].encode("utf-8")
        self._export, self._description, self._sizes = None, None, None
        self._contexts = []
        data = wire.U32.pack(len(name)) + name + wire.U16.pack(len(_INFO_REQUESTS))
        data += b"".join(wire.U16.pack(kind) for kind in _INFO_REQUESTS)
        self._send(Opt.INFO, data)
        return None

    def _ask_contexts(self) -> None:
        name = self._todo[0][0].encode("utf-8")
        self._send(Opt.LIST_META_CONTEXT, wire.U32.pack(len(name)) + name + wire.U32.pack(0))

    def _export_done(self) -> ExportList | None:
        name, listed_description = self._todo.pop(0)
        assert self._export is not None
        size, flags = self._export
        description = listed_description if self._description is None else self._description
        self._exports.append(ExportDetails(
            name=name, description=description, size=size,
            flags=TransmissionFlag(flags), block_sizes=self._sizes,
            meta_contexts=tuple(self._contexts), extended=self._extended))
        return self._ask_next_export()

    # -- parsing --------------------------------------------------------------------

    def _parse_greeting(self) -> bool:
        if len(self._buf) < wire.GREETING.size:
            return False
        magic, second, flags = wire.GREETING.unpack_from(self._buf)
        if magic != NBDMAGIC or second != IHAVEOPT:
            raise ProtocolError(f"not a newstyle NBD server (magic {magic:#x} {second:#x})")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ProtocolError("the server does not support fixed newstyle negotiation")
        del self._buf[:wire.GREETING.size]
        client = ClientFlag.C_FIXED_NEWSTYLE | (flags & ClientFlag.C_NO_ZEROES)
        self._out.append(wire.CLIENT_FLAGS.pack(client))
        self._greeted = True
        self._next_step()
        return True

    def _parse_reply(self) -> ListerEvent | None:
        reply = take_option_reply(self._buf, self._option)
        if reply is None:
            return NEED_DATA
        rep, payload = reply
        if rep & ERROR_BIT:
            return self._refused(rep, payload.decode("utf-8", "replace"))
        if rep == Rep.ACK and payload:
            raise ProtocolError(f"ACK to {self._option.name} with {len(payload)} bytes")
        return self._on_reply(rep, payload)

    def _refused(self, rep: int, message: str) -> ListerEvent | None:
        option = self._option
        if option in (Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY):
            self._next_step()
            return None
        if option is Opt.LIST_META_CONTEXT:  # no contexts on offer
            return self._export_done()
        self._done = True
        return HandshakeFailed(option, rep, message)

    def _on_reply(self, rep: int, payload: bytes) -> ListerEvent | None:
        option = self._option
        if option is Opt.STARTTLS:
            self._expect(rep, Rep.ACK)
            if self._buf:
                raise ProtocolError("the server sent data after its STARTTLS ACK")
            self._tls_wait = True
            return StartTLS()
        if option in (Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY):
            self._expect(rep, Rep.ACK)
            self._extended = self._extended or option is Opt.EXTENDED_HEADERS
            self._structured = True
            self._next_step()
        elif option is Opt.LIST:
            if rep == Rep.SERVER:
                self._listed.append(_server_entry(payload))
                return None
            self._expect(rep, Rep.ACK)
            self._todo = list(self._listed)
            return self._ask_next_export()
        elif option is Opt.INFO:
            if rep == Rep.INFO:
                self._on_info(payload)
                return None
            self._expect(rep, Rep.ACK)
            if self._export is None:
                raise ProtocolError("INFO succeeded without NBD_INFO_EXPORT")
            if not self._structured:
                return self._export_done()
            self._ask_contexts()
        elif option is Opt.LIST_META_CONTEXT:
            if rep == Rep.META_CONTEXT:
                if len(payload) < 5:
                    raise ProtocolError(f"META_CONTEXT reply of {len(payload)} bytes")
                self._contexts.append(payload[4:].decode("utf-8", "replace"))
                return None
            self._expect(rep, Rep.ACK)
            return self._export_done()
        else:
            raise ProtocolError(f"unexpected reply to {option.name}")
        return None

    def _expect(self, rep: int, wanted: Rep) -> None:
        if rep != wanted:
            raise ProtocolError(f"unexpected {rep_name(rep)} to {self._option.name}")

    def _on_info(self, payload: bytes) -> None:
        kind, item = parse_info(payload)
        if isinstance(item, tuple):
            self._export = item
        elif isinstance(item, BlockSizes):
            self._sizes = item
        elif kind == Info.DESCRIPTION and isinstance(item, str):
            self._description = item
        # NBD_INFO_NAME and unknown types: the listed name is the one shown


def _server_entry(payload: bytes) -> tuple[str, str]:
    """An NBD_REP_SERVER reply: the export's name and the rest, its description."""
    if len(payload) < 4:
        raise ProtocolError(f"NBD_REP_SERVER of {len(payload)} bytes")
    (length,) = wire.U32.unpack_from(payload)
    if length > len(payload) - 4:
        raise ProtocolError(f"NBD_REP_SERVER name of {length} bytes in {len(payload)}")
    return (payload[4:4 + length].decode("utf-8", "replace"),
            payload[4 + length:].decode("utf-8", "replace"))
