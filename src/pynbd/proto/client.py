"""Client side of the NBD protocol, sans I/O: the handshake (option haggling).

The handshake's events are in ``client_events`` and the transmission phase is
``ClientTransmission`` (in ``client_transmission``); both are re-exported
here, so ``pynbd.proto.client`` is the one client import.

Rules of this module:
- It never imports asyncio, socket, ssl, os, time or logging.
- Bytes come in through ``receive_data``; options accumulate and leave
  through ``data_to_send``; outcomes leave through ``next_event``.
- ``next_event`` raises only ``ProtocolError`` (the server broke the protocol;
  the connection cannot go on).  Misuse by the caller raises
  ``LocalProtocolError``.
- Option refusals are events, never exceptions: ``OptionRefused`` when the
  client can do without the option, ``HandshakeFailed`` when it cannot.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from . import wire
from .client_events import (
    ClientHandshakeEvent,
    HandshakeComplete,
    HandshakeFailed,
    OptionRefused,
    rep_name,
)
from .client_options import ERROR_BIT, parse_info, take_option_reply
from .client_transmission import ClientTransmission, Completion, errno_name
from .constants import (
    EXPORT_NAME_ZEROES,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from .errors import LocalProtocolError, ProtocolError
from .events import NEED_DATA, StartTLS
from .negotiated import BlockSizes

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .wire import Buffer

__all__ = [
    "ClientHandshake",
    "ClientHandshakeEvent",
    "ClientTransmission",
    "Completion",
    "HandshakeComplete",
    "HandshakeFailed",
    "OptionRefused",
    "errno_name",
    "rep_name",
]

#: second magic of an oldstyle server (we only speak fixed newstyle)
_OLDSTYLE_MAGIC = 0x00420281861253
#: the most option-reply data we buffer (replies are short: infos, names, messages)


# -- handshake ---------------------------------------------------------------------------


class _HState(enum.Enum):
    GREETING = "greeting"
    REPLY = "reply"
    TLS_HANDSHAKE = "tls-handshake"
    EXPORT_NAME = "export-name"
    DONE = "done"


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING or "\0" in text:
        raise LocalProtocolError(f"{text[:40]!r}: NBD strings are at most {MAX_STRING} bytes "
                                 "without NUL")
    return raw


class ClientHandshake:
    """Negotiates one connection from the client side.

    Args:
        export_name: the export to ask for.
        structured: ask for structured replies (needed for meta contexts).
        extended: ask for extended headers first (with ``structured`` only);
            if the server refuses them, structured replies are asked for instead.
        meta_contexts: contexts to select, e.g. ``["base:allocation"]``.
        tls: send STARTTLS first; the shell upgrades on ``StartTLS`` and then
            calls ``tls_started``.

    Order of options: STARTTLS, EXTENDED_HEADERS, STRUCTURED_REPLY (unless
    extended headers were acknowledged), SET_META_CONTEXT, then GO asking for
    NBD_INFO_BLOCK_SIZE (EXPORT_NAME if the server does not know GO, unless
    extended headers are on: a client must not use EXPORT_NAME then).
    """

    def __init__(self, export_name: str = "", *, structured: bool = True,
                 extended: bool = False, meta_contexts: Sequence[str] = (),
                 tls: bool = False) -> None:
        self._name = _string(export_name)
        self._want_structured = structured
        self._want_extended = extended and structured
        self._queries = [_string(q) for q in meta_contexts]
        self._want_tls = tls
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._state = _HState.GREETING
        self._option = Opt.ABORT
        self._steps: list[Opt] = []
        self._no_zeroes = False
        self._go_fallback = False
        self.tls_active = False
        self._reset()

    def _reset(self) -> None:
        self._structured = False
        self._extended = False
        self._contexts: dict[str, int] = {}
        self._export: tuple[int, int] | None = None
        self._sizes: BlockSizes | None = None
        self._info_name: str | None = None
        self._description: str | None = None

    # -- I/O side -------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the server."""
        self._buf += data

    def data_to_send(self) -> bytes:
        """Everything queued for the server since the last call."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ClientHandshakeEvent:
        """Process what has arrived; return an outcome or ``NEED_DATA``."""
        while True:
            if self._state is _HState.DONE:
                raise LocalProtocolError("the handshake is over")
            if self._state is _HState.TLS_HANDSHAKE:
                return NEED_DATA
            if self._state is _HState.GREETING:
                event = self._parse_greeting()
            elif self._state is _HState.EXPORT_NAME:
                event = self._parse_export_name_reply()
            else:
                event = self._parse_reply()
            if event is not None:
                return event

    def tls_started(self) -> None:
        """The shell finished the TLS handshake: negotiate again, now over TLS."""
        if self._state is not _HState.TLS_HANDSHAKE:
            raise LocalProtocolError("tls_started() without a StartTLS event")
        self.tls_active = True
        self._reset()
        self._state = _HState.REPLY
        self._next_step()

    # -- sending --------------------------------------------------------------------

    def _send_option(self, option: Opt, data: bytes = b"") -> None:
        self._option = option
        self._out.append(wire.OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data)

    def _next_step(self) -> None:
        option = self._steps.pop(0)
        if option == Opt.STRUCTURED_REPLY and self._extended:
            option = self._steps.pop(0)
        if option == Opt.SET_META_CONTEXT and not self._structured:
            option = self._steps.pop(0)
        if option == Opt.SET_META_CONTEXT:
            data = bytearray(wire.U32.pack(len(self._name)) + self._name)
            data += wire.U32.pack(len(self._queries))
            for query in self._queries:
                data += wire.U32.pack(len(query)) + query
            self._send_option(option, bytes(data))
        elif option == Opt.GO:
            self._send_option(option, wire.U32.pack(len(self._name)) + self._name
                              + wire.U16.pack(1) + wire.U16.pack(Info.BLOCK_SIZE))
        else:
            self._send_option(option)

    # -- parsing --------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _parse_greeting(self) -> ClientHandshakeEvent | None:
        if len(self._buf) < wire.GREETING.size:
            return NEED_DATA
        magic, second, flags = wire.GREETING.unpack_from(self._buf)
        if magic != NBDMAGIC:
            raise ProtocolError(f"not an NBD server (greeting magic {magic:#x})")
        if second == _OLDSTYLE_MAGIC:
            raise ProtocolError("oldstyle NBD servers are not supported")
        if second != IHAVEOPT:
            raise ProtocolError(f"bad newstyle magic {second:#x}")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ProtocolError("the server does not support fixed newstyle negotiation")
        del self._buf[:wire.GREETING.size]
        self._no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        client = ClientFlag.C_FIXED_NEWSTYLE
        if self._no_zeroes:
            client |= ClientFlag.C_NO_ZEROES
        self._out.append(wire.CLIENT_FLAGS.pack(client))
        if self._want_tls:
            self._steps.append(Opt.STARTTLS)
        if self._want_extended:
            self._steps.append(Opt.EXTENDED_HEADERS)
        if self._want_structured:
            self._steps.append(Opt.STRUCTURED_REPLY)
            if self._queries:
                self._steps.append(Opt.SET_META_CONTEXT)
        self._steps.append(Opt.GO)
        self._state = _HState.REPLY
        self._next_step()
        return None

    def _parse_reply(self) -> ClientHandshakeEvent | None:
        reply = take_option_reply(self._buf, self._option)
        if reply is None:
            return NEED_DATA
        rep, payload = reply
        if rep & ERROR_BIT:
            return self._refused(rep, payload.decode("utf-8", "replace"))
        handler: Callable[[int, bytes], ClientHandshakeEvent | None] = {
            Opt.STARTTLS: self._on_starttls,
            Opt.STRUCTURED_REPLY: self._on_structured,
            Opt.EXTENDED_HEADERS: self._on_extended,
            Opt.SET_META_CONTEXT: self._on_meta_context,
            Opt.GO: self._on_go,
        }[self._option]
        return handler(rep, payload)

    def _refused(self, rep: int, message: str) -> ClientHandshakeEvent:
        option = self._option
        if option == Opt.STRUCTURED_REPLY:
            self._structured = False
        elif option == Opt.EXTENDED_HEADERS:
            self._extended = False
        elif option == Opt.SET_META_CONTEXT:
            self._contexts = {}
        elif (option == Opt.GO and rep == Rep.ERR_UNSUP and not self._go_fallback
              and not self._extended):
            self._go_fallback = True
            self._option = Opt.EXPORT_NAME
            self._out.append(wire.OPTION_HEADER.pack(IHAVEOPT, Opt.EXPORT_NAME,
                                                     len(self._name)) + self._name)
            self._state = _HState.EXPORT_NAME
            return OptionRefused(option, rep, message)
        else:
            self._state = _HState.DONE
            return HandshakeFailed(option, rep, message)
        self._next_step()
        return OptionRefused(option, rep, message)

    @staticmethod
    def _expect_ack(rep: int, payload: bytes, option: Opt) -> None:
        if rep != Rep.ACK:
            raise ProtocolError(f"unexpected {rep_name(rep)} to {option.name}")
        if payload:
            raise ProtocolError(f"ACK to {option.name} with {len(payload)} bytes of data")

    def _on_starttls(self, rep: int, payload: bytes) -> ClientHandshakeEvent:
        self._expect_ack(rep, payload, Opt.STARTTLS)
        if self._buf:
            raise ProtocolError("the server sent data after its STARTTLS ACK, before TLS")
        self._state = _HState.TLS_HANDSHAKE
        return StartTLS()

    def _on_structured(self, rep: int, payload: bytes) -> None:
        self._expect_ack(rep, payload, Opt.STRUCTURED_REPLY)
        self._structured = True
        self._next_step()

    def _on_extended(self, rep: int, payload: bytes) -> None:
        self._expect_ack(rep, payload, Opt.EXTENDED_HEADERS)
        self._extended = True
        self._structured = True
        self._next_step()

    def _on_meta_context(self, rep: int, payload: bytes) -> None:
        if rep == Rep.META_CONTEXT:
            if len(payload) < 5:
                raise ProtocolError(f"META_CONTEXT reply of {len(payload)} bytes")
            (context_id,) = wire.U32.unpack_from(payload)
            name = payload[4:]
            if name not in self._queries:
                raise ProtocolError(f"the server selected context {name!r}, which was not "
                                    "asked for")
            self._contexts[name.decode()] = context_id
            return
        self._expect_ack(rep, payload, Opt.SET_META_CONTEXT)
        self._next_step()

    def _on_go(self, rep: int, payload: bytes) -> ClientHandshakeEvent | None:
        if rep == Rep.INFO:
            self._on_info(payload)
            return None
        self._expect_ack(rep, payload, Opt.GO)
        if self._export is None:
            raise ProtocolError("GO succeeded without NBD_INFO_EXPORT")
        return self._complete(*self._export)

    def _on_info(self, payload: bytes) -> None:
        kind, item = parse_info(payload)
        if isinstance(item, tuple):
            self._export = item
        elif isinstance(item, BlockSizes):
            self._sizes = item
        elif kind == Info.NAME:
            self._info_name = item
        elif kind == Info.DESCRIPTION:
            self._description = item

    def _parse_export_name_reply(self) -> ClientHandshakeEvent | None:
        need = wire.EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else EXPORT_NAME_ZEROES)
        if len(self._buf) < need:
            return NEED_DATA
        size, flags = wire.EXPORT_NAME_REPLY.unpack_from(self._buf)
        del self._buf[:need]
        return self._complete(size, flags)

    def _complete(self, size: int, flags: int) -> HandshakeComplete:
        self._state = _HState.DONE
        if not flags & TransmissionFlag.HAS_FLAGS:
            flags = 0
        return HandshakeComplete(
            size=size, flags=TransmissionFlag(flags), structured=self._structured,
            meta_contexts=dict(self._contexts), block_sizes=self._sizes,
            name=self._info_name, description=self._description,
            trailing=self._take(len(self._buf)), extended=self._extended)
