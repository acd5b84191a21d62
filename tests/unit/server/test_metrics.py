"""The request counters (``pynbd.server.metrics``), the collector and HTTP server of
the exporter (``pynbd.server.metricsexport``) and query-blockstats' mapping.

Connections run over the fake transport and host of ``test_connection`` (no
sockets): a ``MeteredConnection`` counts every request whichever path answers
it (inline, sendfile-less task, direct, refused), a plain ``Connection``
counts nothing.  The exporter's HTTP server runs in the test's loop on a
loopback port, and its answers are read with ``prometheus_client``'s parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.unit.server.test_connection import (
    FakeHost,
    FakeTransport,
    GatedBackend,
    Peer,
    feed,
    run,
)

from pynbd.block import FastPaths, MemoryNode
from pynbd.block import rbd as rbd_module
from pynbd.proto.constants import Cmd, Errno
from pynbd.proto.handshake import TlsMode
from pynbd.qmp.commands.stats import device_stats
from pynbd.server import Export, ExportTable, Server, metrics
from pynbd.server.connection import Connection
from pynbd.server.metrics import BOUNDS_NS, COMMAND_NAMES, UNKNOWN, ExportMetrics, export_views
from pynbd.server.metricsexport import (
    Collector,
    MetricsError,
    MetricsServer,
    parse_address,
    start_exporter,
    stop_exporter,
)
from pynbd.server.runtime import MeteredConnection

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from pynbd.block.node import ReadDone, WriteDone
    from pynbd.proto.client import Completion

SIZE = 1 << 20
R, W, F, T, Z = Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES


@pytest.fixture(autouse=True)
def _process_state() -> Iterator[None]:
    """Counting, the handshake failure counts and rbd timing are process-wide: each
    test starts from and leaves them as a fresh process has them."""
    saved = dict(metrics.HANDSHAKE_FAILURES)
    metrics.set_counting(False)
    yield
    metrics.set_counting(False)
    metrics.time_rbd_calls(False)
    metrics.RBD_CALLS.clear()
    metrics.HANDSHAKE_FAILURES.clear()
    metrics.HANDSHAKE_FAILURES.update(saved)


class MeteredPeer(Peer):
    """``Peer`` with the connection a counting server makes."""

    def __init__(self, backend: MemoryNode, cls: type[Connection] = MeteredConnection) -> None:
        self.host = FakeHost(backend)
        self.conn = cls(self.host)
        self.transport = FakeTransport(self.conn)
        self.conn.connection_made(self.transport)
        self.client = None

    @property
    def metrics(self) -> ExportMetrics:
        export = self.host.exports.lookup("")
        assert export is not None
        return export.metrics

    async def do(self, *cookies: int) -> dict[int, Completion]:
        self.send()
        return await self.completions(len(cookies))


class FailingBackend(MemoryNode):
    """FLUSH fails with EIO; TRIM has a bug (not an OSError: answered EIO as well)."""

    async def flush(self) -> None:
        raise OSError(errno.EIO, "injected")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise RuntimeError("a node bug")


class DirectBackend(MemoryNode):
    """READ and WRITE complete by themselves a loop turn later (like librbd's aio);
    requests at offset 0 fail with ENOSPC."""

    def fast_paths(self) -> FastPaths:
        return FastPaths(start_read=self.start_read, start_write=self.start_write)

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        def work() -> None:
            if offset == 0:
                done(None, OSError(errno.ENOSPC, "injected"))
            else:
                done(bytes(length), None)

        asyncio.get_running_loop().call_soon(work)
        return True

    def start_write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool,
                    done: WriteDone) -> bool:
        asyncio.get_running_loop().call_soon(
            done, OSError(errno.ENOSPC, "injected") if offset == 0 else None)
        return True


# -- the counters ----------------------------------------------------------------------


def test_done_counts_durations_bytes_and_the_highest_write() -> None:
    m = ExportMetrics()
    m.done(R, 0, 4096, 0)  # a start of 0: a huge duration, in the +Inf bucket
    m.done(W, 8192, 512, perf_counter_ns())
    m.done(W, 0, 512, perf_counter_ns())
    assert m.requests(R) == 1
    assert m.durations[R].buckets[-1] == 1
    assert m.byte_count(R) == 4096
    assert m.byte_count(W) == 1024
    assert m.wr_highest_offset == 8192 + 512
    m.done(Z, 1 << 20, 4096, perf_counter_ns())
    m.done(T, 0, 4096, perf_counter_ns())  # lower: the highest stays
    m.done(R, 1 << 30, 4096, perf_counter_ns())  # reads never move it
    m.done(W, 1 << 30, 4096, perf_counter_ns(), failed=True)  # nor failures
    assert m.wr_highest_offset == (1 << 20) + 4096
    assert m.failed[W] == 1
    assert m.byte_count(W) == 1024
    assert [m.requests(c) for c in (R, W, Z, T)] == [2, 3, 1, 1]
    assert m.last_ns > 0
    assert m.last_activity_ns() == m.last_ns
    m.inline_reads += 1  # inline activity: placed when first seen
    seen = m.last_activity_ns()
    assert seen > m.last_ns
    assert m.last_activity_ns() == seen


def test_histogram_bounds_are_inclusive() -> None:
    h = metrics.Histogram()
    for ns in (0, BOUNDS_NS[0], BOUNDS_NS[0] + 1, BOUNDS_NS[-1], BOUNDS_NS[-1] + 1):
        h.observe(ns)
    assert h.buckets[0] == 2
    assert h.buckets[1] == 1
    assert h.buckets[-2] == 1
    assert h.buckets[-1] == 1
    assert h.sum_ns == 2 * BOUNDS_NS[0] + 1 + 2 * BOUNDS_NS[-1] + 1


def test_refused_requests_and_unknown_commands() -> None:
    m = ExportMetrics()
    m.refused(R, Errno.EINVAL)
    m.refused(999, Errno.EINVAL)
    m.refused(-1, Errno.EINVAL)
    assert m.requests(R) == 1
    assert m.invalid[R] == 1
    assert m.durations[R].buckets[0] == 1
    assert m.requests(UNKNOWN) == 2
    assert COMMAND_NAMES[UNKNOWN] == "UNKNOWN"
    assert m.errors == {(R, Errno.EINVAL): 1, (UNKNOWN, Errno.EINVAL): 2}
    assert m.time_ns(R) == 0


def test_servers_count_only_while_counting_is_on() -> None:
    async def body() -> None:
        table = ExportTable()
        assert Server(table).connection_class is Connection
        metrics.set_counting(True)
        assert Server(table).connection_class is MeteredConnection
        metrics.set_counting(False)
        assert Server(table).connection_class is Connection

    run(body)


# -- the metered connection ------------------------------------------------------------


def test_every_path_counts_each_request_once() -> None:
    async def body() -> None:
        backend = FailingBackend(SIZE)
        peer = MeteredPeer(backend)
        peer.handshake(structured=True)
        client = peer.client
        assert client is not None
        m = peer.metrics
        assert m.open_connections() == 1
        # inline (memory: pread_nowait/pwrite_nowait)
        replies = await peer.do(client.write(b"a" * 4096, 4096), client.read(0, 8192))
        assert all(r.ok for r in replies.values())
        # ... not timed: in the lowest bucket, 0 ns
        assert (m.inline_reads, m.inline_writes, m.wr_highest_offset) == (1, 1, 8192)
        assert (m.histogram(R)[0], m.requests(R), m.time_ns(R)) == (1, 1, 0)
        assert m.last_activity_ns() > 0
        # task path: FUA write, write-zeroes, block status, and two failures
        cookies = (client.write(b"b" * 512, 0, fua=True), client.write_zeroes(65536, 4096),
                   client.block_status(0, SIZE), client.flush(), client.trim(0, 4096))
        replies = await peer.do(*cookies)
        assert [replies[c].error for c in cookies] == [0, 0, 0, Errno.EIO, Errno.EIO]
        # refused: past the end, a known command the server does not do, an unknown one
        refused = (client.request(Cmd.READ, offset=SIZE, length=512),
                   client.request(Cmd.RESIZE, offset=0, length=0),
                   client.request(42, offset=0, length=0))  # type: ignore[arg-type]
        replies = await peer.do(*refused)
        assert all(replies[c].error == Errno.EINVAL for c in refused)

        assert {COMMAND_NAMES[c]: m.requests(c) for c in range(len(COMMAND_NAMES))
                if m.requests(c)} == {"READ": 2, "WRITE": 2, "WRITE_ZEROES": 1,
                                      "BLOCK_STATUS": 1, "FLUSH": 1, "TRIM": 1,
                                      "RESIZE": 1, "UNKNOWN": 1}
        assert m.byte_count(R) == 8192
        assert m.byte_count(W) == 4096 + 512
        assert m.failed[F] == m.failed[T] == 1
        assert m.invalid[R] == 1
        assert m.errors == {(F, Errno.EIO): 1, (T, Errno.EIO): 1, (R, Errno.EINVAL): 1,
                            (Cmd.RESIZE, Errno.EINVAL): 1, (UNKNOWN, Errno.EINVAL): 1}
        assert m.wr_highest_offset == 65536 + 4096
        await asyncio.sleep(0)  # the tasks' done callbacks (they replied already)
        assert m.in_flight() == 0
        # the connection's own counters still count as before
        assert peer.conn.stats.bytes_written == 4096 + 512
        client.disconnect()
        peer.send()
        await peer.conn.closed
        assert m.open_connections() == 0
        await backend.close()

    run(body)


def test_direct_requests_are_counted_when_they_complete() -> None:
    async def body() -> None:
        backend = DirectBackend(SIZE)
        peer = MeteredPeer(backend)
        peer.handshake(structured=False)
        client = peer.client
        assert client is not None
        m = peer.metrics
        cookies = (client.read(4096, 4096), client.read(0, 512),
                   client.write(b"c" * 1024, 8192), client.write(b"d" * 512, 0))
        peer.send()
        assert m.requests(R) == m.requests(W) == 0  # started, not yet complete
        assert m.in_flight() == 4
        replies = await peer.completions(len(cookies))
        assert [replies[c].error for c in cookies] == [0, Errno.ENOSPC, 0, Errno.ENOSPC]
        assert (m.requests(R), m.requests(W)) == (2, 2)
        assert (m.failed[R], m.failed[W], m.byte_count(R), m.byte_count(W)) == (1, 1, 4096, 1024)
        assert m.errors == {(R, Errno.ENOSPC): 1, (W, Errno.ENOSPC): 1}
        assert m.wr_highest_offset == 8192 + 1024
        await backend.close()

    run(body)


def test_requests_during_shutdown_are_refused_and_counted() -> None:
    async def body() -> None:
        backend = GatedBackend(SIZE)
        peer = MeteredPeer(backend)
        peer.handshake(structured=False)
        client = peer.client
        assert client is not None
        flush = client.flush()
        peer.send()
        await asyncio.sleep(0)
        peer.conn.shutdown()
        late = client.read(0, 512)
        peer.send()
        backend.gate.set()
        replies = await peer.completions(2)
        assert replies[flush].ok
        assert replies[late].error == Errno.ESHUTDOWN
        m = peer.metrics
        assert (m.requests(F), m.requests(R), m.invalid[R]) == (1, 1, 1)
        assert m.errors == {(R, Errno.ESHUTDOWN): 1}
        await backend.close()

    run(body)


def test_a_plain_connection_counts_nothing() -> None:
    async def body() -> None:
        backend = MemoryNode(SIZE)
        peer = MeteredPeer(backend, cls=Connection)
        peer.handshake(structured=False)
        client = peer.client
        assert client is not None
        await peer.do(client.write(b"a" * 512, 0), client.read(0, 512), client.flush(),
                      client.request(Cmd.READ, offset=SIZE, length=512))
        m = peer.metrics
        assert sum(m.requests(c) for c in range(len(COMMAND_NAMES))) == 0
        assert not m.errors
        assert m.open_connections() == 0
        assert peer.conn.stats.requests == 3
        await backend.close()

    run(body)


# -- handshake failures -------------------------------------------------------------------


def _failures() -> dict[str, int]:
    return dict(metrics.HANDSHAKE_FAILURES)


@pytest.mark.parametrize(("data", "reason"), [
    (b"\0\0\0\3" + b"\xff" * 16, "protocol_error"),  # client flags, then bad option magic
    (b"", "disconnected"),
])
def test_handshake_failures_are_counted_once(data: bytes, reason: str) -> None:
    async def body() -> None:
        before = _failures()
        backend = MemoryNode(SIZE)
        peer = MeteredPeer(backend)
        if data:
            feed(peer.conn, data)
        peer.transport.close()  # the loss reaches the connection next turn
        await peer.conn.closed
        after = _failures()
        assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)
                } == {reason: 1}
        await backend.close()

    run(body)


def test_handshake_timeout_and_tls_required_are_counted() -> None:
    async def body() -> None:
        before = _failures()
        backend = MemoryNode(SIZE)
        peer = MeteredPeer(backend)
        peer.conn._handshake_expired()
        await peer.conn.closed
        # a TLS-only server refuses NBD_OPT_EXPORT_NAME in plaintext: the handshake ends
        host = FakeHost(backend)
        host.tls_mode = TlsMode.REQUIRE
        conn = MeteredConnection(host)
        transport = FakeTransport(conn)
        conn.connection_made(transport)
        feed(conn, b"\0\0\0\3" + b"IHAVEOPT" + b"\0\0\0\1" + b"\0\0\0\0")
        await conn.closed
        after = _failures()
        assert after["timeout"] - before["timeout"] == 1
        assert after["refused"] - before["refused"] == 1
        assert after["disconnected"] == before["disconnected"]
        await backend.close()

    run(body)


# -- rbd call timing -------------------------------------------------------------------------


def _rbd_timer() -> Callable[[Any, int], None] | None:
    return rbd_module.call_timer


def test_rbd_timing_hook_is_set_only_while_on() -> None:
    assert _rbd_timer() is None
    metrics.time_rbd_calls(True)
    timer = _rbd_timer()
    assert timer is not None

    class Node:
        shown_name, node_name, filename = "", "#block001", "rbd:p/i"

    timer(Node(), 3_000_000)
    timer(Node(), 4_000)
    histogram = metrics.RBD_CALLS["#block001"]
    assert sum(histogram.buckets) == 2
    assert histogram.sum_ns == 3_004_000
    metrics.time_rbd_calls(False)
    assert _rbd_timer() is None


# -- the exporter -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)), (":0", ("0.0.0.0", 0)),
    ("[::1]:65535", ("::1", 65535)), ("localhost:80", ("localhost", 80)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected ADDR:PORT"), ("127.0.0.1", "expected ADDR:PORT"),
    ("127.0.0.1:", "expected ADDR:PORT"), ("127.0.0.1:x1", "invalid port 'x1'"),
    ("1.2.3.4:65536", "port 65536 is out of range 0-65535"),
    ("::1:9100", "an IPv6 address goes in brackets"), ("h:-1", "invalid port '-1'"),
])
def test_parse_address_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[")):
        parse_address(text)


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in families[family].samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, sample, labels, found)
    return float(found[0])


def test_collector_families() -> None:
    node = MemoryNode(SIZE)
    export = Export("disk", node)
    m = export.metrics
    m.done(R, 0, 4096, perf_counter_ns())
    m.done(R, 0, 4096, perf_counter_ns() - 2_000_000)  # 2 ms
    m.done(F, 0, 0, perf_counter_ns(), failed=True)
    m.error(F, Errno.EIO)
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(Collector(lambda: export_views([export])))
    families = _families(prometheus_client.generate_latest(registry).decode())
    assert _sample(families, "pynbd_requests", "pynbd_requests_total",
                   export="disk", command="READ") == 2
    assert _sample(families, "pynbd_requests", "pynbd_requests_total",
                   export="disk", command="TRIM") == 0  # every data command, even unseen
    assert _sample(families, "pynbd_request_errors", "pynbd_request_errors_total",
                   export="disk", command="FLUSH", errno="EIO") == 1
    assert _sample(families, "pynbd_bytes", "pynbd_bytes_total",
                   export="disk", direction="read") == 8192
    assert _sample(families, "pynbd_request_duration_seconds",
                   "pynbd_request_duration_seconds_count", export="disk", command="READ") == 2
    assert _sample(families, "pynbd_request_duration_seconds",
                   "pynbd_request_duration_seconds_bucket", export="disk", command="READ",
                   le="0.001") == 1
    assert _sample(families, "pynbd_request_duration_seconds",
                   "pynbd_request_duration_seconds_bucket", export="disk", command="READ",
                   le="+Inf") == 2
    assert _sample(families, "pynbd_request_duration_seconds",
                   "pynbd_request_duration_seconds_sum", export="disk", command="READ") >= 0.002
    assert _sample(families, "pynbd_connections", "pynbd_connections", export="disk") == 0
    assert _sample(families, "pynbd_in_flight_requests", "pynbd_in_flight_requests",
                   export="disk") == 0
    assert {s.labels["reason"] for s in families["pynbd_handshake_failures"].samples} == set(
        metrics.HANDSHAKE_REASONS)


async def _http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_http_server_answers_scrapes_and_refuses_the_rest() -> None:
    async def body() -> None:
        export = Export("", MemoryNode(SIZE))
        export.metrics.done(W, 0, 512, perf_counter_ns())
        server = MetricsServer(lambda: [export])
        await server.start("127.0.0.1", 0)
        port = server.address[1]
        status, headers, text = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        assert headers["content-type"].startswith("text/plain")
        assert int(headers["content-length"]) == len(text)
        assert _sample(_families(text.decode()), "pynbd_bytes", "pynbd_bytes_total",
                       export="", direction="write") == 512
        status, headers, text = await _http(
            port, b"GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
        assert status == 200
        assert headers["content-type"].startswith("application/openmetrics")
        assert text.endswith(b"# EOF\n")
        status, headers, text = await _http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert status == 200
        assert text == b""
        assert int(headers["content-length"]) > 0
        assert (await _http(port, b"GET /nothing HTTP/1.1\r\n\r\n"))[0] == 404
        status, headers, _ = await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        assert (await _http(port, b"garbage\r\n\r\n"))[0] == 400
        # a head that never ends is cut at its limit; the server goes on
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 4000)
        with contextlib.suppress(ConnectionResetError):  # closed with the head unread
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert (await _http(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == 200

        def broken() -> list[Export]:
            raise RuntimeError("a collector bug")

        server.exports = broken  # answered 500 (and logged); the exporter goes on
        assert (await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 500
        server.exports = lambda: [export]
        assert (await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        await server.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    run(body)


def test_start_exporter_turns_counting_and_rbd_timing_on() -> None:
    async def body() -> None:
        exporter = await start_exporter(("127.0.0.1", 0), list)
        assert metrics.counting()
        assert _rbd_timer() is not None
        with pytest.raises(MetricsError, match=r"^cannot listen on 127\.0\.0\.1:\d+ for "
                           "metrics: Address already in use$"):
            await start_exporter(exporter.address, list)
        await stop_exporter(exporter)
        assert _rbd_timer() is None
        await stop_exporter(None)

    run(body)


# -- query-blockstats ------------------------------------------------------------------------


def test_device_stats_maps_commands_as_qemu_accounts_them() -> None:
    a, b = ExportMetrics(), ExportMetrics()
    now = perf_counter_ns
    a.done(R, 0, 4096, now())
    a.done(R, 0, 4096, now(), failed=True)
    a.refused(R, Errno.EINVAL)
    b.done(W, 0, 1024, now())
    b.done(Z, 4096, 4096, now())  # a write operation without bytes
    b.done(T, 0, 8192, now())
    b.done(F, 0, 0, now())
    b.done(Cmd.CACHE, 0, 512, now())  # not shown
    b.refused(T, Errno.EPERM)
    stats = device_stats([a, b])
    assert {k: v for k, v in stats.items() if not k.endswith("time_ns")} == {
        "rd_bytes": 4096, "wr_bytes": 1024, "unmap_bytes": 8192,
        "rd_operations": 1, "wr_operations": 2, "flush_operations": 1, "unmap_operations": 1,
        "wr_highest_offset": 8192, "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
        "failed_rd_operations": 1, "failed_wr_operations": 0, "failed_flush_operations": 0,
        "failed_unmap_operations": 0, "invalid_rd_operations": 1, "invalid_wr_operations": 0,
        "invalid_flush_operations": 0, "invalid_unmap_operations": 1,
        "account_invalid": True, "account_failed": True, "timed_stats": []}
    assert stats["rd_total_time_ns"] == a.time_ns(R) > 0
    assert stats["idle_time_ns"] >= 0
    assert "idle_time_ns" not in device_stats([ExportMetrics()])
    assert device_stats([])["rd_operations"] == 0
