"""Server side of the fixed-newstyle handshake (option haggling), sans I/O.

Rules of this module:
- It never imports asyncio, socket, ssl, os, time or logging.
- Bytes come in through ``receive_data``; replies accumulate and leave
  through ``data_to_send``; outcomes leave through ``next_event``.
- ``next_event`` raises only ``ProtocolError``.
- One option is read whole and answered whole before the next is looked at.
- Option data above ``MAX_OPTION_DATA`` is never buffered: it is skipped as it
  arrives and the option is refused with ``NBD_REP_ERR_TOO_BIG``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from . import wire
from .constants import (
    DIRTY_BITMAP_PREFIX,
    EXPORT_NAME_ZEROES,
    IHAVEOPT,
    MAX_META_QUERIES,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from .errors import LocalProtocolError, ProtocolError
from .events import NEED_DATA, HandshakeClosed, HandshakeDone, HandshakeEvent, StartTLS
from .negotiated import BlockSizes, ExportCatalog, ExportView, Negotiated

if TYPE_CHECKING:
    import struct
    from collections.abc import Callable

#: the id base:allocation has (every export offers it first)
BASE_ALLOCATION_ID = 0
#: LIST_META_CONTEXT queries that name a namespace's contexts as a group (as qemu)
_WILDCARDS = ("base:", "qemu:", DIRTY_BITMAP_PREFIX)
#: option data longer than this ends the connection (qemu's limit)
_HARD_OPTION_LIMIT = MAX_PAYLOAD

_TLS_REQD = "TLS is required: send NBD_OPT_STARTTLS first"

_SERVER_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
_KNOWN_CLIENT_FLAGS = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES


class _State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS_HANDSHAKE = "tls-handshake"
    DONE = "done"


class TlsMode(enum.Enum):
    """How a server treats TLS (the spec's NOTLS, SELECTIVETLS-like, FORCEDTLS)."""

    #: STARTTLS is refused with NBD_REP_ERR_POLICY
    OFF = "off"
    #: plaintext and TLS clients are both served
    ON = "on"
    #: nothing but STARTTLS and ABORT works before TLS
    REQUIRE = "require"


class _OptionRefused(Exception):
    """An option is answered with an error reply; the handshake goes on."""

    def __init__(self, rep: Rep, message: str) -> None:
        super().__init__(message)
        self.rep = rep
        self.message = message


class _Reader:
    """Bounds-checked cursor over one option's data."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u32(self) -> int:
        return self._unpack(wire.U32)

    def u16(self) -> int:
        return self._unpack(wire.U16)

    def _unpack(self, layout: struct.Struct) -> int:
        if self.pos + layout.size > len(self.data):
            raise _OptionRefused(Rep.ERR_INVALID, "option data is too short")
        (value,) = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return int(value)

    def string(self, length: int) -> str:
        if length > MAX_STRING:
            raise _OptionRefused(Rep.ERR_INVALID, f"string of {length} bytes is too long")
        if self.pos + length > len(self.data):
            raise _OptionRefused(Rep.ERR_INVALID, "string runs past the option data")
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _OptionRefused(Rep.ERR_INVALID, "string is not valid UTF-8") from None
        if "\0" in text:
            raise _OptionRefused(Rep.ERR_INVALID, "string contains a NUL byte")
        return text

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise _OptionRefused(Rep.ERR_INVALID, "option data has trailing bytes")


#: what a server advertises unless it raises its payload limit
DEFAULT_BLOCK_SIZES = BlockSizes()


class ServerHandshake:
    """Negotiates one connection's export, options and features.

    Args:
        catalog: the exports on offer (looked up when an option names one).
        refusal: if set, the server will not serve this client (e.g. its
            connection limit is reached); export-selecting options are
            refused with ``NBD_REP_ERR_POLICY`` and this text.
        tls: whether STARTTLS is offered, and whether it is required.

    STARTTLS rules (the lessons of nbdkit's CVE-2021-3716): a client that sends
    anything after STARTTLS before the TLS handshake is dropped, so injected
    plaintext is never acted on; once ``tls_started`` is called every earlier
    negotiation result (structured replies, extended headers, meta contexts) is
    forgotten.
    """

    def __init__(self, catalog: ExportCatalog, *, refusal: str | None = None,
                 tls: TlsMode = TlsMode.OFF, block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
                 ) -> None:
        self._catalog = catalog
        #: advertised in NBD_INFO_BLOCK_SIZE (the maximum is the payload limit)
        self._block_sizes = block_sizes
        self._refusal = refusal
        self._tls_mode = tls
        self.tls_active = False
        self._buf = bytearray()
        self._out: list[bytes] = [wire.GREETING.pack(NBDMAGIC, IHAVEOPT, _SERVER_FLAGS)]
        self._state = _State.CLIENT_FLAGS
        self._fixed = True
        self._no_zeroes = False
        self._skip = 0
        self._skipped_option = 0
        self._reset_negotiation()
        self._handlers: dict[int, Callable[[bytes], HandshakeEvent | None]] = {
            Opt.EXPORT_NAME: self._handle_export_name,
            Opt.ABORT: self._handle_abort,
            Opt.LIST: self._handle_list,
            Opt.STARTTLS: self._handle_starttls,
            Opt.INFO: self._handle_info,
            Opt.GO: self._handle_go,
            Opt.STRUCTURED_REPLY: self._handle_structured_reply,
            Opt.LIST_META_CONTEXT: self._handle_list_meta_context,
            Opt.SET_META_CONTEXT: self._handle_set_meta_context,
            Opt.EXTENDED_HEADERS: self._handle_extended_headers,
        }

    def _reset_negotiation(self) -> None:
        self._structured = False
        self._extended = False
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}

    # -- I/O side -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client."""
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
            if not self._skip:
                if self._tls_required and self._skipped_option not in (Opt.STARTTLS,
                                                                       Opt.ABORT):
                    self._reply(self._skipped_option, Rep.ERR_TLS_REQD, _TLS_REQD)
                else:
                    self._reply(self._skipped_option, Rep.ERR_TOO_BIG,
                                f"option data longer than {MAX_OPTION_DATA} bytes")
        self._buf += data

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._buf)

    def next_event(self) -> HandshakeEvent:
        """Process what has arrived; return an outcome or ``NEED_DATA``."""
        while True:
            if self._state is _State.DONE:
                raise ProtocolError("handshake already finished")
            if self._state is _State.TLS_HANDSHAKE:
                return NEED_DATA
            if self._skip:
                return NEED_DATA
            if self._state is _State.CLIENT_FLAGS:
                event = self._parse_client_flags()
            else:
                event = self._parse_option()
            if event is NEED_DATA or event is not None:
                return event

    # -- parsing --------------------------------------------------------------

    def _parse_client_flags(self) -> HandshakeEvent | None:
        if len(self._buf) < wire.CLIENT_FLAGS.size:
            return NEED_DATA
        (flags,) = wire.CLIENT_FLAGS.unpack_from(self._buf)
        del self._buf[:wire.CLIENT_FLAGS.size]
        # int(): ~ on an IntFlag only complements its known members (0 here)
        if flags & ~int(_KNOWN_CLIENT_FLAGS):
            raise ProtocolError(f"client set unknown flags {flags:#x}")
        self._fixed = bool(flags & ClientFlag.C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self._state = _State.OPTIONS
        return None

    def _parse_option(self) -> HandshakeEvent | None:
        if len(self._buf) < wire.OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = wire.OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > _HARD_OPTION_LIMIT:
            raise ProtocolError(f"option {option} with {length} bytes of data")
        if not self._fixed and option != Opt.EXPORT_NAME:
            raise ProtocolError("non-fixed-newstyle client sent an option other than "
                                "EXPORT_NAME")
        if length > MAX_OPTION_DATA:
            del self._buf[:wire.OPTION_HEADER.size]
            if option == Opt.EXPORT_NAME:
                # EXPORT_NAME has no error reply: the server must close (spec 2.6)
                return self._close(f"export name of {length} bytes is too long")
            self._skipped_option = option
            self._skip = length
            self.receive_data(self._take(len(self._buf)))
            return None
        end = wire.OPTION_HEADER.size + length
        if len(self._buf) < end:
            return NEED_DATA
        data = bytes(self._buf[wire.OPTION_HEADER.size:end])
        del self._buf[:end]
        if self._tls_required and option not in (Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                return self._close("EXPORT_NAME before STARTTLS on a TLS-only server")
            self._reply(option, Rep.ERR_TLS_REQD, _TLS_REQD)
            return None
        handler = self._handlers.get(option)
        if handler is None:
            self._reply(option, Rep.ERR_UNSUP, f"option {option} is not supported")
            return None
        try:
            return handler(data)
        except _OptionRefused as refused:
            if option == Opt.EXPORT_NAME:
                return self._close(refused.message)
            self._reply(option, refused.rep, refused.message)
            return None

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _close(self, reason: str, *, graceful: bool = False) -> HandshakeClosed:
        self._state = _State.DONE
        return HandshakeClosed(reason, graceful=graceful)

    # -- replies ---------------------------------------------------------------

    def _reply(self, option: int, rep: Rep, payload: bytes | str = b"") -> None:
        if isinstance(payload, str):
            # cut to MAX_STRING bytes without leaving half a character behind
            payload = payload.encode("utf-8")[:MAX_STRING].decode("utf-8", "ignore").encode()
        self._out.append(wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, option, rep, len(payload)))
        if payload:
            self._out.append(payload)

    def _find_export(self, name: str) -> ExportView:
        if self._refusal is not None:
            raise _OptionRefused(Rep.ERR_POLICY, self._refusal)
        export = self._catalog.lookup(name)
        if export is None:
            raise _OptionRefused(Rep.ERR_UNKNOWN, f"export {name!r} not present")
        return export

    # -- option handlers --------------------------------------------------------

    def _handle_export_name(self, data: bytes) -> HandshakeEvent:
        if self._extended:
            # the client MUST NOT, and EXPORT_NAME has no error reply: close (as qemu)
            return self._close("NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS")
        name = _Reader(data).string(len(data))
        export = self._find_export(name)
        negotiated = self._negotiated(export)
        self._out.append(wire.EXPORT_NAME_REPLY.pack(export.size, negotiated.flags))
        if not self._no_zeroes:
            self._out.append(bytes(EXPORT_NAME_ZEROES))
        return self._done(negotiated)

    def _handle_abort(self, data: bytes) -> HandshakeEvent:
        self._reply(Opt.ABORT, Rep.ACK)
        return self._close("client sent NBD_OPT_ABORT", graceful=True)

    def _handle_list(self, data: bytes) -> None:
        if data:
            raise _OptionRefused(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        if self._refusal is not None:
            raise _OptionRefused(Rep.ERR_POLICY, self._refusal)
        for export in self._catalog.list_exports():
            name = export.name.encode("utf-8")
            desc = export.description.encode("utf-8")
            self._reply(Opt.LIST, Rep.SERVER, wire.U32.pack(len(name)) + name + desc)
        self._reply(Opt.LIST, Rep.ACK)

    def _handle_starttls(self, data: bytes) -> StartTLS | None:
        if data:
            raise _OptionRefused(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self._tls_mode is TlsMode.OFF:
            raise _OptionRefused(Rep.ERR_POLICY, "TLS is not configured on this server")
        if self.tls_active:
            raise _OptionRefused(Rep.ERR_INVALID, "TLS is already active")
        if self._buf:
            raise ProtocolError("client sent data after NBD_OPT_STARTTLS before the TLS "
                                "handshake")
        self._reply(Opt.STARTTLS, Rep.ACK)
        self._state = _State.TLS_HANDSHAKE
        return StartTLS()

    @property
    def _tls_required(self) -> bool:
        return self._tls_mode is TlsMode.REQUIRE and not self.tls_active

    def tls_started(self) -> None:
        """The shell finished the TLS handshake: forget everything negotiated before."""
        if self._state is not _State.TLS_HANDSHAKE:
            raise LocalProtocolError("tls_started() without a StartTLS event")
        # bytes received from here on came through TLS: the shell stops reading
        # plaintext when it sees StartTLS, and STARTTLS refused any left over
        self.tls_active = True
        self._reset_negotiation()
        self._state = _State.OPTIONS

    def _parse_info_request(self, data: bytes) -> tuple[str, list[int]]:
        reader = _Reader(data)
        name = reader.string(reader.u32())
        count = reader.u16()
        requests = [reader.u16() for _ in range(count)]
        reader.finish()
        return name, requests

    def _send_info(self, option: Opt, data: bytes) -> tuple[ExportView, Negotiated]:
        name, requests = self._parse_info_request(data)
        export = self._find_export(name)
        negotiated = self._negotiated(export)
        self._reply(option, Rep.INFO,
                    wire.INFO_EXPORT.pack(Info.EXPORT, export.size, negotiated.flags))
        if Info.NAME in requests:
            self._reply(option, Rep.INFO,
                        wire.INFO_TYPE.pack(Info.NAME) + export.name.encode("utf-8"))
        if export.description:
            self._reply(option, Rep.INFO, wire.INFO_TYPE.pack(Info.DESCRIPTION)
                        + export.description.encode("utf-8"))
        sizes = negotiated.block_sizes
        self._reply(option, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, sizes.minimum, sizes.preferred, sizes.maximum))
        return export, negotiated

    def _handle_info(self, data: bytes) -> None:
        self._send_info(Opt.INFO, data)
        self._reply(Opt.INFO, Rep.ACK)

    def _handle_go(self, data: bytes) -> HandshakeEvent:
        _, negotiated = self._send_info(Opt.GO, data)
        self._reply(Opt.GO, Rep.ACK)
        return self._done(negotiated)

    def _handle_structured_reply(self, data: bytes) -> None:
        if data:
            raise _OptionRefused(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self._extended:
            raise _OptionRefused(Rep.ERR_EXT_HEADER_REQD,
                                 "extended headers are on, and take precedence")
        if self._structured:
            raise _OptionRefused(Rep.ERR_INVALID, "structured replies are already on")
        self._structured = True
        self._reply(Opt.STRUCTURED_REPLY, Rep.ACK)

    def _handle_extended_headers(self, data: bytes) -> None:
        """Extended headers (they imply structured replies; asked for after
        STRUCTURED_REPLY, they take its place)."""
        if data:
            raise _OptionRefused(Rep.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
        if self._extended:
            raise _OptionRefused(Rep.ERR_INVALID, "extended headers are already on")
        self._extended = True
        self._structured = True
        self._reply(Opt.EXTENDED_HEADERS, Rep.ACK)

    def _parse_meta_request(self, data: bytes) -> tuple[ExportView, list[str]]:
        reader = _Reader(data)
        name = reader.string(reader.u32())
        count = reader.u32()
        if count > MAX_META_QUERIES:
            raise _OptionRefused(Rep.ERR_TOO_BIG, f"{count} meta-context queries")
        queries = [reader.string(reader.u32()) for _ in range(count)]
        reader.finish()
        return self._find_export(name), queries

    def _handle_list_meta_context(self, data: bytes) -> None:
        export, queries = self._parse_meta_request(data)
        offered = export.meta_contexts
        listed = [name for name in offered
                  if not queries or any(_lists(query, name) for query in queries)]
        for name in listed:  # ids in LIST replies mean nothing: 0, as qemu
            self._reply(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT,
                        wire.U32.pack(0) + name.encode())
        self._reply(Opt.LIST_META_CONTEXT, Rep.ACK)

    def _handle_set_meta_context(self, data: bytes) -> None:
        self._meta_export = None
        self._meta_contexts = {}
        if not self._structured:
            raise _OptionRefused(Rep.ERR_INVALID,
                                 "NBD_OPT_SET_META_CONTEXT needs structured replies first")
        export, queries = self._parse_meta_request(data)
        wanted = set(queries)  # exact names only: SET takes no wildcard
        for context_id, name in enumerate(export.meta_contexts):
            if name in wanted:
                self._meta_contexts[context_id] = name
                self._reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                            wire.U32.pack(context_id) + name.encode())
        self._meta_export = export.name
        self._reply(Opt.SET_META_CONTEXT, Rep.ACK)

    # -- outcome ------------------------------------------------------------------

    def _negotiated(self, export: ExportView) -> Negotiated:
        contexts = self._meta_contexts if self._meta_export == export.name else {}
        flags = export.transmission_flags(structured=self._structured)
        if self._extended and contexts:
            # BLOCK_STATUS naming its contexts in a payload: only with extended
            # headers, and not offered when there is no context to name
            flags |= TransmissionFlag.BLOCK_STATUS_PAYLOAD
        return Negotiated(
            export=export,
            flags=flags,
            structured=self._structured,
            extended=self._extended,
            meta_contexts=dict(contexts),
            block_sizes=self._block_sizes,
        )

    def _done(self, negotiated: Negotiated) -> HandshakeDone:
        self._state = _State.DONE
        return HandshakeDone(negotiated, trailing=self._take(len(self._buf)))


def _lists(query: str, name: str) -> bool:
    """Whether a LIST_META_CONTEXT query names context ``name``: exactly, or as
    one of the namespace wildcards qemu answers (``base:``, ``qemu:``,
    ``qemu:dirty-bitmap:``)."""
    return query == name or (query in _WILDCARDS and name.startswith(query))
