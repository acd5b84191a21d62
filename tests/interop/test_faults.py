"""Fault injection seen by real clients: libnbd's Python API and qemu-io.

Faults come from ``pynbd --fault`` (and ``--fault-seed``) or from QMP's
``x-fault-add``/``x-fault-clear`` on a running ``pynbd daemon`` (driven with
``qemu.qmp``).  Each test asserts what the client itself reports: libnbd's
``nbd.Error.errnum``, qemu-io's messages, bytes read back.  One test fills a
real (tmpfs) filesystem instead of injecting ENOSPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from qemu.qmp import ExecuteError, QMPClient
from tests.support.interop import bounded as _bounded
from tests.support.interop import require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20
#: bound for one libnbd call, one QMP exchange, one tool run
T = 20.0


def bounded(fn: Callable[..., Any], *args: Any, timeout: float = T) -> Any:
    """``tests.support.interop.bounded`` with this module's default timeout."""
    return _bounded(fn, *args, timeout=timeout)
#: bound for the daemon to start
START_TIMEOUT = 20.0

#: conftest's ``pynbd_server`` fixture (a factory of running servers)
ServerFactory = Callable[..., Any]


# -- helpers ---------------------------------------------------------------------------------


def nbd_open(uri: str) -> Any:
    h = nbd.NBD()
    bounded(h.connect_uri, uri)
    return h


def nbd_close(h: Any) -> None:
    if not h.aio_is_dead():
        bounded(h.shutdown)


@contextlib.contextmanager
def nbd_client(uri: str) -> Iterator[Any]:
    h = nbd_open(uri)
    try:
        yield h
    finally:
        nbd_close(h)


def errnum(fn: Callable[..., Any], *args: Any) -> int:
    """0 if the libnbd call succeeds, else the errno libnbd reports."""
    try:
        bounded(fn, *args)
    except nbd.Error as err:
        return int(err.errnum)
    return 0


def fill(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


def pattern(seed: int, length: int) -> bytes:
    block = bytes((seed * 7 + i) % 251 + 1 for i in range(251))
    return (block * (length // len(block) + 1))[:length]


def serve(pynbd_server: ServerFactory, *args: str) -> Any:
    return pynbd_server("-e", "0", *args)


def qemu_io(uri: str, *commands: str) -> list[str]:
    """Run qemu-io; return one outcome line per command (its reports, in order)."""
    args = [require_tool("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=T, check=False)
    outcomes = [line for line in proc.stdout.splitlines()
                if line.startswith(("read ", "wrote ", "read failed", "write failed",
                                    "Pattern verification failed"))]
    assert len(outcomes) == len(commands), (proc.stdout, proc.stderr)
    return outcomes


# -- errors reach the client; the connection and the other clients go on ---------------------


def test_read_eio_reaches_libnbd_and_neither_connection_notices_afterwards(
        pynbd_server: ServerFactory) -> None:
    srv = serve(pynbd_server, "--fault", "cmd=read,errno=EIO,range=0-64K,count=1",
                "memory:8M")
    data = pattern(1, 4 * KiB)
    with nbd_client(srv.uri) as a, nbd_client(srv.uri) as b:
        bounded(a.pwrite, data, 0)
        assert bounded(b.pread, 4 * KiB, MiB) == bytes(4 * KiB)
        with pytest.raises(nbd.Error) as info:
            bounded(a.pread, 4 * KiB, 0)
        assert info.value.errnum == errno.EIO
        assert info.value.errno == "EIO"
        # the same connection goes on: the next read works (count=1 is used up)
        assert not a.aio_is_dead()
        assert bounded(a.pread, 4 * KiB, 0) == data
        # the other client saw nothing of it
        assert not b.aio_is_dead()
        assert bounded(b.pread, 4 * KiB, 0) == data
        bounded(b.pwrite, fill(0x5A, 512), 8 * KiB)
        assert bounded(a.pread, 512, 8 * KiB) == fill(0x5A, 512)
    assert srv.proc.poll() is None


def test_enospc_on_writes_reaches_qemu_io_and_earlier_data_is_intact(
        pynbd_server: ServerFactory,
        raw_image: Callable[..., Path]) -> None:
    image = raw_image(4 * MiB)
    srv = serve(pynbd_server, "--fault", "cmd=write,errno=ENOSPC,range=1M-2M", str(image))
    got = qemu_io(srv.uri,
                  "write -P 0xab 0 64k",
                  "write -P 0xcd 1M 64k",       # in the range: ENOSPC
                  "write -P 0xcd 960k 128k",    # overlaps it: ENOSPC
                  "read -P 0xab 0 64k",         # what was written before is intact
                  "read -P 0 960k 128k",        # the failed writes changed nothing
                  "write -P 0xef 2M 4k",        # past the range: fine
                  "read -P 0xef 2M 4k")
    assert got == [
        "wrote 65536/65536 bytes at offset 0",
        "write failed: No space left on device",
        "write failed: No space left on device",
        "read 65536/65536 bytes at offset 0",
        "read 131072/131072 bytes at offset 983040",
        "wrote 4096/4096 bytes at offset 2097152",
        "read 4096/4096 bytes at offset 2097152",
    ]
    with open(image, "rb") as fh:
        disk = fh.read()
    assert disk[:64 * KiB] == fill(0xAB, 64 * KiB)
    assert disk[960 * KiB:1088 * KiB] == bytes(128 * KiB)
    assert disk[2 * MiB:2 * MiB + 4 * KiB] == fill(0xEF, 4 * KiB)


#: injected errno -> what the client must see (a plain read unless noted)
ERRNO_TABLE = [
    ("EPERM", errno.EPERM),
    ("EROFS", errno.EPERM),
    ("ENOMEM", errno.ENOMEM),
    ("EINVAL", errno.EINVAL),
    ("ENOSPC", errno.ENOSPC),
    ("EDQUOT", errno.ENOSPC),
    ("EFBIG", errno.ENOSPC),
    ("ESHUTDOWN", errno.ESHUTDOWN),
    ("EIO", errno.EIO),
    # errnos NBD lacks become EIO
    ("ENOENT", errno.EIO),
    ("EBUSY", errno.EIO),
    ("EAGAIN", errno.EIO),
    # EOVERFLOW only answers a DF read, ENOTSUP only a FAST_ZERO write-zeroes
    ("EOVERFLOW", errno.EINVAL),
    ("ENOTSUP", errno.EINVAL),
]
SLOT = 64 * KiB


def test_errnos_map_through_the_protocol_and_the_rest_become_eio(
        pynbd_server: ServerFactory) -> None:
    faults: list[str] = []
    for index, (name, _) in enumerate(ERRNO_TABLE):
        faults += ["--fault", f"cmd=read,errno={name},range={index * SLOT}-{(index + 1) * SLOT}"]
    overflow = ERRNO_TABLE.index(("EOVERFLOW", errno.EINVAL)) * SLOT
    notsup = len(ERRNO_TABLE) * SLOT
    faults += ["--fault", f"cmd=read+zero,errno=EOVERFLOW,range={overflow}-{overflow + SLOT}",
               "--fault", f"cmd=zero,errno=ENOTSUP,range={notsup}-{notsup + SLOT}"]
    srv = serve(pynbd_server, *faults, "memory:8M")
    with nbd_client(srv.uri) as h:
        assert h.can_df()
        assert h.can_fast_zero()
        got = {name: errnum(h.pread, 4 * KiB, index * SLOT)
               for index, (name, _) in enumerate(ERRNO_TABLE)}
        assert got == dict(ERRNO_TABLE)
        # the two errnos NBD allows only for one request each
        chunks: list[int] = []

        def chunk(buf: bytes, offset: int, status: int, err: list[int]) -> int:
            chunks.append(offset)
            return 0

        # (libnbd takes DF only on pread_structured)
        assert errnum(h.pread_structured, 4 * KiB, overflow, chunk,
                      nbd.CMD_FLAG_DF) == errno.EOVERFLOW
        assert chunks == []
        assert errnum(h.zero, 4 * KiB, overflow) == errno.EINVAL
        assert errnum(h.zero, 4 * KiB, notsup, nbd.CMD_FLAG_FAST_ZERO) == errno.ENOTSUP
        assert errnum(h.zero, 4 * KiB, notsup) == errno.EINVAL
        # fifteen failures later the connection still serves
        assert bounded(h.pread, 4 * KiB, 7 * MiB) == bytes(4 * KiB)
        assert not h.aio_is_dead()


# -- which requests a rule picks ----------------------------------------------------------


def test_a_range_rule_hits_only_requests_overlapping_it(
        pynbd_server: ServerFactory) -> None:
    # with -o the export starts 1 MiB into the image: ranges are export offsets
    srv = serve(pynbd_server, "-o", "1M", "--fault", "cmd=read,errno=EIO,range=1M-2M",
                "memory:8M")
    got = qemu_io(srv.uri,
                  "read 0 64k",
                  "read 960k 64k",      # ends where the range starts
                  "read 1020k 8k",      # straddles its start
                  "read 1536k 4k",      # inside
                  "read 2044k 4k",      # its last bytes
                  "read 2M 64k",        # starts where it ends
                  "read 0 4M",          # covers it
                  "write -P 0x11 1M 4k",  # a write there is not a read
                  "read -P 0x11 1M 4k")
    assert got == [
        "read 65536/65536 bytes at offset 0",
        "read 65536/65536 bytes at offset 983040",
        "read failed: Input/output error",
        "read failed: Input/output error",
        "read failed: Input/output error",
        "read 65536/65536 bytes at offset 2097152",
        "read failed: Input/output error",
        "wrote 4096/4096 bytes at offset 1048576",
        "read failed: Input/output error",
    ]


def test_count_stops_after_n_hits(pynbd_server: ServerFactory) -> None:
    srv = serve(pynbd_server, "--fault", "cmd=read,errno=EIO,count=3", "memory:8M")
    with nbd_client(srv.uri) as h:
        got = [errnum(h.pread, 512, i * 512) for i in range(7)]
        assert got == [errno.EIO] * 3 + [0] * 4


def test_rate_is_reproducible_with_a_fixed_seed(
        pynbd_server: ServerFactory) -> None:
    def failures(seed: int) -> list[int]:
        srv = serve(pynbd_server, "--fault", "cmd=read,errno=EIO,rate=0.5",
                    "--fault-seed", str(seed), "memory:1M")
        with nbd_client(srv.uri) as h:
            return [errnum(h.pread, 512, 0) for _ in range(48)]

    first = failures(42)
    assert set(first) == {0, errno.EIO}
    assert failures(42) == first
    assert failures(43) != first


def test_a_delay_on_one_connections_reads_does_not_hold_another(
        pynbd_server: ServerFactory) -> None:
    srv = serve(pynbd_server, "--fault", "cmd=read,delay=2,range=0-64K", "memory:8M")
    with nbd_client(srv.uri) as w:
        bounded(w.pwrite, pattern(3, 4 * KiB), 0)
        bounded(w.pwrite, pattern(4, 4 * KiB), MiB)
    with nbd_client(srv.uri) as a, nbd_client(srv.uri) as b:
        delayed_buf, other_buf = nbd.Buffer(4 * KiB), nbd.Buffer(4 * KiB)
        delayed = a.aio_pread(delayed_buf, 0)
        other = a.aio_pread(other_buf, MiB)

        def wait_for(cookie: int) -> None:
            deadline = time.monotonic() + T
            for _ in range(10_000):
                if a.aio_command_completed(cookie):
                    return
                assert time.monotonic() < deadline, "command did not complete"
                a.poll(100)
            raise AssertionError("poll loop exhausted")

        # B reads while A's first read waits in the server
        for i in range(10):
            assert bounded(b.pread, 4 * KiB, MiB) == pattern(4, 4 * KiB), i
        # A's later read overtakes its own delayed one
        bounded(wait_for, other)
        assert other_buf.to_bytearray() == pattern(4, 4 * KiB)
        a.poll(0)
        assert not a.aio_command_completed(delayed), \
            "the delayed read finished before reads issued after it"
        bounded(wait_for, delayed)
        assert delayed_buf.to_bytearray() == pattern(3, 4 * KiB)


# -- QMP: x-fault-add / x-fault-clear on a running daemon ---------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    qmp: str
    nbd_sock: str

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.nbd_sock}"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """``pynbd daemon --qmp`` with nothing configured; killed at teardown."""
    qmp_path = str(tmp_path / "qmp.sock")
    pid_file = tmp_path / "daemon.pid"
    err_path = tmp_path / "daemon.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path,
             "--pid-file", str(pid_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for _ in range(100_000):
            if pid_file.exists():  # written once the QMP socket listens
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"daemon did not start: {err_path.read_text()}")
            time.sleep(0.02)
        yield Daemon(proc, qmp_path, str(tmp_path / "nbd.sock"))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def serve_node(client: QMPClient, daemon: Daemon, image: Path) -> None:
    """A raw node "n" over a file node "f", exported writable as "disk"."""
    assert await qmp(client, "blockdev-add", {
        "driver": "raw", "node-name": "n",
        "file": {"driver": "file", "node-name": "f", "filename": str(image)}}) == {}
    assert await qmp(client, "nbd-server-start", {
        "addr": {"type": "unix", "data": {"path": daemon.nbd_sock}}}) == {}
    assert await qmp(client, "block-export-add", {
        "type": "nbd", "id": "e", "node-name": "n", "name": "disk", "writable": True}) == {}


def test_qmp_fault_add_and_clear_change_a_running_export(
        daemon: Daemon, raw_image: Callable[..., Path]) -> None:
    image = raw_image(4 * MiB)
    data = pattern(5, 4 * KiB)

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await serve_node(client, daemon, image)
            assert await qmp(client, "x-query-faults", {"node-name": "n"}) == []
            h = nbd_open(daemon.uri("disk"))
            try:
                bounded(h.pwrite, data, 0)
                assert bounded(h.pread, 4 * KiB, 0) == data
                # on the exported node
                added = await qmp(client, "x-fault-add", {
                    "node-name": "n", "command": "read", "errno": "EIO", "seed": 1})
                assert added == {"id": 1}
                assert errnum(h.pread, 4 * KiB, 0) == errno.EIO
                assert errnum(h.pread, 4 * KiB, 0) == errno.EIO
                assert bounded(h.pwrite, data, 8 * KiB) is None  # writes untouched
                assert await qmp(client, "x-query-faults", {"node-name": "n"}) == [
                    {"id": 1, "command": "read", "errno": "EIO", "rate": 1.0, "hits": 2,
                     "seed": 1}]
                assert await qmp(client, "x-fault-clear", {"node-name": "n", "id": 1}) == {}
                assert bounded(h.pread, 4 * KiB, 0) == data
                # on the file node under it: the export of "n" meets it too
                added = await qmp(client, "x-fault-add", {
                    "node-name": "f", "command": "write", "errno": "ENOSPC",
                    "start": MiB, "end": 2 * MiB, "count": 1})
                assert added == {"id": 1}
                assert errnum(h.pwrite, fill(0x77, 4 * KiB), MiB) == errno.ENOSPC
                bounded(h.pwrite, fill(0x77, 4 * KiB), MiB)  # count=1 is used up
                assert bounded(h.pread, 4 * KiB, MiB) == fill(0x77, 4 * KiB)
                await qmp(client, "x-fault-add", {"node-name": "f", "command": "all",
                                                  "errno": "EPERM"})
                assert errnum(h.pread, 512, 0) == errno.EPERM
                assert errnum(h.flush) == errno.EPERM
                # clearing without an id clears every rule of the node
                assert await qmp(client, "x-fault-clear", {"node-name": "f"}) == {}
                assert await qmp(client, "x-query-faults", {"node-name": "f"}) == []
                assert bounded(h.pread, 4 * KiB, 0) == data
                bounded(h.flush)
                assert not h.aio_is_dead()
            finally:
                nbd_close(h)

    asyncio.run(main())
    with open(image, "rb") as fh:
        disk = fh.read()
    assert disk[:4 * KiB] == data
    assert disk[MiB:MiB + 4 * KiB] == fill(0x77, 4 * KiB)


BAD_FAULT_ADD: list[tuple[dict[str, Any], str]] = [
    ({"command": "read"}, "Parameter 'node-name' is missing"),
    ({"node-name": "n"}, "Parameter 'command' is missing"),
    ({"node-name": "nope", "command": "read"},
     "Cannot find device=nope nor node-name=nope"),
    ({"node-name": "n", "command": "reed"}, "Parameter 'command' does not accept value 'reed'"),
    ({"node-name": "n", "command": "read", "errno": "ENOPE"},
     "Parameter 'errno' does not accept value 'ENOPE'"),
    ({"node-name": "n", "command": "read", "errno": 5},
     "Invalid parameter type for 'errno', expected: string"),
    ({"node-name": "n", "command": "read", "rate": "half"},
     "Invalid parameter type for 'rate', expected: number"),
    ({"node-name": "n", "command": "read", "rate": True},
     "Invalid parameter type for 'rate', expected: number"),
    ({"node-name": "n", "command": "read", "rate": 1.5},
     "Parameter 'rate' expects a value between 0 and 1"),
    ({"node-name": "n", "command": "read", "delay": -1},
     "Parameter 'delay' expects a value of 0 or more"),
    ({"node-name": "n", "command": "read", "start": -1},
     "Parameter 'start' expects a value of 0 or more"),
    ({"node-name": "n", "command": "read", "start": 10, "end": 10},
     "Parameter 'end' expects a value greater than 'start'"),
    ({"node-name": "n", "command": "read", "count": 0},
     "Parameter 'count' expects a value of 1 or more"),
    ({"node-name": "n", "command": "read", "count": 1.5},
     "Invalid parameter type for 'count', expected: integer"),
    ({"node-name": "n", "command": "read", "colour": "red"}, "Parameter 'colour' is unexpected"),
]


def test_bad_qmp_fault_arguments_give_generic_error(
        daemon: Daemon, raw_image: Callable[..., Path]) -> None:
    image = raw_image(MiB)

    async def fails(client: QMPClient, cmd: str, args: dict[str, Any]) -> str:
        with pytest.raises(ExecuteError) as info:
            await qmp(client, cmd, args)
        assert info.value.error_class == "GenericError", str(info.value)
        return str(info.value)

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await serve_node(client, daemon, image)
            for args, message in BAD_FAULT_ADD:
                assert await fails(client, "x-fault-add", args) == message, args
            assert await fails(client, "x-fault-clear", {"node-name": "n", "id": 9}) == \
                "Node 'n' has no fault with id 9"
            assert await fails(client, "x-fault-clear", {"node-name": "x"}) == \
                "Cannot find device=x nor node-name=x"
            assert await fails(client, "x-query-faults", {}) == \
                "Parameter 'node-name' is missing"
            # nothing was added by the failures, and the export still serves
            assert await qmp(client, "x-query-faults", {"node-name": "n"}) == []
            with nbd_client(daemon.uri("disk")) as h:
                assert bounded(h.pread, 512, 0) == bytes(512)
            names = {c["name"] for c in await qmp(client, "query-commands")}
            assert {"x-fault-add", "x-fault-clear", "x-query-faults"} <= names

    asyncio.run(main())


# -- a really full filesystem --------------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where``; skips the test if mounting fails."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)], capture_output=True, text=True, timeout=T,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): "
                    f"{mounted.stderr.strip()}")
    try:
        yield where
    finally:
        done = subprocess.run(["umount", str(where)], capture_output=True, timeout=T,
                              check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=T,
                           check=False)


def test_writes_past_a_full_filesystem_get_enospc_and_earlier_data_stays(
        pynbd_server: ServerFactory, tmp_path: Path) -> None:
    chunk = 64 * KiB
    with tiny_tmpfs(tmp_path / "fs", "1M") as fs:
        image = fs / "disk.img"
        with open(image, "wb") as fh:
            fh.truncate(8 * MiB)  # sparse, eight times the filesystem
        srv = serve(pynbd_server, str(image))
        try:
            with nbd_client(srv.uri) as h:
                written = 0
                failure = 0
                for index in range(8 * MiB // chunk):
                    failure = errnum(h.pwrite, pattern(index, chunk), index * chunk)
                    if failure:
                        break
                    written += 1
                assert failure == errno.ENOSPC
                assert 0 < written <= 16, written  # at most 1 MiB fits
                # the connection goes on: every chunk written before reads back
                for index in range(written):
                    assert bounded(h.pread, chunk, index * chunk) == pattern(index, chunk), \
                        index
                assert errnum(h.pwrite, pattern(99, chunk), 4 * MiB) == errno.ENOSPC
                bounded(h.flush)
                assert bounded(h.pread, chunk, 0) == pattern(0, chunk)
                assert not h.aio_is_dead()
        finally:
            srv.stop()
        with open(image, "rb") as fh:
            assert fh.read(written * chunk) == b"".join(
                pattern(index, chunk) for index in range(written))


# -- command line errors -----------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--fault", "cmd=reed"], "--fault cmd=reed: unknown command 'reed'"),
    (["--fault", "errno=ENOPE"], "--fault errno=ENOPE: unknown errno name 'ENOPE'"),
    (["--fault", "rate=2"], "--fault rate=2: rate must be between 0 and 1"),
    (["--fault", "range=2M-1M"], "--fault range=2M-1M: range end 1048576 must be greater"),
    (["--fault", "count=0"], "--fault count=0: count must be at least 1"),
    (["--fault", "delay=-1"], "--fault delay=-1: delay must be a non-negative number"),
    (["--fault", "cmd=read,bogus=1"], "--fault cmd=read,bogus=1: unknown key 'bogus'"),
    (["--fault-seed", "1"], "--fault-seed needs --fault"),
    (["--fault", "cmd=read", "--fault-seed", "x"], "argument --fault-seed: invalid int"),
])
def test_bad_fault_options_print_one_line_and_exit_2(args: list[str], message: str,
                                                      tmp_path: Path) -> None:
    sock = str(tmp_path / "never.sock")
    proc = subprocess.run([sys.executable, "-m", "pynbd", "-k", sock, *args, "memory:1M"],
                          capture_output=True, text=True, timeout=T, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"pynbd: {message}"), lines[0]
    assert not os.path.exists(sock)
