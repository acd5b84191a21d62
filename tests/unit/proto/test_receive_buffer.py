"""ServerTransmission's receive side: ``get_buffer``/``buffer_updated`` and payload reuse.

The asyncio shell receives straight into views the core hands out.  These
tests check that feeding a stream that way, in any piece sizes, gives exactly
the events ``receive_data`` gives; that a large WRITE payload is received into
the very buffer its ``Request`` carries; that the receive buffer starts small
and grows only while receives fill it; and that ``recycle`` reuses a payload
buffer without ever handing out stale bytes.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.fakes import FakeCatalog, FakeExport

from pynbd.proto import wire
from pynbd.proto.constants import IHAVEOPT, REQUEST_MAGIC, ClientFlag, Cmd, Opt
from pynbd.proto.events import NEED_DATA, HandshakeDone, Request
from pynbd.proto.handshake import ServerHandshake
from pynbd.proto.transmission import (
    DIRECT_PAYLOAD_MIN,
    RECV_BUFFER_MAX,
    RECV_BUFFER_MIN,
    ServerTransmission,
)

if TYPE_CHECKING:
    from pynbd.proto.negotiated import Negotiated

SIZE = 64 << 20
CATALOG = FakeCatalog(FakeExport("", size=SIZE))


def negotiate() -> Negotiated:
    data = b"\x00\x00\x00\x00" + b"\x00\x00"  # empty name, no info requests
    stream = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    stream += wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, len(data)) + data
    core = ServerHandshake(CATALOG)
    core.receive_data(stream)
    done = core.next_event()
    assert isinstance(done, HandshakeDone)
    return done.negotiated


NEGOTIATED = negotiate()


def req(cmd: int, offset: int, length: int, cookie: int, fill: int = 0) -> bytes:
    payload = bytes([fill % 256]) * length if cmd == Cmd.WRITE else b""
    return wire.REQUEST.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload


def drain(core: ServerTransmission) -> list[object]:
    events: list[object] = []
    while (event := core.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def feed_buffered(core: ServerTransmission, stream: bytes, cuts: random.Random,
                  events: list[object], *, parse_between: bool = True) -> None:
    """Feed ``stream`` as asyncio would: into ``get_buffer`` views, in random pieces."""
    pos = 0
    while pos < len(stream):
        view = core.get_buffer()
        assert len(view) > 0
        count = min(len(view), len(stream) - pos, cuts.randint(1, 3 * DIRECT_PAYLOAD_MIN))
        view[:count] = stream[pos:pos + count]
        pos += count
        core.buffer_updated(count)
        del view
        if parse_between:
            events += drain(core)


# requests: (cmd, length) with small and large writes
REQUESTS = st.lists(st.one_of(
    st.tuples(st.just(Cmd.READ), st.integers(0, 1 << 20)),
    st.tuples(st.just(Cmd.WRITE), st.integers(0, 4096)),
    st.tuples(st.just(Cmd.WRITE), st.integers(DIRECT_PAYLOAD_MIN - 2, 3 * DIRECT_PAYLOAD_MIN)),
    st.tuples(st.just(Cmd.FLUSH), st.just(0)),
), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(REQUESTS, st.integers(0, 2**32), st.booleans())
def test_buffered_feeding_gives_the_same_events(requests: list[tuple[int, int]], seed: int,
                                                 parse_between: bool) -> None:
    stream = b"".join(req(cmd, i * 4096, length, cookie=i, fill=i)
                      for i, (cmd, length) in enumerate(requests))
    whole = ServerTransmission(NEGOTIATED)
    whole.receive_data(stream)
    expected = drain(whole)
    assert len(expected) == len(requests)
    core = ServerTransmission(NEGOTIATED)
    events: list[object] = []
    feed_buffered(core, stream, random.Random(seed), events, parse_between=parse_between)
    events += drain(core)
    assert events == expected
    assert core.pending_bytes == 0


def test_large_write_payload_is_received_in_place() -> None:
    length = 4 * DIRECT_PAYLOAD_MIN
    data = req(Cmd.WRITE, 0, length, cookie=7, fill=9)
    core = ServerTransmission(NEGOTIATED)
    first = core.get_buffer()
    head = len(first)
    first[:] = data[:head]
    core.buffer_updated(head)
    assert core.next_event() is NEED_DATA
    assert core.bytes_wanted == len(data) - head
    into = core.get_buffer()
    assert len(into) == len(data) - head  # exactly the rest of the payload, no further
    target = into.obj
    into[:] = data[head:]
    core.buffer_updated(len(into))
    event = core.next_event()
    assert isinstance(event, Request)
    assert event.payload is target
    assert event.payload == bytes([9]) * length
    # after a large WRITE, the next header is received alone: if it starts
    # another large WRITE, none of that payload lands in the receive buffer
    view = core.get_buffer()
    assert len(view) == wire.REQUEST.size
    view[:] = req(Cmd.READ, 0, 512, cookie=8)
    core.buffer_updated(len(view))
    del view
    assert [e.cookie for e in drain(core) if isinstance(e, Request)] == [8]
    assert len(core.get_buffer()) > wire.REQUEST.size  # small requests: batches again


def test_receive_buffer_starts_small_and_grows_while_filled() -> None:
    core = ServerTransmission(NEGOTIATED)
    assert len(core.get_buffer()) <= RECV_BUFFER_MIN
    reads = b"".join(req(Cmd.READ, 0, 512, cookie=i) for i in range(20_000))
    sizes = []
    pos = parsed = 0
    while pos < len(reads):
        view = core.get_buffer()
        sizes.append(len(view))
        count = min(len(view), len(reads) - pos)
        view[:count] = reads[pos:pos + count]
        pos += count
        core.buffer_updated(count)
        del view
        parsed += len(drain(core))
        assert parsed == pos // wire.REQUEST.size
    assert parsed == 20_000
    assert max(sizes) <= RECV_BUFFER_MAX
    assert max(sizes) > RECV_BUFFER_MIN


def test_small_buffer_when_receives_do_not_fill_it() -> None:
    core = ServerTransmission(NEGOTIATED)
    for i in range(1000):
        view = core.get_buffer()
        assert len(view) <= RECV_BUFFER_MIN
        one = req(Cmd.READ, 0, 4096, cookie=i)
        view[:len(one)] = one
        core.buffer_updated(len(one))
        del view
        assert [e.cookie for e in drain(core) if isinstance(e, Request)] == [i]


def test_views_alive_during_parsing_do_not_block_it() -> None:
    """asyncio keeps the last view alive while ``buffer_updated`` runs the parser."""
    core = ServerTransmission(NEGOTIATED)
    stream = b"".join(req(Cmd.WRITE, 0, 3000, cookie=i, fill=i) for i in range(100))
    events: list[object] = []
    pos = 0
    while pos < len(stream):
        view = core.get_buffer()
        count = min(len(view), len(stream) - pos)
        view[:count] = stream[pos:pos + count]
        pos += count
        core.buffer_updated(count)
        events += drain(core)  # view still alive here
    assert [e.payload for e in events if isinstance(e, Request)] == [
        bytes([i]) * 3000 for i in range(100)]


def test_recycled_payload_is_reused_and_holds_only_new_data() -> None:
    length = 2 * DIRECT_PAYLOAD_MIN
    core = ServerTransmission(NEGOTIATED)
    cuts = random.Random(1)
    events: list[object] = []
    feed_buffered(core, req(Cmd.WRITE, 0, length, cookie=1, fill=1)[:1000], cuts, events)
    feed_buffered(core, req(Cmd.WRITE, 0, length, cookie=1, fill=1)[1000:], cuts, events)
    (first,) = events
    assert isinstance(first, Request)
    core.recycle(first.payload)
    events.clear()
    second_stream = req(Cmd.WRITE, 0, length, cookie=2, fill=2)
    feed_buffered(core, second_stream[:1000], cuts, events)
    feed_buffered(core, second_stream[1000:], cuts, events)
    (second,) = events
    assert isinstance(second, Request)
    assert second.payload is first.payload
    assert second.payload == bytes([2]) * length


def test_recycle_ignores_small_and_immutable_payloads() -> None:
    core = ServerTransmission(NEGOTIATED)
    core.recycle(None)
    core.recycle(bytes(DIRECT_PAYLOAD_MIN))
    core.recycle(bytearray(16))
    events: list[object] = []
    stream = req(Cmd.WRITE, 0, DIRECT_PAYLOAD_MIN, cookie=3, fill=3)
    feed_buffered(core, stream[:100], random.Random(2), events)
    feed_buffered(core, stream[100:], random.Random(2), events)
    (event,) = events
    assert isinstance(event, Request)
    assert event.payload == bytes([3]) * DIRECT_PAYLOAD_MIN


def test_an_idle_connection_holds_no_receive_buffer() -> None:
    """Once everything received is parsed, a minimal receive buffer is let go (1,000
    idle clients cost a few MiB); the next ``get_buffer`` makes a new one."""
    core = ServerTransmission(NEGOTIATED)
    for cookie in range(3):
        view = core.get_buffer()
        assert len(view) == RECV_BUFFER_MIN
        data = req(Cmd.READ, 4096 * cookie, 4096, cookie)
        view[:len(data)] = data
        core.buffer_updated(len(data))
        events = drain(core)
        assert [e.cookie for e in events if isinstance(e, Request)] == [cookie]
        assert core.pending_bytes == 0
        assert len(core._buf) == 0
    # a partial header keeps its buffer until the rest arrives
    data = req(Cmd.READ, 0, 512, 9)
    view = core.get_buffer()
    view[:10] = data[:10]
    core.buffer_updated(10)
    assert drain(core) == []
    assert len(core._buf) == RECV_BUFFER_MIN
    view = core.get_buffer()
    view[:len(data) - 10] = data[10:]
    core.buffer_updated(len(data) - 10)
    assert [e.cookie for e in drain(core) if isinstance(e, Request)] == [9]
