"""Shared writable exports and NBD_FLAG_CAN_MULTI_CONN, seen by real libnbd clients.

Covers qemu's ``nbd-multiconn`` iotest scenarios (the multi-conn flag per ``-e``
setting; write on one connection, flush on another, read on a third), parallel
writers, trim/zero/FUA/block-status visibility across connections, the
connection limit, and durability through the shared file descriptor.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import nbd
import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.interop

MiB = 1 << 20
#: bound for one connect attempt (a refused or admitted client answers at once)
CONNECT_TIMEOUT = 10.0
#: bound for waiting until the server has noticed that a client left
ADMIT_TIMEOUT = 10.0
#: bound for one batch of asynchronous requests to complete
AIO_TIMEOUT = 30.0

STATE_HOLE = 1
STATE_ZERO = 2


# -- helpers -----------------------------------------------------------------------


def connect(uri: str, *, meta: bool = True) -> Any:
    """A libnbd handle connected to ``uri`` (base:allocation requested)."""
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def close(h: Any) -> None:
    """Disconnect politely (libnbd 1.14 frees the handle when it is collected).

    A handle that already saw the server go away is dead and has nothing to say.
    """
    if not h.aio_is_dead():
        h.shutdown()


class DebugLog:
    """Collects libnbd debug messages (they include the server's error text)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, context: str, message: str) -> None:
        with self._lock:
            self.messages.append(message)

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.messages)


def connect_bounded(uri: str, log: DebugLog | None = None,
                    timeout: float = CONNECT_TIMEOUT) -> Any:
    """Connect in a helper thread; fail the test if the connect hangs.

    Returns the connected handle or raises the ``nbd.Error`` the connect raised.
    """
    h = nbd.NBD()
    if log is not None:
        h.set_debug(True)
        h.set_debug_callback(log)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            h.connect_uri(uri)
        except BaseException as err:  # handed to the test thread
            outcome.append(err)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"connecting to {uri} hung for more than {timeout} s")
    err = outcome[0]
    if err is not None:
        raise err
    if log is not None:
        h.set_debug(False)
    return h


def connect_when_admitted(uri: str, timeout: float = ADMIT_TIMEOUT) -> Any:
    """Connect, retrying while the server still counts a client that just left.

    A disconnect reaches the server asynchronously, so a connect right after
    another client's ``shutdown`` may still be refused for a moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect_bounded(uri)
        except nbd.Error as err:
            if "policy" not in (err.string or "") or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def assert_refused_for_limit(uri: str, limit: int) -> None:
    """A connect attempt is refused at once, and the server says why."""
    log = DebugLog()
    with pytest.raises(nbd.Error) as info:
        connect_bounded(uri, log)
    assert "server policy prevents NBD_OPT_GO" in (info.value.string or "")
    # libnbd only logs the server's NBD_REP_ERR_POLICY message text
    assert (f"server error message: server connection limit reached ({limit} "
            "simultaneous clients)") in log.text()


def wait_all(h: Any, cookies: list[int], timeout: float = AIO_TIMEOUT) -> None:
    """Poll ``h`` until every command in ``cookies`` completed; raise on errors."""
    deadline = time.monotonic() + timeout
    while h.aio_in_flight() > 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{h.aio_in_flight()} requests still in flight "
                                 f"after {timeout} s")
        h.poll(1000)
    for cookie in cookies:
        # raises nbd.Error if the server answered the command with an error
        assert h.aio_command_completed(cookie) is True


def run_threads(count: int, work: Callable[[int], None],
                timeout: float = AIO_TIMEOUT) -> None:
    """Run ``work(i)`` in ``count`` threads at once; re-raise the first failure."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def body(i: int) -> None:
        try:
            barrier.wait(timeout)
            work(i)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"worker threads hung for {timeout} s"
    if errors:
        raise errors[0]


def extents_of(h: Any, length: int, offset: int) -> list[tuple[int, int]]:
    """``base:allocation`` extents (length, flags) covering ``[offset, offset+length)``."""
    found: list[tuple[int, int]] = []

    def callback(context: str, off: int, entries: list[int], err: Any) -> int:
        assert context == "base:allocation"
        assert off == offset
        found.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, callback)
    assert found, "block status returned no extents"
    return found


class Images:
    """Factory for test disks: ``image(size)`` is a sparse raw file, ``image.rbd(size)``
    the ``rbd:`` spec of a fresh image in the session's Ceph cluster."""

    def __init__(self, raw_image: Callable[..., Path], request: pytest.FixtureRequest) -> None:
        self._raw_image = raw_image
        self._request = request

    def __call__(self, size: int) -> str:
        return str(self._raw_image(size))

    def rbd(self, size: int) -> str:
        ceph = self._request.getfixturevalue("ceph")  # started only if an rbd test runs
        spec: str = ceph.spec(ceph.new_image(size))
        return spec


@pytest.fixture
def image(raw_image: Callable[..., Path], request: pytest.FixtureRequest) -> Images:
    return Images(raw_image, request)


def qemu_pattern_image(path: str) -> None:
    """qemu's nbd-multiconn layout: 0x01 over [0, 2 MiB), 0x02 over [2, 4 MiB)."""
    with open(path, "r+b") as fh:
        fh.write(b"\x01" * (2 * MiB) + b"\x02" * (2 * MiB))


def spec_for(backend: str, image: Images, size: int) -> str:
    if backend == "rbd":
        return image.rbd(size)
    return image(size) if backend == "file" else f"memory:{size}"


#: rbd: a real Ceph cluster (tests/support/ceph.py), images without exclusive-lock
BACKENDS = ["file", "memory", "rbd"]


# -- 1. qemu nbd-multiconn scenarios -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", ["0", "2"])
@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_shared_server_advertises_multi_conn(
        pynbd_server: Callable[..., Any], image: Images,
        backend: str, shared: str, read_only: bool) -> None:
    """qemu test_default_settings: more than one client allowed -> multi-conn."""
    args = ["-e", shared] + (["-r"] if read_only else [])
    srv = pynbd_server(*args, spec_for(backend, image, 4 * MiB))
    h = connect(srv.uri)
    try:
        assert h.can_multi_conn() is True
        assert h.is_read_only() is read_only
        assert h.get_size() == 4 * MiB
    finally:
        close(h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args", [[], ["-r"], ["-e", "1"], ["-e", "1", "-r"]],
                         ids=["default", "ro", "e1", "e1-ro"])
def test_single_client_server_does_not_advertise_multi_conn(
        pynbd_server: Callable[..., Any], image: Images,
        backend: str, args: list[str]) -> None:
    """qemu test_limited_connections (and qemu >= 7.1 ``-r`` without ``-e``)."""
    srv = pynbd_server(*args, spec_for(backend, image, 4 * MiB))
    h = connect(srv.uri)
    try:
        assert h.can_multi_conn() is False
        assert h.is_read_only() is ("-r" in args)
    finally:
        close(h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", ["0", "3"])
def test_parallel_writes_write_flush_read(
        pynbd_server: Callable[..., Any], image: Images,
        backend: str, shared: str) -> None:
    """qemu test_parallel_writes: write on 1, flush on 2, read on 0 sees it."""
    spec = spec_for(backend, image, 4 * MiB)
    if backend == "file":
        qemu_pattern_image(spec)
    srv = pynbd_server("-e", shared, spec)
    clients = [connect(srv.uri) for _ in range(3)]
    try:
        for h in clients:
            assert h.can_multi_conn() is True
        if backend != "file":  # no file to prepare: fill it through a client
            clients[2].pwrite(b"\x01" * (2 * MiB) + b"\x02" * (2 * MiB), 0)
        assert clients[0].pread(MiB, 0) == b"\x01" * MiB
        clients[1].pwrite(b"\x03" * MiB, 0)
        clients[2].flush()
        assert clients[0].pread(MiB, 0) == b"\x03" * MiB
        # the rest of the image is untouched, on every connection
        for h in clients:
            assert h.pread(MiB, MiB) == b"\x01" * MiB
            assert h.pread(2 * MiB, 2 * MiB) == b"\x02" * (2 * MiB)
    finally:
        for h in clients:
            close(h)


def test_read_only_and_writable_servers_share_one_file(
        pynbd_server: Callable[..., Any], image: Images) -> None:
    """Like qemu's ``r`` and ``w`` exports on one node: a read-only multi-conn
    server sees what the writable server's client flushed (both on one file)."""
    path = image(4 * MiB)
    qemu_pattern_image(path)
    writable = pynbd_server("-e", "0", path)
    reader_srv = pynbd_server("-e", "0", "-r", path)
    w, r = connect(writable.uri), connect(reader_srv.uri)
    try:
        assert w.can_multi_conn() is True
        assert r.can_multi_conn() is True
        assert r.pread(4096, 0) == b"\x01" * 4096
        w.pwrite(b"\x03" * 4096, 0)
        w.flush()
        assert r.pread(4096, 0) == b"\x03" * 4096
    finally:
        close(w)
        close(r)


# -- 2. parallel writers and cross-connection visibility --------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_writers_on_distinct_ranges(
        pynbd_server: Callable[..., Any], image: Images, backend: str) -> None:
    """4 connections x 16 in-flight 64 KiB writes to their own ranges; every
    connection then reads the whole image and sees every write."""
    writers, per_writer, block = 4, 16, 64 * 1024
    size = writers * per_writer * block
    srv = pynbd_server("-e", "0", spec_for(backend, image, size))
    expected = bytearray(os.urandom(size))
    handles = [connect(srv.uri) for _ in range(writers)]
    try:
        def work(i: int) -> None:
            h = handles[i]
            cookies, buffers = [], []  # buffers stay referenced until completion
            for j in range(per_writer):
                offset = (i * per_writer + j) * block
                buffers.append(nbd.Buffer.from_bytearray(expected[offset:offset + block]))
                cookies.append(h.aio_pwrite(buffers[-1], offset))
            wait_all(h, cookies)

        run_threads(writers, work)
        for h in handles:
            assert h.pread(size, 0) == expected
    finally:
        for h in handles:
            close(h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_writers_on_the_same_range(
        pynbd_server: Callable[..., Any], image: Images, backend: str) -> None:
    """4 connections repeatedly overwrite the same 1 MiB with their own byte.

    What is asserted once every write was answered and a 5th connection
    flushed: all 5 connections read identical data; every byte is one of
    the 4 pattern bytes; no 512-byte sector mixes two patterns (a sector is
    the smallest unit any storage writes); and on the memory backend, whose
    writes run without interleaving, each 64 KiB block (the unit of one
    request) holds a single pattern.  Which writer wins a block is not
    asserted: the spec gives no ordering between connections.
    """
    writers, rounds, block, span = 4, 4, 64 * 1024, MiB
    patterns = [bytes([0xA0 + i]) for i in range(writers)]
    srv = pynbd_server("-e", "0", spec_for(backend, image, span))
    handles = [connect(srv.uri) for _ in range(writers + 1)]
    try:
        def work(i: int) -> None:
            h = handles[i]
            buf = nbd.Buffer.from_bytearray(patterns[i] * block)
            for _ in range(rounds):
                cookies = [h.aio_pwrite(buf, offset) for offset in range(0, span, block)]
                wait_all(h, cookies)

        run_threads(writers, work)
        handles[writers].flush()
        seen = [bytes(h.pread(span, 0)) for h in handles]
        assert all(data == seen[0] for data in seen)
        data = seen[0]
        assert set(data) <= {p[0] for p in patterns}
        for pos in range(0, span, 512):
            sector = data[pos:pos + 512]
            assert sector == sector[:1] * 512, f"sector at {pos} mixes patterns"
        if backend == "memory":
            for pos in range(0, span, block):
                chunk = data[pos:pos + block]
                assert chunk == chunk[:1] * block, f"block at {pos} mixes patterns"
    finally:
        for h in handles:
            close(h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", [0, nbd.CMD_FLAG_NO_HOLE], ids=["may-trim", "no-hole"])
def test_zero_is_visible_on_other_connection(
        pynbd_server: Callable[..., Any], image: Images,
        backend: str, flags: int) -> None:
    args = ["--discard", "unmap"] if backend != "memory" else []
    srv = pynbd_server("-e", "0", *args, spec_for(backend, image, 4 * MiB))
    a, b = connect(srv.uri), connect(srv.uri)
    try:
        a.pwrite(b"\x5a" * (2 * MiB), 0)
        assert b.pread(2 * MiB, 0) == b"\x5a" * (2 * MiB)
        a.zero(MiB, 256 * 1024, flags)
        got = b.pread(2 * MiB, 0)
        assert got[:256 * 1024] == b"\x5a" * (256 * 1024)
        assert got[256 * 1024:256 * 1024 + MiB] == bytes(MiB)
        assert got[256 * 1024 + MiB:] == b"\x5a" * (2 * MiB - MiB - 256 * 1024)
        # rbd: a zeroed part of an object that still holds data stays allocated (librbd
        # reports allocation per object extent; the memstore OSD keeps no holes)
        if flags != nbd.CMD_FLAG_NO_HOLE and backend != "rbd":
            # a zero that may trim punched a hole; B's block status shows it
            assert extents_of(b, MiB, 256 * 1024) == [(MiB, STATE_HOLE | STATE_ZERO)]
    finally:
        close(a)
        close(b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trim_then_write_across_connections(
        pynbd_server: Callable[..., Any], image: Images, backend: str) -> None:
    """Trim on A: B reads zeroes or the old data (the spec allows either), block by
    block; after B writes the range, A reads B's data."""
    args = ["--discard", "unmap"] if backend != "memory" else []
    srv = pynbd_server("-e", "0", *args, spec_for(backend, image, 4 * MiB))
    a, b = connect(srv.uri), connect(srv.uri)
    try:
        assert a.can_trim() is True
        old = os.urandom(2 * MiB)
        a.pwrite(old, 0)
        a.flush()
        a.trim(MiB, 0)
        got = b.pread(2 * MiB, 0)
        for pos in range(0, MiB, 4096):
            piece = got[pos:pos + 4096]
            assert piece in (bytes(4096), old[pos:pos + 4096]), f"trimmed block at {pos}"
        assert got[MiB:] == old[MiB:]
        if backend != "rbd":  # librbd skips discards of part of an object: a hint only
            # the discard really happened (unmap): B sees a hole reading as zeroes
            assert extents_of(b, MiB, 0) == [(MiB, STATE_HOLE | STATE_ZERO)]
        new = os.urandom(MiB)
        b.pwrite(new, 0)
        assert a.pread(MiB, 0) == new
        assert all(state & STATE_HOLE == 0 for _, state in extents_of(a, MiB, 0))
    finally:
        close(a)
        close(b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fua_write_visible_on_other_connection(
        pynbd_server: Callable[..., Any], image: Images, backend: str) -> None:
    srv = pynbd_server("-e", "0", spec_for(backend, image, 4 * MiB))
    a, b = connect(srv.uri), connect(srv.uri)
    try:
        assert a.can_fua() is True
        data = os.urandom(128 * 1024)
        a.pwrite(data, 3 * MiB, nbd.CMD_FLAG_FUA)
        assert b.pread(len(data), 3 * MiB) == data
    finally:
        close(a)
        close(b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_status_reflects_other_connections_write(
        pynbd_server: Callable[..., Any], image: Images, backend: str) -> None:
    srv = pynbd_server("-e", "0", spec_for(backend, image, 4 * MiB))
    a, b = connect(srv.uri), connect(srv.uri)
    try:
        assert b.can_meta_context("base:allocation") is True
        assert extents_of(b, 128 * 1024, MiB) == [(128 * 1024, STATE_HOLE | STATE_ZERO)]
        a.pwrite(b"\x11" * (128 * 1024), MiB)
        extents = extents_of(b, 128 * 1024, MiB)
        assert sum(length for length, _ in extents) >= 128 * 1024
        assert all(state == 0 for _, state in extents), extents
        # the range before it is still a hole (rbd: allocation is per 4 MiB object here)
        if backend != "rbd":
            assert extents_of(b, 64 * 1024, 0) == [(64 * 1024, STATE_HOLE | STATE_ZERO)]
    finally:
        close(a)
        close(b)


# -- 3. the connection limit ------------------------------------------------------------


def test_limit_two_refuses_third_until_one_leaves(
        pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "2", "memory:1M")
    first, second = connect(srv.uri), connect(srv.uri)
    third = None
    try:
        first.pwrite(b"\x42" * 512, 0)
        assert_refused_for_limit(srv.uri, 2)
        # the refusal did not disturb the admitted clients
        assert second.pread(512, 0) == b"\x42" * 512
        close(first)
        first = None
        third = connect_when_admitted(srv.uri)
        assert third.pread(512, 0) == b"\x42" * 512
        # and now the limit is reached again
        assert_refused_for_limit(srv.uri, 2)
    finally:
        for h in (first, second, third):
            if h is not None:
                close(h)


def test_default_limit_is_one_client(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("memory:1M")
    first = connect(srv.uri)
    second = None
    try:
        assert first.can_multi_conn() is False
        first.pwrite(b"\x24" * 512, 0)
        assert_refused_for_limit(srv.uri, 1)
        close(first)
        first = None
        second = connect_when_admitted(srv.uri)
        assert second.pread(512, 0) == b"\x24" * 512
    finally:
        for h in (first, second):
            if h is not None:
                close(h)


def test_unlimited_serves_twenty_clients(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:1M")
    handles: list[Any] = []
    try:
        for _ in range(20):
            handles.append(connect_bounded(srv.uri))
        for i, h in enumerate(handles):
            assert h.can_multi_conn() is True
            h.pwrite(bytes([i + 1]) * 4096, i * 4096)
        handles[-1].flush()
        expected = b"".join(bytes([i + 1]) * 4096 for i in range(20))
        for h in handles:
            assert h.pread(len(expected), 0) == expected
    finally:
        for h in handles:
            close(h)


# -- 4. durability through the shared fd --------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_write_flush_on_other_connection_then_stop(
        pynbd_server: Callable[..., Any], image: Images, sig: int) -> None:
    path = image(4 * MiB)
    srv = pynbd_server("-e", "0", path)
    a, b = connect(srv.uri), connect(srv.uri)
    data = os.urandom(MiB)
    try:
        a.pwrite(data, MiB + 512)
        b.flush()
        with open(path, "rb") as fh:  # the shared fd wrote through the page cache
            fh.seek(MiB + 512)
            assert fh.read(MiB) == data
        assert srv.stop(sig) == 0
    finally:
        for h in (a, b):
            close(h)  # after the server left, shutdown() just finds the handle dead
    with open(path, "rb") as fh:
        content = fh.read()
    assert len(content) == 4 * MiB
    assert content[MiB + 512:2 * MiB + 512] == data
    assert content[:MiB + 512] == bytes(MiB + 512)
    assert content[2 * MiB + 512:] == bytes(2 * MiB - 512)
