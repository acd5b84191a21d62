"""``pynbd daemon``: QMP management seen by qemu's own client, NBD seen by libnbd.

Every test starts a real ``pynbd daemon --qmp`` process and drives it with the
official ``qemu.qmp`` client (or ``qmp-shell``, or a plain socket for the bad
input), while libnbd, ``nbdinfo`` and the image file on disk show what the
NBD side really does.  Covers qemu's ``nbd-multiconn`` iotest (driven the way
the iotest drives qemu), the export and node lifecycle, QMP robustness while
NBD I/O goes on, several QMP clients, and the daemon's command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from qemu.qmp import ExecuteError, QMPClient
from tests.support.interop import bounded as _bounded
from tests.support.qmp import qmp, qmp_open, qmp_session

from pynbd.qmp.protocol import MAX_LINE
from pynbd.server.runtime import STOP_WAIT_REPORT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

pytestmark = pytest.mark.interop

MiB = 1 << 20
#: bound for the daemon to create its QMP socket (or exit)
START_TIMEOUT = 20.0
#: bound for one QMP exchange, one libnbd call, one event
T = 10.0


def bounded(fn: Callable[..., Any], *args: Any, timeout: float = T) -> Any:
    """``tests.support.interop.bounded`` with this module's default timeout."""
    return _bounded(fn, *args, timeout=timeout)
#: bound for the daemon to exit after SIGTERM or quit
EXIT_TIMEOUT = 20.0
#: bound for retrying while the server has not yet noticed that a client left
SETTLE_TIMEOUT = 10.0

NOT_NEGOTIATED = "Expecting capabilities negotiation with 'qmp_capabilities'"


# -- the daemon ----------------------------------------------------------------------


@dataclass
class Daemon:
    """A ``pynbd daemon`` process started by a test."""

    proc: subprocess.Popen[bytes]
    qmp: str
    dir: Path
    stderr_path: Path
    pid_file: Path

    @property
    def nbd_sock(self) -> str:
        """Where tests put the NBD server (``nbd-server-start``)."""
        return str(self.dir / "n.sock")

    def uri(self, name: str, sock: str | None = None) -> str:
        return f"nbd+unix:///{name}?socket={sock or self.nbd_sock}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"daemon did not exit within {timeout} s; stderr: {self.stderr()}")


def wait_for_path(proc: subprocess.Popen[bytes], path: str, stderr: Path) -> None:
    """Wait (bounded) until ``path`` exists; fail if the process exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    for _ in range(100_000):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            pytest.fail(f"daemon exited with {proc.returncode}: {stderr.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"daemon did not create {path} within {START_TIMEOUT} s")
        time.sleep(0.02)
    pytest.fail(f"daemon did not create {path}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``daemon(*args)`` runs ``pynbd daemon --qmp <tmp>/qN.sock *args``.

    It waits (bounded) for the QMP socket to appear and for the pid file, which
    the daemon writes once every listener is up: a Unix socket's file exists
    from ``bind``, a moment before ``listen`` lets clients in.  With
    ``ready="socket"`` it returns as soon as the socket file appears.  With
    ``qmp=False`` no ``--qmp`` is given.  Every daemon still running at
    teardown is killed.
    """
    started: list[Daemon] = []

    def factory(*args: str, qmp: bool = True, ready: str = "pid") -> Daemon:
        index = len(started)
        qmp_path = str(tmp_path / f"q{index}.sock")
        stderr_path = tmp_path / f"daemon{index}.err"
        pid_file = tmp_path / f"daemon{index}.pid"
        cmd = [sys.executable, "-m", "pynbd", "daemon",
               *(["--qmp", qmp_path] if qmp else []), "--pid-file", str(pid_file), *args]
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        d = Daemon(proc, qmp_path, tmp_path, stderr_path, pid_file)
        started.append(d)
        if qmp:
            wait_for_path(proc, qmp_path, stderr_path)
        if ready == "pid":
            wait_for_path(proc, str(pid_file), stderr_path)
        return d

    yield factory
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def pattern_image(tmp_path: Path) -> str:
    """The iotest's image: 4 MiB, 0x01 over [0, 2 MiB), 0x02 over [2, 4 MiB)."""
    path = tmp_path / "disk"
    path.write_bytes(b"\x01" * (2 * MiB) + b"\x02" * (2 * MiB))
    return str(path)


# -- QMP helpers (qemu.qmp) ------------------------------------------------------------


async def qmp_fails(client: QMPClient, cmd: str, args: dict[str, Any] | None = None,
                    error_class: str = "GenericError") -> str:
    """Run a command that must fail; return the error text."""
    with pytest.raises(ExecuteError) as info:
        await qmp(client, cmd, args)
    assert info.value.error_class == error_class, str(info.value)
    return str(info.value)


async def next_event(client: QMPClient, name: str) -> dict[str, Any]:
    """The next event called ``name`` (others are skipped), within ``T`` seconds."""
    async with asyncio.timeout(T):
        for _ in range(1000):
            event = await client.events.get()
            if event["event"] == name:
                return dict(event)
    raise AssertionError(f"no {name} event among 1000 events")


async def retry_while(fn: Callable[[], Any], text: str,
                      seconds: float = SETTLE_TIMEOUT) -> Any:
    """Await ``fn()`` again while it fails with an error containing ``text``.

    Used where the server learns of a libnbd client's departure a moment after
    libnbd's ``shutdown`` returned.
    """
    deadline = time.monotonic() + seconds
    for _ in range(10_000):
        try:
            return await fn()
        except (ExecuteError, nbd.Error) as err:
            message = str(err) if isinstance(err, ExecuteError) else (err.string or "")
            if text not in message or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError("retry loop exhausted")


def exists(path: str) -> bool:
    return os.path.exists(path)


def export_args(export_id: str, node: str, **extra: Any) -> dict[str, Any]:
    return {"type": "nbd", "id": export_id, "node-name": node, **extra}


def unix_addr(path: str) -> dict[str, Any]:
    return {"type": "unix", "data": {"path": path}}


# -- libnbd helpers ----------------------------------------------------------------------


def nbd_open(uri: str) -> Any:
    h = nbd.NBD()
    bounded(h.connect_uri, uri)
    return h


async def nbd_open_admitted(uri: str) -> Any:
    """Connect, retrying while a client that just left still counts for the limit."""
    async def attempt() -> Any:
        return nbd_open(uri)
    return await retry_while(attempt, "policy")


def nbd_close(h: Any) -> None:
    if not h.aio_is_dead():
        bounded(h.shutdown)


# -- qemu's nbd-multiconn iotest, through qemu.qmp ---------------------------------------


class MultiConnIotest:
    """The iotest's fixture and helpers, over the daemon's QMP socket."""

    def __init__(self, client: QMPClient, sock: str) -> None:
        self.client = client
        self.sock = sock

    @classmethod
    async def setup(cls, client: QMPClient, disk: str, sock: str) -> MultiConnIotest:
        # exactly the iotest's blockdev-add (its format node is raw here): the inline
        # file child has no node-name
        result = await qmp(client, "blockdev-add", {
            "driver": "raw", "node-name": "n",
            "file": {"driver": "file", "filename": disk}})
        assert result == {}
        return cls(client, sock)

    @contextlib.asynccontextmanager
    async def run_server(self, max_connections: int | None = None) -> AsyncIterator[None]:
        args: dict[str, Any] = {"addr": unix_addr(self.sock)}
        if max_connections is not None:
            args["max-connections"] = max_connections
        assert await qmp(self.client, "nbd-server-start", args) == {}
        try:
            yield
        finally:
            assert await qmp(self.client, "nbd-server-stop") == {}

    async def add_export(self, name: str, writable: bool | None = None) -> None:
        args: dict[str, Any] = {"type": "nbd", "id": name, "node-name": "n", "name": name}
        if writable is not None:
            args["writable"] = writable
        assert await qmp(self.client, "block-export-add", args) == {}

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    @contextlib.asynccontextmanager
    async def open_nbd(self, name: str) -> AsyncIterator[Any]:
        h = await nbd_open_admitted(self.uri(name))
        try:
            yield h
        finally:
            nbd_close(h)


def iotest(daemon: Daemon, disk: str,
           body: Callable[[MultiConnIotest], Any]) -> None:
    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await body(await MultiConnIotest.setup(client, disk, daemon.nbd_sock))
    asyncio.run(main())


def test_default_settings(daemon: Callable[..., Daemon], pattern_image: str) -> None:
    async def body(t: MultiConnIotest) -> None:
        async with t.run_server():
            await t.add_export("r")
            await t.add_export("w", writable=True)
            async with t.open_nbd("r") as h:
                assert h.can_multi_conn() is True
                assert h.is_read_only() is True
            async with t.open_nbd("w") as h:
                assert h.can_multi_conn() is True
                assert h.is_read_only() is False
    iotest(daemon(), pattern_image, body)


def test_limited_connections(daemon: Callable[..., Daemon], pattern_image: str) -> None:
    async def body(t: MultiConnIotest) -> None:
        async with t.run_server(max_connections=1):
            await t.add_export("r")
            await t.add_export("w", writable=True)
            async with t.open_nbd("r") as h:
                assert h.can_multi_conn() is False
            async with t.open_nbd("w") as h:
                assert h.can_multi_conn() is False
    iotest(daemon(), pattern_image, body)


def test_parallel_writes(daemon: Callable[..., Daemon], pattern_image: str) -> None:
    async def body(t: MultiConnIotest) -> None:
        async with t.run_server():
            await t.add_export("w", writable=True)
            clients = [nbd_open(t.uri("w")) for _ in range(3)]
            try:
                for h in clients:
                    assert h.can_multi_conn() is True
                assert bounded(clients[0].pread, MiB, 0) == b"\x01" * MiB
                bounded(clients[1].pwrite, b"\x03" * MiB, 0)
                bounded(clients[2].flush)
                assert bounded(clients[0].pread, MiB, 0) == b"\x03" * MiB
            finally:
                for h in clients:
                    nbd_close(h)
    iotest(daemon(), pattern_image, body)
    # the flushed write reached the image file; the rest is untouched
    data = Path(pattern_image).read_bytes()
    assert data == b"\x03" * MiB + b"\x01" * MiB + b"\x02" * (2 * MiB)


# -- exports: listing, deletion, re-adding -------------------------------------------------


async def setup_nodes(client: QMPClient, disk: str) -> None:
    """File node ``f`` and raw node ``n`` over it, both named."""
    assert await qmp(client, "blockdev-add", {
        "driver": "file", "node-name": "f", "filename": disk}) == {}
    assert await qmp(client, "blockdev-add", {
        "driver": "raw", "node-name": "n", "file": "f"}) == {}


def nbdinfo_list(sock: str) -> list[dict[str, Any]]:
    out = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    exports: list[dict[str, Any]] = json.loads(out)["exports"]
    return exports


def test_list_exports_with_nbdinfo(daemon: Callable[..., Daemon], pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            await qmp(client, "block-export-add", export_args(
                "e-ro", "n", name="first", description="read-only view"))
            await qmp(client, "block-export-add", export_args(
                "e-rw", "n", name="second", writable=True, description="writable, too"))
            await qmp(client, "block-export-add", export_args("e-default", "f"))
            exports = {e["export-name"]: e for e in nbdinfo_list(d.nbd_sock)}
            assert set(exports) == {"first", "second", "f"}
            assert exports["first"]["description"] == "read-only view"
            assert exports["second"]["description"] == "writable, too"
            assert "description" not in exports["f"]
            assert exports["first"]["is_read_only"] is True
            assert exports["second"]["is_read_only"] is False
            assert exports["f"]["is_read_only"] is True  # writable defaults to false
            for e in exports.values():
                assert e["export-size"] == 4 * MiB
                assert e["can_multi_conn"] is True
            listed = await qmp(client, "query-block-exports")
            assert sorted(listed, key=lambda e: e["id"]) == [
                {"id": "e-default", "type": "nbd", "node-name": "f", "shutting-down": False},
                {"id": "e-ro", "type": "nbd", "node-name": "n", "shutting-down": False},
                {"id": "e-rw", "type": "nbd", "node-name": "n", "shutting-down": False}]
            # duplicate ids and names are refused
            assert await qmp_fails(client, "block-export-add", export_args("e-ro", "n")) == (
                "Block export id 'e-ro' is already in use")
            assert await qmp_fails(client, "block-export-add", export_args(
                "e-new", "n", name="first")) == "NBD server already has export named 'first'"
    asyncio.run(main())


def test_export_del_safe_refused_while_in_use(daemon: Callable[..., Daemon],
                                              pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            await qmp(client, "block-export-add", export_args("e0", "n", name="disk"))
            h = nbd_open(d.uri("disk"))
            text = await qmp_fails(client, "block-export-del", {"id": "e0"})
            assert "still in use" in text
            assert text == "export 'e0' still in use"
            assert await qmp_fails(client, "block-export-del", {"id": "e0", "mode": "safe"}) \
                == text
            # refused means untouched: listed, and the client keeps working
            assert [e["id"] for e in await qmp(client, "query-block-exports")] == ["e0"]
            assert bounded(h.pread, 4096, 2 * MiB) == b"\x02" * 4096
            nbd_close(h)

            async def delete() -> Any:
                return await qmp(client, "block-export-del", {"id": "e0"})
            assert await retry_while(delete, "still in use") == {}
            event = await next_event(client, "BLOCK_EXPORT_DELETED")
            assert event["data"] == {"id": "e0"}
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
            assert abs(event["timestamp"]["seconds"] - time.time()) < 3600
            assert await qmp(client, "query-block-exports") == []
            with pytest.raises(nbd.Error):
                nbd_open(d.uri("disk"))
            assert await qmp_fails(client, "block-export-del", {"id": "e0"}) == (
                "Export 'e0' is not found")
    asyncio.run(main())


def test_export_del_hard_drops_clients_and_the_name_can_be_reused(
        daemon: Callable[..., Daemon], pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            await qmp(client, "block-export-add", export_args(
                "e0", "n", name="disk", writable=True))
            h1 = nbd_open(d.uri("disk"))
            h2 = nbd_open(d.uri("disk"))
            bounded(h1.pwrite, b"\x05" * 4096, 0)
            assert await qmp(client, "block-export-del", {"id": "e0", "mode": "hard"}) == {}
            event = await next_event(client, "BLOCK_EXPORT_DELETED")
            assert event["data"] == {"id": "e0"}
            assert await qmp(client, "query-block-exports") == []
            for h in (h1, h2):
                with pytest.raises(nbd.Error):
                    bounded(h.pread, 4096, 0)
            # same id, same name: a new client sees the data the dropped one wrote
            await qmp(client, "block-export-add", export_args(
                "e0", "n", name="disk", writable=True))
            assert [e["id"] for e in await qmp(client, "query-block-exports")] == ["e0"]
            h3 = nbd_open(d.uri("disk"))
            assert bounded(h3.pread, 4096, 0) == b"\x05" * 4096
            nbd_close(h3)
    asyncio.run(main())


def test_server_stop_and_restart_on_another_socket(daemon: Callable[..., Daemon],
                                                   pattern_image: str) -> None:
    d = daemon()
    other = str(d.dir / "n2.sock")

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            assert await qmp_fails(client, "nbd-server-stop") == "NBD server not running"
            assert await qmp_fails(client, "block-export-add", export_args("e0", "n")) == (
                "NBD server not running")
            assert "TLS" in await qmp_fails(client, "nbd-server-start", {
                "addr": unix_addr(d.nbd_sock), "tls-creds": "tls0"})
            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            assert await qmp_fails(client, "nbd-server-start", {
                "addr": unix_addr(other)}) == "NBD server already running"
            await qmp(client, "block-export-add", export_args("e0", "n", name="disk"))
            await qmp(client, "block-export-add", export_args("e1", "f", name="raw"))
            h = nbd_open(d.uri("disk"))
            assert await qmp(client, "nbd-server-stop") == {}
            deleted = {(await next_event(client, "BLOCK_EXPORT_DELETED"))["data"]["id"]
                       for _ in range(2)}
            assert deleted == {"e0", "e1"}
            assert await qmp(client, "query-block-exports") == []
            assert not exists(d.nbd_sock)
            with pytest.raises(nbd.Error):
                bounded(h.pread, 4096, 0)
            with pytest.raises(nbd.Error):
                nbd_open(d.uri("disk"))

            await qmp(client, "nbd-server-start", {"addr": unix_addr(other)})
            await qmp(client, "block-export-add", export_args("e0", "n", name="disk"))
            h = nbd_open(d.uri("disk", other))
            assert bounded(h.pread, 4096, 0) == b"\x01" * 4096
            nbd_close(h)
            await qmp(client, "nbd-server-stop")
            assert not exists(other)
    asyncio.run(main())


def test_blockdev_del_refused_while_in_use(daemon: Callable[..., Daemon],
                                           pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            await qmp(client, "blockdev-add", {"driver": "memory", "node-name": "m",
                                               "size": MiB})
            nodes = await qmp(client, "query-named-block-nodes")
            by_name = {n["node-name"]: n for n in nodes}
            assert set(by_name) == {"f", "n", "m"}
            assert by_name["f"]["drv"] == "file"
            assert by_name["n"]["drv"] == "raw"
            assert by_name["m"]["drv"] == "memory"
            assert by_name["f"]["file"] == pattern_image
            assert by_name["n"]["image"]["virtual-size"] == 4 * MiB
            assert by_name["m"]["image"]["virtual-size"] == MiB
            # as qemu shows a node: a raw node's file is its protocol child's
            assert by_name["n"]["file"] == pattern_image
            assert {n["backing_file_depth"] for n in nodes} == {0}
            assert {name: n["ro"] for name, n in by_name.items()} == {
                "f": False, "n": False, "m": False}
            assert await qmp_fails(client, "blockdev-add", {
                "driver": "memory", "node-name": "m", "size": 1}) == (
                "Duplicate nodes with node-name='m'")

            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            await qmp(client, "block-export-add", export_args("e0", "n"))
            assert await qmp_fails(client, "blockdev-del", {"node-name": "n"}) == (
                "Node 'n' is busy: in use by block export 'e0'")
            assert await qmp_fails(client, "blockdev-del", {"node-name": "f"}) == (
                "Node 'f' is busy: in use by node 'n'")
            assert await qmp_fails(client, "blockdev-del", {"node-name": "zz"}) == (
                "Failed to find node with node-name='zz'")
            assert await qmp_fails(client, "block-export-add", export_args("e1", "zz")) == (
                "Cannot find device=zz nor node-name=zz")
            await qmp(client, "block-export-del", {"id": "e0"})
            await next_event(client, "BLOCK_EXPORT_DELETED")
            assert await qmp_fails(client, "blockdev-del", {"node-name": "f"}) == (
                "Node 'f' is busy: in use by node 'n'")
            assert await qmp(client, "blockdev-del", {"node-name": "n"}) == {}
            assert await qmp(client, "blockdev-del", {"node-name": "f"}) == {}
            assert await qmp(client, "blockdev-del", {"node-name": "m"}) == {}
            assert await qmp(client, "query-named-block-nodes") == []

            # an inline child without a node-name is named by the daemon and goes
            # with its parent; a failed blockdev-add leaves no child behind
            await qmp(client, "blockdev-add", {"driver": "raw", "node-name": "p", "file": {
                "driver": "file", "filename": pattern_image}})
            names = [n["node-name"] for n in await qmp(client, "query-named-block-nodes")]
            assert "p" in names
            assert len(names) == 2
            assert await qmp(client, "blockdev-del", {"node-name": "p"}) == {}
            assert await qmp(client, "query-named-block-nodes") == []
            text = await qmp_fails(client, "blockdev-add", {
                "driver": "raw", "node-name": "bad", "offset": 8 * MiB,
                "file": {"driver": "file", "node-name": "child", "filename": pattern_image}})
            assert text
            assert await qmp(client, "query-named-block-nodes") == []
            # the name is free again
            await qmp(client, "blockdev-add", {"driver": "file", "node-name": "child",
                                               "filename": pattern_image})
    asyncio.run(main())


def test_query_nbd_clients_counts_io(daemon: Callable[..., Daemon],
                                     pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            await qmp(client, "block-export-add", export_args(
                "e0", "n", name="disk", writable=True))
            assert await qmp(client, "x-query-nbd-clients") == []
            h = nbd_open(d.uri("disk"))
            [before] = await qmp(client, "x-query-nbd-clients")
            assert before["export"] == "disk"
            assert before["id"] == "e0"
            assert before["negotiated"] is True
            bounded(h.pread, 4096, 0)
            bounded(h.pwrite, b"\x07" * 8192, MiB)
            bounded(h.flush)
            [after] = await qmp(client, "x-query-nbd-clients")
            assert after["requests"] == before["requests"] + 3
            assert after["bytes-read"] == before["bytes-read"] + 4096
            assert after["bytes-written"] == before["bytes-written"] + 8192
            nbd_close(h)
            # the client is forgotten once the server saw it leave
            deadline = time.monotonic() + SETTLE_TIMEOUT
            for _ in range(10_000):
                if not await qmp(client, "x-query-nbd-clients"):
                    break
                assert time.monotonic() < deadline, "client still listed after it left"
                await asyncio.sleep(0.05)
    asyncio.run(main())


def test_two_exports_of_one_node_share_the_backend(daemon: Callable[..., Daemon],
                                                   pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            await qmp(client, "block-export-add", export_args("ro", "n", name="ro"))
            await qmp(client, "block-export-add", export_args(
                "rw", "n", name="rw", writable=True))
            reader = nbd_open(d.uri("ro"))
            writer = nbd_open(d.uri("rw"))
            assert reader.is_read_only() is True
            assert bounded(reader.pread, 4096, 3 * MiB) == b"\x02" * 4096
            payload = bytes(range(256)) * 16
            bounded(writer.pwrite, payload, 3 * MiB)
            bounded(writer.flush)
            assert bounded(reader.pread, 4096, 3 * MiB) == payload
            # and the read-only export really refuses writes
            with pytest.raises(nbd.Error):
                bounded(reader.pwrite, b"x" * 512, 0)
            nbd_close(reader)
            nbd_close(writer)
    asyncio.run(main())
    assert Path(pattern_image).read_bytes()[3 * MiB:3 * MiB + 4096] == bytes(range(256)) * 16


# -- QMP robustness over a plain socket ----------------------------------------------------


def strict_json(line: bytes) -> Any:
    """``line`` as standard JSON: Python's NaN and Infinity extensions are refused."""
    def refuse(name: str) -> None:
        raise AssertionError(f"the daemon sent {name}, which is not JSON: {line[:200]!r}")
    return json.loads(line, parse_constant=refuse)


class RawQMP:
    """A QMP connection over a plain Unix socket, one standard JSON object per line."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(T)
        self.sock.connect(path)
        self.buf = b""

    def recv(self) -> dict[str, Any]:
        for _ in range(100_000):
            line, sep, rest = self.buf.partition(b"\n")
            if sep:
                self.buf = rest
                message: dict[str, Any] = strict_json(line)
                return message
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("QMP server closed the connection")
            self.buf += data
        raise AssertionError("no complete QMP message")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, data: bytes) -> dict[str, Any]:
        self.send(data)
        return self.recv()

    def close(self) -> None:
        self.sock.close()


def error_reply(reply: dict[str, Any], error_class: str, desc: str) -> None:
    assert set(reply) <= {"error", "id"}, reply
    assert reply["error"]["class"] == error_class, reply
    assert reply["error"]["desc"].startswith(desc), reply


class BackgroundIO:
    """A libnbd client writing and verifying blocks until stopped (bounded)."""

    def __init__(self, uri: str, offset: int, rounds: int = 100_000,
                 seconds: float = 60.0) -> None:
        self.h = nbd_open(uri)
        self.offset = offset
        self.limit = rounds
        self.seconds = seconds
        self.rounds = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        try:
            for i in range(self.limit):
                if self._stop.is_set() or time.monotonic() > deadline:
                    break
                data = bytes([i % 251]) * 4096
                off = self.offset + (i % 64) * 4096
                self.h.pwrite(data, off)
                got = self.h.pread(4096, off)
                if got != data:
                    raise AssertionError(f"round {i}: read back other data at {off}")
                self.rounds += 1
        except BaseException as err:
            self.errors.append(err)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(T)
        assert not self._thread.is_alive(), "background I/O hung"
        if self.errors:
            raise self.errors[0]
        nbd_close(self.h)
        return self.rounds



def test_qmp_robustness_while_nbd_io_goes_on(daemon: Callable[..., Daemon],
                                             tmp_path: Path) -> None:
    nbd_sock = str(tmp_path / "n.sock")
    d = daemon("--blockdev", "driver=memory,node-name=m,size=8M",
               "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
               "--export", "type=nbd,id=e0,node-name=m,name=disk,writable=on")
    background = BackgroundIO(d.uri("disk"), offset=4 * MiB)
    h = nbd_open(d.uri("disk"))
    checks = 0

    def verified_io() -> None:
        """The export still serves, with the right data, after each QMP abuse."""
        nonlocal checks
        checks += 1
        data = checks.to_bytes(4, "big") * 1024
        bounded(h.pwrite, data, checks * 4096)
        assert bounded(h.pread, 4096, checks * 4096) == data

    q = RawQMP(d.qmp)
    try:
        greeting = q.recv()
        assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        assert greeting["QMP"]["capabilities"] == []
        # before negotiation
        error_reply(q.command(b'{"execute": "query-version", "id": 1}\n'),
                    "CommandNotFound", NOT_NEGOTIATED)
        error_reply(q.command(b'{"execute": "no-such-command"}\n'),
                    "CommandNotFound", NOT_NEGOTIATED)
        error_reply(q.command(b"garbage\n"), "GenericError", "JSON parse error")
        verified_io()
        assert q.command(b'{"execute": "qmp_capabilities", "id": "neg"}') == {
            "return": {}, "id": "neg"}
        # malformed JSON and non-objects
        for garbage, desc in [
                (b"garbage\n", "JSON parse error"),
                (b'{"execute": }\n', "JSON parse error"),
                (b"[1, 2]\n", "QMP input must be a JSON object"),
                (b'"str"\n', "QMP input must be a JSON object"),
                (b"123\n", "QMP input must be a JSON object"),
                (b'"{ unterminated\n', "JSON parse error"),
                (b'{"execute": "query-version", "bogus": 1}\n',
                 "QMP input member 'bogus' is unexpected"),
                (b'{"arguments": {}}\n', "QMP input lacks member 'execute'")]:
            error_reply(q.command(garbage), "GenericError", desc)
            verified_io()
        # an oversized message gets one error; the session goes on
        head = b'{"execute": "block-export-add", "arguments": {"description": "'
        q.send(head + b"{[x" * ((2 * MiB) // 3) + b'"}, "id": 9}\n')
        error_reply(q.recv(), "GenericError", f"QMP input is longer than {MAX_LINE} bytes")
        assert q.command(b'{"execute": "query-version", "id": 10}')["id"] == 10
        verified_io()
        # unknown commands, bad, missing and extra arguments
        error_reply(q.command(b'{"execute": "no-such-command", "id": 2}'),
                    "CommandNotFound", "The command no-such-command has not been found")
        error_reply(q.command(b'{"execute": "block-export-add", "arguments": {"type": "nbd",'
                              b' "id": "e1", "node-name": "m", "writable": "yes"}}'),
                    "GenericError", "Invalid parameter type for 'writable', expected: boolean")
        error_reply(q.command(b'{"execute": "nbd-server-start", "arguments": {"addr": '
                              b'{"type": "unix", "data": {"path": 5}}}}'),
                    "GenericError", "Invalid parameter type for 'addr.data.path', "
                    "expected: string")
        error_reply(q.command(b'{"execute": "block-export-del", "arguments": {}}'),
                    "GenericError", "Parameter 'id' is missing")
        error_reply(q.command(b'{"execute": "query-version", "arguments": {"x": 1}}'),
                    "GenericError", "Parameter 'x' is unexpected")
        error_reply(q.command(b'{"execute": "blockdev-add", "arguments": {"driver": "nope",'
                              b' "node-name": "z"}}'),
                    "GenericError", "Parameter 'driver' does not accept value 'nope'")
        verified_io()
        # nothing of that reached the engine: the export is as it was
        reply = q.command(b'{"execute": "query-block-exports", "id": "last"}')
        assert reply == {"return": [{"id": "e0", "type": "nbd", "node-name": "m",
                                     "shutting-down": False}], "id": "last"}
    finally:
        q.close()
    assert background.stop() > 0
    verified_io()
    nbd_close(h)
    assert d.proc.poll() is None


def test_replies_are_always_json(daemon: Callable[..., Daemon]) -> None:
    """qemu reads ``1e99999`` as a double infinity and would echo ``"id": inf``;
    the daemon answers a non-finite number with a parse error that has no id,
    and everything it writes parses as standard JSON."""
    d = daemon("--blockdev", "driver=memory,node-name=m,size=1M")
    q = RawQMP(d.qmp)
    out_of_range = "JSON parse error, number out of range"
    try:
        assert "QMP" in q.recv()
        error_reply(q.command(b'{"execute": "query-version", "id": 1e99999}\n'),
                    "GenericError", out_of_range)
        assert q.command(b'{"execute": "qmp_capabilities", "id": 1e308}') == {
            "return": {}, "id": 1e308}
        for line in [b'{"execute": "query-version", "id": 1e99999}',
                     b'{"execute": "query-version", "id": -1E400}',
                     b'{"execute": "query-version", "id": [1, 2e999]}',
                     b'{"execute": "x-fault-add", "id": 3, "arguments": '
                     b'{"node-name": "m", "command": "read", "delay": 1e999}}']:
            reply = q.command(line + b"\n")
            assert "id" not in reply
            error_reply(reply, "GenericError", out_of_range)
        for line in [b'{"execute": "query-version", "id": NaN}',
                     b'{"execute": "query-version", "id": Infinity}',
                     b'{"execute": "query-version", "id": -Infinity}']:
            error_reply(q.command(line + b"\n"), "GenericError", "JSON parse error")
        # finite numbers, however written, come back as numbers JSON can carry
        big = 10 ** 400
        for raw, echoed in [(b"1e-99999", 0.0), (b"-0.5E3", -500.0),
                            (str(big).encode(), big)]:
            reply = q.command(b'{"execute": "query-version", "id": ' + raw + b"}\n")
            assert reply["id"] == echoed
            assert reply["return"]["qemu"]["major"] == 7
        assert q.command(b'{"execute": "query-block-exports", "id": "last"}') == {
            "return": [], "id": "last"}
    finally:
        q.close()
    assert d.proc.poll() is None


# -- node names and export ids, as qemu checks them ------------------------------------------


def test_node_names_and_export_ids_as_qemu_checks_them(daemon: Callable[..., Daemon]) -> None:
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            for name in ["", "1abc", "-n", "_n", "#block001", "a b", "a/b", "n\u00e9",
                         "1" + "n" * 4999]:
                assert await qmp_fails(client, "blockdev-add", {
                    "driver": "memory", "node-name": name, "size": MiB}) == (
                    f"Invalid node-name: '{name}'")
            for length in (32, 5000):
                assert await qmp_fails(client, "blockdev-add", {
                    "driver": "memory", "node-name": "n" * length, "size": MiB}) == (
                    "Node name too long")
            assert await qmp(client, "query-named-block-nodes") == []
            longest = "N" + "a-._9" * 6
            assert len(longest) == 31
            assert await qmp(client, "blockdev-add", {
                "driver": "memory", "node-name": longest, "size": MiB}) == {}
            # duplicate before too long; inline children are checked and named alike
            assert await qmp_fails(client, "blockdev-add", {
                "driver": "memory", "node-name": longest, "size": MiB}) == (
                f"Duplicate nodes with node-name='{longest}'")
            assert await qmp_fails(client, "blockdev-add", {
                "driver": "raw", "node-name": "p", "file": {
                    "driver": "memory", "node-name": "c" * 40, "size": MiB}}) == (
                "Node name too long")
            assert await qmp(client, "blockdev-add", {
                "driver": "raw", "node-name": "p", "file": {"driver": "memory",
                                                           "size": MiB}}) == {}
            names = [n["node-name"] for n in await qmp(client, "query-named-block-nodes")]
            assert names == [longest, "#block001", "p"]

            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            for bad in ["", "#e0", "0e", "e 0", "e\u00e9"]:
                assert await qmp_fails(client, "block-export-add",
                                       export_args(bad, longest)) == (
                    "Invalid block export id")
            assert await qmp(client, "block-export-add",
                             export_args("e" * 100, longest, name="disk")) == {}
            exports = await qmp(client, "query-block-exports")
            assert [(e["id"], e["node-name"]) for e in exports] == [("e" * 100, longest)]
            h = nbd_open(d.uri("disk"))
            assert h.get_size() == MiB
            nbd_close(h)
    asyncio.run(main())


# -- several QMP clients -------------------------------------------------------------------


def test_several_qmp_clients(daemon: Callable[..., Daemon], pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        # one after another
        async with qmp_session(d.qmp) as first:
            await setup_nodes(first, pattern_image)
        async with qmp_session(d.qmp) as second:
            names = {n["node-name"] for n in await qmp(second, "query-named-block-nodes")}
            assert names == {"f", "n"}
            await qmp(second, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
        # two at once, plus one that never negotiates
        silent = RawQMP(d.qmp)
        try:
            assert "QMP" in silent.recv()
            async with qmp_session(d.qmp) as a, qmp_session(d.qmp) as b:
                await qmp(a, "block-export-add", export_args("e0", "n"))
                assert [e["id"] for e in await qmp(b, "query-block-exports")] == ["e0"]
                assert (await qmp(a, "query-version"))["qemu"]["major"] == 7
                await qmp(b, "block-export-del", {"id": "e0"})
                event_a = await next_event(a, "BLOCK_EXPORT_DELETED")
                event_b = await next_event(b, "BLOCK_EXPORT_DELETED")
                assert event_a["data"] == event_b["data"] == {"id": "e0"}
                assert event_a["timestamp"] == event_b["timestamp"]
                assert await qmp(a, "query-block-exports") == []
            # the client that had not negotiated got no event: its next message is
            # the reply to its own negotiation
            assert silent.command(b'{"execute": "qmp_capabilities"}') == {"return": {}}
            assert silent.command(b'{"execute": "query-block-exports"}') == {"return": []}
        finally:
            silent.close()
    asyncio.run(main())


def test_qmp_shell(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    nbd_sock = str(tmp_path / "n.sock")
    d = daemon("--blockdev", "driver=memory,node-name=m,size=1M",
               "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
               "--export", "type=nbd,id=exp0,node-name=m,name=disk")
    shell = Path(sys.executable).parent / "qmp-shell"
    assert shell.exists(), "qmp-shell (from the qemu.qmp package) is not installed"
    run = subprocess.run(
        [str(shell), d.qmp],
        input="query-block-exports\nblock-export-del id=exp0\nquery-block-exports\n",
        capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stderr
    assert "exp0" in run.stdout
    replies = [json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies == [
        {"return": [{"id": "exp0", "type": "nbd", "node-name": "m", "shutting-down": False}]},
        {"return": {}},
        {"return": []}]


# -- the command line ----------------------------------------------------------------------


def nbdinfo_json(uri: str) -> dict[str, Any]:
    out = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    info: dict[str, Any] = json.loads(out)["exports"][0]
    return info


@pytest.mark.parametrize(("limit", "multi_conn"), [(None, True), ("0", True), ("1", False)])
def test_startup_options_serve_at_once(daemon: Callable[..., Daemon], tmp_path: Path,
                                       pattern_image: str, limit: str | None,
                                       multi_conn: bool) -> None:
    nbd_sock = str(tmp_path / "n.sock")
    server = f"addr.type=unix,addr.path={nbd_sock}"
    if limit is not None:
        server += f",max-connections={limit}"
    d = daemon("--blockdev", f"driver=file,node-name=n0,filename={pattern_image}",
               "--nbd-server", server,
               "--export", "type=nbd,id=e0,node-name=n0,name=disk,writable=on,"
               "description=from the,,command line")
    info = nbdinfo_json(d.uri("disk"))
    assert info["export-name"] == "disk"
    assert info["description"] == "from the,command line"
    assert info["export-size"] == 4 * MiB
    assert info["is_read_only"] is False
    assert info["can_multi_conn"] is multi_conn

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            assert await qmp(client, "query-block-exports") == [
                {"id": "e0", "type": "nbd", "node-name": "n0", "shutting-down": False}]
        h = await nbd_open_admitted(d.uri("disk"))
        bounded(h.pwrite, b"\x09" * 512, 0)
        bounded(h.flush)
        nbd_close(h)
    asyncio.run(main())
    assert Path(pattern_image).read_bytes()[:513] == b"\x09" * 512 + b"\x01"


def test_startup_nested_node_without_qmp(daemon: Callable[..., Daemon], tmp_path: Path,
                                         pattern_image: str) -> None:
    """``file.*`` options make an inline child node; the daemon runs without --qmp."""
    nbd_sock = str(tmp_path / "n.sock")
    d = daemon("--blockdev", f"driver=raw,node-name=n,offset=1M,size=2M,read-only=on,"
               f"file.driver=file,file.node-name=f,file.read-only=on,"
               f"file.filename={pattern_image}",
               "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
               "--export", "type=nbd,id=e0,node-name=n,name=", qmp=False)
    info = nbdinfo_json(f"nbd+unix:///?socket={nbd_sock}")
    assert info["export-size"] == 2 * MiB
    assert info["is_read_only"] is True
    h = nbd_open(f"nbd+unix:///?socket={nbd_sock}")
    assert bounded(h.pread, 2 * MiB, 0) == b"\x01" * MiB + b"\x02" * MiB
    nbd_close(h)
    assert d.pid_file.read_text() == f"{d.proc.pid}\n"
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0
    assert not os.path.exists(nbd_sock)
    assert not d.pid_file.exists()
    assert d.stderr() == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--blockdev", "driver=nope,node-name=a"],
     "--blockdev driver=nope,node-name=a: Parameter 'driver' does not accept value 'nope'"),
    (["--blockdev", "driver=file,node-name=a"],
     "--blockdev driver=file,node-name=a: Parameter 'filename' is missing"),
    (["--blockdev", "driver=file,node-name=a,filename=/nonexistent/disk.img"],
     "--blockdev driver=file,node-name=a,filename=/nonexistent/disk.img: "
     "Could not open '/nonexistent/disk.img': No such file or directory"),
    (["--blockdev", "driver=memory,node-name=m,size=1M",
      "--nbd-server", "addr.type=unix,addr.path=@NBD@",
      "--export", "type=nbd,id=e0,node-name=m,writable=maybe"],
     "--export type=nbd,id=e0,node-name=m,writable=maybe: "
     "Parameter 'writable' expects 'on' or 'off'"),
    (["--blockdev", "driver=memory,node-name=m,size=1M",
      "--nbd-server", "addr.type=unix,addr.path=@NBD@",
      "--export", "type=nbd,id=e0,node-name=missing"],
     "--export type=nbd,id=e0,node-name=missing: "
     "Cannot find device=missing nor node-name=missing"),
    (["--blockdev", "driver=memory,node-name=m,size=1M",
      "--export", "type=nbd,id=e0,node-name=m"],
     "--export type=nbd,id=e0,node-name=m: NBD server not running"),
    (["--nbd-server", "addr.type=unix"],
     "--nbd-server addr.type=unix: Parameter 'addr.path' is missing"),
    (["--nbd-server", "addr.type=unix,addr.path=@NBD@,max-connections=lots"],
     "--nbd-server addr.type=unix,addr.path=@NBD@,max-connections=lots: "
     "Parameter 'max-connections' expects an integer"),
    (["--blockdev", "driver"], "--blockdev driver: Expected '=' after parameter 'driver'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--poll-max-ns", "-1"], "argument --poll-max-ns: '-1' must be between 0 and 1000000"),
    (["--blockdev", "driver=memory,node-name=m,size=9223372036854775808"],
     "--blockdev driver=memory,node-name=m,size=9223372036854775808: Parameter 'size': "
     "size 9223372036854775808 is too large (the limit is 2**63 - 1 bytes)"),
    (["--blockdev", "driver=memory,node-name=1m,size=1M"],
     "--blockdev driver=memory,node-name=1m,size=1M: Invalid node-name: '1m'"),
    (["--blockdev", f"driver=memory,node-name={'m' * 32},size=1M"],
     f"--blockdev driver=memory,node-name={'m' * 32},size=1M: Node name too long"),
    (["--blockdev", "driver=memory,node-name=m,size=1M",
      "--nbd-server", "addr.type=unix,addr.path=@NBD@",
      "--export", "type=nbd,id=#e0,node-name=m"],
     "--export type=nbd,id=#e0,node-name=m: Invalid block export id"),
], ids=["driver", "filename", "nofile", "writable", "nonode", "noserver", "nopath",
        "limit", "keyval", "option", "poll", "memory-size", "node-name", "node-name-long",
        "export-id"])
def test_bad_startup_options(tmp_path: Path, args: list[str], message: str) -> None:
    qmp_path = str(tmp_path / "q.sock")
    nbd_sock = str(tmp_path / "n.sock")
    args = [a.replace("@NBD@", nbd_sock) for a in args]
    message = message.replace("@NBD@", nbd_sock)
    pid_file = tmp_path / "daemon.pid"
    run = subprocess.run([sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path,
                          "--pid-file", str(pid_file), *args],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                         check=False)
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr == f"pynbd daemon: {message}\n"
    assert not os.path.exists(qmp_path)
    assert not os.path.exists(nbd_sock)
    assert not pid_file.exists()


def test_sigterm_ends_the_daemon_in_order(daemon: Callable[..., Daemon],
                                          pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            await qmp(client, "block-export-add", export_args("e0", "n", writable=True))
            h = nbd_open(d.uri("n"))
            bounded(h.pwrite, b"\x0b" * 4096, 0)
            d.proc.send_signal(signal.SIGTERM)
            assert d.wait() == 0
            with pytest.raises(nbd.Error):
                bounded(h.pread, 4096, 0)
    asyncio.run(main())
    assert not os.path.exists(d.qmp)
    assert not os.path.exists(d.nbd_sock)
    assert Path(pattern_image).read_bytes()[:4097] == b"\x0b" * 4096 + b"\x01"


def test_second_signal_exits_when_the_final_flush_hangs(daemon: Callable[..., Daemon],
                                                        pattern_image: str) -> None:
    """A node whose flush never returns (a Ceph cluster gone away) keeps the first
    SIGTERM waiting; a second one ends the daemon at once (status 1)."""
    d = daemon()

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await setup_nodes(client, pattern_image)
            assert await qmp(client, "x-fault-add", {
                "node-name": "n", "command": "flush", "delay": 600}) == {"id": 1}
            d.proc.send_signal(signal.SIGTERM)
            with pytest.raises(subprocess.TimeoutExpired):
                d.proc.wait(STOP_WAIT_REPORT + 1.0)  # the final flush waits, and says so
            d.proc.send_signal(signal.SIGTERM)
            assert d.wait() == 1
            exited.append(True)
    exited: list[bool] = []
    with contextlib.suppress(EOFError):  # the daemon went away under the QMP client
        asyncio.run(main())
    assert exited == [True]
    stderr = d.stderr()
    assert "still waiting for the final flush of node 'n' after 2 s" in stderr
    assert "second signal" in stderr


def test_sigterm_right_after_start(daemon: Callable[..., Daemon]) -> None:
    """The socket's appearance means signals are already handled (exit status 0)."""
    for _ in range(5):
        d = daemon(ready="socket")
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait() == 0
        assert not os.path.exists(d.qmp)


def test_quit_over_qmp(daemon: Callable[..., Daemon], pattern_image: str) -> None:
    d = daemon()

    async def main() -> None:
        client = await qmp_open(d.qmp)
        try:
            await setup_nodes(client, pattern_image)
            await qmp(client, "nbd-server-start", {"addr": unix_addr(d.nbd_sock)})
            await qmp(client, "block-export-add", export_args("e0", "n"))
            assert await qmp(client, "quit") == {}
            shutdown = await next_event(client, "SHUTDOWN")
            assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        finally:
            async with asyncio.timeout(T):
                await client.disconnect()
    asyncio.run(main())
    assert d.wait() == 0
    assert not os.path.exists(d.qmp)
    assert not os.path.exists(d.nbd_sock)
