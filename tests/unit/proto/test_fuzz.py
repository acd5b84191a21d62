"""Property tests: no input makes the protocol cores misbehave.

Whatever bytes arrive, in whatever chunking, ``next_event`` yields events or
``NEED_DATA`` or raises ``ProtocolError``; nothing else escapes.  After
``NEED_DATA`` the core holds less than one whole message (skipped option data
is never buffered), everything it sent parses as well-formed replies, and every
``Request`` that comes out is safe to hand to a backend.

Run many more examples with ``HYPOTHESIS_PROFILE=fuzz``.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.fakes import FakeCatalog, FakeExport

from pynbd.proto import wire
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
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
from pynbd.proto.handshake import ServerHandshake
from pynbd.proto.negotiated import Negotiated
from pynbd.proto.transmission import ServerTransmission

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile("pynbd-proto", max_examples=300, deadline=None,
                          suppress_health_check=_HEALTH)
settings.register_profile("fuzz", max_examples=20_000, deadline=None,
                          suppress_health_check=_HEALTH)
FUZZING = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
PROFILE = settings.get_profile("fuzz" if FUZZING else "pynbd-proto")
if FUZZING:  # a long run: each test may take minutes
    pytestmark = pytest.mark.timeout(3600)

#: no input is fed in more pieces than this; the rest goes in one piece
MAX_PIECES = 300
#: no loop over next_event runs longer than this without NEED_DATA
MAX_EVENTS = 100_000

# -- exports ---------------------------------------------------------------------------------




CATALOG = FakeCatalog(FakeExport(""), FakeExport("disk", 1 << 30, "a disk"),
                      FakeExport("ro", 4096, read_only=True),
                      FakeExport("\u20ac" * 1365, 512, "\u00e9" * 2000))
NAMES = ["", "disk", "ro", "\u20ac" * 1365, "nope", "\u20ac" * 1364 + "ab"]

# -- feeding ----------------------------------------------------------------------------------

piece_sizes = st.lists(st.one_of(st.integers(1, 8), st.integers(1, 5000),
                                 st.integers(1, 100_000)), min_size=1, max_size=40)


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    """Cut ``data`` into pieces of ``sizes`` (cycled), at most MAX_PIECES of them."""
    pieces: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(data):
        if len(pieces) == MAX_PIECES - 1:
            pieces.append(data[pos:])
            break
        size = sizes[i % len(sizes)]
        pieces.append(data[pos:pos + size])
        pos += size
        i += 1
    return pieces



def next_or_error(core: ServerHandshake | ServerTransmission) -> object:
    """The next event, or the ProtocolError it raised (any other exception escapes)."""
    try:
        return core.next_event()
    except ProtocolError as err:
        return err


# -- handshake --------------------------------------------------------------------------------


def check_replies(out: bytes, *, done: bool) -> None:
    """``out`` is well-formed option replies (plus an EXPORT_NAME reply if done)."""
    pos = 0
    size = wire.OPTION_REPLY_HEADER.size
    while len(out) - pos >= size:
        magic, _, rep, length = wire.OPTION_REPLY_HEADER.unpack_from(out, pos)
        if magic != REPLY_MAGIC:
            break
        assert len(out) - pos - size >= length, "reply data cut short"
        data = out[pos + size:pos + size + length]
        if rep & 0x8000_0000:
            assert len(data) <= 4096
            data.decode("utf-8")  # error messages are UTF-8
        elif rep == Rep.INFO:
            assert len(data) >= 2
        pos += size + length
    rest = len(out) - pos
    assert rest == 0 or (done and rest in (10, 134)), f"{rest} stray bytes in the output"


def drive_handshake(data: bytes, sizes: list[int], *, refusal: str | None = None) -> None:
    core = ServerHandshake(CATALOG, refusal=refusal)
    greeting = core.data_to_send()
    assert len(greeting) == wire.GREETING.size
    # unknown client flags: the connection must end before anything else happens
    bad_flags = len(data) >= 4 and bool(int.from_bytes(data[:4], "big") & ~3)
    fed = 0
    for piece in split(data, sizes):
        before = core.pending_bytes
        core.receive_data(piece)
        fed += len(piece)
        assert core.pending_bytes <= before + len(piece)
        for _ in range(MAX_EVENTS):
            event = next_or_error(core)
            if isinstance(event, ProtocolError):
                assert event.message
                check_replies(core.data_to_send(), done=False)
                return
            assert not (bad_flags and fed >= 4), "unknown client flags were accepted"
            if event is NEED_DATA:
                check_replies(core.data_to_send(), done=False)
                # less than one whole option is held, whatever was fed
                assert core.pending_bytes < wire.OPTION_HEADER.size + MAX_OPTION_DATA
                break
            assert isinstance(event, HandshakeDone | HandshakeClosed | StartTLS)
            if isinstance(event, StartTLS):
                continue
            check_replies(core.data_to_send(), done=isinstance(event, HandshakeDone))
            if isinstance(event, HandshakeDone):
                negotiated = event.negotiated
                assert core.pending_bytes == 0
                assert data[:fed].endswith(event.trailing)
                assert negotiated.flags & TransmissionFlag.HAS_FLAGS
                assert bool(negotiated.flags & TransmissionFlag.SEND_DF) is (
                    negotiated.structured)
                assert set(negotiated.meta_contexts.values()) <= {BASE_ALLOCATION}
                assert not negotiated.meta_contexts or negotiated.structured
                assert CATALOG.lookup(negotiated.export.name) is negotiated.export
                assert refusal is None
            return
        else:
            raise AssertionError("next_event never returned NEED_DATA")


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


@st.composite
def option_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["raw", "info", "meta", "big", "string"]))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    if kind == "big":
        return bytes(draw(st.integers(MAX_OPTION_DATA - 2, MAX_OPTION_DATA + 300)))
    name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=8))).encode()
    if kind == "string":
        return name
    name_len = draw(st.one_of(st.just(len(name)), st.integers(0, 0xFFFF_FFFF)))
    if kind == "info":
        requests = draw(st.lists(st.one_of(st.sampled_from(list(Info)),
                                           st.integers(0, 0xFFFF)), max_size=5))
        count = draw(st.one_of(st.just(len(requests)), st.integers(0, 0xFFFF)))
        return (_u32(name_len) + name + struct.pack(">H", count)
                + b"".join(struct.pack(">H", r) for r in requests))
    queries = draw(st.lists(st.one_of(
        st.sampled_from(["base:", BASE_ALLOCATION, "qemu:x", "base:x", ""]),
        st.text(max_size=6)), max_size=4))
    count = draw(st.one_of(st.just(len(queries)), st.integers(0, 0xFFFF_FFFF)))
    return (_u32(name_len) + name + _u32(count)
            + b"".join(_u32(len(q.encode())) + q.encode() for q in queries))


@st.composite
def options(draw: st.DrawFn) -> bytes:
    code = draw(st.one_of(st.sampled_from([int(o) for o in Opt] + [0, 12, 99, 0xFFFF_FFFF]),
                          st.integers(0, 0xFFFF_FFFF)))
    body = draw(option_bodies())
    length = draw(st.one_of(st.just(len(body)), st.just(len(body)),
                            st.integers(max(0, len(body) - 3), len(body) + 3),
                            st.integers(0, 0xFFFF_FFFF),
                            st.sampled_from([MAX_PAYLOAD, MAX_PAYLOAD + 1])))
    magic = draw(st.one_of(st.just(IHAVEOPT), st.just(IHAVEOPT), st.just(IHAVEOPT),
                           st.integers(0, 2**64 - 1)))
    return wire.OPTION_HEADER.pack(magic, code, length) + body


client_flags = st.one_of(st.sampled_from([3, 3, 3, 1, 0, 2]), st.integers(0, 0xFFFF_FFFF))


@PROFILE
@given(data=st.binary(max_size=2000), sizes=piece_sizes, with_flags=st.booleans())
def test_handshake_survives_any_bytes(data: bytes, sizes: list[int], with_flags: bool) -> None:
    prefix = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE) if with_flags else b""
    drive_handshake(prefix + data, sizes)


@PROFILE
@given(flags=client_flags, opts=st.lists(options(), max_size=8), sizes=piece_sizes,
       tail=st.binary(max_size=40), refuse=st.booleans())
def test_handshake_survives_mostly_valid_options(flags: int, opts: list[bytes],
                                                 sizes: list[int], tail: bytes,
                                                 refuse: bool) -> None:
    drive_handshake(wire.CLIENT_FLAGS.pack(flags) + b"".join(opts) + tail, sizes,
                    refusal="not now" if refuse else None)


@PROFILE
@given(length=st.integers(MAX_OPTION_DATA + 1, MAX_PAYLOAD),
       code=st.one_of(st.sampled_from([int(o) for o in Opt]), st.integers(0, 0xFFFF_FFFF)),
       sizes=st.lists(st.integers(512, 300_000), min_size=1, max_size=10))
def test_skipped_option_data_is_never_buffered(length: int, code: int,
                                               sizes: list[int]) -> None:
    core = ServerHandshake(CATALOG)
    core.receive_data(wire.CLIENT_FLAGS.pack(3))
    assert core.next_event() is NEED_DATA
    core.receive_data(wire.OPTION_HEADER.pack(IHAVEOPT, code, length))
    event = core.next_event()
    if code == Opt.EXPORT_NAME:  # cannot be answered: the connection is closed
        assert isinstance(event, HandshakeClosed)
        return
    assert event is NEED_DATA
    core.data_to_send()
    # feed up to 1 MiB of the data in the drawn pieces: nothing of it is kept
    remaining = min(length, 1 << 20)
    i = 0
    while remaining:
        piece = min(sizes[i % len(sizes)], remaining)
        core.receive_data(bytes(piece))
        remaining -= piece
        i += 1
        assert core.next_event() is NEED_DATA
        assert core.pending_bytes == 0
    if length <= 1 << 20:
        assert core.data_to_send()[8:16] == struct.pack(">II", code, Rep.ERR_TOO_BIG)
    else:
        assert core.data_to_send() == b""


# -- transmission -----------------------------------------------------------------------------

ALLOWED = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}


@st.composite
def negotiated_states(draw: st.DrawFn) -> tuple[Negotiated, int]:
    structured = draw(st.booleans())
    meta = structured and draw(st.booleans())
    export = FakeExport("x", size=draw(st.sampled_from([0, 512, 1 << 20, 1 << 20, 1 << 40])),
                        read_only=draw(st.booleans()))
    negotiated = Negotiated(export=export,
                            flags=export.transmission_flags(structured=structured),
                            structured=structured,
                            meta_contexts={0: BASE_ALLOCATION} if meta else {})
    return negotiated, draw(st.sampled_from([MAX_PAYLOAD, 4096, 100]))


#: what a generated request gets wrong (at most one thing, so streams stay in sync)
FAULTS = ["none"] * 6 + ["cmd", "flags", "unknown-flags", "offset", "length", "magic",
                         "payload"]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    fault = draw(st.sampled_from(FAULTS))
    commands = [int(c) for c in Cmd if c not in (Cmd.DISC, Cmd.RESIZE)] * 3 + [Cmd.DISC]
    cmd = draw(st.sampled_from(commands))
    allowed = int(ALLOWED.get(Cmd(cmd), CmdFlag(0)))
    flags = draw(st.sampled_from([0, 0, CmdFlag.FUA, allowed]).map(lambda f: f & allowed))
    offset = draw(st.one_of(st.integers(0, 4096), st.integers(0, 1 << 21)))
    length = draw(st.one_of(st.integers(0, 1024), st.integers(0, 5000),
                            st.sampled_from([0, 512, 4096, 4097])))
    magic = REQUEST_MAGIC
    if fault == "cmd":
        cmd = draw(st.one_of(st.sampled_from([Cmd.RESIZE, 9, 100, 0xFFFF]),
                             st.integers(0, 0xFFFF)))
    elif fault == "flags":
        flags = draw(st.integers(0, 0xFFFF))
    elif fault == "unknown-flags":
        flags |= draw(st.integers(1, 0x3FF)) << 6
    elif fault == "offset":
        offset = draw(st.one_of(st.sampled_from([1 << 40, 2**64 - 1]),
                                st.integers(0, 2**64 - 1)))
    elif fault == "length":
        length = draw(st.integers(0, 0xFFFF_FFFF))
    elif fault == "magic":
        magic = draw(st.integers(0, 0xFFFF_FFFF))
    payload = b""
    if cmd == Cmd.WRITE and length <= 5000:
        payload = bytes(length)
        if fault == "payload":
            payload = draw(st.binary(max_size=64))
    cookie = draw(st.one_of(st.sampled_from([0, 2**64 - 1, 2**63 + 1]),
                            st.integers(0, 2**64 - 1)))
    return wire.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload


def check_reply(buffers: list[bytes | bytearray | memoryview], cookie: int) -> None:
    data = b"".join(bytes(b) for b in buffers)
    (magic,) = struct.unpack_from(">I", data)
    if magic == SIMPLE_REPLY_MAGIC:
        assert len(data) == 16
        assert struct.unpack_from(">Q", data, 8) == (cookie,)
    else:
        assert magic == STRUCTURED_REPLY_MAGIC
        _, flags, _, got_cookie, length = wire.STRUCTURED_CHUNK.unpack_from(data)
        assert (flags, got_cookie) == (ReplyFlag.DONE, cookie)
        assert len(data) == wire.STRUCTURED_CHUNK.size + length


def check_request(event: Request, negotiated: Negotiated, max_payload: int) -> None:
    """A Request is only ever something a backend can safely be given."""
    size = negotiated.export.size
    assert event.cmd in ALLOWED
    assert not event.flags & ~int(ALLOWED[Cmd(event.cmd)])
    assert 0 <= event.cookie < 2**64
    if event.cmd == Cmd.FLUSH:
        assert (event.offset, event.length) == (0, 0)
    else:
        assert event.offset + event.length <= size
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
    if event.cmd == Cmd.BLOCK_STATUS:
        assert negotiated.meta_contexts
        assert event.length > 0


def drive_transmission(state: tuple[Negotiated, int], data: bytes, sizes: list[int]) -> None:
    negotiated, max_payload = state
    core = ServerTransmission(negotiated, max_payload=max_payload)
    bound = wire.REQUEST.size + max_payload
    for piece in split(data, sizes):
        core.receive_data(piece)
        assert core.pending_bytes < bound + len(piece)
        for _ in range(MAX_EVENTS):
            event = next_or_error(core)
            if isinstance(event, ProtocolError):
                if event.cookie is not None:
                    assert event.errno == Errno.EINVAL
                    check_reply(core.reply_error(event.cookie, event.errno, event.message),
                                event.cookie)
                return
            if event is NEED_DATA:
                assert core.pending_bytes < bound
                assert core.bytes_wanted >= 1
                break
            if isinstance(event, Disconnect):
                core.receive_data(piece)
                assert core.next_event() is NEED_DATA
                return
            if isinstance(event, InvalidRequest):
                assert event.errno in (Errno.EINVAL, Errno.EPERM, Errno.ENOSPC,
                                       Errno.EOVERFLOW)
                assert event.message
                check_reply(core.reply_error(event.cookie, event.errno, event.message),
                            event.cookie)
            else:
                assert isinstance(event, Request)
                check_request(event, negotiated, max_payload)
        else:
            raise AssertionError("next_event never returned NEED_DATA")


@PROFILE
@given(state=negotiated_states(), data=st.binary(max_size=2000), sizes=piece_sizes,
       valid_start=st.booleans())
def test_transmission_survives_any_bytes(state: tuple[Negotiated, int], data: bytes,
                                         sizes: list[int], valid_start: bool) -> None:
    prefix = struct.pack(">I", REQUEST_MAGIC) if valid_start else b""
    drive_transmission(state, prefix + data, sizes)


@PROFILE
@given(state=negotiated_states(), reqs=st.lists(requests(), max_size=12), sizes=piece_sizes,
       tail=st.binary(max_size=40))
def test_transmission_survives_mostly_valid_requests(state: tuple[Negotiated, int],
                                                     reqs: list[bytes], sizes: list[int],
                                                     tail: bytes) -> None:
    drive_transmission(state, b"".join(reqs) + tail, sizes)


@PROFILE
@given(state=negotiated_states(), reqs=st.lists(requests(), min_size=1, max_size=6),
       sizes=piece_sizes)
def test_transmission_chunking_does_not_change_events(state: tuple[Negotiated, int],
                                                      reqs: list[bytes],
                                                      sizes: list[int]) -> None:
    data = b"".join(reqs)

    def events(pieces: list[bytes]) -> list[object]:
        core = ServerTransmission(state[0], max_payload=state[1])
        out: list[object] = []
        for piece in pieces:
            core.receive_data(piece)
            for _ in range(MAX_EVENTS):
                try:
                    event = core.next_event()
                except ProtocolError as err:
                    return [*out, ("error", err.cookie, err.errno)]
                if event is NEED_DATA:
                    break
                out.append(event)
                if isinstance(event, Disconnect):
                    return out
        return out

    assert events(split(data, sizes)) == events([data])
