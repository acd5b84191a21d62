"""Property tests of ``ExtendedTransmission``: no input makes it misbehave.

Whatever extended requests (mostly valid, one fault at a time) or bytes arrive,
in whatever chunking, ``next_event`` yields the same events or raises only
``ProtocolError``; every ``Request`` is safe for a backend (ranges inside the
export, payloads within the limit and exactly as long as the request says);
every reply is one extended chunk naming its request's cookie and offset; and
the per-request bookkeeping is empty once every request has been answered.

Run many more examples with ``HYPOTHESIS_PROFILE=fuzz``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.fakes import FakeExport

from pynbd.proto import wire
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
)
from pynbd.proto.errors import ProtocolError
from pynbd.proto.events import NEED_DATA, Disconnect, InvalidRequest, Request
from pynbd.proto.extended import ExtendedTransmission
from pynbd.proto.negotiated import Negotiated

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile("pynbd-proto-ext", max_examples=300, deadline=None,
                          suppress_health_check=_HEALTH)
settings.register_profile("fuzz", max_examples=20_000, deadline=None,
                          suppress_health_check=_HEALTH)
PROFILE = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                                       "pynbd-proto-ext")))
MAX_EVENTS = 10_000
PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
ALLOWED = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
piece_sizes = st.lists(st.integers(1, 300), min_size=1, max_size=20)


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        pieces.append(data[pos:pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return pieces


@st.composite
def states(draw: st.DrawFn) -> tuple[Negotiated, int]:
    export = FakeExport("x", size=draw(st.sampled_from([0, 512, 1 << 20, 1 << 40, 1 << 62])),
                        read_only=draw(st.booleans()))
    negotiated = Negotiated(export=export, flags=export.transmission_flags(structured=True),
                            structured=True, extended=True,
                            meta_contexts={0: BASE_ALLOCATION} if draw(st.booleans()) else {})
    return negotiated, draw(st.sampled_from([MAX_PAYLOAD, 4096, 100]))


FAULTS = ["none"] * 6 + ["cmd", "flags", "offset", "length", "magic", "payload-len",
                         "no-payload-len"]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    fault = draw(st.sampled_from(FAULTS))
    cmd = draw(st.sampled_from([int(c) for c in ALLOWED] * 3 + [int(Cmd.DISC)]))
    allowed = int(ALLOWED.get(Cmd(cmd), CmdFlag(0)))
    flags = draw(st.sampled_from([0, 0, CmdFlag.FUA, allowed]).map(lambda f: f & allowed))
    offset = draw(st.one_of(st.integers(0, 4096), st.integers(0, 1 << 41)))
    length = draw(st.one_of(st.integers(0, 1024), st.integers(0, 5000),
                            st.sampled_from([0, 512, 1 << 32, 1 << 40])))
    magic = EXTENDED_REQUEST_MAGIC
    if fault == "cmd":
        cmd = draw(st.integers(0, 0xFFFF))
    elif fault == "flags":
        flags = draw(st.integers(0, 0xFFFF))
    elif fault == "offset":
        offset = draw(st.integers(0, 2**64 - 1))
    elif fault == "length":
        length = draw(st.integers(0, 2**64 - 1))
    elif fault == "magic":
        magic = draw(st.sampled_from([REQUEST_MAGIC, 0, EXTENDED_REPLY_MAGIC]))
    elif fault == "payload-len":
        flags |= PAYLOAD_LEN
        length = draw(st.integers(0, 300))
    if cmd == Cmd.WRITE and fault != "no-payload-len":
        flags |= PAYLOAD_LEN
        length = draw(st.integers(0, 5000)) if fault != "length" else length
    payload = bytes(length) if (flags & PAYLOAD_LEN or cmd == Cmd.WRITE) and \
        length <= 5000 else b""
    cookie = draw(st.integers(0, 2**64 - 1))
    return wire.EXTENDED_REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload


def check_reply(buffers: list[bytes | bytearray | memoryview], cookie: int,
                offset: int) -> None:
    data = b"".join(bytes(b) for b in buffers)
    magic, flags, _, got_cookie, got_offset, length = wire.EXTENDED_CHUNK.unpack_from(data)
    assert magic == EXTENDED_REPLY_MAGIC
    assert (flags, got_cookie, got_offset) == (ReplyFlag.DONE, cookie, offset)
    assert len(data) == wire.EXTENDED_CHUNK.size + length


def check_request(event: Request, negotiated: Negotiated, max_payload: int) -> None:
    assert event.cmd in ALLOWED
    assert not event.flags & ~int(ALLOWED[Cmd(event.cmd)])
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
    if event.cmd == Cmd.BLOCK_STATUS:
        assert negotiated.meta_contexts
        assert event.length > 0


def next_or_error(core: ExtendedTransmission) -> object:
    try:
        return core.next_event()
    except ProtocolError as err:
        return err


def drive(state: tuple[Negotiated, int], pieces: list[bytes]) -> list[object]:
    """Feed ``pieces``; check and answer every event; return them (comparable)."""
    negotiated, max_payload = state
    core = ExtendedTransmission(negotiated, max_payload=max_payload)
    out: list[object] = []
    for piece in pieces:
        core.receive_data(piece)
        for _ in range(MAX_EVENTS):
            event = next_or_error(core)
            if isinstance(event, ProtocolError):
                if event.cookie is not None:
                    assert event.errno == Errno.EINVAL
                    core.reply_error(event.cookie, event.errno, event.message)
                assert core._offsets == {}  # every request answered: nothing kept
                return [*out, ("error", event.cookie, event.errno)]
            if event is NEED_DATA:
                assert core.bytes_wanted >= 1
                break
            out.append(event)
            if isinstance(event, Disconnect):
                return out
            if isinstance(event, InvalidRequest):
                assert event.message
                check_reply(core.reply_error(event.cookie, event.errno, event.message),
                            event.cookie, event.offset)
            else:
                assert isinstance(event, Request)
                check_request(event, negotiated, max_payload)
                check_reply(core.reply_ok(event.cookie), event.cookie, event.offset)
            assert core._offsets == {}
        else:
            raise AssertionError("next_event never returned NEED_DATA")
    return out


@PROFILE
@given(state=states(), reqs=st.lists(requests(), min_size=1, max_size=8), sizes=piece_sizes,
       tail=st.binary(max_size=40))
def test_extended_requests_in_any_chunking(state: tuple[Negotiated, int], reqs: list[bytes],
                                           sizes: list[int], tail: bytes) -> None:
    data = b"".join(reqs)
    whole = drive(state, [data])
    assert drive(state, split(data, sizes)) == whole
    drive(state, split(data + tail, sizes))


@PROFILE
@given(state=states(), data=st.binary(max_size=2000), sizes=piece_sizes)
def test_extended_transmission_survives_any_bytes(state: tuple[Negotiated, int], data: bytes,
                                                  sizes: list[int]) -> None:
    prefix = wire.U32.pack(EXTENDED_REQUEST_MAGIC)
    drive(state, split(prefix + data, sizes))
