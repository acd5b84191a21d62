"""ServerHandshake: every option, fed whole, byte by byte and with trailing bytes.

Targets: nbd-protocol.md section 2 (fixed-newstyle haggling) and qemu's choices
where the spec leaves room.  Every message goes through ``three_ways``, which
feeds it to three fresh cores (whole, one byte at a time, and with the start of
a further message appended) and insists on identical events and output bytes.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

import pytest
from tests.support.fakes import FakeCatalog, FakeExport
from tests.support.wire import option_replies as replies

from pynbd.block import MemoryNode
from pynbd.proto import wire
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    NBDMAGIC,
    REPLY_MAGIC,
    ClientFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.proto.errors import ProtocolError
from pynbd.proto.events import NEED_DATA, HandshakeClosed, HandshakeDone
from pynbd.proto.handshake import ServerHandshake
from pynbd.server.export import Export, ExportTable

if TYPE_CHECKING:
    from pynbd.proto.negotiated import Negotiated

# -- a tiny in-test catalog -------------------------------------------------------------




DEFAULT = FakeExport("", size=1 << 20)
DISK = FakeExport("disk", size=64 << 20, description="the main disk")
RO = FakeExport("ro", size=12345, read_only=True, multi_conn=False)
UNICODE = FakeExport("d\u00efsk-\u20ac", size=4096, description="\u00fcber")
CATALOG = FakeCatalog(DEFAULT, DISK, RO, UNICODE)

# -- message builders -------------------------------------------------------------------

FIXED_NZ = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES
CLIENT = wire.CLIENT_FLAGS.pack(FIXED_NZ)
#: the start of one more option header, which never completes
TRAIL = wire.OPTION_HEADER.pack(IHAVEOPT, Opt.LIST, 0)[:11]
GREETING = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


def option(code: int, data: bytes = b"", *, length: int | None = None,
           magic: int = IHAVEOPT) -> bytes:
    size = len(data) if length is None else length
    return wire.OPTION_HEADER.pack(magic, code, size) + data


def info_data(name: str | bytes, requests: tuple[int, ...] = (), *,
              name_len: int | None = None, count: int | None = None,
              extra: bytes = b"") -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    n = len(raw) if name_len is None else name_len
    k = len(requests) if count is None else count
    return (struct.pack(">I", n) + raw + struct.pack(">H", k)
            + b"".join(struct.pack(">H", r) for r in requests) + extra)


def meta_data(name: str | bytes, queries: tuple[str | bytes, ...] = (), *,
              count: int | None = None, extra: bytes = b"") -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    q = len(queries) if count is None else count
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", q)
    for query in queries:
        qraw = query.encode() if isinstance(query, str) else query
        out += struct.pack(">I", len(qraw)) + qraw
    return out + extra


LIST = option(Opt.LIST)
STRUCTURED = option(Opt.STRUCTURED_REPLY)


def go(name: str, *requests: int) -> bytes:
    return option(Opt.GO, info_data(name, requests))


# -- the driver ---------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    greeting: bytes
    #: everything sent after the greeting
    out: bytes
    #: events other than NEED_DATA, and a ProtocolError if one was raised
    events: list[object]
    core: ServerHandshake

    @property
    def last(self) -> object:
        assert self.events, "no event came out"
        return self.events[-1]

    @property
    def done(self) -> HandshakeDone:
        assert len(self.events) == 1, self.events
        assert isinstance(self.events[0], HandshakeDone), self.events
        return self.events[0]

    @property
    def negotiated(self) -> Negotiated:
        return self.done.negotiated


def run(stream: bytes, chunks: list[bytes] | None = None, *,
        catalog: FakeCatalog = CATALOG, refusal: str | None = None) -> Run:
    """Feed ``chunks`` (default: ``stream`` whole), draining events after each."""
    core = ServerHandshake(catalog, refusal=refusal)
    greeting = core.data_to_send()
    events: list[object] = []
    out = bytearray()
    for chunk in [stream] if chunks is None else chunks:
        core.receive_data(chunk)
        for _ in range(10_000):
            try:
                event = core.next_event()
            except ProtocolError as err:
                events.append(err)
                return Run(greeting, bytes(out + core.data_to_send()), events, core)
            out += core.data_to_send()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, HandshakeDone | HandshakeClosed):
                return Run(greeting, bytes(out + core.data_to_send()), events, core)
        else:
            pytest.fail("next_event never asked for data")
    out += core.data_to_send()
    return Run(greeting, bytes(out), events, core)


def _comparable(events: list[object]) -> list[object]:
    result: list[object] = []
    for event in events:
        if isinstance(event, HandshakeDone):
            result.append(("done", event.negotiated))
        elif isinstance(event, ProtocolError):
            result.append(("protocol-error", str(event), event.cookie))
        else:
            result.append(event)
    return result


def three_ways(stream: bytes, *, catalog: FakeCatalog = CATALOG,
               refusal: str | None = None) -> Run:
    """Run ``stream`` whole, byte by byte and with TRAIL appended; all must agree."""
    whole = run(stream, catalog=catalog, refusal=refusal)
    bytewise = run(stream, [stream[i:i + 1] for i in range(len(stream))],
                   catalog=catalog, refusal=refusal)
    trailing = run(stream + TRAIL, catalog=catalog, refusal=refusal)
    for other in (bytewise, trailing):
        assert other.greeting == whole.greeting == GREETING
        assert other.out == whole.out
        assert _comparable(other.events) == _comparable(whole.events)
    if whole.events and isinstance(whole.last, HandshakeDone):
        assert isinstance(trailing.last, HandshakeDone)
        assert trailing.last.trailing == whole.last.trailing + TRAIL
        assert isinstance(bytewise.last, HandshakeDone)
        assert bytewise.last.trailing == b""
    elif not whole.events:
        assert whole.core.pending_bytes == 0
        assert bytewise.core.pending_bytes == 0
        assert trailing.core.pending_bytes == len(TRAIL)
    return whole


def info_replies(out: bytes, opt: int) -> tuple[dict[int, bytes], list[tuple[int, int, bytes]]]:
    """INFO payloads by info type (each type at most once), and all replies."""
    all_replies = replies(out)
    infos: dict[int, bytes] = {}
    for code, rep, data in all_replies:
        assert code == opt
        if rep == Rep.INFO:
            (kind,) = struct.unpack_from(">H", data)
            assert kind not in infos, f"info {kind} sent twice"
            infos[kind] = data[2:]
    return infos, all_replies


def assert_one_reply(out: bytes, opt: int, rep: Rep) -> bytes:
    got = replies(out)
    assert [(o, r) for o, r, _ in got] == [(opt, rep)], got
    return got[0][2]


def assert_list_works(data: bytes) -> None:
    """The replies that a LIST sent after something else must end with."""
    got = replies(data)[-5:]
    assert [(o, r) for o, r, _ in got] == [(Opt.LIST, Rep.SERVER)] * 4 + [(Opt.LIST, Rep.ACK)]


# -- greeting and client flags ------------------------------------------------------------


def test_greeting_bytes_exact() -> None:
    core = ServerHandshake(CATALOG)
    greeting = core.data_to_send()
    assert greeting == GREETING
    assert wire.GREETING.unpack(greeting) == (NBDMAGIC, IHAVEOPT, 0x0003)
    assert core.data_to_send() == b""
    assert core.next_event() is NEED_DATA
    assert core.data_to_send() == b""


@pytest.mark.parametrize("flags", [0b01, 0b11, 0b10, 0])
def test_known_client_flags_wait_for_options(flags: int) -> None:
    result = three_ways(wire.CLIENT_FLAGS.pack(flags))
    assert result.events == []
    assert result.out == b""


@pytest.mark.parametrize("flags", [0b100, 0b101, 0x8000_0000, 0xFFFF_FFFF, 0x0000_0103])
def test_unknown_client_flags_are_a_protocol_error(flags: int) -> None:
    result = three_ways(wire.CLIENT_FLAGS.pack(flags) + LIST)
    assert len(result.events) == 1
    assert isinstance(result.last, ProtocolError)
    assert result.out == b""


@pytest.mark.parametrize("flags", [0, ClientFlag.C_NO_ZEROES])
def test_non_fixed_client_export_name_works(flags: int) -> None:
    result = three_ways(wire.CLIENT_FLAGS.pack(flags) + option(Opt.EXPORT_NAME, b"disk"))
    assert result.negotiated.export == DISK
    expected_len = 10 if flags & ClientFlag.C_NO_ZEROES else 134
    assert len(result.out) == expected_len


@pytest.mark.parametrize("stream", [
    LIST,
    go("disk"),
    option(Opt.INFO, info_data("disk")),
    STRUCTURED,
    option(Opt.ABORT),
    option(99),
])
def test_non_fixed_client_any_other_option_is_a_protocol_error(stream: bytes) -> None:
    result = three_ways(wire.CLIENT_FLAGS.pack(0) + stream)
    assert len(result.events) == 1
    assert isinstance(result.last, ProtocolError)
    assert result.out == b""


# -- NBD_OPT_EXPORT_NAME ------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "padding"), [
    (ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES, 0),
    (ClientFlag.C_FIXED_NEWSTYLE, 124),
])
def test_export_name_reply_honours_no_zeroes(flags: int, padding: int) -> None:
    result = three_ways(wire.CLIENT_FLAGS.pack(flags) + option(Opt.EXPORT_NAME, b"disk"))
    assert len(result.out) == 10 + padding
    size, tflags = wire.EXPORT_NAME_REPLY.unpack_from(result.out)
    assert size == 64 << 20
    assert tflags == DISK.transmission_flags(structured=False) == 0xD6D
    assert result.out[10:] == bytes(padding)
    negotiated = result.negotiated
    assert negotiated.export is DISK
    assert negotiated.flags == tflags
    assert negotiated.structured is False
    assert negotiated.meta_contexts == {}
    assert result.done.trailing == b""


def test_export_name_empty_is_the_default_export() -> None:
    result = three_ways(CLIENT + option(Opt.EXPORT_NAME))
    assert result.negotiated.export is DEFAULT
    assert wire.EXPORT_NAME_REPLY.unpack(result.out) == (1 << 20, 0xD6D)


def test_export_name_unicode() -> None:
    result = three_ways(CLIENT + option(Opt.EXPORT_NAME, UNICODE.name.encode()))
    assert result.negotiated.export is UNICODE


def test_export_name_carries_trailing_bytes() -> None:
    after = wire.REQUEST.pack(0x25609513, 0, 0, 7, 0, 512)
    result = run(CLIENT + option(Opt.EXPORT_NAME, b"disk") + after)
    assert result.done.trailing == after
    assert result.core.pending_bytes == 0


@pytest.mark.parametrize("name", [
    b"nope", b"DISK", b"disk\x00", b"\xff\xfe", b"x" * 5000, b"x" * (MAX_OPTION_DATA + 1),
])
def test_export_name_failure_closes_without_a_reply(name: bytes) -> None:
    # EXPORT_NAME has no error reply: the server MUST close (spec 2.6).
    result = three_ways(CLIENT + option(Opt.EXPORT_NAME, name))
    assert len(result.events) == 1
    closed = result.last
    assert isinstance(closed, HandshakeClosed)
    assert closed.graceful is False
    assert result.out == b""


def test_export_name_after_options() -> None:
    result = three_ways(CLIENT + LIST + STRUCTURED + option(Opt.EXPORT_NAME, b"ro"))
    out = result.out
    got = replies(out[:-10])
    assert [r for _, r, _ in got] == [Rep.SERVER] * 4 + [Rep.ACK, Rep.ACK]
    size, tflags = wire.EXPORT_NAME_REPLY.unpack(out[-10:])
    assert size == 12345
    # structured replies on: DF is added to the EXPORT_NAME flags too (as qemu does)
    assert tflags == 0x48F
    assert result.negotiated.structured is True


# -- NBD_OPT_ABORT ------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored data"])
def test_abort_acks_then_closes_gracefully(data: bytes) -> None:
    result = three_ways(CLIENT + option(Opt.ABORT, data))
    assert assert_one_reply(result.out, Opt.ABORT, Rep.ACK) == b""
    assert len(result.events) == 1
    closed = result.last
    assert isinstance(closed, HandshakeClosed)
    assert closed.graceful is True


def test_abort_after_other_options() -> None:
    result = three_ways(CLIENT + LIST + option(99) + option(Opt.ABORT))
    got = replies(result.out)
    assert got[-1] == (Opt.ABORT, Rep.ACK, b"")
    assert got[-2][:2] == (99, Rep.ERR_UNSUP)
    assert isinstance(result.last, HandshakeClosed)


# -- NBD_OPT_LIST -------------------------------------------------------------------------


def test_list_one_server_reply_per_export_then_ack() -> None:
    result = three_ways(CLIENT + LIST)
    got = replies(result.out)
    assert [(o, r) for o, r, _ in got] == [(Opt.LIST, Rep.SERVER)] * 4 + [(Opt.LIST, Rep.ACK)]
    seen = []
    for export, (_, _, data) in zip(CATALOG.list_exports(), got, strict=False):
        name = export.name.encode()
        desc = export.description.encode()
        assert len(data) == 4 + len(name) + len(desc)
        (name_len,) = struct.unpack_from(">I", data)
        assert name_len == len(name)
        assert data[4:4 + name_len] == name
        assert data[4 + name_len:] == desc
        seen.append(data[4:4 + name_len].decode())
    assert seen == ["", "disk", "ro", UNICODE.name]
    assert got[-1][2] == b""
    assert result.events == []


def test_list_empty_catalog_just_acks() -> None:
    result = three_ways(CLIENT + LIST, catalog=FakeCatalog())
    assert assert_one_reply(result.out, Opt.LIST, Rep.ACK) == b""


def test_list_with_data_is_invalid_and_next_option_works() -> None:
    result = three_ways(CLIENT + option(Opt.LIST, b"junk") + LIST)
    got = replies(result.out)
    assert got[0][:2] == (Opt.LIST, Rep.ERR_INVALID)
    assert [r for _, r, _ in got[1:]] == [Rep.SERVER] * 4 + [Rep.ACK]


# -- NBD_OPT_STARTTLS ---------------------------------------------------------------------


def test_starttls_without_tls_is_policy() -> None:
    result = three_ways(CLIENT + option(Opt.STARTTLS) + LIST)
    got = replies(result.out)
    assert got[0][:2] == (Opt.STARTTLS, Rep.ERR_POLICY)
    assert got[0][2].decode()  # a human message
    assert_list_works(result.out)
    assert result.events == []


def test_starttls_with_data_is_invalid() -> None:
    result = three_ways(CLIENT + option(Opt.STARTTLS, b"x") + LIST)
    got = replies(result.out)
    assert got[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)
    assert_list_works(result.out)


# -- NBD_OPT_INFO and NBD_OPT_GO ---------------------------------------------------------

INFO_GO = pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO], ids=["INFO", "GO"])


def _block_size(data: bytes) -> tuple[int, int, int]:
    assert len(data) == 12
    minimum, preferred, maximum = struct.unpack(">III", data)
    return minimum, preferred, maximum


@INFO_GO
def test_info_go_basic_replies(opt: Opt) -> None:
    result = three_ways(CLIENT + option(opt, info_data("disk")))
    infos, got = info_replies(result.out, opt)
    assert got[-1] == (opt, Rep.ACK, b"")
    assert all(r == Rep.INFO for _, r, _ in got[:-1])
    assert set(infos) == {Info.EXPORT, Info.DESCRIPTION, Info.BLOCK_SIZE}
    size, tflags = struct.unpack(">QH", infos[Info.EXPORT])
    assert size == 64 << 20
    assert tflags == DISK.transmission_flags(structured=False)
    assert not tflags & TransmissionFlag.SEND_DF
    assert infos[Info.DESCRIPTION] == b"the main disk"
    assert _block_size(infos[Info.BLOCK_SIZE]) == (1, 4096, 32 * 1024 * 1024)
    if opt == Opt.GO:
        negotiated = result.negotiated
        assert negotiated.export is DISK
        assert negotiated.flags == tflags
        assert negotiated.structured is False
        assert negotiated.meta_contexts == {}
        assert result.done.trailing == b""
    else:
        assert result.events == []


@INFO_GO
def test_info_go_reply_lengths_exact(opt: Opt) -> None:
    result = three_ways(CLIENT + option(opt, info_data("disk", (Info.NAME,))))
    lengths = {struct.unpack_from(">H", d)[0]: len(d)
               for _, r, d in replies(result.out) if r == Rep.INFO}
    assert lengths == {Info.EXPORT: 12, Info.NAME: 2 + 4, Info.DESCRIPTION: 2 + 13,
                       Info.BLOCK_SIZE: 14}


@INFO_GO
def test_info_go_name_only_when_requested(opt: Opt) -> None:
    without = three_ways(CLIENT + option(opt, info_data("")))
    infos, _ = info_replies(without.out, opt)
    assert Info.NAME not in infos
    assert Info.DESCRIPTION not in infos  # the default export has no description
    assert set(infos) == {Info.EXPORT, Info.BLOCK_SIZE}

    requested = three_ways(CLIENT + option(opt, info_data(UNICODE.name, (Info.NAME,))))
    infos, _ = info_replies(requested.out, opt)
    assert infos[Info.NAME] == UNICODE.name.encode()
    assert infos[Info.DESCRIPTION] == "\u00fcber".encode()


@INFO_GO
def test_info_go_block_size_always_and_unknown_codes_ignored(opt: Opt) -> None:
    plain = three_ways(CLIENT + option(opt, info_data("ro")))
    asked = three_ways(CLIENT + option(opt, info_data("ro", (Info.BLOCK_SIZE, 999, 0xFFFF))))
    assert plain.out == asked.out
    infos, _ = info_replies(asked.out, opt)
    assert _block_size(infos[Info.BLOCK_SIZE]) == (1, 4096, MAX_PAYLOAD)
    assert struct.unpack(">QH", infos[Info.EXPORT]) == (12345, 0x40F)


@INFO_GO
def test_info_go_unknown_export(opt: Opt) -> None:
    result = three_ways(CLIENT + option(opt, info_data("nope", (Info.NAME,))) + LIST)
    got = replies(result.out)
    assert got[0][:2] == (opt, Rep.ERR_UNKNOWN)
    assert b"nope" in got[0][2]
    assert not any(r == Rep.INFO for _, r, _ in got)
    assert_list_works(result.out)
    assert result.events == []


def _bad_info_payloads() -> list[tuple[str, bytes]]:
    long_name = b"n" * 4097
    return [
        ("empty", b""),
        ("short-name-length", b"\x00\x00"),
        ("name-runs-past", info_data("disk", name_len=100)),
        ("name-length-short", info_data("disk", name_len=2)),
        ("no-count", struct.pack(">I", 4) + b"disk"),
        ("count-too-big", info_data("disk", (Info.NAME,), count=2)),
        ("count-too-small", info_data("disk", (Info.NAME, Info.BLOCK_SIZE), count=1)),
        ("odd-trailing-byte", info_data("disk", extra=b"\x00")),
        ("trailing-bytes", info_data("disk", (Info.NAME,), extra=b"junkjunk")),
        ("name-too-long", info_data(long_name)),
        ("invalid-utf8", info_data(b"\xc3\x28")),
        ("nul-in-name", info_data(b"di\x00sk")),
        ("huge-name-length", info_data("disk", name_len=0xFFFFFFFF)),
    ]


@INFO_GO
@pytest.mark.parametrize(("case", "payload"), _bad_info_payloads(),
                         ids=[c for c, _ in _bad_info_payloads()])
def test_info_go_malformed_is_invalid_and_next_option_parses(
        opt: Opt, case: str, payload: bytes) -> None:
    result = three_ways(CLIENT + option(opt, payload) + LIST)
    got = replies(result.out)
    assert got[0][:2] == (opt, Rep.ERR_INVALID), case
    assert not any(o == opt and r == Rep.INFO for o, r, _ in got)
    assert_list_works(result.out)
    assert result.events == []


def test_failed_go_leaves_the_handshake_open() -> None:
    result = three_ways(CLIENT + go("nope") + option(Opt.GO, b"bad") + go("ro"))
    got = replies(result.out)
    assert got[0][:2] == (Opt.GO, Rep.ERR_UNKNOWN)
    assert got[1][:2] == (Opt.GO, Rep.ERR_INVALID)
    assert got[-1] == (Opt.GO, Rep.ACK, b"")
    assert result.negotiated.export is RO


@pytest.mark.parametrize("structured", [False, True])
def test_info_then_identical_go_returns_the_same_information(structured: bool) -> None:
    prefix = CLIENT + (STRUCTURED if structured else b"")
    data = info_data("disk", (Info.NAME, Info.BLOCK_SIZE))
    result = three_ways(prefix + option(Opt.INFO, data) + option(Opt.GO, data))
    got = replies(result.out)
    if structured:
        assert got.pop(0) == (Opt.STRUCTURED_REPLY, Rep.ACK, b"")
    info_part = [(r, d) for o, r, d in got if o == Opt.INFO]
    go_part = [(r, d) for o, r, d in got if o == Opt.GO]
    assert info_part == go_part
    assert info_part[-1] == (Rep.ACK, b"")
    export_info = next(d for r, d in info_part if d[:2] == b"\x00\x00")
    (_, tflags) = struct.unpack(">QH", export_info[2:])
    assert result.negotiated.flags == tflags
    assert bool(tflags & TransmissionFlag.SEND_DF) is structured


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO, Opt.LIST, Opt.LIST_META_CONTEXT])
def test_refusal_answers_policy_with_the_message(opt: Opt) -> None:
    payload = {Opt.INFO: info_data("disk"), Opt.GO: info_data("disk"), Opt.LIST: b"",
               Opt.LIST_META_CONTEXT: meta_data("disk")}[opt]
    message = "server is full: 3 clients"
    result = three_ways(CLIENT + option(opt, payload), refusal=message)
    assert assert_one_reply(result.out, opt, Rep.ERR_POLICY) == message.encode()
    assert result.events == []


def test_refusal_still_allows_abort_and_closes_export_name() -> None:
    result = three_ways(CLIENT + go("disk") + option(Opt.ABORT), refusal="full")
    got = replies(result.out)
    assert got == [(Opt.GO, Rep.ERR_POLICY, b"full"), (Opt.ABORT, Rep.ACK, b"")]
    assert isinstance(result.last, HandshakeClosed)
    assert result.last.graceful is True

    closed = three_ways(CLIENT + option(Opt.EXPORT_NAME, b"disk"), refusal="full")
    assert closed.out == b""
    assert isinstance(closed.last, HandshakeClosed)
    assert closed.last.graceful is False


def test_go_carries_trailing_bytes() -> None:
    after = wire.REQUEST.pack(0x25609513, 0, 0, 0xFFFFFFFFFFFFFFFF, 0, 512) + b"\x01\x02"
    result = run(CLIENT + go("disk") + after)
    assert result.done.trailing == after
    assert result.core.pending_bytes == 0
    got = replies(result.out)
    assert got[-1] == (Opt.GO, Rep.ACK, b"")


def test_next_event_after_done_is_refused() -> None:
    result = run(CLIENT + go("disk"))
    assert isinstance(result.last, HandshakeDone)
    with pytest.raises(ProtocolError):
        result.core.next_event()


# -- NBD_OPT_STRUCTURED_REPLY ---------------------------------------------------------------


def test_structured_reply_acks_and_adds_df() -> None:
    result = three_ways(CLIENT + STRUCTURED + go("disk"))
    got = replies(result.out)
    assert got[0] == (Opt.STRUCTURED_REPLY, Rep.ACK, b"")
    negotiated = result.negotiated
    assert negotiated.structured is True
    assert negotiated.flags & TransmissionFlag.SEND_DF
    assert negotiated.flags == 0xDED


def test_without_structured_reply_no_df() -> None:
    result = three_ways(CLIENT + go("disk"))
    assert result.negotiated.structured is False
    assert not result.negotiated.flags & TransmissionFlag.SEND_DF
    assert result.negotiated.flags == 0xD6D


def test_structured_reply_twice_is_invalid() -> None:
    result = three_ways(CLIENT + STRUCTURED + STRUCTURED + go("disk"))
    got = replies(result.out)
    assert got[0] == (Opt.STRUCTURED_REPLY, Rep.ACK, b"")
    assert got[1][:2] == (Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    assert result.negotiated.structured is True


def test_structured_reply_with_data_is_invalid_and_not_enabled() -> None:
    result = three_ways(CLIENT + option(Opt.STRUCTURED_REPLY, b"\x00") + go("disk"))
    got = replies(result.out)
    assert got[0][:2] == (Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    assert result.negotiated.structured is False
    assert not result.negotiated.flags & TransmissionFlag.SEND_DF


# -- NBD_OPT_LIST_META_CONTEXT -------------------------------------------------------------

BASE_REPLY = struct.pack(">I", 0) + BASE_ALLOCATION.encode()


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("queries", [(), ("base:",), (BASE_ALLOCATION,),
                                     ("qemu:dirty-bitmap:x", "base:"),
                                     ("base:", BASE_ALLOCATION)])
def test_list_meta_context_base_allocation(structured: bool, queries: tuple[str, ...]) -> None:
    prefix = CLIENT + (STRUCTURED if structured else b"")
    result = three_ways(prefix + option(Opt.LIST_META_CONTEXT, meta_data("disk", queries)))
    got = [g for g in replies(result.out) if g[0] == Opt.LIST_META_CONTEXT]
    assert got == [(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, BASE_REPLY),
                   (Opt.LIST_META_CONTEXT, Rep.ACK, b"")]
    assert result.events == []


@pytest.mark.parametrize("queries", [("qemu:dirty-bitmap:x",), ("x-foo:bar",),
                                     ("base:nothing",), ("qemu:",)])
def test_list_meta_context_unknown_queries_just_ack(queries: tuple[str, ...]) -> None:
    result = three_ways(CLIENT + STRUCTURED
                        + option(Opt.LIST_META_CONTEXT, meta_data("disk", queries)))
    assert replies(result.out)[1:] == [(Opt.LIST_META_CONTEXT, Rep.ACK, b"")]


def test_list_meta_context_unknown_export() -> None:
    result = three_ways(CLIENT + STRUCTURED
                        + option(Opt.LIST_META_CONTEXT, meta_data("nope")) + LIST)
    got = replies(result.out)
    assert got[1][:2] == (Opt.LIST_META_CONTEXT, Rep.ERR_UNKNOWN)
    assert_list_works(result.out)


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
@pytest.mark.parametrize("payload", [
    b"",
    meta_data("disk", (BASE_ALLOCATION,), count=2),
    meta_data("disk", (BASE_ALLOCATION,), extra=b"x"),
    meta_data("disk", (b"\xff:x",)),
    meta_data("disk", ("b" * 4097,)),
    struct.pack(">I", 10) + b"disk",
], ids=["empty", "count-too-big", "trailing", "bad-utf8", "query-too-long", "short-name"])
def test_meta_context_malformed_is_invalid(opt: Opt, payload: bytes) -> None:
    result = three_ways(CLIENT + STRUCTURED + option(opt, payload) + LIST)
    got = replies(result.out)
    assert got[1][:2] == (opt, Rep.ERR_INVALID)
    assert_list_works(result.out)


# -- NBD_OPT_SET_META_CONTEXT --------------------------------------------------------------


def _set(name: str, *queries: str) -> bytes:
    return option(Opt.SET_META_CONTEXT, meta_data(name, queries))


def test_set_meta_context_before_structured_is_invalid() -> None:
    result = three_ways(CLIENT + _set("disk", BASE_ALLOCATION) + STRUCTURED + go("disk"))
    got = replies(result.out)
    assert got[0][:2] == (Opt.SET_META_CONTEXT, Rep.ERR_INVALID)
    assert result.negotiated.meta_contexts == {}


def test_set_meta_context_selects_base_allocation() -> None:
    result = three_ways(CLIENT + STRUCTURED + _set("disk", "qemu:x", BASE_ALLOCATION)
                        + go("disk"))
    got = [g for g in replies(result.out) if g[0] == Opt.SET_META_CONTEXT]
    assert [r for _, r, _ in got] == [Rep.META_CONTEXT, Rep.ACK]
    data = got[0][2]
    (context_id,) = struct.unpack_from(">I", data)
    assert data[4:] == BASE_ALLOCATION.encode()
    assert result.negotiated.meta_contexts == {context_id: BASE_ALLOCATION}


@pytest.mark.parametrize("queries", [(), ("base:",), ("qemu:dirty-bitmap:x",)])
def test_set_meta_context_selecting_nothing(queries: tuple[str, ...]) -> None:
    result = three_ways(CLIENT + STRUCTURED + _set("disk", *queries) + go("disk"))
    got = [g for g in replies(result.out) if g[0] == Opt.SET_META_CONTEXT]
    assert got == [(Opt.SET_META_CONTEXT, Rep.ACK, b"")]
    assert result.negotiated.meta_contexts == {}


def test_go_to_another_export_drops_the_contexts() -> None:
    result = three_ways(CLIENT + STRUCTURED + _set("disk", BASE_ALLOCATION) + go("ro"))
    assert result.negotiated.export is RO
    assert result.negotiated.meta_contexts == {}


def test_export_name_to_the_same_export_keeps_the_contexts() -> None:
    result = three_ways(CLIENT + STRUCTURED + _set("disk", BASE_ALLOCATION)
                        + option(Opt.EXPORT_NAME, b"disk"))
    assert result.negotiated.meta_contexts == {0: BASE_ALLOCATION}


@pytest.mark.parametrize("failing", [
    _set("nope", BASE_ALLOCATION),
    option(Opt.SET_META_CONTEXT, b"\x00"),
], ids=["unknown-export", "malformed"])
def test_failing_set_clears_the_earlier_selection(failing: bytes) -> None:
    result = three_ways(CLIENT + STRUCTURED + _set("disk", BASE_ALLOCATION) + failing
                        + go("disk"))
    got = [g for g in replies(result.out) if g[0] == Opt.SET_META_CONTEXT]
    assert [r for _, r, _ in got][:2] == [Rep.META_CONTEXT, Rep.ACK]
    assert got[2][1] in (Rep.ERR_UNKNOWN, Rep.ERR_INVALID)
    assert result.negotiated.meta_contexts == {}


def test_later_set_replaces_the_selection() -> None:
    result = three_ways(CLIENT + STRUCTURED + _set("disk", BASE_ALLOCATION)
                        + _set("ro", BASE_ALLOCATION) + go("ro"))
    assert result.negotiated.meta_contexts == {0: BASE_ALLOCATION}
    result = three_ways(CLIENT + STRUCTURED + _set("disk", BASE_ALLOCATION)
                        + _set("ro", BASE_ALLOCATION) + go("disk"))
    assert result.negotiated.meta_contexts == {}


# -- unknown and oversized options, bad framing --------------------------------------------


@pytest.mark.parametrize("code", [0, 4, 12, 99, 0x7FFFFFFF, 0xFFFFFFFF])
@pytest.mark.parametrize("data", [b"", b"some option data", bytes(4096)])
def test_unknown_options_are_unsupported_and_next_option_works(code: int, data: bytes) -> None:
    result = three_ways(CLIENT + option(code, data) + LIST)
    got = replies(result.out)
    assert got[0][:2] == (code, Rep.ERR_UNSUP)
    assert_list_works(result.out)
    assert result.events == []


def _feed_in_pieces(core: ServerHandshake, data: bytes, piece: int) -> list[int]:
    """Feed ``data`` in ``piece``-sized chunks; return pending_bytes after each step."""
    pending = []
    for start in range(0, len(data), piece):
        core.receive_data(data[start:start + piece])
        assert core.next_event() is NEED_DATA
        pending.append(core.pending_bytes)
    return pending


@pytest.mark.parametrize("code", [99, Opt.INFO, Opt.GO, Opt.LIST, Opt.SET_META_CONTEXT])
def test_oversized_option_is_skipped_not_buffered(code: int) -> None:
    size = 1 << 20
    core = ServerHandshake(CATALOG)
    core.data_to_send()
    core.receive_data(CLIENT)
    assert core.next_event() is NEED_DATA
    header = option(code, length=size)
    body = bytes(range(256)) * (size // 256)
    pending = _feed_in_pieces(core, header + body[:-1], 4096)
    assert max(pending) <= 4096 + wire.OPTION_HEADER.size
    assert pending[-1] == 0
    assert core.data_to_send() == b""  # not answered before the data is consumed
    core.receive_data(body[-1:] + LIST)
    assert core.next_event() is NEED_DATA
    out = core.data_to_send()
    got = replies(out)
    assert got[0][:2] == (code, Rep.ERR_TOO_BIG)
    assert got[0][2]  # a message
    assert_list_works(out)
    assert core.pending_bytes == 0


def test_option_data_at_the_limit_is_read() -> None:
    at_limit = three_ways(CLIENT + option(99, bytes(MAX_OPTION_DATA)) + LIST)
    assert replies(at_limit.out)[0][:2] == (99, Rep.ERR_UNSUP)
    over = three_ways(CLIENT + option(99, bytes(MAX_OPTION_DATA + 1)) + LIST)
    assert replies(over.out)[0][:2] == (99, Rep.ERR_TOO_BIG)
    assert_list_works(over.out)


def test_oversized_option_fed_whole_then_go() -> None:
    result = three_ways(CLIENT + option(Opt.INFO, bytes(100_000)) + go("disk"))
    got = replies(result.out)
    assert got[0][:2] == (Opt.INFO, Rep.ERR_TOO_BIG)
    assert result.negotiated.export is DISK


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 0x8000_0000, 0xFFFF_FFFF])
def test_option_longer_than_32_mib_is_a_protocol_error(length: int) -> None:
    result = three_ways(CLIENT + option(99, length=length))
    assert len(result.events) == 1
    assert isinstance(result.last, ProtocolError)
    assert result.out == b""


def test_option_of_exactly_32_mib_is_skipped() -> None:
    core = ServerHandshake(CATALOG)
    core.receive_data(CLIENT + option(99, length=MAX_PAYLOAD))
    assert core.next_event() is NEED_DATA
    assert core.pending_bytes == 0
    core.data_to_send()
    piece = bytes(1 << 20)
    for _ in range(32):
        core.receive_data(piece)
        assert core.next_event() is NEED_DATA
        assert core.pending_bytes == 0
    assert replies(core.data_to_send()) == [
        (99, Rep.ERR_TOO_BIG, f"option data longer than {MAX_OPTION_DATA} bytes".encode())]


@pytest.mark.parametrize("magic", [0, NBDMAGIC, IHAVEOPT ^ 1, REPLY_MAGIC])
def test_bad_option_magic_is_a_protocol_error(magic: int) -> None:
    result = three_ways(CLIENT + LIST + option(Opt.LIST, magic=magic))
    assert_list_works(result.out)
    assert len(result.events) == 1
    assert isinstance(result.last, ProtocolError)


def test_long_sequence_of_options_all_answered_in_order() -> None:
    stream = CLIENT + b"".join(option(code) for code in (99, Opt.LIST, 4, Opt.STARTTLS) * 5)
    result = three_ways(stream + STRUCTURED + go("disk", Info.NAME))
    got = [(o, r) for o, r, _ in replies(result.out)]
    one_round = ([(99, Rep.ERR_UNSUP)] + [(Opt.LIST, Rep.SERVER)] * 4 + [(Opt.LIST, Rep.ACK)]
                 + [(4, Rep.ERR_UNSUP), (Opt.STARTTLS, Rep.ERR_POLICY)])
    assert got[:len(one_round) * 5] == one_round * 5
    assert got[len(one_round) * 5] == (Opt.STRUCTURED_REPLY, Rep.ACK)
    assert got[-1] == (Opt.GO, Rep.ACK)
    assert result.negotiated.structured is True


def test_error_messages_are_valid_utf8_within_the_string_limit() -> None:
    # a 4095-byte name of 3-byte characters makes an error message over 4096 bytes;
    # cutting it must not leave half a character behind (messages are UTF-8)
    name = "\u20ac" * 1365
    result = three_ways(CLIENT + option(Opt.INFO, info_data(name)) + LIST)
    message = replies(result.out)[0][2]
    assert replies(result.out)[0][:2] == (Opt.INFO, Rep.ERR_UNKNOWN)
    assert len(message) <= 4096
    assert message.decode("utf-8").startswith("export ")
    assert_list_works(result.out)

    refusal = "\u00e9" + "\u20ac" * 2000
    refused = three_ways(CLIENT + LIST, refusal=refusal)
    text = assert_one_reply(refused.out, Opt.LIST, Rep.ERR_POLICY).decode("utf-8")
    assert refusal.startswith(text)
    assert len(text.encode()) > 4090


def test_real_exports_through_list_and_go() -> None:
    table = ExportTable()
    shared = MemoryNode(8 << 20)
    table.add(Export("", shared, description="default", multi_conn=True))
    table.add(Export("snap", shared, description="read-only view", read_only=True))
    core = ServerHandshake(table)
    assert core.data_to_send() == GREETING
    core.receive_data(CLIENT + LIST + STRUCTURED + go("snap", Info.NAME))
    done = core.next_event()
    assert isinstance(done, HandshakeDone)
    got = replies(core.data_to_send())
    assert got[:3] == [(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x00default"),
                       (Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x04snapread-only view"),
                       (Opt.LIST, Rep.ACK, b"")]
    infos, _ = info_replies(b"".join(
        wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, o, r, len(d)) + d
        for o, r, d in got[4:]), Opt.GO)
    assert struct.unpack(">QH", infos[Info.EXPORT]) == (8 << 20, 0x48F)
    assert infos[Info.NAME] == b"snap"
    assert infos[Info.DESCRIPTION] == b"read-only view"
    assert done.negotiated.export is table.lookup("snap")
    assert done.negotiated.read_only


# -- several contexts: qemu:allocation-depth, bitmaps ---------------------------------------

DEPTH = "qemu:allocation-depth"
BITMAPS = ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1")
RICH = FakeExport("rich", meta_contexts=(BASE_ALLOCATION, DEPTH, *BITMAPS))
RICH_CATALOG = FakeCatalog(DISK, RICH)


def _listed(queries: tuple[str, ...], export: str = "rich") -> list[str]:
    result = three_ways(CLIENT + STRUCTURED
                        + option(Opt.LIST_META_CONTEXT, meta_data(export, queries)),
                        catalog=RICH_CATALOG)
    got = [g for g in replies(result.out) if g[0] == Opt.LIST_META_CONTEXT]
    assert got[-1] == (Opt.LIST_META_CONTEXT, Rep.ACK, b"")
    assert all(rep == Rep.META_CONTEXT and data[:4] == bytes(4) for _, rep, data in got[:-1])
    return [data[4:].decode() for _, _, data in got[:-1]]


@pytest.mark.parametrize(("queries", "expected"), [
    ((), [BASE_ALLOCATION, DEPTH, *BITMAPS]),  # no query: every context
    (("qemu:",), [DEPTH, *BITMAPS]),  # qemu's namespace wildcard
    (("qemu:dirty-bitmap:",), list(BITMAPS)),  # every exported bitmap
    (("base:",), [BASE_ALLOCATION]),
    ((DEPTH,), [DEPTH]),
    (("qemu:dirty-bitmap:b1", "base:allocation"), [BASE_ALLOCATION, BITMAPS[1]]),
    (("qemu:dirty-bitmap:b", "qemu:allocation", "qemu"), []),  # prefixes are not wildcards
])
def test_list_meta_context_wildcards(queries: tuple[str, ...], expected: list[str]) -> None:
    assert _listed(queries) == expected


def test_list_meta_context_offers_only_the_exports_contexts() -> None:
    assert _listed((), export="disk") == [BASE_ALLOCATION]
    assert _listed((DEPTH, "qemu:"), export="disk") == []


def test_set_meta_context_selects_several_by_exact_name() -> None:
    result = three_ways(CLIENT + STRUCTURED
                        + _set("rich", BITMAPS[1], "qemu:", DEPTH, BASE_ALLOCATION, DEPTH)
                        + go("rich"), catalog=RICH_CATALOG)
    got = [g for g in replies(result.out) if g[0] == Opt.SET_META_CONTEXT]
    assert got[-1] == (Opt.SET_META_CONTEXT, Rep.ACK, b"")
    chosen = {struct.unpack_from(">I", data)[0]: data[4:].decode() for _, _, data in got[:-1]}
    assert sorted(chosen.values()) == sorted([BASE_ALLOCATION, DEPTH, BITMAPS[1]])
    assert len(got) == 4  # DEPTH asked twice is selected once; "qemu:" selects nothing
    assert result.negotiated.meta_contexts == chosen
