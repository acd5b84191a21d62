"""NBD_OPT_EXTENDED_HEADERS in the server core: the option (handshake) and
the 32-byte requests and replies (``ExtendedTransmission``).

The negotiated state comes from a real ``ServerHandshake`` run.  Request
streams go through ``three_ways`` (whole, one byte at a time, and with the
start of a further request appended) and through ``get_buffer`` in pieces.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

import pytest
from tests.support.fakes import FakeCatalog, FakeExport

from pynbd.proto import wire
from pynbd.proto.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_EXTENTS,
    MAX_PAYLOAD,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
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
from pynbd.proto.extended import ExtendedTransmission
from pynbd.proto.handshake import ServerHandshake, TlsMode
from pynbd.proto.transmission import DIRECT_PAYLOAD_MIN

if TYPE_CHECKING:
    from pynbd.proto.negotiated import Negotiated
    from pynbd.proto.wire import Buffer

SIZE = 1 << 20
GIB4 = 1 << 32
RW = FakeExport("rw", size=SIZE)
RO = FakeExport("ro", size=SIZE, read_only=True)
BIG = FakeExport("big", size=1 << 40)
CATALOG = FakeCatalog(RW, RO, BIG)
CLIENT = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)

# -- handshake ------------------------------------------------------------------------------


def option(code: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, code, len(data)) + data


def go(name: str = "rw") -> bytes:
    raw = name.encode()
    return option(Opt.GO, struct.pack(">I", len(raw)) + raw + b"\x00\x00")


def set_meta(name: str = "rw") -> bytes:
    raw, query = name.encode(), BASE_ALLOCATION.encode()
    return option(Opt.SET_META_CONTEXT, struct.pack(">I", len(raw)) + raw
                  + struct.pack(">II", 1, len(query)) + query)


EXTENDED = option(Opt.EXTENDED_HEADERS)
STRUCTURED = option(Opt.STRUCTURED_REPLY)


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of every option reply after the 18-byte greeting."""
    got = []
    pos = wire.GREETING.size
    while pos < len(out):
        magic, opt, rep, length = wire.OPTION_REPLY_HEADER.unpack_from(out, pos)
        assert magic == REPLY_MAGIC
        pos += wire.OPTION_REPLY_HEADER.size
        got.append((opt, rep, out[pos:pos + length]))
        pos += length
    return got


def handshake(stream: bytes, *, tls: TlsMode = TlsMode.OFF,
              ) -> tuple[ServerHandshake, object, bytes]:
    core = ServerHandshake(CATALOG, tls=tls)
    core.receive_data(stream)
    event = core.next_event()
    return core, event, core.data_to_send()


def test_extended_headers_are_acknowledged_and_imply_structured_replies() -> None:
    _, event, out = handshake(CLIENT + EXTENDED + go())
    assert isinstance(event, HandshakeDone)
    assert replies(out)[0] == (Opt.EXTENDED_HEADERS, Rep.ACK, b"")
    assert event.negotiated.extended
    assert event.negotiated.structured
    assert event.negotiated.flags & TransmissionFlag.SEND_DF
    # no payload form of BLOCK_STATUS is offered
    assert not event.negotiated.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD


def test_clients_that_do_not_ask_get_neither() -> None:
    for stream in (CLIENT + go(), CLIENT + STRUCTURED + go()):
        _, event, _ = handshake(stream)
        assert isinstance(event, HandshakeDone)
        assert not event.negotiated.extended


def test_extended_headers_with_data_are_invalid_and_change_nothing() -> None:
    _, event, out = handshake(CLIENT + option(Opt.EXTENDED_HEADERS, b"x") + go())
    assert isinstance(event, HandshakeDone)
    got = replies(out)
    assert got[0][:2] == (Opt.EXTENDED_HEADERS, Rep.ERR_INVALID)
    assert got[0][2]  # a message
    assert not event.negotiated.extended
    assert not event.negotiated.structured


def test_extended_headers_twice_is_invalid_and_they_stay_on() -> None:
    _, event, out = handshake(CLIENT + EXTENDED + EXTENDED + go())
    assert isinstance(event, HandshakeDone)
    got = replies(out)
    assert got[0][:2] == (Opt.EXTENDED_HEADERS, Rep.ACK)
    assert got[1][:2] == (Opt.EXTENDED_HEADERS, Rep.ERR_INVALID)
    assert event.negotiated.extended


def test_structured_reply_after_extended_headers_is_ext_header_reqd() -> None:
    _, event, out = handshake(CLIENT + EXTENDED + STRUCTURED + go())
    assert isinstance(event, HandshakeDone)
    got = replies(out)
    assert got[1][:2] == (Opt.STRUCTURED_REPLY, Rep.ERR_EXT_HEADER_REQD)
    assert event.negotiated.extended
    assert event.negotiated.structured


def test_extended_headers_after_structured_reply_take_precedence() -> None:
    _, event, out = handshake(CLIENT + STRUCTURED + EXTENDED + go())
    assert isinstance(event, HandshakeDone)
    got = replies(out)
    assert [g[:2] for g in got[:2]] == [(Opt.STRUCTURED_REPLY, Rep.ACK),
                                        (Opt.EXTENDED_HEADERS, Rep.ACK)]
    assert event.negotiated.extended


def test_meta_contexts_need_only_extended_headers() -> None:
    _, event, out = handshake(CLIENT + EXTENDED + set_meta() + go())
    assert isinstance(event, HandshakeDone)
    assert replies(out)[1][:2] == (Opt.SET_META_CONTEXT, Rep.META_CONTEXT)
    assert event.negotiated.meta_contexts == {0: BASE_ALLOCATION}
    # with a context to name, BLOCK_STATUS's payload form is offered
    assert event.negotiated.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD


def test_block_status_payload_is_offered_only_with_extended_headers() -> None:
    _, event, _ = handshake(CLIENT + STRUCTURED + set_meta() + go())
    assert isinstance(event, HandshakeDone)
    assert event.negotiated.meta_contexts
    assert not event.negotiated.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD


def test_export_name_after_extended_headers_closes() -> None:
    _, event, out = handshake(CLIENT + EXTENDED + option(Opt.EXPORT_NAME, b"rw"))
    assert isinstance(event, HandshakeClosed)
    assert "EXTENDED_HEADERS" in event.reason
    # the ACK and nothing after it: no export size and flags
    assert [g[:2] for g in replies(out)] == [(Opt.EXTENDED_HEADERS, Rep.ACK)]


def test_export_name_without_extended_headers_still_works() -> None:
    _, event, _ = handshake(CLIENT + option(Opt.EXPORT_NAME, b"rw"))
    assert isinstance(event, HandshakeDone)


def test_starttls_forgets_extended_headers() -> None:
    core, event, _ = handshake(CLIENT + EXTENDED + option(Opt.STARTTLS), tls=TlsMode.ON)
    assert isinstance(event, StartTLS)
    core.tls_started()
    core.receive_data(go())
    done = core.next_event()
    assert isinstance(done, HandshakeDone)
    assert not done.negotiated.extended
    assert not done.negotiated.structured
    # ... and they can be negotiated again over TLS
    core, event, _ = handshake(CLIENT + option(Opt.STARTTLS), tls=TlsMode.ON)
    core.tls_started()
    core.receive_data(EXTENDED + go())
    done = core.next_event()
    assert isinstance(done, HandshakeDone)
    assert done.negotiated.extended


# -- requests -----------------------------------------------------------------------------


def negotiate(export: FakeExport = RW, *, meta: bool = True) -> Negotiated:
    stream = CLIENT + EXTENDED + (set_meta(export.name) if meta else b"") + go(export.name)
    _, event, _ = handshake(stream)
    assert isinstance(event, HandshakeDone)
    assert event.negotiated.extended
    return event.negotiated


EXT = negotiate()
EXT_RO = negotiate(RO)
EXT_BIG = negotiate(BIG)
EXT_NO_META = negotiate(meta=False)
COOKIE = 0xFFFFFFFFFFFFFFFF
PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)


def req(cmd: int, offset: int = 0, length: int = 0, *, cookie: int = COOKIE, flags: int = 0,
        payload: bytes | None = None, magic: int = EXTENDED_REQUEST_MAGIC) -> bytes:
    """One extended request; with PAYLOAD_LEN, ``length`` bytes of payload unless given."""
    if payload is None:
        payload = bytes(i % 251 for i in range(length)) if flags & PAYLOAD_LEN else b""
    return wire.EXTENDED_REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload


def write(offset: int, length: int, *, cookie: int = COOKIE, flags: int = 0) -> bytes:
    return req(Cmd.WRITE, offset, length, cookie=cookie, flags=flags | PAYLOAD_LEN)


#: the start of one more request, which never completes
TRAIL = req(Cmd.READ, 0, 512, cookie=42)[:20]
NEXT = req(Cmd.READ, 4096, 512, cookie=7)
NEXT_EVENT = Request(Cmd.READ, 0, 7, 4096, 512, None)


def run(negotiated: Negotiated, pieces: list[bytes], *, max_payload: int = MAX_PAYLOAD,
        via_buffer: bool = False) -> tuple[list[object], ExtendedTransmission]:
    core = ExtendedTransmission(negotiated, max_payload=max_payload)
    events: list[object] = []
    for piece in pieces:
        if via_buffer:
            view = memoryview(piece)
            while view:
                buf = core.get_buffer()
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                core.buffer_updated(n)
                view = view[n:]
        else:
            core.receive_data(piece)
        while True:
            try:
                event = core.next_event()
            except ProtocolError as err:
                events.append(err)
                return events, core
            if event is NEED_DATA:
                break
            events.append(event)
    return events, core


def _comparable(events: list[object]) -> list[object]:
    return [("protocol-error", str(e), e.cookie, e.errno) if isinstance(e, ProtocolError)
            else e for e in events]


def three_ways(negotiated: Negotiated, stream: bytes, *,
               max_payload: int = MAX_PAYLOAD) -> list[object]:
    """Events of ``stream`` fed whole, byte by byte, in 1000-byte pieces through
    ``get_buffer`` and with TRAIL appended (all equal)."""
    whole, core = run(negotiated, [stream], max_payload=max_payload)
    expected = _comparable(whole)
    bytewise, _ = run(negotiated, [stream[i:i + 1] for i in range(len(stream))],
                      max_payload=max_payload)
    assert _comparable(bytewise) == expected
    pieces, _ = run(negotiated, [stream[i:i + 1000] for i in range(0, len(stream), 1000)],
                    max_payload=max_payload, via_buffer=True)
    assert _comparable(pieces) == expected
    trailing, trailing_core = run(negotiated, [stream + TRAIL], max_payload=max_payload)
    assert _comparable(trailing) == expected
    if not any(isinstance(e, ProtocolError | Disconnect) for e in whole):
        assert core.pending_bytes == 0
        assert trailing_core.pending_bytes == len(TRAIL)
    return whole


def one_event(negotiated: Negotiated, stream: bytes) -> object:
    events = three_ways(negotiated, stream + NEXT)
    assert len(events) == 2, events
    assert events[1] == NEXT_EVENT  # the stream is still in step
    return events[0]


@pytest.mark.parametrize(("negotiated", "cmd", "flags", "offset", "length"), [
    (EXT, Cmd.READ, 0, 0, 512),
    (EXT, Cmd.READ, CmdFlag.DF, SIZE - 1, 1),
    (EXT, Cmd.READ, 0, 0, 0),
    (EXT, Cmd.FLUSH, 0, 0, 0),
    (EXT, Cmd.FLUSH, CmdFlag.FUA, 0, 0),
    (EXT, Cmd.TRIM, 0, 0, SIZE),
    (EXT, Cmd.TRIM, 0, SIZE, 0),
    (EXT, Cmd.CACHE, 0, 512, 0),
    (EXT, Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, 0, 0),
    (EXT, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, SIZE),
    # effect lengths of more than 32 bits
    (EXT_BIG, Cmd.TRIM, 0, 0, GIB4 + 512),
    (EXT_BIG, Cmd.WRITE_ZEROES, CmdFlag.FUA, 4096, 1 << 39),
    (EXT_BIG, Cmd.CACHE, 0, 0, 1 << 40),
    (EXT_BIG, Cmd.BLOCK_STATUS, 0, 0, 1 << 40),
])
def test_valid_requests(negotiated: Negotiated, cmd: Cmd, flags: int, offset: int,
                        length: int) -> None:
    event = one_event(negotiated, req(cmd, offset, length, flags=flags))
    assert event == Request(cmd, flags, COOKIE, offset, length, None)


@pytest.mark.parametrize("length", [0, 1, 300, DIRECT_PAYLOAD_MIN - 1, DIRECT_PAYLOAD_MIN,
                                    DIRECT_PAYLOAD_MIN * 3 + 7])
def test_write_with_payload_len(length: int) -> None:
    event = one_event(EXT, write(4096, length, flags=CmdFlag.FUA))
    assert isinstance(event, Request)
    # PAYLOAD_LEN is consumed by the parser: the handlers see the command's own flags
    assert (event.cmd, event.flags, event.offset, event.length) == (
        Cmd.WRITE, CmdFlag.FUA, 4096, length)
    assert event.payload == bytes(i % 251 for i in range(length))


def test_write_past_the_end_consumes_its_payload() -> None:
    event = one_event(EXT, write(SIZE - 10, 512))
    assert isinstance(event, InvalidRequest)
    assert event.errno == Errno.ENOSPC


def test_write_on_read_only_export_consumes_its_payload() -> None:
    event = one_event(EXT_RO, write(0, DIRECT_PAYLOAD_MIN * 2))
    assert isinstance(event, InvalidRequest)
    assert event.errno == Errno.EPERM


def test_write_without_payload_len_still_carries_its_payload() -> None:
    """The client MUST set PAYLOAD_LEN on WRITE, but qemu 10's client does not and
    qemu's server reads the payload anyway: so do we (the stream stays in step)."""
    for length in (512, DIRECT_PAYLOAD_MIN * 2):
        payload = bytes(i % 251 for i in range(length))
        event = one_event(EXT, req(Cmd.WRITE, 0, length, flags=CmdFlag.FUA, payload=payload))
        assert event == Request(Cmd.WRITE, CmdFlag.FUA, COOKIE, 0, length, payload)


def status_payload(effect: int, *ids: int) -> bytes:
    return struct.pack(">Q", effect) + b"".join(struct.pack(">I", i) for i in ids)


@pytest.mark.parametrize("flags", [0, CmdFlag.REQ_ONE])
def test_block_status_payload_form(flags: int) -> None:
    payload = status_payload(1 << 39, 0)
    event = one_event(EXT_BIG, req(Cmd.BLOCK_STATUS, 4096, len(payload),
                                   flags=flags | PAYLOAD_LEN, payload=payload))
    assert event == Request(Cmd.BLOCK_STATUS, flags, COOKIE, 4096, 1 << 39, None, (0,))


@pytest.mark.parametrize("ids", [(1,), (0,), (1, 0), (0, 1)])
def test_block_status_payload_names_some_of_the_contexts(ids: tuple[int, ...]) -> None:
    """With two contexts negotiated, the payload may ask for one, or both in any
    order: the request carries the ids, for the handler to answer just those."""
    two = dataclasses.replace(EXT, meta_contexts={0: BASE_ALLOCATION, 1: ALLOCATION_DEPTH})
    payload = status_payload(512, *ids)
    event = one_event(two, req(Cmd.BLOCK_STATUS, 0, len(payload), flags=PAYLOAD_LEN,
                               payload=payload))
    assert event == Request(Cmd.BLOCK_STATUS, 0, COOKIE, 0, 512, None, ids)
    bad = status_payload(512, 2)
    event = one_event(two, req(Cmd.BLOCK_STATUS, 0, len(bad), flags=PAYLOAD_LEN, payload=bad))
    assert isinstance(event, InvalidRequest)


@pytest.mark.parametrize(("negotiated", "payload", "errno"), [
    (EXT, status_payload(512, 0, 0), Errno.EINVAL),  # an id twice
    (EXT, status_payload(512, 1), Errno.EINVAL),  # an id never negotiated
    (EXT, status_payload(512), Errno.EINVAL),  # no id
    (EXT, status_payload(512, 0) + b"x", Errno.EINVAL),  # not whole ids
    (EXT, status_payload(0, 0), Errno.EINVAL),  # zero length, as without a payload
    (EXT, status_payload(SIZE + 1, 0), Errno.EINVAL),  # past the end
    (EXT_NO_META, status_payload(512, 0), Errno.EINVAL),  # the form was not offered
])
def test_bad_block_status_payloads(negotiated: Negotiated, payload: bytes,
                                   errno: Errno) -> None:
    event = one_event(negotiated, req(Cmd.BLOCK_STATUS, 0, len(payload), flags=PAYLOAD_LEN,
                                      payload=payload))
    assert isinstance(event, InvalidRequest)
    assert event.errno == errno


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
                                 Cmd.BLOCK_STATUS, Cmd.RESIZE, 99])
@pytest.mark.parametrize("length", [8, 300, DIRECT_PAYLOAD_MIN + 5])
def test_payload_on_commands_without_a_payload_form_is_read_and_refused(
        cmd: int, length: int) -> None:
    event = one_event(EXT, req(cmd, 0, length, flags=PAYLOAD_LEN, cookie=5))
    assert isinstance(event, InvalidRequest)
    assert (event.errno, event.cookie, event.cmd) == (Errno.EINVAL, 5, cmd)
    assert "payload" in event.message


@pytest.mark.parametrize(("cmd", "flags"), [(Cmd.WRITE, PAYLOAD_LEN), (Cmd.WRITE, 0),
                                           (Cmd.BLOCK_STATUS, PAYLOAD_LEN)])
def test_payload_over_the_limit_ends_the_connection_after_an_error(cmd: int,
                                                                   flags: int) -> None:
    stream = req(cmd, 4096, 1024 + 1, flags=flags, cookie=9, payload=b"")
    events = three_ways(EXT, NEXT + stream, max_payload=1024)
    assert events[0] == NEXT_EVENT
    err = events[1]
    assert isinstance(err, ProtocolError)
    assert (err.cookie, err.errno) == (9, Errno.EINVAL)
    # the error reply carries the request's offset
    _, core = run(EXT, [stream], max_payload=1024)
    reply = joined(core.reply_error(9, err.errno, err.message))
    assert ext_chunks(reply)[0][:4] == (ReplyFlag.DONE, ReplyType.ERROR, 9, 4096)


@pytest.mark.parametrize(("negotiated", "stream", "errno"), [
    # reads stay limited by the maximum payload
    (EXT_BIG, req(Cmd.READ, 0, MAX_PAYLOAD + 1), Errno.EINVAL),
    (EXT_BIG, req(Cmd.READ, 0, GIB4), Errno.EINVAL),
    (EXT_BIG, req(Cmd.READ, 0, GIB4, flags=CmdFlag.DF), Errno.EOVERFLOW),
    (EXT, req(Cmd.TRIM, 0, GIB4), Errno.EINVAL),
    (EXT, req(Cmd.WRITE_ZEROES, SIZE, GIB4), Errno.ENOSPC),
    (EXT, req(Cmd.CACHE, 1, SIZE), Errno.EINVAL),
    (EXT, req(Cmd.BLOCK_STATUS, 0, SIZE + 1), Errno.EINVAL),
    (EXT, req(Cmd.BLOCK_STATUS, 0, 0), Errno.EINVAL),
    (EXT_NO_META, req(Cmd.BLOCK_STATUS, 0, 512), Errno.EINVAL),
    (EXT, req(Cmd.FLUSH, 0, 1), Errno.EINVAL),
    (EXT, req(Cmd.READ, 0, 512, flags=1 << 15), Errno.EINVAL),
    (EXT_RO, req(Cmd.TRIM, 0, 512), Errno.EPERM),
    (EXT, req(99, 0, 512), Errno.EINVAL),
    (EXT_BIG, req(Cmd.TRIM, (1 << 64) - 512, 1 << 40), Errno.EINVAL),
])
def test_invalid_requests(negotiated: Negotiated, stream: bytes, errno: Errno) -> None:
    event = one_event(negotiated, stream)
    assert isinstance(event, InvalidRequest), event
    assert event.errno == errno


@pytest.mark.parametrize("magic", [REQUEST_MAGIC, 0, EXTENDED_REPLY_MAGIC,
                                   EXTENDED_REQUEST_MAGIC ^ 1])
def test_a_request_in_another_form_is_a_protocol_error(magic: int) -> None:
    events = three_ways(EXT, NEXT + req(Cmd.READ, 0, 512, magic=magic) + NEXT)
    assert events[0] == NEXT_EVENT
    assert len(events) == 2
    err = events[1]
    assert isinstance(err, ProtocolError)
    assert err.cookie is None
    if magic == REQUEST_MAGIC:
        assert "compact" in str(err)


def test_a_compact_request_after_extended_headers_is_a_protocol_error() -> None:
    compact = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 512)
    events, _ = run(EXT, [compact])  # 28 bytes: no wait for a 32-byte header
    assert isinstance(events[0], ProtocolError)


def test_disc_ends_parsing() -> None:
    events = three_ways(EXT, NEXT + req(Cmd.DISC, 0, 0) + NEXT)
    assert events == [NEXT_EVENT, Disconnect()]


def test_many_requests_in_one_stream() -> None:
    stream = b"".join(write(i * 512, 512, cookie=i) + req(Cmd.READ, i * 512, 512, cookie=i)
                      for i in range(50))
    events = three_ways(EXT, stream)
    assert len(events) == 100
    assert all(isinstance(e, Request) for e in events)


def test_large_writes_back_to_back_are_not_copied() -> None:
    length = DIRECT_PAYLOAD_MIN * 2
    stream = write(0, length, cookie=1) + write(length, length, cookie=2)
    events, core = run(EXT, [stream[i:i + 4096] for i in range(0, len(stream), 4096)],
                       via_buffer=True)
    assert [(e.cookie, e.offset, e.length) for e in events if isinstance(e, Request)] == [
        (1, 0, length), (2, length, length)]
    assert core.pending_bytes == 0


# -- replies ------------------------------------------------------------------------------


def joined(buffers: list[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def ext_chunks(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """(flags, type, cookie, offset, payload) of extended chunks; all bytes accounted for."""
    out = []
    pos = 0
    while pos < len(data):
        magic, flags, kind, cookie, offset, length = wire.EXTENDED_CHUNK.unpack_from(data, pos)
        assert magic == EXTENDED_REPLY_MAGIC
        pos += wire.EXTENDED_CHUNK.size
        assert pos + length <= len(data)
        out.append((flags, kind, cookie, offset, data[pos:pos + length]))
        pos += length
    return out


def parsed(stream: bytes, negotiated: Negotiated = EXT) -> tuple[ExtendedTransmission, object]:
    events, core = run(negotiated, [stream])
    assert len(events) == 1
    return core, events[0]


def test_reply_ok_is_a_none_chunk_with_the_request_offset() -> None:
    core, _ = parsed(req(Cmd.TRIM, 8192, 512, cookie=0x8000000000000001))
    data = joined(core.reply_ok(0x8000000000000001))
    assert data == wire.EXTENDED_CHUNK.pack(EXTENDED_REPLY_MAGIC, ReplyFlag.DONE,
                                            ReplyType.NONE, 0x8000000000000001, 8192, 0)
    assert len(data) == 32


def test_reply_error_and_error_offset() -> None:
    core, _ = parsed(req(Cmd.TRIM, 4096, 100, cookie=3))
    got = ext_chunks(joined(core.reply_error(3, Errno.EIO, "disk on fire")))
    assert got == [(ReplyFlag.DONE, ReplyType.ERROR, 3, 4096,
                    struct.pack(">IH", Errno.EIO, 12) + b"disk on fire")]
    core, _ = parsed(req(Cmd.TRIM, 4096, 100, cookie=3))
    got = ext_chunks(joined(core.reply_error(3, Errno.EIO, "m", offset=4100)))
    assert got == [(ReplyFlag.DONE, ReplyType.ERROR_OFFSET, 3, 4096,
                    struct.pack(">IH", Errno.EIO, 1) + b"m" + struct.pack(">Q", 4100))]


def test_invalid_request_reply_carries_its_offset() -> None:
    core, event = parsed(req(Cmd.TRIM, SIZE, 512, cookie=4))
    assert isinstance(event, InvalidRequest)
    got = ext_chunks(joined(core.reply_error(event.cookie, event.errno, event.message)))
    assert got[0][:4] == (ReplyFlag.DONE, ReplyType.ERROR, 4, SIZE)


def test_reply_read_and_read_head() -> None:
    core, _ = parsed(req(Cmd.READ, 512, 4, cookie=5))
    assert ext_chunks(joined(core.reply_read(5, 512, b"abcd"))) == [
        (ReplyFlag.DONE, ReplyType.OFFSET_DATA, 5, 512, struct.pack(">Q", 512) + b"abcd")]
    core, _ = parsed(req(Cmd.READ, 512, 4, cookie=5))
    head = joined(core.reply_read_head(5, 512, 4))
    assert ext_chunks(head + b"abcd") == [
        (ReplyFlag.DONE, ReplyType.OFFSET_DATA, 5, 512, struct.pack(">Q", 512) + b"abcd")]
    core, _ = parsed(req(Cmd.READ, 512, 0, cookie=5))
    assert ext_chunks(joined(core.reply_read(5, 512, b""))) == [
        (ReplyFlag.DONE, ReplyType.NONE, 5, 512, b"")]


def test_reply_read_sparse_chunks_all_carry_the_request_offset() -> None:
    core, _ = parsed(req(Cmd.READ, 1024, 3072, cookie=6))
    got = ext_chunks(joined(core.reply_read_sparse(6, [(1024, 1024, None),
                                                       (2048, 2048, b"x" * 2048)])))
    assert got == [(0, ReplyType.OFFSET_HOLE, 6, 1024, struct.pack(">QI", 1024, 1024)),
                   (ReplyFlag.DONE, ReplyType.OFFSET_DATA, 6, 1024,
                    struct.pack(">Q", 2048) + b"x" * 2048)]


def test_block_status_ext_with_64_bit_extents() -> None:
    core, _ = parsed(req(Cmd.BLOCK_STATUS, 0, 1 << 40, cookie=8), EXT_BIG)
    extents = [(GIB4 * 3, 3), (512, 0), ((1 << 40) - GIB4 * 3 - 512, 1)]
    got = ext_chunks(joined(core.reply_block_status(8, [(0, extents)])))
    assert len(got) == 1
    flags, kind, cookie, offset, payload = got[0]
    assert (flags, kind, cookie, offset) == (ReplyFlag.DONE, ReplyType.BLOCK_STATUS_EXT, 8, 0)
    assert len(payload) == 8 + 16 * 3
    assert struct.unpack_from(">II", payload) == (0, 3)
    assert [struct.unpack_from(">QQ", payload, 8 + 16 * i) for i in range(3)] == extents


def test_block_status_ext_one_chunk_per_context_last_one_done() -> None:
    core, _ = parsed(req(Cmd.BLOCK_STATUS, 4096, 512, cookie=9))
    got = ext_chunks(joined(core.reply_block_status(9, [(0, [(512, 0)]), (7, [(512, 1)])])))
    assert [(g[0], g[1], g[3]) for g in got] == [(0, ReplyType.BLOCK_STATUS_EXT, 4096),
                                                 (ReplyFlag.DONE, ReplyType.BLOCK_STATUS_EXT,
                                                  4096)]
    assert struct.unpack_from(">II", got[1][4]) == (7, 1)


def test_block_status_ext_is_capped_and_the_count_matches() -> None:
    core, _ = parsed(req(Cmd.BLOCK_STATUS, 0, SIZE, cookie=10))
    extents = [(1, i & 3) for i in range(MAX_EXTENTS + 5)]
    payload = ext_chunks(joined(core.reply_block_status(10, [(0, extents)])))[0][4]
    assert struct.unpack_from(">II", payload) == (0, MAX_EXTENTS)
    assert len(payload) == 8 + 16 * MAX_EXTENTS


def test_request_offsets_are_forgotten_once_replied() -> None:
    stream = b"".join(req(Cmd.READ, i * 512, 512, cookie=i) for i in range(10))
    events, core = run(EXT, [stream])
    for event in events:
        assert isinstance(event, Request)
        if event.cookie % 2:
            core.reply_ok(event.cookie)
        else:
            core.reply_read_sparse(event.cookie, [(event.offset, 512, None)])
    assert core._offsets == {}  # the bookkeeping must not grow
