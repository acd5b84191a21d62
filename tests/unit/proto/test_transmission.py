"""ServerTransmission: request validation (spec 3.5, 3.6, 3.10) and reply layouts (3.3, 3.8).

The negotiated state comes from a real ServerHandshake run, so the flags the
core validates against are the ones a client would have been shown.  Every
request stream goes through ``three_ways`` (whole, one byte at a time, and
with the start of a further request appended).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

import pytest
from tests.support.fakes import FakeCatalog, FakeExport

from pynbd.proto import wire
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_EXTENTS,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
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
from pynbd.proto.events import NEED_DATA, Disconnect, HandshakeDone, InvalidRequest, Request
from pynbd.proto.handshake import ServerHandshake
from pynbd.proto.negotiated import Negotiated
from pynbd.proto.transmission import ServerTransmission

if TYPE_CHECKING:
    from pynbd.proto.wire import Buffer

# -- exports and negotiation -------------------------------------------------------------




SIZE = 1 << 20
RW = FakeExport("rw", size=SIZE)
RO = FakeExport("ro", size=SIZE, read_only=True)
BIG = FakeExport("big", size=1 << 40)
BARE = FakeExport("bare", size=SIZE, fixed=TransmissionFlag.HAS_FLAGS)
CATALOG = FakeCatalog(RW, RO, BIG, BARE)


def _option(code: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, code, len(data)) + data


def negotiate(export: FakeExport = RW, *, structured: bool = False,
              meta: bool = False) -> Negotiated:
    """Run a real handshake to GO and return what it negotiated."""
    name = export.name.encode()
    stream = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    if structured:
        stream += _option(Opt.STRUCTURED_REPLY)
    if meta:
        query = BASE_ALLOCATION.encode()
        stream += _option(Opt.SET_META_CONTEXT, struct.pack(">I", len(name)) + name
                          + struct.pack(">II", 1, len(query)) + query)
    stream += _option(Opt.GO, struct.pack(">I", len(name)) + name + b"\x00\x00")
    core = ServerHandshake(CATALOG)
    core.receive_data(stream)
    done = core.next_event()
    assert isinstance(done, HandshakeDone)
    assert done.negotiated.structured is structured
    assert bool(done.negotiated.meta_contexts) is meta
    return done.negotiated


PLAIN = negotiate()
STRUCT = negotiate(structured=True, meta=True)

# -- request stream builders and the driver ----------------------------------------------

COOKIE = 0xFFFFFFFFFFFFFFFF
COOKIES = [0, 1, 0x8000000000000001, 0xFFFFFFFFFFFFFFFF, 0x0123456789ABCDEF]


def req(cmd: int, offset: int = 0, length: int = 0, *, cookie: int = COOKIE, flags: int = 0,
        payload: bytes | None = None, magic: int = REQUEST_MAGIC) -> bytes:
    """One compact request; a WRITE gets ``length`` bytes of payload unless given one."""
    if payload is None:
        payload = bytes(i % 251 for i in range(length)) if cmd == Cmd.WRITE else b""
    return wire.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload


#: the start of one more request, which never completes
TRAIL = req(Cmd.READ, 0, 512, cookie=42)[:20]


@dataclasses.dataclass
class Run:
    events: list[object]
    core: ServerTransmission


def run(negotiated: Negotiated, chunks: list[bytes], *,
        max_payload: int = MAX_PAYLOAD) -> Run:
    core = ServerTransmission(negotiated, max_payload=max_payload)
    events: list[object] = []
    for chunk in chunks:
        core.receive_data(chunk)
        for _ in range(10_000):
            try:
                event = core.next_event()
            except ProtocolError as err:
                events.append(err)
                return Run(events, core)
            if event is NEED_DATA:
                break
            events.append(event)
        else:
            pytest.fail("next_event never asked for data")
    return Run(events, core)


def _comparable(events: list[object]) -> list[object]:
    return [("protocol-error", str(e), e.cookie, e.errno) if isinstance(e, ProtocolError)
            else e for e in events]


def three_ways(negotiated: Negotiated, stream: bytes, *,
               max_payload: int = MAX_PAYLOAD) -> list[object]:
    """Events of ``stream`` fed whole, byte by byte and with TRAIL appended (all equal)."""
    whole = run(negotiated, [stream], max_payload=max_payload)
    bytewise = run(negotiated, [stream[i:i + 1] for i in range(len(stream))],
                   max_payload=max_payload)
    trailing = run(negotiated, [stream + TRAIL], max_payload=max_payload)
    expected = _comparable(whole.events)
    assert _comparable(bytewise.events) == expected
    assert _comparable(trailing.events) == expected
    stopped = any(isinstance(e, ProtocolError | Disconnect) for e in whole.events)
    if not stopped:
        assert whole.core.pending_bytes == 0
        assert bytewise.core.pending_bytes == 0
        assert trailing.core.pending_bytes == len(TRAIL)
    return whole.events


def one_event(negotiated: Negotiated, stream: bytes) -> object:
    events = three_ways(negotiated, stream)
    assert len(events) == 1, events
    return events[0]


def invalid(negotiated: Negotiated, stream: bytes) -> InvalidRequest:
    event = one_event(negotiated, stream)
    assert isinstance(event, InvalidRequest), event
    return event


def request(negotiated: Negotiated, stream: bytes) -> Request:
    event = one_event(negotiated, stream)
    assert isinstance(event, Request), event
    return event


NEXT = req(Cmd.READ, 4096, 512, cookie=7)
NEXT_EVENT = Request(Cmd.READ, CmdFlag(0), 7, 4096, 512, None)

# -- valid requests -----------------------------------------------------------------------


@pytest.mark.parametrize(("cmd", "flags", "offset", "length"), [
    (Cmd.READ, 0, 0, 512),
    (Cmd.READ, CmdFlag.DF, SIZE - 1, 1),
    (Cmd.WRITE, 0, 4096, 300),
    (Cmd.FLUSH, 0, 0, 0),
    (Cmd.TRIM, 0, 0, SIZE),
    (Cmd.CACHE, 0, 512, 4096),
    (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, 0, 65536),
    (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, SIZE),
    (Cmd.READ, 0, SIZE, 0),
    (Cmd.WRITE, 0, 0, 0),
])
def test_valid_request_fields(cmd: Cmd, flags: int, offset: int, length: int) -> None:
    event = request(STRUCT, req(cmd, offset, length, flags=flags))
    assert event.cmd == cmd
    assert event.flags == flags
    assert event.cookie == COOKIE
    assert event.offset == offset
    assert event.length == length
    if cmd == Cmd.WRITE:
        assert event.payload == bytes(i % 251 for i in range(length))
    else:
        assert event.payload is None


def test_write_payload_exact_and_next_request_parses() -> None:
    payload = bytes(range(256)) * 3 + b"\x00tail"
    events = three_ways(PLAIN, req(Cmd.WRITE, 100, len(payload), cookie=5, payload=payload)
                        + NEXT)
    assert events == [Request(Cmd.WRITE, CmdFlag(0), 5, 100, len(payload), payload),
                      NEXT_EVENT]
    first = events[0]
    assert isinstance(first, Request)
    assert first.payload is not None
    assert bytes(first.payload) == payload


def test_write_split_across_feeds_and_bytes_wanted() -> None:
    payload = b"abcdefghij" * 10
    data = req(Cmd.WRITE, 0, 100, cookie=9, payload=payload)
    core = ServerTransmission(PLAIN)
    assert core.bytes_wanted == 28
    core.receive_data(data[:10])
    assert core.next_event() is NEED_DATA
    assert core.bytes_wanted == 18
    core.receive_data(data[10:28])
    assert core.next_event() is NEED_DATA
    assert core.bytes_wanted == 100
    core.receive_data(data[28:90])
    assert core.next_event() is NEED_DATA
    assert core.bytes_wanted == 38
    core.receive_data(data[90:])
    event = core.next_event()
    assert event == Request(Cmd.WRITE, CmdFlag(0), 9, 0, 100, payload)
    assert core.next_event() is NEED_DATA
    assert core.pending_bytes == 0
    assert core.bytes_wanted == 28


def test_many_requests_in_one_feed() -> None:
    stream = b"".join(req(Cmd.WRITE, i * 512, 512, cookie=i) + req(Cmd.READ, i * 512, 512,
                                                                    cookie=1000 + i)
                      for i in range(50))
    events = run(PLAIN, [stream]).events
    assert all(isinstance(e, Request) for e in events)
    assert [e.cookie for e in events if isinstance(e, Request)] == [
        c for i in range(50) for c in (i, 1000 + i)]


@pytest.mark.parametrize("cookie", COOKIES)
def test_cookies_are_echoed_exactly(cookie: int) -> None:
    ok = request(PLAIN, req(Cmd.READ, 0, 1, cookie=cookie))
    assert ok.cookie == cookie
    bad = invalid(PLAIN, req(Cmd.READ, SIZE, 1, cookie=cookie))
    assert bad.cookie == cookie
    for core in (ServerTransmission(PLAIN), ServerTransmission(STRUCT)):
        for reply in (core.reply_ok(cookie), core.reply_error(cookie, Errno.EIO, "x"),
                      core.reply_read(cookie, 0, b"data")):
            header = b"".join(reply)
            if header[:4] == struct.pack(">I", SIMPLE_REPLY_MAGIC):
                assert wire.SIMPLE_REPLY.unpack_from(header)[2] == cookie
            else:
                assert wire.STRUCTURED_CHUNK.unpack_from(header)[3] == cookie


# -- NBD_CMD_DISC ----------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "offset", "length"), [(0, 0, 0), (0xFFFF, 5, 1 << 31)])
def test_disc_ends_the_stream(flags: int, offset: int, length: int) -> None:
    events = three_ways(PLAIN, NEXT + req(Cmd.DISC, offset, length, flags=flags) + NEXT
                        + req(Cmd.WRITE, 0, 10))
    assert events == [NEXT_EVENT, Disconnect()]


def test_nothing_comes_out_after_disc() -> None:
    core = ServerTransmission(PLAIN)
    core.receive_data(req(Cmd.DISC))
    assert core.next_event() == Disconnect()
    for _ in range(3):
        core.receive_data(NEXT + req(Cmd.DISC))
        assert core.next_event() is NEED_DATA


# -- invalid requests: answered, stream goes on -------------------------------------------


@pytest.mark.parametrize("cmd", [Cmd.RESIZE, 9, 10, 100, 0x7FFF, 0xFFFF])
def test_unknown_command_is_einval_and_next_parses(cmd: int) -> None:
    events = three_ways(STRUCT, req(cmd, 0, 512, cookie=0x8000000000000001) + NEXT)
    assert len(events) == 2
    bad = events[0]
    assert isinstance(bad, InvalidRequest)
    assert (bad.cookie, bad.cmd, bad.errno) == (0x8000000000000001, cmd, Errno.EINVAL)
    assert bad.message
    assert events[1] == NEXT_EVENT


@pytest.mark.parametrize(("cmd", "flags"), [
    (Cmd.READ, CmdFlag.NO_HOLE),
    (Cmd.READ, CmdFlag.REQ_ONE),
    (Cmd.READ, CmdFlag.FAST_ZERO),
    (Cmd.READ, CmdFlag.PAYLOAD_LEN),
    (Cmd.READ, 0x40),
    (Cmd.READ, 0x8000),
    (Cmd.WRITE, CmdFlag.DF),
    (Cmd.WRITE, CmdFlag.NO_HOLE),
    (Cmd.WRITE, CmdFlag.PAYLOAD_LEN),
    (Cmd.WRITE, 0x80 | CmdFlag.FUA),
    (Cmd.WRITE, 0xFFFF),
    (Cmd.FLUSH, CmdFlag.REQ_ONE),
    (Cmd.FLUSH, 0x100),
    (Cmd.TRIM, CmdFlag.NO_HOLE),
    (Cmd.TRIM, 0x200),
    (Cmd.CACHE, CmdFlag.DF),
    (Cmd.CACHE, 0x4000),
    (Cmd.WRITE_ZEROES, CmdFlag.DF),
    (Cmd.WRITE_ZEROES, CmdFlag.REQ_ONE),
    (Cmd.WRITE_ZEROES, 0x400),
    (Cmd.BLOCK_STATUS, CmdFlag.FAST_ZERO),
    (Cmd.BLOCK_STATUS, CmdFlag.DF),
    (Cmd.BLOCK_STATUS, 0x1000),
], ids=lambda v: v.name if isinstance(v, Cmd) else f"{v:#x}")
@pytest.mark.parametrize("negotiated", [PLAIN, STRUCT], ids=["simple", "structured"])
def test_bad_flags_are_einval_and_payload_consumed(cmd: Cmd, flags: int,
                                                   negotiated: Negotiated) -> None:
    events = three_ways(negotiated, req(cmd, 0, 512, flags=flags) + NEXT)
    assert len(events) == 2
    bad = events[0]
    assert isinstance(bad, InvalidRequest)
    assert (bad.cookie, bad.cmd, bad.errno) == (COOKIE, cmd, Errno.EINVAL)
    assert events[1] == NEXT_EVENT


@pytest.mark.parametrize(("cmd", "length"), [
    (Cmd.READ, 512), (Cmd.WRITE, 512), (Cmd.FLUSH, 0), (Cmd.TRIM, 512), (Cmd.CACHE, 512),
    (Cmd.WRITE_ZEROES, 512), (Cmd.BLOCK_STATUS, 512),
])
def test_fua_is_accepted_on_every_command(cmd: Cmd, length: int) -> None:
    event = request(STRUCT, req(cmd, 0, length, flags=CmdFlag.FUA))
    assert event.cmd == cmd
    assert event.flags == CmdFlag.FUA


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
@pytest.mark.parametrize("structured", [False, True])
def test_write_type_on_read_only_is_eperm(cmd: Cmd, structured: bool) -> None:
    negotiated = negotiate(RO, structured=structured, meta=structured)
    assert negotiated.read_only
    events = three_ways(negotiated, req(cmd, 512, 1024, flags=CmdFlag.FUA) + NEXT)
    assert len(events) == 2
    bad = events[0]
    assert isinstance(bad, InvalidRequest)
    assert (bad.cookie, bad.cmd, bad.errno, bad.offset) == (COOKIE, cmd, Errno.EPERM, 512)
    assert events[1] == NEXT_EVENT


@pytest.mark.parametrize(("cmd", "length"), [(Cmd.READ, 512), (Cmd.CACHE, 512),
                                             (Cmd.FLUSH, 0), (Cmd.BLOCK_STATUS, 512)])
def test_read_only_still_serves_non_writing_commands(cmd: Cmd, length: int) -> None:
    negotiated = negotiate(RO, structured=True, meta=True)
    assert request(negotiated, req(cmd, 0, length)).cmd == cmd


@pytest.mark.parametrize(("cmd", "errno"), [
    (Cmd.WRITE, Errno.ENOSPC),
    (Cmd.WRITE_ZEROES, Errno.ENOSPC),
    (Cmd.READ, Errno.EINVAL),
    (Cmd.TRIM, Errno.EINVAL),
    (Cmd.CACHE, Errno.EINVAL),
    (Cmd.BLOCK_STATUS, Errno.EINVAL),
])
@pytest.mark.parametrize(("offset", "length"), [
    (SIZE - 511, 512), (SIZE, 1), (SIZE + 4096, 0), (0xFFFFFFFFFFFFFFFF, 1),
    (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF),
])
def test_past_the_end(cmd: Cmd, errno: Errno, offset: int, length: int) -> None:
    if cmd == Cmd.WRITE and length > 4096:
        length = 4096
        offset = SIZE - 100
    events = three_ways(STRUCT, req(cmd, offset, length) + NEXT)
    bad = events[0]
    assert isinstance(bad, InvalidRequest)
    assert (bad.cookie, bad.cmd, bad.errno, bad.offset) == (COOKIE, cmd, errno, offset)
    assert events[1:] == [NEXT_EVENT]


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
                                 Cmd.BLOCK_STATUS])
def test_up_to_the_end_is_fine(cmd: Cmd) -> None:
    assert request(STRUCT, req(cmd, SIZE - 512, 512)).offset == SIZE - 512


@pytest.mark.parametrize(("offset", "length"), [(1, 0), (0, 1), (4096, 4096)])
def test_flush_with_offset_or_length_is_einval(offset: int, length: int) -> None:
    bad = invalid(PLAIN, req(Cmd.FLUSH, offset, length))
    assert bad.errno == Errno.EINVAL


def test_df_without_structured_replies_is_einval() -> None:
    bad = invalid(PLAIN, req(Cmd.READ, 0, 512, flags=CmdFlag.DF))
    assert bad.errno == Errno.EINVAL
    assert request(STRUCT, req(Cmd.READ, 0, 512, flags=CmdFlag.DF)).flags == CmdFlag.DF


def test_read_over_32_mib() -> None:
    plain = negotiate(BIG)
    structured = negotiate(BIG, structured=True)
    assert request(plain, req(Cmd.READ, 0, MAX_PAYLOAD)).length == MAX_PAYLOAD
    assert invalid(plain, req(Cmd.READ, 0, MAX_PAYLOAD + 1)).errno == Errno.EINVAL
    assert invalid(structured, req(Cmd.READ, 0, MAX_PAYLOAD + 1)).errno == Errno.EINVAL
    df = invalid(structured, req(Cmd.READ, 4096, 0xFFFFFFFF, flags=CmdFlag.DF))
    assert (df.errno, df.offset) == (Errno.EOVERFLOW, 4096)
    # without structured replies, DF itself is the error
    assert invalid(plain, req(Cmd.READ, 0, MAX_PAYLOAD + 1,
                              flags=CmdFlag.DF)).errno == Errno.EINVAL
    # other commands may cover more than the payload limit
    assert request(structured, req(Cmd.TRIM, 0, 0xFFFFFFFF)).length == 0xFFFFFFFF
    assert request(structured, req(Cmd.WRITE_ZEROES, 0, 0xFFFFFFFF)).length == 0xFFFFFFFF


@pytest.mark.parametrize("negotiated", [PLAIN, negotiate(structured=True)],
                         ids=["simple", "structured-no-contexts"])
def test_block_status_without_contexts_is_einval(negotiated: Negotiated) -> None:
    assert negotiated.meta_contexts == {}
    bad = invalid(negotiated, req(Cmd.BLOCK_STATUS, 0, 512))
    assert bad.errno == Errno.EINVAL


def test_block_status_zero_length_is_einval() -> None:
    assert invalid(STRUCT, req(Cmd.BLOCK_STATUS, 0, 0)).errno == Errno.EINVAL


@pytest.mark.parametrize(("cmd", "flags"), [
    (Cmd.FLUSH, 0), (Cmd.TRIM, 0), (Cmd.WRITE_ZEROES, 0),
    (Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO),
])
def test_unadvertised_commands_are_einval(cmd: Cmd, flags: int) -> None:
    bare = negotiate(BARE)
    assert bare.flags == TransmissionFlag.HAS_FLAGS
    assert invalid(bare, req(cmd, 0, 0, flags=flags)).errno == Errno.EINVAL


def test_fast_zero_needs_the_flag() -> None:
    no_fast = FakeExport("nf", fixed=TransmissionFlag.HAS_FLAGS
                         | TransmissionFlag.SEND_WRITE_ZEROES)
    negotiated = Negotiated(export=no_fast, flags=no_fast.transmission_flags(structured=False))
    assert request(negotiated, req(Cmd.WRITE_ZEROES, 0, 512)).cmd == Cmd.WRITE_ZEROES
    bad = invalid(negotiated, req(Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.FAST_ZERO))
    assert bad.errno == Errno.EINVAL


def test_cache_is_tolerated_without_send_cache() -> None:
    assert request(negotiate(BARE), req(Cmd.CACHE, 0, 512)).cmd == Cmd.CACHE


# -- protocol errors: the connection ends ------------------------------------------------


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 0xFFFFFFFF])
def test_oversized_write_is_a_protocol_error_with_cookie(length: int) -> None:
    events = three_ways(PLAIN, NEXT + req(Cmd.WRITE, 0, length, cookie=0x8000000000000001,
                                          payload=b""))
    assert events[0] == NEXT_EVENT
    err = events[1]
    assert isinstance(err, ProtocolError)
    assert err.cookie == 0x8000000000000001
    assert err.errno == Errno.EINVAL
    # decided on the header alone: nothing of the payload was waited for or kept
    core = ServerTransmission(PLAIN)
    core.receive_data(req(Cmd.WRITE, 0, length, payload=b""))
    assert core.bytes_wanted == 1
    with pytest.raises(ProtocolError):
        core.next_event()
    assert core.pending_bytes == wire.REQUEST.size


def test_max_payload_argument_is_the_write_limit() -> None:
    assert request(PLAIN, req(Cmd.WRITE, 0, 100)).length == 100
    err = three_ways(PLAIN, req(Cmd.WRITE, 0, 101, payload=b""), max_payload=100)[0]
    assert isinstance(err, ProtocolError)
    assert err.cookie == COOKIE
    events = three_ways(PLAIN, req(Cmd.WRITE, 0, 100) + NEXT, max_payload=100)
    assert len(events) == 2


@pytest.mark.parametrize("magic", [0, EXTENDED_REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
                                   REQUEST_MAGIC ^ 1, 0xFFFFFFFF])
def test_bad_request_magic_is_a_protocol_error(magic: int) -> None:
    events = three_ways(PLAIN, NEXT + req(Cmd.READ, 0, 512, magic=magic) + NEXT)
    assert events[0] == NEXT_EVENT
    assert len(events) == 2
    err = events[1]
    assert isinstance(err, ProtocolError)
    assert err.cookie is None


# -- replies ----------------------------------------------------------------------------------


def chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Parse structured chunks: (flags, type, cookie, payload); all bytes accounted for."""
    out = []
    pos = 0
    while pos < len(data):
        magic, flags, kind, cookie, length = wire.STRUCTURED_CHUNK.unpack_from(data, pos)
        assert magic == STRUCTURED_REPLY_MAGIC
        pos += wire.STRUCTURED_CHUNK.size
        assert pos + length <= len(data)
        out.append((flags, kind, cookie, data[pos:pos + length]))
        pos += length
    return out


def joined(buffers: list[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


@pytest.mark.parametrize("negotiated", [PLAIN, STRUCT], ids=["simple", "structured"])
def test_reply_ok_is_a_simple_reply(negotiated: Negotiated) -> None:
    data = joined(ServerTransmission(negotiated).reply_ok(0x8000000000000001))
    assert len(data) == 16
    assert data == struct.pack(">IIQ", 0x67446698, 0, 0x8000000000000001)


def test_reply_error_simple() -> None:
    core = ServerTransmission(PLAIN)
    for errno in (Errno.EPERM, Errno.EIO, Errno.EINVAL, Errno.ENOSPC, Errno.EOVERFLOW):
        data = joined(core.reply_error(COOKIE, errno, "a message nobody can see"))
        assert data == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno, COOKIE)
    # an offset cannot be expressed in a simple reply either
    assert joined(core.reply_error(1, Errno.EIO, "m", offset=4096)) == struct.pack(
        ">IIQ", SIMPLE_REPLY_MAGIC, Errno.EIO, 1)


@pytest.mark.parametrize("message", ["", "bad request", "\u00fcn\u00efc\u00f8de"])
def test_reply_error_structured(message: str) -> None:
    core = ServerTransmission(STRUCT)
    got = chunks(joined(core.reply_error(COOKIE, Errno.ENOSPC, message)))
    assert len(got) == 1
    flags, kind, cookie, payload = got[0]
    assert (flags, kind, cookie) == (ReplyFlag.DONE, ReplyType.ERROR, COOKIE)
    raw = message.encode()
    assert len(payload) == 6 + len(raw)
    errno, msg_len = struct.unpack_from(">IH", payload)
    assert (errno, msg_len) == (Errno.ENOSPC, len(raw))
    assert payload[6:] == raw


def test_reply_error_offset_layout() -> None:
    core = ServerTransmission(STRUCT)
    got = chunks(joined(core.reply_error(7, Errno.EIO, "disk on fire", offset=1 << 33)))
    assert len(got) == 1
    flags, kind, cookie, payload = got[0]
    assert (flags, kind, cookie) == (ReplyFlag.DONE, ReplyType.ERROR_OFFSET, 7)
    assert len(payload) == 6 + 12 + 8
    assert struct.unpack_from(">IH", payload) == (Errno.EIO, 12)
    assert payload[6:18] == b"disk on fire"
    assert struct.unpack_from(">Q", payload, 18) == (1 << 33,)


def test_reply_error_long_message_is_cut_to_valid_utf8() -> None:
    core = ServerTransmission(STRUCT)
    message = "\u20ac" * 2000  # 6000 bytes; 4096 is not a multiple of 3
    payload = chunks(joined(core.reply_error(1, Errno.EIO, message)))[0][3]
    (msg_len,) = struct.unpack_from(">H", payload, 4)
    assert msg_len == len(payload) - 6
    assert 4090 <= msg_len <= 4096
    text = payload[6:].decode("utf-8")
    assert message.startswith(text)


def test_reply_read_simple() -> None:
    core = ServerTransmission(PLAIN)
    data = bytearray(b"\x01\x02\x03" * 1000)
    buffers = core.reply_read(0xFFFFFFFFFFFFFFFF, 4096, data)
    assert buffers[-1] is data  # passed through, not copied
    out = joined(buffers)
    assert out[:16] == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 0xFFFFFFFFFFFFFFFF)
    assert out[16:] == data
    assert len(out) == 16 + 3000


def test_reply_read_structured() -> None:
    core = ServerTransmission(STRUCT)
    data = memoryview(b"xyz" * 700)
    buffers = core.reply_read(0x8000000000000001, (1 << 40) + 512, data)
    assert buffers[-1] is data
    got = chunks(joined(buffers))
    assert len(got) == 1
    flags, kind, cookie, payload = got[0]
    assert (flags, kind, cookie) == (ReplyFlag.DONE, ReplyType.OFFSET_DATA,
                                     0x8000000000000001)
    assert len(payload) == 8 + 2100
    assert struct.unpack_from(">Q", payload) == ((1 << 40) + 512,)
    assert payload[8:] == bytes(data)


def test_reply_read_structured_empty_is_a_none_chunk() -> None:
    got = chunks(joined(ServerTransmission(STRUCT).reply_read(3, 0, b"")))
    assert got == [(ReplyFlag.DONE, ReplyType.NONE, 3, b"")]


def test_reply_read_sparse() -> None:
    core = ServerTransmission(STRUCT)
    first = b"A" * 4096
    last = bytearray(b"B" * 100)
    pieces: list[tuple[int, int, Buffer | None]] = [
        (1 << 20, 4096, first), ((1 << 20) + 4096, 8192, None),
        ((1 << 20) + 12288, 100, last)]
    got = chunks(joined(core.reply_read_sparse(COOKIE, pieces)))
    assert [(f, k, c) for f, k, c, _ in got] == [
        (0, ReplyType.OFFSET_DATA, COOKIE), (0, ReplyType.OFFSET_HOLE, COOKIE),
        (ReplyFlag.DONE, ReplyType.OFFSET_DATA, COOKIE)]
    assert got[0][3] == struct.pack(">Q", 1 << 20) + first
    hole = got[1][3]
    assert len(hole) == 12
    assert struct.unpack(">QI", hole) == ((1 << 20) + 4096, 8192)
    assert got[2][3] == struct.pack(">Q", (1 << 20) + 12288) + last


def test_reply_read_sparse_single_hole_carries_done() -> None:
    got = chunks(joined(ServerTransmission(STRUCT).reply_read_sparse(
        5, [(512, 65536, None)])))
    assert got == [(ReplyFlag.DONE, ReplyType.OFFSET_HOLE, 5, struct.pack(">QI", 512, 65536))]


def test_reply_block_status() -> None:
    core = ServerTransmission(STRUCT)
    extents_a = [(4096, 0), (8192, 3), (512, 2)]
    extents_b = [(65536, 1)]
    got = chunks(joined(core.reply_block_status(COOKIE, [(0, extents_a), (7, extents_b)])))
    assert [(f, k, c) for f, k, c, _ in got] == [
        (0, ReplyType.BLOCK_STATUS, COOKIE), (ReplyFlag.DONE, ReplyType.BLOCK_STATUS, COOKIE)]
    for (_, _, _, payload), (context_id, extents) in zip(
            got, [(0, extents_a), (7, extents_b)], strict=True):
        assert len(payload) == 4 + 8 * len(extents)
        assert struct.unpack_from(">I", payload) == (context_id,)
        assert [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range(len(extents))] \
            == extents


def test_reply_block_status_single_context_done_and_extent_cap() -> None:
    core = ServerTransmission(STRUCT)
    extents = [(512, i & 3) for i in range(MAX_EXTENTS + 10)]
    got = chunks(joined(core.reply_block_status(1, [(0, extents)])))
    assert len(got) == 1
    flags, kind, cookie, payload = got[0]
    assert (flags, kind, cookie) == (ReplyFlag.DONE, ReplyType.BLOCK_STATUS, 1)
    assert len(payload) == 4 + 8 * MAX_EXTENTS
    assert struct.unpack_from(">II", payload, len(payload) - 8) == extents[MAX_EXTENTS - 1]


def test_handshake_trailing_bytes_start_the_transmission() -> None:
    name = b"rw"
    after = (req(Cmd.WRITE, 0, 5, cookie=1, payload=b"hello") + req(Cmd.READ, 0, 5, cookie=2)
             + req(Cmd.DISC, cookie=3))
    core = ServerHandshake(CATALOG)
    core.receive_data(wire.CLIENT_FLAGS.pack(3) + _option(
        Opt.GO, struct.pack(">I", len(name)) + name + b"\x00\x00") + after[:40])
    done = core.next_event()
    assert isinstance(done, HandshakeDone)
    assert done.trailing == after[:40]
    transmission = ServerTransmission(done.negotiated)
    events = run_with(transmission, [done.trailing, after[40:]])
    assert events == [Request(Cmd.WRITE, CmdFlag(0), 1, 0, 5, b"hello"),
                      Request(Cmd.READ, CmdFlag(0), 2, 0, 5, None), Disconnect()]


def run_with(core: ServerTransmission, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        core.receive_data(chunk)
        for _ in range(1000):
            event = core.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
    return events
