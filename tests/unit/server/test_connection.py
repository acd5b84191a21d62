"""``Connection`` over a fake transport: no sockets, bytes in and out by hand.

The client side is the sans-IO client core (``pynbd.proto.client``); its bytes
are fed to the connection the way asyncio does it (``get_buffer`` then
``buffer_updated``), and what the connection writes to the transport goes
back to the client core.  The transport has no socket, so every reply takes
the writer's transport path (``transport.write``).  The server is a fake
``ConnectionHost`` that records its bookkeeping calls.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from pynbd.block import MemoryNode
from pynbd.block.node import Extent, ExtentFlags
from pynbd.proto.client import ClientHandshake, ClientTransmission, Completion, HandshakeComplete
from pynbd.proto.constants import BASE_ALLOCATION, MAX_PAYLOAD, Cmd, Errno
from pynbd.proto.events import NEED_DATA
from pynbd.proto.handshake import TlsMode
from pynbd.server import connection
from pynbd.server.connection import Connection
from pynbd.server.export import Export, ExportTable
from pynbd.server.handlers import clip_extents
from pynbd.server.writer import LARGE_WRITE, queue_on_transport

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

    from pynbd.server.tls import TlsCredentials

SIZE = 1 << 20
TIMEOUT = 10.0


class FakeTransport(asyncio.Transport):
    """Records what the connection writes and does to reading; no socket, no fd.
    ``close`` reports the loss to the protocol on the next loop turn, as asyncio's do."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.writes = 0
        #: every pause_reading/resume_reading call, in order
        self.reading: list[str] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed
        self.written += data
        self.writes += 1

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data

    @property
    def reading_paused(self) -> bool:
        return bool(self.reading) and self.reading[-1] == "pause"

    def pause_reading(self) -> None:
        self.reading.append("pause")

    def resume_reading(self) -> None:
        self.reading.append("resume")

    def is_reading(self) -> bool:
        return not self.reading_paused

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket, no peer name, no TLS


class FakeHost:
    """A ``ConnectionHost`` with one export and no TLS, recording the bookkeeping."""

    def __init__(self, backend: MemoryNode) -> None:
        self.exports = ExportTable()
        self.exports.add(Export("", backend, multi_conn=True))
        self.tls_mode = TlsMode.OFF
        self.tls_context: ssl.SSLContext | None = None
        self.tls: TlsCredentials | None = None
        self.handshake_limit = 0.0
        self.max_payload = MAX_PAYLOAD
        self.calls: list[str] = []

    def admit(self, conn: Connection) -> str | None:
        self.calls.append("admit")
        return None

    def connection_gone(self, conn: Connection) -> None:
        self.calls.append("gone")

    def client_started(self, conn: Connection) -> None:
        self.calls.append("started")

    def client_finished(self, conn: Connection) -> None:
        self.calls.append("finished")


class GatedBackend(MemoryNode):
    """A memory disk whose FLUSH waits until the test opens the gate."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()

    async def flush(self) -> None:
        await self.gate.wait()


def feed(conn: Connection, data: bytes, *, piece: int = 1 << 30) -> None:
    """Hand ``data`` to the connection as asyncio would, ``piece`` bytes at most a time."""
    view = memoryview(data)
    while view:
        buf = conn.get_buffer(len(view))
        count = min(len(buf), len(view), piece)
        assert count > 0
        buf[:count] = view[:count]
        conn.buffer_updated(count)
        view = view[count:]


class Peer:
    """A connection with its fake transport and host, and the client's cores."""

    def __init__(self, backend: MemoryNode) -> None:
        self.host = FakeHost(backend)
        self.conn = Connection(self.host)
        self.transport = FakeTransport(self.conn)
        self.conn.connection_made(self.transport)
        self.client: ClientTransmission | None = None

    def handshake(self, *, structured: bool, piece: int = 1 << 30) -> HandshakeComplete:
        """Negotiate the default export; ``piece`` splits what the server receives."""
        core = ClientHandshake("", structured=structured,
                               meta_contexts=[BASE_ALLOCATION] if structured else ())
        while True:
            core.receive_data(self.transport.take())
            event = core.next_event()
            feed(self.conn, core.data_to_send(), piece=piece)
            if isinstance(event, HandshakeComplete):
                self.client = ClientTransmission.from_handshake(event)
                return event
            assert event is NEED_DATA, event

    def send(self) -> None:
        assert self.client is not None
        feed(self.conn, self.client.data_to_send())

    async def completions(self, count: int) -> dict[int, Completion]:
        """Wait for ``count`` completions (running the loop for task-path replies)."""
        assert self.client is not None
        done: dict[int, Completion] = {}
        while len(done) < count:
            self.client.receive_data(self.transport.take())
            event = self.client.next_event()
            if event is NEED_DATA:
                await asyncio.sleep(0)
            else:
                assert isinstance(event, Completion)
                done[event.cookie] = event
        return done


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def timed() -> None:
        await asyncio.wait_for(body(), TIMEOUT)

    asyncio.run(timed())


@pytest.mark.parametrize("structured", [False, True])
def test_handshake_requests_and_disconnect(structured: bool) -> None:
    async def body() -> None:
        backend = MemoryNode(SIZE)
        peer = Peer(backend)
        done = peer.handshake(structured=structured, piece=5)
        assert done.size == SIZE
        assert peer.host.calls == ["admit", "started"]
        client = peer.client
        assert client is not None

        data = bytes(range(256)) * 16
        write = client.write(data, 8192)
        flush = client.flush()
        peer.send()
        replies = await peer.completions(2)
        assert replies[write].ok
        assert replies[flush].ok

        read = client.read(8192, 4096)
        zeroes = client.write_zeroes(8192 + 1024, 1024)
        peer.send()
        replies = await peer.completions(2)
        assert replies[read].data == data
        assert replies[zeroes].ok
        read_again = client.read(8192, 4096)
        status = client.block_status(0, SIZE) if structured else None
        peer.send()
        replies = await peer.completions(2 if structured else 1)
        assert replies[read_again].data == data[:1024] + bytes(1024) + data[2048:]
        if status is not None:
            extents = replies[status].extents
            assert extents is not None
            assert sum(length for length, _ in extents[BASE_ALLOCATION]) == SIZE

        stats = peer.conn.stats
        assert (stats.requests, stats.bytes_read, stats.bytes_written) == (
            6 if structured else 5, 8192, 4096)
        client.disconnect()
        peer.send()
        await peer.conn.closed
        assert peer.transport.closed
        assert peer.host.calls == ["admit", "started", "finished", "gone"]
        await backend.close()

    run(body)


def test_bad_requests_get_error_replies_and_the_connection_goes_on() -> None:
    async def body() -> None:
        backend = MemoryNode(SIZE)
        peer = Peer(backend)
        peer.handshake(structured=True)
        client = peer.client
        assert client is not None
        past_end = client.request(Cmd.READ, offset=SIZE - 512, length=4096)
        bad_flags = client.request(Cmd.FLUSH, flags=0x8000)
        good = client.read(0, 512)
        peer.send()
        replies = await peer.completions(3)
        assert replies[past_end].error == Errno.EINVAL
        assert replies[bad_flags].error == Errno.EINVAL
        assert replies[good].data == bytes(512)
        assert not peer.transport.is_closing()

        # a request with a bad magic breaks the protocol: the connection ends
        feed(peer.conn, b"\x00" * 28)
        assert peer.transport.closed
        await peer.conn.closed
        assert peer.host.calls[-2:] == ["finished", "gone"]
        await backend.close()

    run(body)


def test_reading_pauses_at_the_in_flight_limit_and_resumes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "MAX_IN_FLIGHT", 4)

    async def body() -> None:
        backend = GatedBackend(SIZE)
        peer = Peer(backend)
        peer.handshake(structured=False)
        client = peer.client
        assert client is not None
        flushes = [client.flush() for _ in range(6)]
        peer.send()
        await asyncio.sleep(0)
        # four tasks wait on the backend; the other two stay parsed, not started
        assert peer.conn.in_flight == 4
        assert peer.transport.reading == ["pause"]
        assert peer.transport.take() == b""

        # an inline read arriving now waits too: nothing is processed while paused
        read = client.read(0, 4096)
        peer.send()
        assert peer.transport.take() == b""

        backend.gate.set()
        replies = await peer.completions(7)
        assert sorted(replies) == sorted([*flushes, read])
        assert all(reply.ok for reply in replies.values())
        assert peer.transport.reading == ["pause", "resume"]
        await asyncio.sleep(0)  # a task counts in flight until its done callback ran
        assert peer.conn.in_flight == 0
        peer.conn.shutdown()
        await peer.conn.closed
        await backend.close()

    run(body)


def test_reading_pauses_while_the_transport_cannot_take_more() -> None:
    async def body() -> None:
        backend = MemoryNode(SIZE)
        peer = Peer(backend)
        peer.handshake(structured=False)
        client = peer.client
        assert client is not None
        peer.conn.pause_writing()
        assert peer.transport.reading == ["pause"]
        read = client.read(0, 4096)
        peer.send()
        assert peer.transport.take() == b""  # held until writing resumes
        peer.conn.resume_writing()
        assert peer.transport.reading == ["pause", "resume"]
        assert (await peer.completions(1))[read].data == bytes(4096)
        peer.conn.shutdown()
        await peer.conn.closed
        await backend.close()

    run(body)


def test_the_transport_path_joins_small_pieces_and_keeps_large_ones_whole() -> None:
    class Recorder(FakeTransport):
        def __init__(self) -> None:
            super().__init__(asyncio.Protocol())
            self.pieces: list[bytes] = []

        def write(self, data: bytes | bytearray | memoryview) -> None:
            self.pieces.append(bytes(data))

    transport = Recorder()
    large = bytearray(b"x" * LARGE_WRITE)
    queue_on_transport(transport, [b"ab", b"cd", memoryview(large), b"ef"])
    assert transport.pieces == [b"abcd", bytes(large), b"ef"]


def test_clip_extents_cuts_to_the_request() -> None:
    zero, data = ExtentFlags.HOLE | ExtentFlags.ZERO, ExtentFlags.DATA
    # the last extent reaching the end is cut; any after it dropped
    assert clip_extents([Extent(100, data), Extent(1 << 40, zero), Extent(5, data)],
                        1000, 1300) == [(100, data), (200, zero)]
    # a backend extent longer than 32 bits comes out as the request's length
    assert clip_extents([Extent(1 << 40, zero)], 0, 0xFFFFFFFF) == [(0xFFFFFFFF, zero)]
    # extents covering less than the request are kept as they are
    assert clip_extents([Extent(10, data)], 0, 100) == [(10, data)]
