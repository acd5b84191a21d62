"""Fuzz targets for the client role: ClientHandshake and ClientTransmission.

The handshake target feeds the fuzzer's bytes to ``ClientHandshake`` as what
a server sent (and goes on into transmission if they complete it).  The
transmission target starts from a real handshake and reads the fuzzer's
bytes as a script: calls a client application makes (read, write, flush,
trim, write_zeroes, block_status, raw requests, disconnect) interleaved with
raw reply bytes and generated, mostly well-formed replies to the requests in
flight.  ``ProtocolError`` ends the connection and is fine; so is
``LocalProtocolError`` from a request call (the API refusing misuse), never
from ``receive_data``/``next_event``.  Anything else, a failed invariant or
``Hang`` is a crash.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from pynbd.proto import wire
from pynbd.proto.client import (
    ClientHandshake,
    ClientTransmission,
    Completion,
    HandshakeComplete,
    HandshakeFailed,
    OptionRefused,
)
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
    ReplyType,
)
from pynbd.proto.errors import LocalProtocolError, ProtocolError
from pynbd.proto.events import NEED_DATA, StartTLS

from .common import EXPORTS, EXTENDED_EXPORTS, Input, converse, drain, pieces

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_ERROR_BIT = 1 << 31
#: structured chunk types the reply generator picks from (the last slot: any 16-bit type)
_CHUNK_TYPES = (ReplyType.NONE, ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE,
                ReplyType.BLOCK_STATUS, ReplyType.ERROR, ReplyType.ERROR_OFFSET)
_ERRORS = (Errno.EIO, Errno.EINVAL, Errno.ENOSPC, Errno.EOVERFLOW, Errno.ENOTSUP, 0)
#: the most data a generated OFFSET_DATA chunk carries (keeps every input cheap)
_MAX_CHUNK_DATA = 1 << 16
_OPTIONS_SENT = frozenset({Opt.STARTTLS, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.GO,
                           Opt.EXPORT_NAME})
#: with extended headers: BLOCK_STATUS_EXT takes BLOCK_STATUS's place
_EXT_CHUNK_TYPES = (ReplyType.NONE, ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE,
                    ReplyType.BLOCK_STATUS_EXT, ReplyType.ERROR, ReplyType.ERROR_OFFSET)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_MASK64 = (1 << 64) - 1
#: raw requests whose length is their payload's (a WRITE's is built here): they keep
#: 16-bit lengths.  A raw READ may have any length: over the payload limit it gets no
#: buffer (tests/unit/proto/test_fuzz_regressions.py)
_BUFFERED = (Cmd.WRITE,)


@dataclasses.dataclass(frozen=True, slots=True)
class _Sent:
    cmd: int
    offset: int
    length: int
    flags: int


class ClientDriver:
    """Plays a client application on a ``ClientTransmission`` and checks what it says."""

    def __init__(self, core: ClientTransmission) -> None:
        self.core = core
        self.sent: dict[int, _Sent] = {}
        self.names = set(core.meta_contexts.values())
        self.broken = False

    # -- requests -----------------------------------------------------------------------

    def _range(self, inp: Input) -> tuple[int, int]:
        """An offset and length, mostly inside the export, sometimes anything."""
        size = self.core.size
        how = inp.u8()
        if how >= 0xF0:
            return inp.u64(), inp.u32()
        if self.core.extended:  # 64-bit lengths: a range may pass 4 GiB
            offset = inp.u64() % (size + 1)
            return offset, inp.u64() % (size - offset + 1)
        offset = inp.u32() % (size + 1)
        return offset, inp.u32() % (size - offset + 1)

    def call(self, op: int, inp: Input) -> None:
        """One request call chosen by ``op``, its arguments read from ``inp``."""
        core = self.core
        make: Callable[[], int | None]
        if op == 0:
            offset, _ = self._range(inp)
            make = functools.partial(core.read, offset, inp.u16())
        elif op == 1:
            offset, _ = self._range(inp)
            make = functools.partial(core.write, bytes(inp.u16()), offset,
                                     fua=bool(inp.u8() & 1))
        elif op == 2:
            make = core.flush
        elif op == 3:
            make = functools.partial(core.trim, *self._range(inp), fua=bool(inp.u8() & 1))
        elif op == 4:
            bits = inp.u8()
            make = functools.partial(core.write_zeroes, *self._range(inp),
                                     no_hole=bool(bits & 1), fast_zero=bool(bits & 2),
                                     fua=bool(bits & 4))
        elif op == 5:
            make = functools.partial(core.block_status, *self._range(inp),
                                     req_one=bool(inp.u8() & 1))
        elif op == 6:
            cmd, odd = Cmd(inp.u8() % len(Cmd)), inp.u8() == 0xFF
            offset, length, flags = inp.u64(), inp.u16(), inp.u16()
            if self.core.extended and length >= 0xFF00 and not odd and cmd not in _BUFFERED:
                length = inp.u64()  # any 64-bit length
            # WRITE carries a payload, nothing else does; ``odd`` gets that wrong
            payload = bytes(length) if (cmd == Cmd.WRITE) != odd else None
            make = functools.partial(core.request, cmd, offset=offset, length=length,
                                     flags=flags, payload=payload)
        else:
            make = core.disconnect
        self.attempt(make)

    def attempt(self, make: Callable[[], int | None]) -> None:
        """Make one request call; a refusal (LocalProtocolError) must queue nothing."""
        try:
            cookie = make()
        except LocalProtocolError:
            assert self.core.data_to_send() == b"", "a refused request was queued"
            return
        self._check_sent(self.core.data_to_send(), cookie)

    def _check_sent(self, out: bytes, cookie: int | None) -> None:
        if self.core.extended:
            head = wire.EXTENDED_REQUEST
            magic, flags, cmd, got, offset, length = head.unpack_from(out)
            assert magic == EXTENDED_REQUEST_MAGIC
            # a WRITE's length is its payload's, and says so (other flags: as the caller gave)
            assert cmd != Cmd.WRITE or flags & _PAYLOAD_LEN, flags
        else:
            head = wire.REQUEST
            magic, flags, cmd, got, offset, length = head.unpack_from(out)
            assert magic == REQUEST_MAGIC
        body = length if cmd == Cmd.WRITE else 0
        assert len(out) == head.size + body, "request framing"
        if cmd == Cmd.DISC:
            return
        assert cookie is not None
        assert got == cookie
        assert cookie not in self.sent, "a cookie reused while in flight"
        self.sent[cookie] = _Sent(cmd, offset, length, flags)
        assert self.core.in_flight == len(self.sent)

    # -- replies ------------------------------------------------------------------------

    def _within(self, inp: Input, sent: _Sent) -> tuple[int, int]:
        """A piece of ``sent``'s range, or (rarely) anything."""
        how = inp.u8()
        if how >= 0xF0:
            return inp.u64(), inp.u32()
        # (a raw request's range may pass 2**64: the offset wraps, as on the wire)
        if self.core.extended:  # 64-bit lengths
            start = inp.u64() % (sent.length + 1)
            return (sent.offset + start) & _MASK64, inp.u64() % (sent.length - start + 1)
        start = inp.u32() % (sent.length + 1)
        return (sent.offset + start) & _MASK64, inp.u32() % (sent.length - start + 1)

    def reply(self, inp: Input) -> bytes:
        """One reply or chunk for a request in flight, mostly well-formed."""
        cookies = sorted(self.sent)
        pick = inp.u8()
        cookie = cookies[pick % len(cookies)] if cookies and pick < 0xF0 else inp.u64()
        sent = self.sent.get(cookie, _Sent(Cmd.READ, 0, 16, 0))
        kind = inp.u8()
        if self.core.extended and kind % 8 != 7:
            return self._extended_reply(inp, cookie, sent, kind)
        if kind % 8 == 7 or (not self.core.structured and kind % 8):
            error = int(_ERRORS[inp.u8() % len(_ERRORS)])
            data = bytes(sent.length) if sent.cmd == Cmd.READ and not error else b""
            return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data
        flags = inp.u8()
        flags = flags & 1 if flags < 0xF0 else inp.u16()
        if kind % 8 == 6:
            chunk_type = inp.u16()
            payload = inp.take(inp.u8())
        else:
            chunk_type = _CHUNK_TYPES[kind % 8]
            payload = self._payload(inp, sent, chunk_type)
        head = wire.STRUCTURED_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie,
                                          len(payload))
        return head + payload

    def _extended_reply(self, inp: Input, cookie: int, sent: _Sent, kind: int) -> bytes:
        """One extended chunk, mostly naming the request's offset."""
        flags = inp.u8()
        flags = flags & 1 if flags < 0xF0 else inp.u16()
        offset = sent.offset if inp.u8() < 0xF0 else inp.u64()
        if kind % 8 == 6:
            chunk_type = inp.u16()
            payload = inp.take(inp.u8())
        else:
            chunk_type = _EXT_CHUNK_TYPES[kind % 8]
            payload = self._payload(inp, sent, chunk_type)
        return wire.EXTENDED_CHUNK.pack(EXTENDED_REPLY_MAGIC, flags, chunk_type, cookie, offset,
                                        len(payload)) + payload

    def _status_ext(self, inp: Input, sent: _Sent) -> bytes:
        """A BLOCK_STATUS_EXT payload: any number of 64-bit descriptors, a count that
        mostly matches."""
        ids = [*self.core.meta_contexts, inp.u32()]
        context_id = ids[inp.u8() % len(ids)]
        how = inp.u8()
        count = how % 8 if how < 0xF0 else inp.u16() % 600
        body = b""
        for _ in range(count):
            _, length = self._within(inp, sent)
            status = inp.u8() & 3 if inp.u8() < 0xF0 else inp.u64()
            body += wire.EXTENT_EXT.pack(length, status)
        told = count if inp.u8() < 0xF0 else inp.u32()
        return wire.BLOCK_STATUS_EXT.pack(context_id, told) + body

    def _payload(self, inp: Input, sent: _Sent, chunk_type: int) -> bytes:
        if chunk_type == ReplyType.BLOCK_STATUS_EXT:
            return self._status_ext(inp, sent)
        if chunk_type == ReplyType.OFFSET_DATA:
            offset, length = self._within(inp, sent)
            return wire.OFFSET_DATA.pack(offset) + bytes(min(length, _MAX_CHUNK_DATA))
        if chunk_type == ReplyType.OFFSET_HOLE:
            offset, length = self._within(inp, sent)
            return wire.OFFSET_HOLE.pack(offset, length & 0xFFFFFFFF)  # 32 bits, even extended
        if chunk_type == ReplyType.BLOCK_STATUS:
            ids = [*self.core.meta_contexts, inp.u32()]
            body = wire.U32.pack(ids[inp.u8() % len(ids)])
            for _ in range(inp.u8() % 4):
                _, length = self._within(inp, sent)
                body += wire.EXTENT.pack(length, inp.u8() & 3)
            return body
        if chunk_type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            error = int(_ERRORS[inp.u8() % len(_ERRORS)])
            message = inp.take(inp.u8() % 64)
            body = wire.ERROR_CHUNK.pack(error, len(message)) + message
            if chunk_type == ReplyType.ERROR_OFFSET:
                body += wire.U64.pack(self._within(inp, sent)[0])
            return body
        return b""

    def pump(self) -> None:
        """Take every completion the core has; a ProtocolError breaks the connection."""
        events = drain(self.core)
        while True:
            try:
                event = next(events, NEED_DATA)
            except ProtocolError as err:
                error: ProtocolError | None = err
            else:
                error = None
            if error is not None:
                assert error.message
                # the connection stays broken: every later call raises again
                try:
                    self.core.next_event()
                except ProtocolError:
                    self.broken = True
                    return
                raise AssertionError("next_event worked again after a ProtocolError")
            if event is NEED_DATA:
                return
            assert isinstance(event, Completion), event
            self._check_completion(event)

    def _check_completion(self, event: Completion) -> None:
        sent = self.sent.pop(event.cookie, None)
        assert sent is not None, f"completion for cookie {event.cookie:#x}, not in flight"
        assert event.cmd == sent.cmd
        assert self.core.in_flight == len(self.sent)
        if event.error:
            assert not event.ok
            assert event.data is None
            assert event.extents is None
            if event.error_offset is not None:
                assert sent.offset <= event.error_offset < sent.offset + sent.length
            return
        assert event.ok
        assert event.error_offset is None
        if sent.cmd == Cmd.READ:
            assert event.data is not None
            assert len(event.data) == sent.length
        else:
            assert event.data is None
        if sent.cmd == Cmd.BLOCK_STATUS:
            assert event.extents is not None
            assert set(event.extents) == self.names
            for extents in event.extents.values():
                assert extents
                assert all(length > 0 for length, _ in extents)
                assert not sent.flags & CmdFlag.REQ_ONE or len(extents) == 1
        else:
            assert event.extents is None


def client_transmission(data: bytes) -> None:
    """A real handshake (in memory, cached), then a script of requests and replies."""
    inp = Input(data)
    export, cfg = inp.u8(), inp.u8()
    conversation = converse(export, structured=bool(cfg & 1), meta=bool(cfg & 2))
    _run_script(ClientDriver(ClientTransmission.from_handshake(conversation.client_done)), inp)


def client_extended_transmission(data: bytes) -> None:
    """The same after a real handshake that negotiated extended headers: 32-byte
    requests, extended reply chunks (BLOCK_STATUS_EXT among them), 64-bit ranges."""
    inp = Input(data)
    export, cfg = inp.u8(), inp.u8()
    conversation = converse(export, structured=True, meta=bool(cfg & 2), extended=True)
    core = ClientTransmission.from_handshake(conversation.client_done)
    assert core.extended
    assert core.structured
    _run_script(ClientDriver(core), inp)


def _run_script(driver: ClientDriver, inp: Input) -> None:
    while inp.remaining and not driver.broken:
        op = inp.u8() % 12
        if op < 8:
            driver.call(op, inp)
            continue
        if op < 10:
            driver.core.receive_data(inp.take(1 + inp.u8()))
        else:
            driver.core.receive_data(driver.reply(inp))
        driver.pump()


# -- handshake ---------------------------------------------------------------------------------


class _Options:
    """What the client sent in the handshake: (client flags, then) whole options it knows."""

    def __init__(self, *, extended: bool) -> None:
        self.first = True
        self.allowed = _OPTIONS_SENT | ({Opt.EXTENDED_HEADERS} if extended else set())
        self.sent: list[int] = []

    def check(self, out: bytes) -> None:
        pos = 0
        if self.first and out:
            (flags,) = wire.CLIENT_FLAGS.unpack_from(out)
            assert flags in (1, 3), f"client flags {flags:#x}"
            pos = wire.CLIENT_FLAGS.size
        self.first = self.first and not out
        while pos < len(out):
            magic, option, length = wire.OPTION_HEADER.unpack_from(out, pos)
            assert magic == IHAVEOPT
            assert option in self.allowed, option
            self.sent.append(option)
            pos += wire.OPTION_HEADER.size + length
        assert pos == len(out), "an option cut short"


def _check_complete(event: HandshakeComplete, core: ClientHandshake, *, structured: bool,
                    queries: list[str], tls: bool, options: _Options) -> None:
    assert not tls or core.tls_active, "an export without the TLS the client asked for"
    assert structured or not event.structured
    assert set(event.meta_contexts) <= set(queries)
    assert not event.meta_contexts or event.structured
    sizes = event.block_sizes
    assert sizes is None or 0 < sizes.minimum <= sizes.maximum
    if event.extended:
        assert Opt.EXTENDED_HEADERS in options.allowed, "extended headers, not asked for"
        assert event.structured
        sent = options.sent
        last = len(sent) - 1 - sent[::-1].index(Opt.EXTENDED_HEADERS)
        after = set(sent[last + 1:])
        # once acknowledged, neither is sent (EXPORT_NAME: a client MUST NOT)
        assert not after & {Opt.STRUCTURED_REPLY, Opt.EXPORT_NAME}, sent


def _transmission_after(done: HandshakeComplete, feed: Iterator[bytes]) -> None:
    driver = ClientDriver(ClientTransmission.from_handshake(done))
    core = driver.core
    # what a client does first, where the export allows it
    driver.attempt(functools.partial(core.read, 0, min(core.size, 4096)))
    driver.attempt(core.flush)
    driver.attempt(functools.partial(core.block_status, 0, min(core.size, 1 << 20)))
    driver.pump()
    for piece in feed:
        if driver.broken:
            return
        driver.core.receive_data(piece)
        driver.pump()


def client_handshake(data: bytes) -> None:
    """The fuzzer's bytes as a server's side of the handshake (and what follows it)."""
    _handshake_as_client(data, extended=False)


def client_extended_handshake(data: bytes) -> None:
    """The same, for a client that asks for extended headers first."""
    _handshake_as_client(data, extended=True)


def _handshake_as_client(data: bytes, *, extended: bool) -> None:
    inp = Input(data)
    cfg, export, size = inp.u8(), inp.u8(), inp.u16()
    # cfg 0x20: extended headers asked for without structured replies (so not asked for)
    structured, tls = bool(cfg & 1) or (extended and not cfg & 0x20), bool(cfg & 4)
    extended = extended and structured
    queries = [BASE_ALLOCATION] if cfg & 2 else []
    if cfg & 0x10:
        queries.append("qemu:dirty-bitmap:b")
    exports = EXTENDED_EXPORTS if extended else EXPORTS
    core = ClientHandshake(exports[export % len(exports)].name, structured=structured,
                           extended=extended, meta_contexts=queries, tls=tls)
    assert core.data_to_send() == b"", "the client speaks before the greeting"
    greeting = wire.GREETING.pack(NBDMAGIC, IHAVEOPT, inp.u16()) if cfg & 8 else b""
    feed = pieces(greeting + inp.rest(), size or 1 << 16)
    options = _Options(extended=extended)
    refusable = {Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.GO}
    if extended:
        refusable.add(Opt.EXTENDED_HEADERS)
    for piece in feed:
        core.receive_data(piece)
        events = drain(core)
        while True:
            try:
                event = next(events, NEED_DATA)
            except ProtocolError:
                return  # the server broke the protocol: the connection ends
            if event is NEED_DATA:
                break
            if isinstance(event, OptionRefused):
                assert event.rep & _ERROR_BIT
                assert event.option in refusable
            elif isinstance(event, HandshakeFailed):
                assert event.rep & _ERROR_BIT
                assert str(event)
                return
            elif isinstance(event, StartTLS):
                assert tls
                assert not core.tls_active
                core.tls_started()  # the shell's TLS handshake succeeded
            else:
                assert isinstance(event, HandshakeComplete), event
                options.check(core.data_to_send())
                _check_complete(event, core, structured=structured, queries=queries, tls=tls,
                                options=options)
                _transmission_after(event, feed)
                return
            options.check(core.data_to_send())
        options.check(core.data_to_send())
