"""Fuzz targets for the server role: ServerHandshake and ServerTransmission.

Each target takes the fuzzer's bytes, reads a few of them as configuration
(TLS mode, export, chunking), feeds the rest to the core as what a client
sent, and plays the shell's part on the event side (``tls_started`` after
StartTLS, a reply built for every request).  ``ProtocolError`` ends the
connection and is fine; any other exception, a failed invariant (an
``AssertionError``) or ``Hang`` is a crash.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from pynbd.proto import wire
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    MAX_STRING,
    REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from pynbd.proto.errors import ProtocolError
from pynbd.proto.events import (
    NEED_DATA,
    Disconnect,
    HandshakeClosed,
    HandshakeDone,
    InvalidRequest,
    Request,
    StartTLS,
)
from pynbd.proto.handshake import ServerHandshake, TlsMode
from pynbd.proto.transmission import ServerTransmission

from .common import CATALOG, Input, converse, drain, pieces

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from pynbd.proto.negotiated import Negotiated
    from pynbd.proto.wire import Buffer

_ERROR_BIT = 1 << 31
#: flags each command may carry in a Request
_ALLOWED = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
_ERRNOS = list(Errno)
#: reads up to this long are answered with data; longer ones with holes or an error
_MAX_READ_DATA = 1 << 16
_MAX_PAYLOADS = (MAX_PAYLOAD, 4096, 100)


# -- invariants -------------------------------------------------------------------------------


def check_option_replies(out: bytes, *, done: bool) -> None:
    """``out`` is whole option replies (plus, once done, an EXPORT_NAME reply)."""
    head = wire.OPTION_REPLY_HEADER
    pos = 0
    while len(out) - pos >= head.size:
        magic, _, rep, length = head.unpack_from(out, pos)
        if magic != REPLY_MAGIC:
            break
        assert pos + head.size + length <= len(out), "option reply cut short"
        if rep & _ERROR_BIT:
            message = out[pos + head.size:pos + head.size + length]
            assert len(message) <= MAX_STRING, "error message over 4096 bytes"
            message.decode("utf-8")
        pos += head.size + length
    rest = len(out) - pos
    assert rest == 0 or (done and rest in (10, 134)), f"{rest} stray bytes in the replies"


def check_reply(buffers: list[Buffer], cookie: int, *, structured: bool,
                data_length: int = 0) -> None:
    """``buffers`` are exactly one whole reply to ``cookie``."""
    data = b"".join(bytes(b) for b in buffers)
    (magic,) = wire.U32.unpack_from(data)
    if magic == SIMPLE_REPLY_MAGIC:
        assert wire.SIMPLE_REPLY.unpack_from(data)[2] == cookie
        assert len(data) == wire.SIMPLE_REPLY.size + data_length
        return
    assert structured, "a structured reply without STRUCTURED_REPLY"
    assert magic == STRUCTURED_REPLY_MAGIC, f"reply magic {magic:#x}"
    head = wire.STRUCTURED_CHUNK
    pos = 0
    done = False
    while pos < len(data):
        assert not done, "a chunk after the DONE chunk"
        magic, flags, _, got, length = head.unpack_from(data, pos)
        assert (magic, got) == (STRUCTURED_REPLY_MAGIC, cookie)
        pos += head.size + length
        done = bool(flags & ReplyFlag.DONE)
    assert pos == len(data), "a chunk cut short"
    assert done, "structured reply without a DONE chunk"


def check_request(event: Request, negotiated: Negotiated, max_payload: int) -> None:
    """A Request is only ever something a backend can safely be given."""
    assert event.cmd in _ALLOWED, f"command {event.cmd} reached the backend"
    assert not event.flags & ~int(_ALLOWED[Cmd(event.cmd)])
    if event.cmd == Cmd.FLUSH:
        assert (event.offset, event.length) == (0, 0)
    else:
        assert event.offset + event.length <= negotiated.export.size
    if negotiated.read_only:
        assert event.cmd not in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
    if event.cmd == Cmd.WRITE:
        assert event.payload is not None
        assert len(event.payload) == event.length <= max_payload
    else:
        assert event.payload is None
    if event.cmd == Cmd.READ:
        assert event.length <= max_payload
    if event.flags & CmdFlag.DF:
        assert negotiated.structured
    if event.flags & CmdFlag.FAST_ZERO:
        assert negotiated.flags & TransmissionFlag.SEND_FAST_ZERO
    if event.cmd == Cmd.BLOCK_STATUS:
        assert negotiated.meta_contexts
        assert event.length > 0


# -- transmission ------------------------------------------------------------------------------


def _answer(core: ServerTransmission, event: Request, seed: int) -> None:
    """Build the reply a shell could send for ``event`` and check its framing."""
    structured = core.negotiated.structured
    how = (event.cookie ^ seed) % 4
    cookie = event.cookie
    if how == 0:  # the backend failed
        errno = _ERRNOS[(seed + event.length) % len(_ERRNOS)]
        message = "\u00e9" * ((seed * 37 + event.offset) % 2500)
        offset = event.offset if seed & 1 and event.cmd != Cmd.FLUSH else None
        check_reply(core.reply_error(cookie, errno, message, offset=offset), cookie,
                    structured=structured)
    elif event.cmd == Cmd.READ:
        length = event.length
        if length <= _MAX_READ_DATA and (how == 1 or not structured or not length):
            check_reply(core.reply_read(cookie, event.offset, bytes(length)), cookie,
                        structured=structured, data_length=0 if structured else length)
        elif structured:
            # alternate data and holes in pieces of a seed-chosen size
            step = max(1 + seed * 97 % min(length, _MAX_READ_DATA), length // 64 + 1)
            parts: list[tuple[int, int, Buffer | None]] = []
            for i, start in enumerate(range(0, length, step)):
                size = min(step, length - start)
                hole = (i + how) % 2 == 0 or size > _MAX_READ_DATA
                parts.append((event.offset + start, size, None if hole else bytes(size)))
            check_reply(core.reply_read_sparse(cookie, parts), cookie, structured=True)
        else:
            check_reply(core.reply_error(cookie, Errno.ENOMEM), cookie, structured=False)
    elif event.cmd == Cmd.BLOCK_STATUS:
        extents = [(event.length, seed & 3)] if how == 1 else [(1, 0), (event.length, 3)]
        contexts = [(cid, extents) for cid in core.negotiated.meta_contexts]
        check_reply(core.reply_block_status(cookie, contexts), cookie, structured=True)
    else:
        check_reply(core.reply_ok(cookie), cookie, structured=structured)


def _check_transmission_error(core: ServerTransmission, err: ProtocolError) -> None:
    """A ProtocolError ends the connection; one with a cookie is answered first."""
    if err.cookie is None:
        return
    assert err.errno == Errno.EINVAL, err.errno
    check_reply(core.reply_error(err.cookie, err.errno, err.message), err.cookie,
                structured=core.negotiated.structured)


def serve(core: ServerTransmission, stream: Iterable[bytes], seed: int,
          max_payload: int, *, buffered: bool = False) -> None:
    """Feed ``stream`` to ``core`` piece by piece, answering every event.

    ``buffered``: as the asyncio shell does, through ``get_buffer`` /
    ``buffer_updated`` (a piece may take several rounds, with the events handled
    after each), and WRITE payloads are given back with ``recycle``.
    """
    for piece in stream:
        pos = 0
        while True:
            if buffered:
                view = core.get_buffer()
                assert len(view) >= 1
                take = min(len(view), len(piece) - pos)
                view[:take] = piece[pos:pos + take]
                core.buffer_updated(take)
                pos += take
            else:
                core.receive_data(piece)
                pos = len(piece)
            if not _handle(core, piece, seed, max_payload, recycle=buffered):
                return
            if pos >= len(piece):
                break


def _handle(core: ServerTransmission, piece: bytes, seed: int, max_payload: int, *,
            recycle: bool) -> bool:
    """Answer every event the core has; False once the connection is over."""
    negotiated = core.negotiated
    structured = negotiated.structured
    events = drain(core)
    while True:
        try:
            event = next(events, NEED_DATA)
        except ProtocolError as err:
            _check_transmission_error(core, err)
            return False
        if event is NEED_DATA:
            break
        if isinstance(event, Disconnect):
            # nothing after NBD_CMD_DISC is acted on
            core.receive_data(piece)
            assert core.next_event() is NEED_DATA
            return False
        if isinstance(event, InvalidRequest):
            assert event.errno in (Errno.EINVAL, Errno.EPERM, Errno.ENOSPC,
                                   Errno.EOVERFLOW), event
            assert event.message
            offset = event.offset if seed & 2 else None
            check_reply(core.reply_error(event.cookie, event.errno, event.message,
                                         offset=offset),
                        event.cookie, structured=structured)
            continue
        assert isinstance(event, Request), event
        check_request(event, negotiated, max_payload)
        _answer(core, event, seed)
        if recycle and event.payload is not None:
            core.recycle(event.payload)
    # less than one whole request is held, and the core says how much is missing
    assert core.pending_bytes < wire.REQUEST.size + max_payload
    assert core.bytes_wanted >= 1
    return True


def server_transmission(data: bytes) -> None:
    """A real handshake (in memory, cached), then the fuzzer's bytes as requests."""
    inp = Input(data)
    export, cfg, size, seed = inp.u8(), inp.u8(), inp.u16(), inp.u8()
    conversation = converse(export, structured=bool(cfg & 1), meta=bool(cfg & 2))
    max_payload = _MAX_PAYLOADS[(cfg >> 2 & 3) % len(_MAX_PAYLOADS)]
    # zeroes after the input, so a WRITE can carry more than an input holds
    padding = inp.u16() * 16 if cfg & 0x40 else 0
    core = ServerTransmission(conversation.negotiated, max_payload=max_payload)
    serve(core, itertools.chain(pieces(inp.rest(), size or 1 << 16),
                                pieces(bytes(padding), 1 << 16)), seed, max_payload,
          buffered=bool(cfg & 0x80))


# -- handshake ---------------------------------------------------------------------------------


def _check_done(event: HandshakeDone, core: ServerHandshake, *, refused: bool,
                tls: TlsMode) -> None:
    negotiated = event.negotiated
    assert not refused, "a refused client got an export"
    assert tls is not TlsMode.REQUIRE or core.tls_active, "an export without TLS"
    assert core.pending_bytes == 0
    flags = negotiated.flags
    fixed = getattr(negotiated.export, "fixed", None)
    assert fixed is not None or flags & TransmissionFlag.HAS_FLAGS
    assert fixed is not None or bool(flags & TransmissionFlag.SEND_DF) is negotiated.structured
    assert set(negotiated.meta_contexts.values()) <= {BASE_ALLOCATION}
    assert not negotiated.meta_contexts or negotiated.structured
    assert CATALOG.lookup(negotiated.export.name) is negotiated.export


def _handshake(core: ServerHandshake, feed: Iterator[bytes], stream: bytes, *,
               refused: bool, tls: TlsMode) -> HandshakeDone | None:
    """Feed the handshake until it ends; the HandshakeDone if it chose an export."""
    # unknown client flags must end the connection before anything else happens
    bad_flags = len(stream) >= 4 and bool(int.from_bytes(stream[:4], "big") & ~3)
    fed = 0
    for piece in feed:
        core.receive_data(piece)
        fed += len(piece)
        events = drain(core)
        while True:
            try:
                event = next(events, NEED_DATA)
            except ProtocolError:
                check_option_replies(core.data_to_send(), done=False)
                return None
            assert not (bad_flags and fed >= 4), "unknown client flags were accepted"
            if event is NEED_DATA:
                break
            if isinstance(event, StartTLS):
                assert tls is not TlsMode.OFF
                assert not core.tls_active
                core.tls_started()  # the shell's TLS handshake succeeded
                continue
            if isinstance(event, HandshakeClosed):
                check_option_replies(core.data_to_send(), done=False)
                return None
            assert isinstance(event, HandshakeDone), event
            check_option_replies(core.data_to_send(), done=True)
            _check_done(event, core, refused=refused, tls=tls)
            return event
        check_option_replies(core.data_to_send(), done=False)
        assert core.pending_bytes < wire.OPTION_HEADER.size + MAX_OPTION_DATA
    return None


def server_handshake(data: bytes) -> None:
    """The fuzzer's bytes as a client's handshake (and what follows it)."""
    inp = Input(data)
    cfg, size, seed = inp.u8(), inp.u16(), inp.u8()
    tls = (TlsMode.OFF, TlsMode.ON, TlsMode.REQUIRE, TlsMode.OFF)[cfg & 3]
    refusal = "the server is full" if cfg & 4 else None
    # zeroes after the input, so an option's data can run past MAX_OPTION_DATA
    padding = inp.u16() * 4 if cfg & 0x40 else 0
    prefix = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    stream = (prefix if cfg & 8 else b"") + inp.rest()
    core = ServerHandshake(CATALOG, refusal=refusal, tls=tls)
    assert len(core.data_to_send()) == wire.GREETING.size
    feed = itertools.chain(pieces(stream, size or 1 << 16), pieces(bytes(padding), 1 << 16))
    done = _handshake(core, feed, stream, refused=refusal is not None, tls=tls)
    if done is None:
        return
    max_payload = _MAX_PAYLOADS[(cfg >> 4 & 3) % len(_MAX_PAYLOADS)]
    transmission = ServerTransmission(done.negotiated, max_payload=max_payload)
    serve(transmission, itertools.chain([done.trailing], feed), seed, max_payload)

