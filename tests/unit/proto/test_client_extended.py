"""The client cores with extended headers: ``ClientHandshake`` asking for
NBD_OPT_EXTENDED_HEADERS and ``ClientTransmission`` speaking 32-byte headers.

The client cores talk to the server cores (bytes passed by hand), so both
sides of every rule are checked together; malformed replies are built by hand.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest
from tests.support.fakes import FakeCatalog, FakeExport

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
    REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Errno,
    HandshakeFlag,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from pynbd.proto.errors import LocalProtocolError, ProtocolError
from pynbd.proto.events import NEED_DATA, HandshakeDone, Request
from pynbd.proto.extended import ExtendedTransmission
from pynbd.proto.handshake import ServerHandshake
from pynbd.proto.transmission import ServerTransmission

if TYPE_CHECKING:
    from pynbd.proto.wire import Buffer

BIG = FakeExport("big", size=1 << 40)
CATALOG = FakeCatalog(BIG)


class Refusing(ServerHandshake):
    """A server from before the extension: option 11 is unknown to it."""

    def __init__(self, catalog: FakeCatalog) -> None:
        super().__init__(catalog)
        del self._handlers[Opt.EXTENDED_HEADERS]


def negotiate(client: ClientHandshake, server: ServerHandshake,
              ) -> tuple[HandshakeComplete, HandshakeDone, list[object]]:
    """Run both handshakes to the end; the client's events along the way."""
    events: list[object] = []
    done: HandshakeDone | None = None
    for _ in range(100):
        server_out = server.data_to_send()
        if server_out:
            client.receive_data(server_out)
        event = client.next_event()
        server.receive_data(client.data_to_send())
        if done is None:
            server_event = server.next_event()
            if isinstance(server_event, HandshakeDone):
                done = server_event
        if isinstance(event, HandshakeComplete):
            assert done is not None
            return event, done, events
        if event is not NEED_DATA:
            events.append(event)
            assert not isinstance(event, HandshakeFailed), event
    raise AssertionError("the handshake did not finish")


def test_extended_headers_are_negotiated_when_asked_for() -> None:
    complete, done, events = negotiate(
        ClientHandshake("big", extended=True, meta_contexts=[BASE_ALLOCATION]),
        ServerHandshake(CATALOG))
    assert events == []
    assert complete.extended
    assert complete.structured
    assert done.negotiated.extended
    assert complete.meta_contexts == {BASE_ALLOCATION: 0}


def test_structured_reply_is_not_sent_once_extended_headers_are_on() -> None:
    client = ClientHandshake("big", extended=True)
    client.receive_data(wire.GREETING.pack(NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE))
    assert client.next_event() is NEED_DATA
    sent = client.data_to_send()
    assert wire.OPTION_HEADER.unpack_from(sent, 4)[1] == Opt.EXTENDED_HEADERS
    client.receive_data(wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.EXTENDED_HEADERS,
                                                      Rep.ACK, 0))
    assert client.next_event() is NEED_DATA
    assert wire.OPTION_HEADER.unpack_from(client.data_to_send())[1] == Opt.GO


def test_the_default_and_turned_off_ask_for_structured_replies_only() -> None:
    for client in (ClientHandshake("big"), ClientHandshake("big", extended=False)):
        complete, done, _ = negotiate(client, ServerHandshake(CATALOG))
        assert not complete.extended
        assert complete.structured
        assert not done.negotiated.extended


def test_a_server_without_the_extension_gets_structured_replies() -> None:
    complete, done, events = negotiate(ClientHandshake("big", extended=True),
                                       Refusing(CATALOG))
    assert [(e.option, e.rep) for e in events if isinstance(e, OptionRefused)] == [
        (Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP)]
    assert not complete.extended
    assert complete.structured
    assert done.negotiated.structured


def test_no_export_name_fallback_after_extended_headers() -> None:
    client = ClientHandshake("big", extended=True)
    client.receive_data(wire.GREETING.pack(NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE))
    client.next_event()
    client.receive_data(wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.EXTENDED_HEADERS,
                                                      Rep.ACK, 0)
                        + wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.GO,
                                                        Rep.ERR_UNSUP, 0))
    event = client.next_event()
    assert isinstance(event, HandshakeFailed)
    assert event.option == Opt.GO


# -- transmission: the client core against the server core ----------------------------------


def pair(*, extended: bool = True) -> tuple[ClientTransmission, ServerTransmission]:
    complete, done, _ = negotiate(
        ClientHandshake("big", extended=extended, meta_contexts=[BASE_ALLOCATION]),
        ServerHandshake(CATALOG))
    client = ClientTransmission.from_handshake(complete)
    server = (ExtendedTransmission if extended else ServerTransmission)(done.negotiated)
    return client, server


def requests(client: ClientTransmission, server: ServerTransmission) -> list[Request]:
    server.receive_data(client.data_to_send())
    got = []
    while (event := server.next_event()) is not NEED_DATA:
        assert isinstance(event, Request), event
        got.append(event)
    return got


def completion(client: ClientTransmission, reply: list[Buffer]) -> Completion:
    client.receive_data(b"".join(bytes(b) for b in reply))
    event = client.next_event()
    assert isinstance(event, Completion)
    return event


def test_requests_are_extended_with_64_bit_lengths() -> None:
    client, server = pair()
    client.trim(0, 1 << 39)
    client.write_zeroes(4096, (1 << 40) - 4096)
    client.write(b"abc", 512)
    sent = client.data_to_send()
    assert wire.EXTENDED_REQUEST.unpack_from(sent)[0] == EXTENDED_REQUEST_MAGIC
    server.receive_data(sent)
    got = []
    while (event := server.next_event()) is not NEED_DATA:
        got.append(event)
    assert [(e.cmd, e.offset, e.length) for e in got if isinstance(e, Request)] == [
        (Cmd.TRIM, 0, 1 << 39), (Cmd.WRITE_ZEROES, 4096, (1 << 40) - 4096),
        (Cmd.WRITE, 512, 3)]
    write = got[2]
    assert isinstance(write, Request)
    assert write.payload == b"abc"
    assert write.flags == 0  # PAYLOAD_LEN was on the wire, the parser took it off


def test_lengths_over_32_bits_need_extended_headers() -> None:
    client, _ = pair(extended=False)
    with pytest.raises(LocalProtocolError, match="extended"):
        client.trim(0, 1 << 32)


def test_round_trips_of_every_reply_kind() -> None:
    client, server = pair()
    cookie = client.write(b"data", 8)
    (request,) = requests(client, server)
    assert completion(client, server.reply_ok(request.cookie)) == Completion(cookie, Cmd.WRITE)
    cookie = client.read(8, 4)
    (request,) = requests(client, server)
    assert completion(client, server.reply_read(request.cookie, 8, b"data")).data == b"data"
    cookie = client.read(4096, 8192)
    (request,) = requests(client, server)
    got = completion(client, server.reply_read_sparse(
        request.cookie, [(4096, 4096, None), (8192, 4096, b"x" * 4096)]))
    assert got.data == bytes(4096) + b"x" * 4096
    cookie = client.block_status(0, 1 << 40)
    (request,) = requests(client, server)
    extents = [(3 << 32, 3), ((1 << 40) - (3 << 32), 0)]
    got = completion(client, server.reply_block_status(request.cookie, [(0, extents)]))
    assert got.extents == {BASE_ALLOCATION: extents}
    cookie = client.trim(512, 512)
    (request,) = requests(client, server)
    got = completion(client, server.reply_error(request.cookie, Errno.EIO, "no", offset=600))
    assert (got.cookie, got.error, got.message, got.error_offset) == (cookie, Errno.EIO, "no",
                                                                      600)


def chunk(kind: int, cookie: int, offset: int, payload: bytes, *,
          flags: int = ReplyFlag.DONE) -> bytes:
    return wire.EXTENDED_CHUNK.pack(EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset,
                                    len(payload)) + payload


@pytest.mark.parametrize(("make", "message"), [
    (lambda c: struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, c) + bytes(16), "bad reply magic"),
    (lambda c: struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 0, c, 0) + bytes(12),
     "bad reply magic"),
    (lambda c: chunk(ReplyType.NONE, c, 4095, b""), "offset"),
    (lambda c: chunk(ReplyType.BLOCK_STATUS, c, 4096, struct.pack(">III", 0, 512, 0)),
     "extended headers on"),
    (lambda c: chunk(ReplyType.BLOCK_STATUS_EXT, c, 4096,
                     struct.pack(">IIQQ", 0, 2, 512, 0)), "counts 2"),
    (lambda c: chunk(ReplyType.BLOCK_STATUS_EXT, c, 4096,
                     struct.pack(">IIQQ", 0, 1, 0, 0)), "zero length"),
])
def test_malformed_extended_replies(make: object, message: str) -> None:
    client, _ = pair()
    cookie = client.block_status(4096, 8192)
    client.receive_data(make(cookie))  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=message):
        client.next_event()


def test_block_status_ext_without_extended_headers_is_refused() -> None:
    client, _ = pair(extended=False)
    cookie = client.block_status(0, 512)
    client.receive_data(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1,
                                    ReplyType.BLOCK_STATUS_EXT, cookie, 24)
                        + struct.pack(">IIQQ", 0, 1, 512, 0))
    with pytest.raises(ProtocolError, match="unknown structured chunk"):
        client.next_event()


def test_flags_the_client_sees() -> None:
    client, _ = pair()
    assert client.extended
    assert client.flags & TransmissionFlag.SEND_DF
    assert client.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD  # a context was selected
