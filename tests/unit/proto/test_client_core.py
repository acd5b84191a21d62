"""The sans-IO client core: ClientHandshake and ClientTransmission.

Targets: nbd-protocol.md 2.5-2.8 (option replies, GO/INFO, the EXPORT_NAME
fallback), 3.3/3.4 (simple and structured replies, any order), 3.8 (chunk
types and their rules), 6.4 (block status replies) and 7.2 (STARTTLS).  Every
reply stream is fed three ways (whole, one byte at a time, and with the start
of a further reply appended); the client is also wired to the server cores in
memory, and hypothesis feeds it arbitrary bytes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.block import MemoryNode
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
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from pynbd.proto.errors import LocalProtocolError, ProtocolError
from pynbd.proto.events import (
    NEED_DATA,
    HandshakeDone,
    InvalidRequest,
    Request,
    StartTLS,
)
from pynbd.proto.handshake import ServerHandshake, TlsMode
from pynbd.proto.negotiated import BlockSizes
from pynbd.proto.transmission import ServerTransmission
from pynbd.server.export import Export, ExportTable

if TYPE_CHECKING:
    from collections.abc import Callable

MiB = 1 << 20
GREETING = wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 3)
ALL_FLAGS = TransmissionFlag(0x0FFF) & ~TransmissionFlag.READ_ONLY
MODES = ["whole", "bytewise", "with-next"]
#: the start of one more reply, for an unrelated cookie, appended in "with-next" mode
NEXT_PREFIX = wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 0xABCDEF)[:11]


def catalog() -> ExportTable:
    table = ExportTable()
    table.add(Export("disk", MemoryNode(MiB), description="a disk", multi_conn=True))
    table.add(Export("", MemoryNode(4096)))
    return table


# -- byte builders (server side) --------------------------------------------------------------


def opt_reply(option: int, rep: int, payload: bytes = b"") -> bytes:
    return wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, option, rep, len(payload)) + payload


def info_export(size: int = MiB, flags: int = 0x3) -> bytes:
    return opt_reply(Opt.GO, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, size, flags))


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes = b"", *, done: bool = True) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return wire.STRUCTURED_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie,
                                      len(payload)) + payload


def data_chunk(cookie: int, offset: int, data: bytes, *, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, wire.OFFSET_DATA.pack(offset) + data, done=done)


def hole_chunk(cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(offset, length),
                 done=done)


def error_chunk(cookie: int, errno: int, message: str, *, offset: int | None = None,
                done: bool = True) -> bytes:
    text = message.encode()
    body = wire.ERROR_CHUNK.pack(errno, len(text)) + text
    if offset is None:
        return chunk(cookie, ReplyType.ERROR, body, done=done)
    return chunk(cookie, ReplyType.ERROR_OFFSET, body + wire.U64.pack(offset), done=done)


def status_chunk(cookie: int, context: int, extents: list[tuple[int, int]], *,
                 done: bool = True) -> bytes:
    body = wire.U32.pack(context) + b"".join(wire.EXTENT.pack(*e) for e in extents)
    return chunk(cookie, ReplyType.BLOCK_STATUS, body, done=done)


# -- feeding -----------------------------------------------------------------------------------


def pieces(data: bytes, mode: str) -> list[bytes]:
    if mode == "bytewise":
        return [data[i:i + 1] for i in range(len(data))]
    if mode == "with-next":
        return [data + NEXT_PREFIX]
    return [data]


def feed_tx(core: ClientTransmission, data: bytes, mode: str) -> list[Completion]:
    """Feed ``data`` in the given way; return the completions, in order."""
    events: list[Completion] = []
    for piece in pieces(data, mode):
        core.receive_data(piece)
        for _ in range(1000):
            event = core.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, Completion)
            events.append(event)
    return events


def feed_hs(core: ClientHandshake, data: bytes, mode: str = "whole") -> list[object]:
    events: list[object] = []
    for piece in pieces(data, mode) if mode != "with-next" else [data]:
        core.receive_data(piece)
        for _ in range(100):
            event = core.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, (HandshakeComplete, HandshakeFailed, StartTLS)):
                return events
    return events


def options_sent(data: bytes) -> list[tuple[int, bytes]]:
    """Split what a client sent into options (after its 4 bytes of flags)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, length = wire.OPTION_HEADER.unpack_from(data, pos)
        assert magic == IHAVEOPT
        pos += wire.OPTION_HEADER.size
        out.append((option, data[pos:pos + length]))
        pos += length
    return out


def tx(structured: bool = True, flags: TransmissionFlag = ALL_FLAGS) -> ClientTransmission:
    return ClientTransmission(size=MiB, flags=flags, structured=structured,
                              meta_contexts={7: BASE_ALLOCATION} if structured else {})


# -- handshake: wired to ServerHandshake --------------------------------------------------


def pump(client: ClientHandshake, server: ServerHandshake) -> tuple[list[object], list[object]]:
    """Run both handshake cores against each other until the client is done (or at TLS)."""
    client_events: list[object] = []
    server_events: list[object] = []
    for _ in range(50):
        client.receive_data(server.data_to_send())
        event = client.next_event()
        if event is not NEED_DATA:
            client_events.append(event)
        if isinstance(event, (HandshakeComplete, HandshakeFailed, StartTLS)):
            return client_events, server_events
        server.receive_data(client.data_to_send())
        while True:
            sevent = server.next_event()
            if sevent is NEED_DATA:
                break
            server_events.append(sevent)
            if isinstance(sevent, (HandshakeDone, StartTLS)):
                break
    raise AssertionError(f"handshake did not finish: {client_events} {server_events}")


def test_round_trip_with_structured_replies_and_meta_context() -> None:
    client = ClientHandshake("disk", meta_contexts=[BASE_ALLOCATION])
    server = ServerHandshake(catalog())
    client_events, server_events = pump(client, server)
    done = client_events[-1]
    assert isinstance(done, HandshakeComplete)
    assert done.size == MiB
    assert done.structured is True
    assert done.meta_contexts == {BASE_ALLOCATION: 0}
    assert done.block_sizes == BlockSizes(1, 4096, 32 * MiB)
    assert done.description == "a disk"
    assert done.flags & TransmissionFlag.CAN_MULTI_CONN
    assert done.trailing == b""
    (server_done,) = server_events
    assert isinstance(server_done, HandshakeDone)
    assert server_done.negotiated.flags == done.flags
    assert server_done.negotiated.meta_contexts == {0: BASE_ALLOCATION}


def test_client_flags_and_option_order_on_the_wire() -> None:
    client = ClientHandshake("disk", meta_contexts=[BASE_ALLOCATION])
    assert client.data_to_send() == b""  # nothing before the greeting
    client.receive_data(GREETING)
    assert client.next_event() is NEED_DATA
    out = client.data_to_send()
    assert out[:4] == wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    assert options_sent(out[4:]) == [(Opt.STRUCTURED_REPLY, b"")]
    client.receive_data(opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert client.next_event() is NEED_DATA
    meta = b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x0fbase:allocation"
    assert options_sent(client.data_to_send()) == [(Opt.SET_META_CONTEXT, meta)]
    client.receive_data(opt_reply(Opt.SET_META_CONTEXT, Rep.ACK))
    assert client.next_event() is NEED_DATA
    go = b"\0\0\0\x04disk\0\x01\0\x03"  # one info request: NBD_INFO_BLOCK_SIZE
    assert options_sent(client.data_to_send()) == [(Opt.GO, go)]


def test_round_trip_without_structured_replies() -> None:
    client = ClientHandshake("disk", structured=False, meta_contexts=[BASE_ALLOCATION])
    client_events, server_events = pump(client, ServerHandshake(catalog()))
    done = client_events[-1]
    assert isinstance(done, HandshakeComplete)
    assert (done.structured, done.meta_contexts) == (False, {})
    assert isinstance(server_events[-1], HandshakeDone)
    assert server_events[-1].negotiated.structured is False


def test_round_trip_unknown_export_fails_with_the_server_message() -> None:
    client_events, _ = pump(ClientHandshake("nope"), ServerHandshake(catalog()))
    assert client_events == [HandshakeFailed(Opt.GO, Rep.ERR_UNKNOWN,
                                             "export 'nope' not present")]
    assert str(client_events[0]) == ("GO refused: NBD_REP_ERR_UNKNOWN: export 'nope' "
                                     "not present")


def test_round_trip_starttls_then_negotiation_starts_over() -> None:
    client = ClientHandshake("disk", meta_contexts=[BASE_ALLOCATION], tls=True)
    server = ServerHandshake(catalog(), tls=TlsMode.REQUIRE)
    client_events, server_events = pump(client, server)
    assert client_events == [StartTLS()]
    assert server_events == [StartTLS()]
    server.tls_started()  # both shells did the TLS handshake
    client.tls_started()
    assert client.tls_active
    client_events, server_events = pump(client, server)
    done = client_events[-1]
    assert isinstance(done, HandshakeComplete)
    assert (done.structured, done.meta_contexts) == (True, {BASE_ALLOCATION: 0})
    assert isinstance(server_events[-1], HandshakeDone)


def test_plaintext_client_to_tls_only_server_fails_with_tls_reqd() -> None:
    client_events, _ = pump(ClientHandshake("disk"), ServerHandshake(catalog(),
                                                                     tls=TlsMode.REQUIRE))
    assert [type(e) for e in client_events] == [OptionRefused, HandshakeFailed]
    refused, failed = client_events
    assert isinstance(refused, OptionRefused)
    assert isinstance(failed, HandshakeFailed)
    assert (refused.option, refused.rep) == (Opt.STRUCTURED_REPLY, Rep.ERR_TLS_REQD)
    assert (failed.option, failed.rep) == (Opt.GO, Rep.ERR_TLS_REQD)


def test_starttls_refused_is_fatal() -> None:
    client_events, _ = pump(ClientHandshake("disk", tls=True), ServerHandshake(catalog()))
    assert client_events == [HandshakeFailed(Opt.STARTTLS, Rep.ERR_POLICY,
                                             "TLS is not configured on this server")]


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_refused_structured_replies_are_optional(mode: str) -> None:
    client = ClientHandshake("disk", meta_contexts=[BASE_ALLOCATION])
    stream = (GREETING + opt_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, b"no such thing")
              + info_export(4096, 0x1 | TransmissionFlag.SEND_FLUSH) + opt_reply(Opt.GO, Rep.ACK)
              + b"\x67")
    events = feed_hs(client, stream, mode)
    assert events[0] == OptionRefused(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, "no such thing")
    done = events[1]
    assert isinstance(done, HandshakeComplete)
    assert (done.size, done.structured, done.meta_contexts) == (4096, False, {})
    assert done.flags == TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
    assert done.block_sizes is None
    assert done.trailing == (b"\x67" if mode == "whole" else b"")
    sent = options_sent(client.data_to_send()[4:])
    assert [option for option, _ in sent] == [Opt.STRUCTURED_REPLY, Opt.GO]  # no meta


@pytest.mark.parametrize("no_zeroes", [True, False])
@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_go_unsupported_falls_back_to_export_name(no_zeroes: bool, mode: str) -> None:
    client = ClientHandshake("disk", structured=False)
    greeting = wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 3 if no_zeroes else 1)
    reply = wire.EXPORT_NAME_REPLY.pack(5 * MiB, 0x3) + (b"" if no_zeroes else bytes(124))
    events = feed_hs(client, greeting + opt_reply(Opt.GO, Rep.ERR_UNSUP) + reply, mode)
    assert events[0] == OptionRefused(Opt.GO, Rep.ERR_UNSUP, "")
    done = events[1]
    assert isinstance(done, HandshakeComplete)
    assert (done.size, int(done.flags)) == (5 * MiB, 0x3)
    out = client.data_to_send()
    expected_flags = ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES if no_zeroes else 0)
    assert out[:4] == wire.CLIENT_FLAGS.pack(expected_flags)
    assert [o for o, _ in options_sent(out[4:])] == [Opt.GO, Opt.EXPORT_NAME]
    assert options_sent(out[4:])[1][1] == b"disk"


def test_info_replies_name_description_and_unknown_types() -> None:
    client = ClientHandshake("disk", structured=False)
    stream = (GREETING
              + opt_reply(Opt.GO, Rep.INFO, wire.INFO_TYPE.pack(Info.NAME) + b"canonical")
              + opt_reply(Opt.GO, Rep.INFO, wire.INFO_TYPE.pack(Info.DESCRIPTION) + b"words")
              + opt_reply(Opt.GO, Rep.INFO, wire.INFO_TYPE.pack(99) + b"ignored")
              + opt_reply(Opt.GO, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 512,
                                                                       4096, 65536))
              + info_export() + opt_reply(Opt.GO, Rep.ACK))
    (done,) = feed_hs(client, stream)
    assert isinstance(done, HandshakeComplete)
    assert (done.name, done.description) == ("canonical", "words")
    assert done.block_sizes == BlockSizes(512, 4096, 65536)
    assert ClientTransmission.from_handshake(done).max_payload == 65536


@pytest.mark.parametrize(("stream", "match"), [
    (b"NBDMAGXC" + GREETING[8:], "not an NBD server"),
    (wire.GREETING.pack(NBDMAGIC, 0x00420281861253, 0), "oldstyle"),
    (wire.GREETING.pack(NBDMAGIC, 0x1234, 3), "bad newstyle magic"),
    (wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 0), "fixed newstyle"),
    (GREETING + wire.OPTION_REPLY_HEADER.pack(0x1234, Opt.GO, Rep.ACK, 0), "reply magic"),
    (GREETING + opt_reply(Opt.LIST, Rep.ACK), "while waiting for GO"),
    (GREETING + wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.GO, Rep.INFO, 1 << 20),
     "option reply of"),
    (GREETING + opt_reply(Opt.GO, Rep.ACK), "without NBD_INFO_EXPORT"),
    (GREETING + opt_reply(Opt.GO, Rep.INFO, wire.INFO_TYPE.pack(Info.EXPORT) + bytes(11)),
     "NBD_INFO_EXPORT of"),
    (GREETING + opt_reply(Opt.GO, Rep.INFO, b"\0"), "INFO reply of 1"),
    (GREETING + opt_reply(Opt.GO, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(3, 0, 4096, 512)),
     "nonsense block sizes"),
    (GREETING + opt_reply(Opt.GO, Rep.SERVER, b"x"), "unexpected NBD_REP_SERVER"),
    (GREETING + info_export() + opt_reply(Opt.GO, Rep.ACK, b"x"), "ACK to GO with 1"),
])
def test_malformed_handshake_replies(stream: bytes, match: str) -> None:
    client = ClientHandshake("disk", structured=False)
    with pytest.raises(ProtocolError, match=match):
        feed_hs(client, stream)


@pytest.mark.parametrize(("reply", "match"), [
    (opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\x01qemu:dirty"),
     "not asked for"),
    (opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0"), "META_CONTEXT reply of 3"),
])
def test_malformed_meta_context_replies(reply: bytes, match: str) -> None:
    client = ClientHandshake("disk", meta_contexts=[BASE_ALLOCATION])
    feed_hs(client, GREETING + opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    with pytest.raises(ProtocolError, match=match):
        feed_hs(client, reply)


def test_meta_context_refusal_goes_on_without_contexts() -> None:
    client = ClientHandshake("disk", meta_contexts=[BASE_ALLOCATION])
    events = feed_hs(client, GREETING + opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK)
                     + opt_reply(Opt.SET_META_CONTEXT, Rep.ERR_INVALID, b"bad")
                     + info_export() + opt_reply(Opt.GO, Rep.ACK))
    assert events[0] == OptionRefused(Opt.SET_META_CONTEXT, Rep.ERR_INVALID, "bad")
    assert isinstance(events[1], HandshakeComplete)
    assert (events[1].structured, events[1].meta_contexts) == (True, {})


def test_plaintext_after_starttls_ack_is_refused() -> None:
    """Injected bytes after the STARTTLS ACK must not be read as server replies."""
    client = ClientHandshake("disk", tls=True)
    with pytest.raises(ProtocolError, match="after its STARTTLS ACK"):
        feed_hs(client, GREETING + opt_reply(Opt.STARTTLS, Rep.ACK) + info_export())


def test_handshake_misuse() -> None:
    client = ClientHandshake("disk")
    with pytest.raises(LocalProtocolError):
        client.tls_started()
    with pytest.raises(LocalProtocolError):
        ClientHandshake("x" * 4097)
    done = ClientHandshake("disk", structured=False)
    feed_hs(done, GREETING + info_export() + opt_reply(Opt.GO, Rep.ACK))
    with pytest.raises(LocalProtocolError):
        done.next_event()


# -- transmission: every reply type, fed three ways ----------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_simple_replies(mode: str) -> None:
    core = tx(structured=False)
    write = core.write(b"w" * 512, 0)
    failed = core.write(b"w" * 512, 512, fua=True)
    read = core.read(4096, 8)
    bad_read = core.read(0, 8)
    stream = (simple(failed, Errno.ENOSPC) + simple(read, 0, b"abcdefgh") + simple(write)
              + simple(bad_read, Errno.EIO))
    assert feed_tx(core, stream, mode) == [
        Completion(failed, Cmd.WRITE, error=Errno.ENOSPC),
        Completion(read, Cmd.READ, data=b"abcdefgh"),
        Completion(write, Cmd.WRITE),
        Completion(bad_read, Cmd.READ, error=Errno.EIO),
    ]
    assert core.in_flight == 0


@pytest.mark.parametrize("mode", MODES)
def test_structured_none_and_simple_non_read_replies(mode: str) -> None:
    core = tx()
    flush, trim, zero = core.flush(), core.trim(0, 4096), core.write_zeroes(0, 4096)
    stream = chunk(flush, ReplyType.NONE) + simple(trim) + simple(zero, Errno.EPERM)
    assert feed_tx(core, stream, mode) == [Completion(flush, Cmd.FLUSH),
                                           Completion(trim, Cmd.TRIM),
                                           Completion(zero, Cmd.WRITE_ZEROES, error=Errno.EPERM)]


@pytest.mark.parametrize("mode", MODES)
def test_read_data_and_holes_in_any_order(mode: str) -> None:
    core = tx()
    cookie = core.read(1000, 40)
    stream = (data_chunk(cookie, 1030, b"C" * 10, done=False)
              + hole_chunk(cookie, 1010, 20, done=False)
              + data_chunk(cookie, 1000, b"A" * 10, done=False)
              + chunk(cookie, ReplyType.NONE))
    assert feed_tx(core, stream, mode) == [
        Completion(cookie, Cmd.READ, data=b"A" * 10 + bytes(20) + b"C" * 10)]


@pytest.mark.parametrize("mode", MODES)
def test_read_in_one_data_chunk(mode: str) -> None:
    core = tx()
    cookie = core.read(0, 4096)
    payload = bytes(range(256)) * 16
    assert feed_tx(core, data_chunk(cookie, 0, payload), mode) == [
        Completion(cookie, Cmd.READ, data=payload)]


@pytest.mark.parametrize("mode", MODES)
def test_interleaved_chunks_of_two_reads(mode: str) -> None:
    core = tx()
    a, b = core.read(0, 8), core.read(8, 8)
    stream = (data_chunk(b, 12, b"bbbb", done=False) + data_chunk(a, 0, b"aaaa", done=False)
              + data_chunk(b, 8, b"BBBB") + hole_chunk(a, 4, 4))
    assert feed_tx(core, stream, mode) == [Completion(b, Cmd.READ, data=b"BBBBbbbb"),
                                           Completion(a, Cmd.READ, data=b"aaaa" + bytes(4))]


@pytest.mark.parametrize("mode", MODES)
def test_error_chunks(mode: str) -> None:
    core = tx()
    write, read, trim, other = (core.write(b"x" * 16, 0), core.read(0, 64), core.trim(64, 64),
                                core.flush())
    stream = (error_chunk(write, Errno.ENOSPC, "disk full")
              + data_chunk(read, 0, b"d" * 32, done=False)
              + error_chunk(read, Errno.EIO, "bad sector", offset=40, done=False)
              + error_chunk(read, Errno.EINVAL, "second error is ignored", offset=50,
                            done=False)
              + chunk(read, ReplyType.NONE)
              + error_chunk(trim, Errno.EPERM, "", offset=64)
              + chunk(other, 0x8123, wire.U32.pack(Errno.ENOTSUP) + b"???"))
    assert feed_tx(core, stream, mode) == [
        Completion(write, Cmd.WRITE, error=Errno.ENOSPC, message="disk full"),
        Completion(read, Cmd.READ, error=Errno.EIO, message="bad sector", error_offset=40),
        Completion(trim, Cmd.TRIM, error=Errno.EPERM, error_offset=64),
        Completion(other, Cmd.FLUSH, error=Errno.ENOTSUP,
                   message="unknown error chunk type 0x8123"),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_block_status(mode: str) -> None:
    core = tx()
    cookie = core.block_status(0, 8192)
    one = core.block_status(0, 8192, req_one=True)
    stream = (status_chunk(cookie, 7, [(4096, 0), (65536, 3)])
              + status_chunk(one, 7, [(4096, 0)]))
    assert feed_tx(core, stream, mode) == [
        Completion(cookie, Cmd.BLOCK_STATUS, extents={BASE_ALLOCATION: [(4096, 0), (65536, 3)]}),
        Completion(one, Cmd.BLOCK_STATUS, extents={BASE_ALLOCATION: [(4096, 0)]}),
    ]


def test_requests_on_the_wire() -> None:
    core = tx()
    cookies = [core.read(512, 1024), core.write(b"p" * 4, 8, fua=True), core.flush(),
               core.trim(0, 4096, fua=True),
               core.write_zeroes(4096, 4096, no_hole=True, fast_zero=True),
               core.block_status(0, MiB, req_one=True)]
    assert len(set(cookies)) == len(cookies)
    out = core.data_to_send()
    expected = [(0, Cmd.READ, 512, 1024), (CmdFlag.FUA, Cmd.WRITE, 8, 4),
                (0, Cmd.FLUSH, 0, 0), (CmdFlag.FUA, Cmd.TRIM, 0, 4096),
                (CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, Cmd.WRITE_ZEROES, 4096, 4096),
                (CmdFlag.REQ_ONE, Cmd.BLOCK_STATUS, 0, MiB)]
    pos = 0
    for cookie, (flags, cmd, offset, length) in zip(cookies, expected, strict=True):
        assert wire.REQUEST.unpack_from(out, pos) == (REQUEST_MAGIC, flags, cmd, cookie,
                                                      offset, length)
        pos += wire.REQUEST.size + (length if cmd == Cmd.WRITE else 0)
        if cmd == Cmd.WRITE:
            assert out[pos - 4:pos] == b"pppp"
    assert pos == len(out)
    core.disconnect()
    disc = core.data_to_send()
    assert wire.REQUEST.unpack(disc)[2] == Cmd.DISC
    assert core.in_flight == len(cookies)
    with pytest.raises(LocalProtocolError):
        core.flush()


@pytest.mark.parametrize(("make", "match"), [
    (lambda c: c.read(MiB - 1, 2), "outside"),
    (lambda c: c.read(0, 0), "read of 0"),
    (lambda c: c.write(b"", 0), "write of 0"),
    (lambda c: c.block_status(0, 0), "zero length"),
])
def test_request_misuse(make: Callable[[ClientTransmission], int], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        make(tx())


def test_unadvertised_features_are_refused_locally() -> None:
    core = tx(structured=False, flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY)
    makers: list[Callable[[], int]] = [
        core.flush, lambda: core.trim(0, 1), lambda: core.write(b"x", 0),
        lambda: core.write_zeroes(0, 1), lambda: core.block_status(0, 1)]
    for make in makers:
        with pytest.raises(LocalProtocolError):
            make()
    assert core.data_to_send() == b""


# -- malformed replies ---------------------------------------------------------------------


def _malformed_cases() -> list[tuple[str, Callable[[ClientTransmission], bytes], str]]:
    return [
        ("bad magic", lambda c: b"\x12\x34\x56\x78" + bytes(12), "bad reply magic"),
        ("extended magic", lambda c: wire.U32.pack(EXTENDED_REPLY_MAGIC) + bytes(28),
         "bad reply magic"),
        ("unknown cookie", lambda c: simple(999), "unknown cookie"),
        ("simple read after structured", lambda c: simple(c.read(0, 4), 0, b"abcd"),
         "simple reply to READ"),
        ("simple after chunks", lambda c: (lambda k: data_chunk(k, 0, b"ab", done=False)
                                           + simple(k))(c.read(0, 4)), "after structured"),
        ("data outside", lambda c: data_chunk(c.read(0, 4), 2, b"abcd"), "longer|outside"),
        ("data before", lambda c: data_chunk(c.read(100, 4), 98, b"ab"), "outside"),
        ("overlap", lambda c: (lambda k: data_chunk(k, 0, b"ab", done=False)
                               + data_chunk(k, 1, b"cd"))(c.read(0, 4)), "overlaps"),
        ("short read", lambda c: data_chunk(c.read(0, 4), 0, b"ab"), "covered 2 of 4"),
        ("empty data", lambda c: chunk(c.read(0, 4), ReplyType.OFFSET_DATA, bytes(8)),
         "OFFSET_DATA chunk of 8"),
        ("hole size 0", lambda c: hole_chunk(c.read(0, 4), 0, 0), "zero length"),
        ("hole length", lambda c: chunk(c.read(0, 4), ReplyType.OFFSET_HOLE, bytes(8)),
         "OFFSET_HOLE chunk of 8"),
        ("data for write", lambda c: data_chunk(c.write(b"x", 0), 0, b"x"), "for WRITE"),
        ("none with payload", lambda c: chunk(c.flush(), ReplyType.NONE, b"x"), "payload"),
        ("none not done", lambda c: chunk(c.flush(), ReplyType.NONE, done=False),
         "without the DONE"),
        ("unknown type", lambda c: chunk(c.flush(), 3, b""), "unknown structured chunk"),
        ("status ext", lambda c: chunk(c.block_status(0, 4), ReplyType.BLOCK_STATUS_EXT,
                                       bytes(24)), "unknown structured chunk"),
        ("status for read", lambda c: status_chunk(c.read(0, 4), 7, [(4, 0)]),
         "BLOCK_STATUS chunk for READ"),
        ("status length", lambda c: chunk(c.block_status(0, 4), ReplyType.BLOCK_STATUS,
                                          bytes(13)), "BLOCK_STATUS chunk of 13"),
        ("status context", lambda c: status_chunk(c.block_status(0, 4), 8, [(4, 0)]),
         "unknown context id 8"),
        ("status twice", lambda c: (lambda k: status_chunk(k, 7, [(4, 0)], done=False)
                                    + status_chunk(k, 7, [(4, 0)]))(c.block_status(0, 4)),
         "two BLOCK_STATUS"),
        ("status zero extent", lambda c: status_chunk(c.block_status(0, 4), 7, [(0, 0)]),
         "zero length"),
        ("status past length", lambda c: status_chunk(c.block_status(0, 4), 7,
                                                      [(4, 0), (4, 3)]), "run past"),
        ("req_one two extents", lambda c: status_chunk(
            c.block_status(0, 8, req_one=True), 7, [(4, 0), (4, 3)]), "REQ_ONE"),
        ("status missing", lambda c: chunk(c.block_status(0, 4), ReplyType.NONE),
         "without context"),
        ("error value 0", lambda c: error_chunk(c.flush(), 0, "x"), "error value 0"),
        ("error too short", lambda c: chunk(c.flush(), ReplyType.ERROR, b"\0\0\0\x05"),
         "error chunk of 4"),
        ("message overrun", lambda c: chunk(c.flush(), ReplyType.ERROR,
                                            wire.ERROR_CHUNK.pack(5, 10) + b"abc"),
         "overruns"),
        ("error offset outside", lambda c: error_chunk(c.read(0, 4), 5, "x", offset=4),
         "outside the request"),
        ("error offset for flush", lambda c: error_chunk(c.flush(), 5, "x", offset=0),
         "ERROR_OFFSET chunk for FLUSH"),
        ("huge error chunk", lambda c: wire.STRUCTURED_CHUNK.pack(
            STRUCTURED_REPLY_MAGIC, 1, ReplyType.ERROR, c.flush(), 1 << 20), "bytes of payload"),
    ]


@pytest.mark.parametrize(("make", "match"), [(m, r) for _, m, r in _malformed_cases()],
                         ids=[name for name, _, _ in _malformed_cases()])
def test_malformed_replies(make: Callable[[ClientTransmission], bytes], match: str) -> None:
    core = tx()
    stream = make(core)
    with pytest.raises(ProtocolError, match=match):
        feed_tx(core, stream, "whole")
    with pytest.raises(ProtocolError):  # the stream cannot go on
        core.next_event()


def test_structured_reply_without_negotiation_is_a_protocol_error() -> None:
    core = tx(structured=False)
    with pytest.raises(ProtocolError, match="without STRUCTURED_REPLY"):
        feed_tx(core, chunk(core.flush(), ReplyType.NONE), "whole")


# -- arbitrary input -------------------------------------------------------------------------


def _drain(core: ClientTransmission) -> None:
    for _ in range(10_000):
        event = core.next_event()
        if event is NEED_DATA:
            return
        assert isinstance(event, Completion)
    raise AssertionError("next_event never asked for more data")


def _fuzz_core() -> tuple[ClientTransmission, list[int]]:
    core = tx()
    cookies = [core.read(0, 16), core.write(b"x" * 8, 0), core.block_status(0, 64),
               core.flush(), core.read(32, 4)]
    return core, cookies


_message = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda cookie, error, data: simple(cookie, error) + data,
              st.integers(1, 6), st.sampled_from([0, 5, 22]), st.binary(max_size=20)),
    st.builds(lambda flags, kind, cookie, payload: wire.STRUCTURED_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload,
        st.integers(0, 3), st.sampled_from([0, 1, 2, 5, 6, 0x8001, 0x8002, 0x8003, 7]),
        st.integers(1, 6), st.binary(max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_message, max_size=8), st.integers(1, 64))
def test_arbitrary_replies_give_completions_or_protocol_errors(messages: list[bytes],
                                                               step: int) -> None:
    core, _ = _fuzz_core()
    data = b"".join(messages)
    try:
        for pos in range(0, len(data), step):
            core.receive_data(data[pos:pos + step])
            _drain(core)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_give_completions_or_protocol_errors(data: bytes) -> None:
    core, _ = _fuzz_core()
    try:
        core.receive_data(data)
        _drain(core)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_handshake_bytes_give_events_or_protocol_errors(data: bytes,
                                                                  greet: bool) -> None:
    client = ClientHandshake("disk", meta_contexts=[BASE_ALLOCATION])
    try:
        events = feed_hs(client, (GREETING if greet else b"") + data)
    except ProtocolError:
        return
    for event in events:
        assert isinstance(event, (HandshakeComplete, HandshakeFailed, OptionRefused, StartTLS))


# -- transmission: wired to ServerTransmission -----------------------------------------------


class Disk:
    """The test's backend: serves ServerTransmission requests from a bytearray."""

    def __init__(self, server: ServerTransmission, size: int) -> None:
        self.server = server
        self.data = bytearray(size)

    def serve(self, request: Request) -> list[bytes | bytearray | memoryview]:
        s = self.server
        end = request.offset + request.length
        if request.cmd == Cmd.READ:
            piece = bytes(self.data[request.offset:end])
            if s.negotiated.structured and request.length >= 8 and not any(piece[4:]):
                # data then a hole, as a sparse server sends it
                return s.reply_read_sparse(request.cookie, [
                    (request.offset, 4, piece[:4]),
                    (request.offset + 4, request.length - 4, None)])
            return s.reply_read(request.cookie, request.offset, piece)
        if request.cmd == Cmd.WRITE:
            assert request.payload is not None
            self.data[request.offset:end] = request.payload
        elif request.cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            self.data[request.offset:end] = bytes(request.length)
        elif request.cmd == Cmd.BLOCK_STATUS:
            return s.reply_block_status(request.cookie, [(0, [(request.length, 0)])])
        return s.reply_ok(request.cookie)


def connected(structured: bool) -> tuple[ClientTransmission, ServerTransmission]:
    client = ClientHandshake("disk", structured=structured, meta_contexts=[BASE_ALLOCATION])
    server = ServerHandshake(catalog())
    client_events, server_events = pump(client, server)
    done, server_done = client_events[-1], server_events[-1]
    assert isinstance(done, HandshakeComplete)
    assert isinstance(server_done, HandshakeDone)
    return (ClientTransmission.from_handshake(done),
            ServerTransmission(server_done.negotiated))


@pytest.mark.parametrize("structured", [True, False])
def test_round_trip_transmission_out_of_order(structured: bool) -> None:
    client, server = connected(structured)
    disk = Disk(server, MiB)
    cookies = {
        "write": client.write(b"hello world!", 100, fua=True),
        "zero": client.write_zeroes(104, 2, no_hole=True),
        "flush": client.flush(),
    }
    requests: list[Request] = []
    server.receive_data(client.data_to_send())
    while (event := server.next_event()) is not NEED_DATA:
        assert isinstance(event, Request)
        requests.append(event)
    assert [(r.cookie, r.offset, r.length) for r in requests] == [
        (cookies["write"], 100, 12), (cookies["zero"], 104, 2), (cookies["flush"], 0, 0)]
    assert requests[0].flags == CmdFlag.FUA
    replies = [b"".join(disk.serve(r)) for r in requests]
    client.receive_data(b"".join(reversed(replies)))  # the server may answer in any order
    done = []
    while (completion := client.next_event()) is not NEED_DATA:
        assert isinstance(completion, Completion)
        done.append((completion.cookie, completion.ok))
    assert done == [(cookies["flush"], True), (cookies["zero"], True), (cookies["write"], True)]

    read, sparse = client.read(100, 12), client.read(200, 64)
    past_end = client.request(Cmd.READ, offset=MiB - 4, length=8)
    status = client.block_status(0, 4096) if structured else None
    server.receive_data(client.data_to_send())
    out = []
    while (event := server.next_event()) is not NEED_DATA:
        if isinstance(event, InvalidRequest):
            out.append(b"".join(server.reply_error(event.cookie, event.errno, event.message)))
        else:
            assert isinstance(event, Request)
            out.append(b"".join(disk.serve(event)))
    client.receive_data(b"".join(out))
    results = {}
    while (completion := client.next_event()) is not NEED_DATA:
        assert isinstance(completion, Completion)
        results[completion.cookie] = completion
    assert results[read].data == b"hell\0\0world!"
    assert results[sparse].data == bytes(64)
    assert results[past_end].error == Errno.EINVAL
    assert results[past_end].message == ("request past the end of the 1048576-byte export"
                                         if structured else "")
    if status is not None:
        assert results[status].extents == {BASE_ALLOCATION: [(4096, 0)]}
    assert client.in_flight == 0


def test_cookies_are_unique_among_requests_in_flight() -> None:
    core = tx()
    cookies = {core.flush() for _ in range(1000)}
    assert len(cookies) == 1000
    assert struct.unpack(">Q", core.data_to_send()[8:16])[0] in cookies
