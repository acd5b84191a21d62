"""Fuzz targets for the server role after NBD_OPT_EXTENDED_HEADERS.

``server-extended-handshake`` starts the client's side of the handshake with
a prefix that negotiates extended headers (alone, after STRUCTURED_REPLY,
twice, followed by STRUCTURED_REPLY, SET_META_CONTEXT or EXPORT_NAME, or
with data), then the fuzzer's bytes; if an export is chosen the connection
goes on in ``ExtendedTransmission`` (or ``ServerTransmission`` if the
fuzzer's options took extended headers away) with the bytes that follow.
``server-extended-transmission`` starts from a real extended handshake and
reads the fuzzer's bytes either raw, as requests, or as a script of 32-byte
requests (any magic, flags, type, 64-bit offsets and lengths, PAYLOAD_LEN,
payloads, compact requests in the wrong form).  The invariants are those of
``server_targets``: only ``ProtocolError`` escapes, every ``Request`` is safe
for a backend, every reply is one whole reply of extended chunks naming the
request's cookie and offset, and the per-request bookkeeping is empty once
every request has its reply.  Scripted requests also give exactly one event
each, in order, and a valid one is a ``Request`` with exactly its fields.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from typing import TYPE_CHECKING

from pynbd.proto import wire
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from pynbd.proto.errors import ProtocolError
from pynbd.proto.events import NEED_DATA, Disconnect, InvalidRequest, Request
from pynbd.proto.extended import ExtendedTransmission
from pynbd.proto.handshake import ServerHandshake, TlsMode
from pynbd.proto.transmission import ServerTransmission

from .common import CATALOG, Input, converse, drain, pieces
from .server_targets import _handshake, check_request, serve

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pynbd.proto.negotiated import Negotiated
    from pynbd.proto.wire import Buffer

_ERRNOS = [e for e in Errno if e]
_MAX_PAYLOADS = (1 << 25, 4096, 100)
_MAX_READ_DATA = 1 << 16
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
CMDS = (Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
         Cmd.BLOCK_STATUS, Cmd.DISC)
#: what each command needs to be valid on a connection (beyond its range)
_NEEDS = {Cmd.FLUSH: TransmissionFlag.SEND_FLUSH, Cmd.TRIM: TransmissionFlag.SEND_TRIM,
          Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES}
_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)


# -- invariants -------------------------------------------------------------------------------


def _check_chunk(kind: int, body: bytes, *, done: bool) -> None:
    """One extended chunk's payload is what its type says."""
    assert kind != ReplyType.BLOCK_STATUS, "a compact BLOCK_STATUS chunk with extended headers"
    if kind == ReplyType.NONE:
        assert done
        assert not body
    elif kind == ReplyType.BLOCK_STATUS_EXT:
        _, count = wire.BLOCK_STATUS_EXT.unpack_from(body)
        assert count
        assert len(body) == wire.BLOCK_STATUS_EXT.size + 16 * count
    elif kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
        error, msglen = wire.ERROR_CHUNK.unpack_from(body)
        tail = 8 if kind == ReplyType.ERROR_OFFSET else 0
        assert error
        assert len(body) == wire.ERROR_CHUNK.size + msglen + tail
    elif kind == ReplyType.OFFSET_HOLE:
        assert len(body) == wire.OFFSET_HOLE.size
        assert wire.OFFSET_HOLE.unpack(body)[1]
    else:
        assert kind == ReplyType.OFFSET_DATA, kind
        assert len(body) > wire.OFFSET_DATA.size


def check_ext_reply(buffers: list[Buffer], cookie: int, offset: int | None) -> None:
    """``buffers`` are exactly one whole reply of extended chunks to ``cookie``, each
    naming the request's ``offset`` (unknown: None)."""
    data = b"".join(bytes(b) for b in buffers)
    head = wire.EXTENDED_CHUNK
    pos = 0
    done = False
    while pos < len(data):
        assert not done, "a chunk after the DONE chunk"
        assert len(data) - pos >= head.size, "a chunk header cut short"
        magic, flags, kind, got, got_offset, length = head.unpack_from(data, pos)
        assert magic == EXTENDED_REPLY_MAGIC, f"reply magic {magic:#x}"
        assert got == cookie
        assert offset is None or got_offset == offset, (got_offset, offset)
        done = bool(flags & ReplyFlag.DONE)
        _check_chunk(kind, data[pos + head.size:pos + head.size + length], done=done)
        pos += head.size + length
    assert pos == len(data), "a chunk cut short"
    assert done, "a reply without a DONE chunk"


def _answered(core: ExtendedTransmission) -> None:
    # every request so far has its reply: nothing kept per cookie
    assert not core._offsets, core._offsets


# -- expectations of a script -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Expect:
    """What one scripted request must give: an event with its cookie; ``request``: the
    very Request (cmd, flags, offset, length) of a valid one; ``fatal``: a
    ProtocolError naming it (a payload over the limit)."""

    cookie: int
    cmd: int
    request: tuple[int, int, int, int] | None = None
    fatal: bool = False


class ExtServer:
    """Feeds an ``ExtendedTransmission``, answers and checks every event."""

    def __init__(self, core: ExtendedTransmission, seed: int, max_payload: int,
                 expect: deque[Expect] | None) -> None:
        self.core = core
        self.seed = seed
        self.max_payload = max_payload
        #: None: the stream holds something other than whole scripted requests
        self.expect = expect
        self.over = False

    def _next(self, cookie: int, event: object) -> Expect | None:
        if self.expect is None:
            return None
        assert self.expect, f"an event beyond the scripted requests: {event!r}"
        want = self.expect.popleft()
        assert want.cookie == cookie, (want, event)
        assert want.fatal is isinstance(event, ProtocolError), (want, event)
        return want

    def serve(self, stream: Iterable[bytes], *, buffered: bool) -> None:
        for piece in stream:
            pos = 0
            while not self.over:
                if buffered:
                    view = self.core.get_buffer()
                    assert len(view) >= 1
                    take = min(len(view), len(piece) - pos)
                    view[:take] = piece[pos:pos + take]
                    self.core.buffer_updated(take)
                    pos += take
                else:
                    self.core.receive_data(piece)
                    pos = len(piece)
                self._handle(piece, recycle=buffered)
                if pos >= len(piece):
                    break
            if self.over:
                return
        assert not self.expect, f"scripted requests without an event: {self.expect}"

    def _handle(self, piece: bytes, *, recycle: bool) -> None:
        core = self.core
        events = drain(core)
        while True:
            try:
                event = next(events, NEED_DATA)
            except ProtocolError as err:
                self._error(err)
                return
            if event is NEED_DATA:
                break
            if isinstance(event, Disconnect):
                if self.expect is not None:
                    assert self.expect, event
                    assert self.expect.popleft().cmd == Cmd.DISC, event
                core.receive_data(piece)
                assert core.next_event() is NEED_DATA
                self.over = True
                return
            if isinstance(event, InvalidRequest):
                self._invalid(event)
                continue
            assert isinstance(event, Request), event
            want = self._next(event.cookie, event)
            check_request(event, core.negotiated, self.max_payload)
            if want is not None and want.request is not None:
                assert (event.cmd, event.flags, event.offset, event.length) == want.request, (
                    event, want)
            self._answer(event)
            if recycle and event.payload is not None:
                core.recycle(event.payload)
        assert core.pending_bytes < wire.EXTENDED_REQUEST.size + self.max_payload
        assert core.bytes_wanted >= 1

    def _error(self, err: ProtocolError) -> None:
        self.over = True
        if err.cookie is None:
            assert self.expect is None, f"whole scripted requests broke the framing: {err}"
            return
        self._next(err.cookie, err)
        assert err.errno == Errno.EINVAL, err.errno
        check_ext_reply(self.core.reply_error(err.cookie, err.errno, err.message), err.cookie,
                        None)
        _answered(self.core)

    def _invalid(self, event: InvalidRequest) -> None:
        want = self._next(event.cookie, event)
        assert want is None or want.request is None, f"a valid request refused: {event}"
        assert event.errno in (Errno.EINVAL, Errno.EPERM, Errno.ENOSPC, Errno.EOVERFLOW), event
        assert event.message
        offset = event.offset if self.seed & 2 else None
        check_ext_reply(self.core.reply_error(event.cookie, event.errno, event.message,
                                              offset=offset), event.cookie, event.offset)
        _answered(self.core)

    def _answer(self, event: Request) -> None:
        core, seed, cookie = self.core, self.seed, event.cookie
        how = (cookie ^ seed) % 4
        if how == 0:  # the backend failed
            errno = _ERRNOS[(seed + event.length) % len(_ERRNOS)]
            message = "\u00e9" * ((seed * 37 + event.offset) % 2500)
            offset = event.offset if seed & 1 and event.cmd != Cmd.FLUSH else None
            reply = core.reply_error(cookie, errno, message, offset=offset)
        elif event.cmd == Cmd.READ:
            reply = self._read(event, how)
        elif event.cmd == Cmd.BLOCK_STATUS:
            reply = core.reply_block_status(cookie, [
                (cid, self._extents(event.length, how)) for cid in core.negotiated.meta_contexts])
        else:
            reply = core.reply_ok(cookie)
        check_ext_reply(reply, cookie, event.offset)
        _answered(core)

    def _read(self, event: Request, how: int) -> list[Buffer]:
        length = event.length
        if length <= _MAX_READ_DATA and (how == 1 or not length):
            return self.core.reply_read(event.cookie, event.offset, bytes(length))
        step = max(1 + self.seed * 97 % min(length, _MAX_READ_DATA), length // 64 + 1)
        parts: list[tuple[int, int, Buffer | None]] = []
        for i, start in enumerate(range(0, length, step)):
            size = min(step, length - start)
            hole = (i + how) % 2 == 0 or size > _MAX_READ_DATA
            parts.append((event.offset + start, size, None if hole else bytes(size)))
        return self.core.reply_read_sparse(event.cookie, parts)

    def _extents(self, length: int, how: int) -> list[tuple[int, int]]:
        """Extents over ``length`` (which may pass 4 GiB), 64-bit status values too."""
        if how == 1:
            return [(length, self.seed & 3)]
        if how == 2:
            return [(1, 0), (length, 3)]
        count = 1 + self.seed * 31 % 300
        step = max(1, length // count)
        return [(step, (1 << 40 | i) if self.seed & 4 else i & 3) for i in range(count)]


# -- the script -------------------------------------------------------------------------------


def _valid(neg: Negotiated, max_payload: int, cmd: int, offset: int, length: int) -> bool:
    """Whether a request without flags (PAYLOAD_LEN on WRITE aside) must be accepted."""
    if cmd == Cmd.DISC or (cmd in _WRITES and neg.read_only):
        return False
    need = _NEEDS.get(Cmd(cmd))
    if need is not None and not neg.flags & need:
        return False
    if cmd == Cmd.FLUSH:
        return offset == length == 0
    if offset + length > neg.export.size:
        return False
    if cmd in (Cmd.READ, Cmd.WRITE):
        return length <= max_payload
    return cmd != Cmd.BLOCK_STATUS or (bool(neg.meta_contexts) and length > 0)


def _range(inp: Input, neg: Negotiated, cmd: Cmd, max_payload: int) -> tuple[int, int]:
    size = neg.export.size
    how = inp.u8()
    if how >= 0xF8:
        return inp.u64(), inp.u64()
    if cmd == Cmd.FLUSH and how < 0x80:
        return 0, 0
    offset = inp.u64() % (size + 1)
    if cmd in (Cmd.READ, Cmd.WRITE):
        length = inp.u16() % (min(max_payload, 4096) + 1)
        if how >= 0xF0:  # over the limit
            length = max_payload + 1 + inp.u8()
        return offset, length
    return offset, inp.u64() % (size - offset + 1)


def _status_payload(inp: Input, neg: Negotiated, effect: int) -> bytes:
    """A BLOCK_STATUS payload: an effect length, then context ids (some unknown, repeated)."""
    ids = [*neg.meta_contexts, inp.u32()]
    body = wire.U64.pack(effect)
    for _ in range(inp.u8() % 4):
        body += wire.U32.pack(ids[inp.u8() % len(ids)])
    return body


def script(inp: Input, neg: Negotiated, max_payload: int) -> tuple[bytes, deque[Expect] | None]:
    """Requests read from ``inp`` (each one fault at most); the bytes and what each
    must give (None once a request breaks the framing)."""
    out = bytearray()
    expect: deque[Expect] = deque()
    for i in itertools.count():
        if not inp.remaining:
            return bytes(out), expect
        op = inp.u8()
        fault = op % 16
        cmd = CMDS[inp.u8() % len(CMDS)]
        offset, length = _range(inp, neg, cmd, max_payload)
        flags = _PAYLOAD_LEN if cmd == Cmd.WRITE and not op & 0x80 else 0
        raw_cmd: int = cmd
        if fault == 8:
            flags = inp.u16()
        elif fault == 9:
            raw_cmd = inp.u16()
        elif fault == 10:
            flags |= inp.u8() & 0x3F & ~_PAYLOAD_LEN
        cookie = (inp.u8() << 56) | i
        payload = b""
        if fault == 11:  # a payload on any command: BLOCK_STATUS's form, or junk
            payload = (_status_payload(inp, neg, length) if cmd == Cmd.BLOCK_STATUS
                       else bytes(inp.u8()))
            flags |= _PAYLOAD_LEN
            length = len(payload)
        elif flags & _PAYLOAD_LEN or raw_cmd == Cmd.WRITE:
            payload = bytes(length) if length <= max_payload else b""
        magic = EXTENDED_REQUEST_MAGIC
        if fault == 12:
            out += wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length & 0xFFFF)
            return bytes(out) + inp.rest(), None
        if fault == 13:
            magic = inp.u32()
            if magic == EXTENDED_REQUEST_MAGIC:
                magic ^= 1
        out += wire.EXTENDED_REQUEST.pack(magic, flags & 0xFFFF, raw_cmd & 0xFFFF, cookie,
                                          offset, length) + payload
        if fault in (13, 14, 15):  # a bad magic, a cut payload, trailing junk
            if fault == 14 and payload:
                del out[-1 - inp.u8() % len(payload):]
            return bytes(out) + inp.rest(), None
        if (flags & _PAYLOAD_LEN or raw_cmd == Cmd.WRITE) and length > max_payload:
            expect.append(Expect(cookie, raw_cmd, fatal=True))
            return bytes(out), expect
        if raw_cmd == Cmd.DISC:
            expect.append(Expect(-1, raw_cmd))
            return bytes(out), expect
        valid = fault < 8 and _valid(neg, max_payload, cmd, offset, length)
        request = (raw_cmd, flags & ~_PAYLOAD_LEN, offset, length) if valid else None
        expect.append(Expect(cookie, raw_cmd, request))
    raise AssertionError("unreachable")


def server_extended_transmission(data: bytes) -> None:
    """A real extended handshake (in memory, cached), then the fuzzer's bytes as raw
    requests or (cfg 0x20) as a script of requests."""
    inp = Input(data)
    export, cfg, size, seed = inp.u8(), inp.u8(), inp.u16(), inp.u8()
    conversation = converse(export, structured=True, meta=bool(cfg & 2), extended=True)
    negotiated = conversation.negotiated
    assert negotiated.extended
    assert negotiated.structured
    max_payload = _MAX_PAYLOADS[(cfg >> 2 & 3) % len(_MAX_PAYLOADS)]
    # (at most 64 KiB: in buffered mode the core may take a payload a few bytes at
    # a time, and a MiB of it made single inputs take seconds, stalling CI's smoke)
    padding = min(inp.u16(), 4096) * 16 if cfg & 0x40 else 0
    expect: deque[Expect] | None = None
    stream = inp.rest()
    if cfg & 0x20:
        stream, expect = script(Input(stream), negotiated, max_payload)
        padding = 0
    core = ExtendedTransmission(negotiated, max_payload=max_payload)
    server = ExtServer(core, seed, max_payload, expect)
    server.serve(itertools.chain(pieces(stream, size or 1 << 16),
                                 pieces(bytes(padding), 1 << 16)), buffered=bool(cfg & 0x80))


# -- handshake ---------------------------------------------------------------------------------


def option(opt: Opt, data: bytes = b"") -> bytes:
    """One option as a client sends it."""
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def _meta(name: str) -> bytes:
    raw, query = name.encode(), BASE_ALLOCATION.encode()
    return option(Opt.SET_META_CONTEXT, wire.U32.pack(len(raw)) + raw + wire.U32.pack(1)
                   + wire.U32.pack(len(query)) + query)


_EXT = option(Opt.EXTENDED_HEADERS)
_STRUCTURED = option(Opt.STRUCTURED_REPLY)
#: option prefixes by cfg & 7, and whether extended headers are on after them
_PREFIXES: tuple[tuple[bytes, bool], ...] = (
    (_EXT, True),
    (_STRUCTURED + _EXT, True),
    (_EXT + _EXT, True),
    (_EXT + _STRUCTURED, True),
    (_EXT + _meta("big"), True),
    (option(Opt.EXTENDED_HEADERS, b"x"), False),
    (b"", False),
    (_EXT + option(Opt.EXPORT_NAME, b"big"), True),
)


def _check_negotiated(negotiated: Negotiated, *, extended: bool) -> None:
    assert not extended or negotiated.extended, "extended headers were lost"
    assert not negotiated.extended or negotiated.structured
    payload_form = bool(negotiated.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD)
    assert payload_form is (negotiated.extended and bool(negotiated.meta_contexts))


def server_extended_handshake(data: bytes) -> None:
    """A client's handshake that negotiates extended headers, then the fuzzer's bytes."""
    inp = Input(data)
    cfg, size, seed = inp.u8(), inp.u16(), inp.u8()
    prefix, extended = _PREFIXES[cfg & 7]
    tls = (TlsMode.OFF, TlsMode.ON, TlsMode.REQUIRE, TlsMode.OFF)[cfg >> 3 & 3]
    flags = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    stream = flags + prefix + inp.rest()
    core = ServerHandshake(CATALOG, tls=tls)
    core.data_to_send()
    feed = pieces(stream, size or 1 << 16)
    done = _handshake(core, feed, stream, refused=False, tls=tls)
    if cfg & 7 == 7 and tls is not TlsMode.REQUIRE:
        assert done is None, "an export after EXPORT_NAME with extended headers on"
    if done is None:
        return
    negotiated = done.negotiated
    # only STARTTLS forgets extended headers, and TLS OFF refuses it
    _check_negotiated(negotiated, extended=extended and tls is TlsMode.OFF)
    max_payload = _MAX_PAYLOADS[(cfg >> 5 & 3) % len(_MAX_PAYLOADS)]
    rest = itertools.chain([done.trailing], feed)
    if not negotiated.extended:
        serve(ServerTransmission(negotiated, max_payload=max_payload), rest, seed, max_payload)
        return
    ExtServer(ExtendedTransmission(negotiated, max_payload=max_payload), seed, max_payload,
              None).serve(rest, buffered=bool(cfg & 0x80))
