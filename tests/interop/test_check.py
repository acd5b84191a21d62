"""``pynbd check`` and the ``pynbd.client`` API against real servers.

The checker must pass on correct servers (pynbd with both backends, qemu-nbd,
nbdkit, two servers sharing one image, a TLS export) and must report
violations, with the block's history, against a server that advertises
multi-conn while keeping a write-back cache per connection
(``tests/support/broken_server.py``); the same script with the cache off is
the control and must pass.  The client API is cross-checked with libnbd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from tests.support.interop import require_tool as tool

from pynbd.client import (
    ConnectError,
    ConnectionLost,
    NBDClient,
    RequestError,
    Target,
    parse_uri,
)
from pynbd.proto.constants import Errno

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.interop

MiB = 1 << 20
#: bound for one checker run (they run for 1-2 s, plus start-up)
RUN_TIMEOUT = 90.0
#: bound for a server to start listening
START_TIMEOUT = 20.0
BROKEN_SERVER = Path(__file__).resolve().parents[1] / "support" / "broken_server.py"
COUNT_KEYS = {"read", "write", "write_fua", "zero", "trim", "flush"}


def check(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``pynbd check`` (through the real command line) to completion."""
    return subprocess.run([sys.executable, "-m", "pynbd", "check", *args],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)


def check_json(*args: str) -> tuple[int, dict[str, Any]]:
    proc = check(*args, "--json")
    assert proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def assert_clean_pass(code: int, result: dict[str, Any], connections: int,
                      uris: list[str]) -> None:
    assert code == 0, json.dumps(result, indent=1)[:3000]
    assert result["result"] == "pass"
    assert result["violations"] == []
    assert result["errors"] == []
    assert (result["connections"], result["uris"]) == (connections, uris)
    assert set(result["counts"]) == COUNT_KEYS
    assert all(result["counts"][k] > 0 for k in COUNT_KEYS), result["counts"]
    assert result["ops"] == sum(result["counts"].values())
    assert result["blocks_verified"] >= result["counts"]["read"]
    assert result["ops_per_second"] > 0
    # the checker's own pace: its CPU time during the run and operations per CPU second
    assert 0 < result["checker_cpu_seconds"] <= 2 * result["seconds"]
    assert result["checker_cpu_share"] == pytest.approx(
        result["checker_cpu_seconds"] / result["seconds"], abs=0.01)
    assert result["checker_ops_per_cpu_second"] == pytest.approx(
        result["ops"] / result["checker_cpu_seconds"], rel=0.01)


def wait_for_socket(path: Path, proc: subprocess.Popen[Any]) -> None:
    """Wait (bounded) until something accepts connections and greets on ``path``."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(2.0)
                probe.connect(str(path))
                if probe.recv(18)[:8] == b"NBDMAGIC":
                    return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"nothing listens on {path} within {START_TIMEOUT} s")


@contextlib.contextmanager
def _unix_server(argv: list[str], sock: Path) -> Iterator[str]:
    """Run a server that listens on ``sock`` until the block ends; killed by pid."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def qemu_nbd(image: Path, sock: Path) -> contextlib.AbstractContextManager[str]:
    """``qemu-nbd -f raw -e 0 -t -k SOCK IMAGE``."""
    return _unix_server([tool("qemu-nbd"), "-f", "raw", "-e", "0", "-t", "-k", str(sock),
                         str(image)], sock)


def nbdkit(sock: Path, *args: str) -> contextlib.AbstractContextManager[str]:
    return _unix_server([tool("nbdkit"), "-f", "-U", str(sock), *args], sock)


@contextlib.contextmanager
def broken_server(sock: Path, *, cache: bool) -> Iterator[str]:
    """The test-only server with (or, as the control, without) per-connection caches."""
    proc = subprocess.Popen([sys.executable, str(BROKEN_SERVER), "--socket", str(sock),
                             "--size", "1M", "--cache", "on" if cache else "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(START_TIMEOUT):
                pytest.fail("broken_server.py did not start")
        uri = proc.stdout.readline().strip()
        assert uri == f"nbd+unix:///?socket={sock}", proc.stderr.read() if proc.stderr else ""
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- correct servers pass ------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "connections"),
                         [("memory", 4), ("memory", 8), ("file", 4), ("file", 8)])
def test_passes_on_pynbd(pynbd_server: Callable[..., Any], raw_image: Callable[..., Path],
                         backend: str, connections: int) -> None:
    image = "memory:64M" if backend == "memory" else str(raw_image(8 * MiB))
    srv = pynbd_server("-e", "0", image)
    # a small region, so blocks are written, trimmed and read by many connections
    code, result = check_json(srv.uri, "--write", "--connections", str(connections),
                              "--seconds", "2", "--region", "1M", "--seed", "7")
    assert_clean_pass(code, result, connections, [srv.uri])
    assert (result["seed"], result["region"], result["block"]) == (7, MiB, 4096)


def test_passes_on_pynbd_over_tcp_with_the_default_region(
        pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:16M", tcp=True)
    assert srv.uri.startswith("nbd://127.0.0.1:")
    code, result = check_json(srv.uri, "--write", "--seconds", "1")
    assert_clean_pass(code, result, 4, [srv.uri])
    assert result["region"] == 16 * MiB  # the export is smaller than 64M
    assert result["inflight"] == 8


def test_passes_on_qemu_nbd(raw_image: Callable[..., Path], tmp_path: Path) -> None:
    with qemu_nbd(raw_image(8 * MiB), tmp_path / "qemu.sock") as uri:
        code, result = check_json(uri, "--write", "--connections", "4", "--seconds", "2",
                                  "--region", "1M")
    assert_clean_pass(code, result, 4, [uri])


def test_passes_on_nbdkit_memory(tmp_path: Path) -> None:
    with nbdkit(tmp_path / "kit.sock", "memory", "4M") as uri:
        code, result = check_json(uri, "--write", "--seconds", "1", "--region", "512K")
    assert_clean_pass(code, result, 4, [uri])


def test_two_uris_qemu_nbd_and_pynbd_sharing_one_image(
        pynbd_server: Callable[..., Any], raw_image: Callable[..., Path],
        tmp_path: Path) -> None:
    """Connections go round-robin over both servers; both use the host's page cache."""
    image = raw_image(8 * MiB)
    srv = pynbd_server("-e", "0", str(image))
    with qemu_nbd(image, tmp_path / "qemu.sock") as quri:
        code, result = check_json(quri, srv.uri, "--write", "--connections", "4",
                                  "--seconds", "2", "--region", "1M")
    assert_clean_pass(code, result, 4, [quri, srv.uri])


def test_text_output(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:4M")
    proc = check(srv.uri, "--write", "--seconds", "1", "--seed", "42", "--inflight", "3",
                  "--block", "8192")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == "pynbd check: PASS"
    assert lines[1] == "  4 connections over 1 URI(s), 3 requests in flight each, seed 42"
    assert lines[2] == "  region 4194304 bytes in 512 blocks of 8192"
    assert re.fullmatch(r"  \d+ operations in 1\.\d\d s: \d+ ops/s", lines[3]), lines[3]
    assert re.fullmatch(r"  checker CPU \d+\.\d\d s \(\d+% of one core\): \d+ ops per CPU "
                        r"second", lines[4]), lines[4]
    assert re.fullmatch(r"  read [1-9]\d*, write [1-9]\d*, write FUA [1-9]\d*, "
                        r"write-zeroes [1-9]\d*, trim [1-9]\d*, flush [1-9]\d*", lines[5])
    assert re.fullmatch(r"  blocks verified \d+ \(torn reads accepted \d+\)", lines[6])
    assert len(lines) == 7


def test_tls_export(pynbd_server: Callable[..., Any], tmp_path: Path) -> None:
    certs = tmp_path / "pki"
    setup = subprocess.run([sys.executable, "-m", "pynbd", "tls-setup", str(certs)],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert setup.returncode == 0, setup.stderr
    srv = pynbd_server("-e", "0", "--tls-creds", str(certs), "memory:4M")
    assert srv.uri.startswith("nbds+unix://")
    uri = f"{srv.uri}&tls-certificates={certs}"
    code, result = check_json(uri, "--write", "--seconds", "1", "--connections", "2")
    assert_clean_pass(code, result, 2, [uri])
    # the same export without TLS: refused by the server, one clear line, exit 2
    plain = check(srv.uri.replace("nbds+unix", "nbd+unix"), "--write", "--seconds", "1")
    assert plain.returncode == 2
    assert plain.stdout == ""
    assert plain.stderr.count("\n") == 1
    assert "NBD_REP_ERR_TLS_REQD" in plain.stderr
    assert "the server requires TLS" in plain.stderr
    # a server certificate that does not name the host we expect is not trusted
    wrong = check(f"{uri}&tls-hostname=other.example", "--write", "--seconds", "1")
    assert wrong.returncode == 2
    assert "TLS failed" in wrong.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in wrong.stderr


# -- the broken server is caught; its control passes ---------------------------------------


_HEAD = re.compile(r"VIOLATION at block (\d+) \(offset (\d+)\): READ #(\d+) on connection "
                   r"(\d+) \(sent t=(\d+), done t=(\d+)\) saw (write #\d+|zeroes) "
                   r"\(first bytes ([0-9a-f]{32})\)")
_REASON = re.compile(r"  (write #\d+|zeroes) had been replaced by (WRITE #\d+|WRITE_ZEROES)"
                     r".* on connection (\d+) \(sent t=(\d+), done t=(\d+)\), which completed "
                     r"before this read was sent")
_ROW = re.compile(r"  +#(\d+) +(\d+) +(\d+) +(\d+|-)  (\S.*?)(?:   <== violation)?")


def test_reports_violations_on_a_server_with_per_connection_caches(tmp_path: Path) -> None:
    with broken_server(tmp_path / "broken.sock", cache=True) as uri:
        proc = check(uri, "--write", "--connections", "4", "--seconds", "3",
                     "--region", "256K", "--seed", "1")
    print(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"pynbd check: FAIL: [1-9]\d* violation\(s\), 0 error\(s\)",
                        lines[-7]), lines[-7]
    head = _HEAD.fullmatch(lines[0])
    assert head is not None, lines[0]
    block, offset, read_id, read_conn, sent, done = map(int, head.groups()[:6])
    assert offset == block * 4096
    assert sent < done
    reason = _REASON.fullmatch(lines[1])
    assert reason is not None, lines[1]
    # a connection always sees its own cached writes: the newer write that the read
    # missed must have come from another connection, and completed before the read
    assert int(reason.group(3)) != read_conn
    assert int(reason.group(5)) < sent
    assert lines[2].startswith("  allowed: ")
    assert lines[3] == f"  history of block {block} (logical clock; done '-' = no reply):"
    rows = []
    first_row = 6 if re.fullmatch(r"  \.\.\. \d+ earlier operations not shown", lines[5]) else 5
    for line in lines[first_row:]:
        if line.startswith(("VIOLATION", "pynbd check")):
            break
        row = _ROW.fullmatch(line)
        assert row is not None, line
        rows.append(row)
    marked = [r for r in rows if r.group(0).endswith("<== violation")]
    assert len(marked) == 1
    assert (int(marked[0].group(1)), int(marked[0].group(2))) == (read_id, read_conn)
    assert marked[0].group(5).startswith("READ")
    sends = [int(r.group(3)) for r in rows]
    assert sends == sorted(sends)  # the history is in logical send order
    replaced = reason.group(2).split()[-1]  # "#N" of the write the read should have seen
    assert any(replaced in r.group(5) for r in rows) or reason.group(2) == "WRITE_ZEROES"


def test_violation_json(tmp_path: Path) -> None:
    with broken_server(tmp_path / "broken.sock", cache=True) as uri:
        code, result = check_json(uri, "--write", "--seconds", "3", "--region", "256K")
    assert code == 1
    assert result["result"] == "fail"
    assert result["violation_count"] >= 1
    first = result["violations"][0]
    assert first["offset"] == first["block"] * 4096
    assert first["read"]["kind"] == "read"
    assert first["seen"] not in first["expected"]
    assert "had been replaced by" in first["reason"]
    history = first["history"]
    assert history[-1]["op"] == first["read"]["op"] or any(
        h["op"] == first["read"]["op"] for h in history)
    assert all(h["sent"] is not None for h in history)
    assert any(h["kind"] in ("write", "zero") and h["conn"] != first["read"]["conn"]
               for h in history)


def test_control_without_the_cache_passes(tmp_path: Path) -> None:
    with broken_server(tmp_path / "control.sock", cache=False) as uri:
        code, result = check_json(uri, "--write", "--connections", "4", "--seconds", "2",
                                  "--region", "256K", "--seed", "1")
    assert_clean_pass(code, result, 4, [uri])


# -- refusals and errors: exit 2, one line -----------------------------------------------


def _one_line_refusal(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("pynbd check: ")
    for needle in needles:
        assert needle in proc.stderr


def test_refuses_without_write_and_touches_nothing(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:4M")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    try:
        h.pwrite(b"\xa5" * MiB, 0)
        _one_line_refusal(check(srv.uri, "--seconds", "1"), "without --write")
        assert h.pread(MiB, 0) == b"\xa5" * MiB
    finally:
        h.shutdown()


def test_refuses_an_export_without_multi_conn_unless_forced(
        pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("memory:4M")  # -e 1: one client, no CAN_MULTI_CONN (as qemu-nbd)
    _one_line_refusal(check(srv.uri, "--write", "--seconds", "1"),
                      "does not advertise multi-conn", "--force")
    code, result = check_json(srv.uri, "--write", "--force", "--connections", "1",
                              "--seconds", "1")
    assert_clean_pass(code, result, 1, [srv.uri])


@pytest.mark.parametrize(("uri", "needle"), [
    ("http://localhost/x", "the scheme must be"),
    ("nbd+unix:///disk", "socket=PATH parameter is missing"),
    ("nbd+unix://host/disk?socket=/tmp/s", "has no host"),
    ("nbd:///disk", "the host is missing"),
    ("nbd://localhost:99999/", "invalid port"),
    ("nbd://localhost/?socket=/tmp/s", "socket= only goes with nbd+unix"),
    ("nbd+unix:///?socket=/tmp/s&bogus=1", "unknown parameter 'bogus'"),
    ("nbd+unix:///?socket=/tmp/s&tls-certificates=/tmp", "needs an nbds"),
    ("not a uri", "the scheme must be"),
])
def test_bad_uri(uri: str, needle: str) -> None:
    _one_line_refusal(check(uri, "--write"), "bad NBD URI", needle)


def test_unreachable_socket(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    _one_line_refusal(check(f"nbd+unix:///?socket={missing}", "--write"),
                      "cannot connect", str(missing), "No such file or directory")


def test_unreachable_tcp_port() -> None:
    with socket.socket() as sock:  # bound, not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        _one_line_refusal(check(f"nbd://127.0.0.1:{port}/", "--write"),
                          "cannot connect", "Connection refused")


@pytest.mark.parametrize(("args", "needle"), [
    (["--block", "1000"], "multiple of 512"),
    (["--region", "8M"], "larger than the 4194304-byte export"),
    (["--connections", "0"], "must be positive"),
    (["--seconds", "-1"], "must be positive"),
    (["--region", "lots"], "invalid size"),
])
def test_usage_errors(pynbd_server: Callable[..., Any], args: list[str], needle: str) -> None:
    srv = pynbd_server("-e", "0", "memory:4M")
    _one_line_refusal(check(srv.uri, "--write", *args), needle)


def test_no_uri_is_a_usage_error() -> None:
    _one_line_refusal(check("--write"), "required")


# -- the client API ---------------------------------------------------------------------------


def test_parse_uri_libnbd_forms() -> None:
    assert parse_uri("nbd://example.com/disk") == Target(
        uri="nbd://example.com/disk", export="disk", tls=False, host="example.com")
    assert parse_uri("nbd://[::1]:1234/hello%20world").host == "::1"
    assert parse_uri("nbd://[::1]:1234/hello%20world").port == 1234
    assert parse_uri("nbd://[::1]:1234/hello%20world").export == "hello world"
    assert parse_uri("nbd://h").export == ""
    assert parse_uri("nbd://h//disk").export == "/disk"
    unix = parse_uri("nbds+unix:///e?socket=/run/s.sock&tls-certificates=/pki&"
                     "tls-verify-peer=0")
    assert (unix.socket, unix.export, unix.tls, unix.tls_certificates,
            unix.tls_verify_peer) == ("/run/s.sock", "e", True, "/pki", False)
    assert parse_uri("nbds://h/", tls_certificates="/d").tls_certificates == "/d"
    with pytest.raises(ValueError, match="given twice"):
        parse_uri("nbd+unix:///?socket=/a&socket=/b")


def test_client_api_cross_checked_with_libnbd(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:4M")

    async def ours() -> list[tuple[int, int]]:
        async with await NBDClient.connect(srv.uri) as c:
            assert (c.size, c.can_multi_conn, c.structured) == (4 * MiB, True, True)
            assert (c.can_flush, c.can_fua, c.can_trim, c.can_zero) == (True,) * 4
            assert c.meta_contexts == {"base:allocation": 0}
            # 64 writes and then 64 reads in flight at once
            await asyncio.gather(*(c.pwrite(bytes([i]) * 4096, i * 4096, fua=i % 3 == 0)
                                   for i in range(64)))
            reads = await asyncio.gather(*(c.pread(i * 4096, 4096) for i in range(64)))
            assert reads == [bytes([i]) * 4096 for i in range(64)]
            await c.zero(MiB, 64 * 1024)
            await c.trim(2 * MiB, 64 * 1024)
            await c.flush()
            return await c.block_status(0, 4 * MiB)

    extents = asyncio.run(ours())
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(srv.uri)
    try:
        assert h.pread(64 * 4096, 0) == b"".join(bytes([i]) * 4096 for i in range(64))
        theirs: list[tuple[int, int]] = []

        def collect(context: str, offset: int, entries: list[int], err: Any) -> int:
            theirs.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        h.block_status(4 * MiB, 0, collect)
        assert extents == theirs
        assert sum(length for length, _ in extents) == 4 * MiB
        h.pwrite(b"libnbd" * 100, 3 * MiB + 7)
    finally:
        h.shutdown()

    async def read_back() -> bytes:
        async with await NBDClient.connect(srv.uri) as c:
            return await c.pread(3 * MiB + 7, 600)

    assert asyncio.run(read_back()) == b"libnbd" * 100


def test_request_errors_keep_the_connection(tmp_path: Path) -> None:
    with nbdkit(tmp_path / "full.sock", "full", "1M") as uri:  # every write is ENOSPC

        async def run() -> tuple[RequestError, bytes]:
            async with await NBDClient.connect(uri) as c:
                with pytest.raises(RequestError) as info:
                    await c.pwrite(b"x" * 512, 0)
                return info.value, await c.pread(0, 512)

        error, data = asyncio.run(run())
    assert error.errno == Errno.ENOSPC
    assert str(error).startswith("WRITE failed: ENOSPC")
    assert data == bytes(512)


def test_pending_requests_fail_when_the_server_goes_away(
        pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:4M")

    async def run() -> list[BaseException | bytes]:
        c = await NBDClient.connect(srv.uri)
        try:
            srv.proc.send_signal(signal.SIGSTOP)  # nothing can be answered now
            calls = [asyncio.ensure_future(c.pread(i * 4096, 4096)) for i in range(16)]
            await asyncio.sleep(0.2)
            assert c.in_flight == 16
            srv.proc.send_signal(signal.SIGKILL)
            results = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), 20)
            with pytest.raises(ConnectionLost):
                await c.flush()
            return results
        finally:
            await c.close()

    results = asyncio.run(run())
    srv.proc.wait(10)
    assert all(isinstance(r, ConnectionLost) for r in results), results
    assert "16 requests were in flight" in str(results[0])


def test_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="No such file or directory"):
        asyncio.run(NBDClient.connect(f"nbd+unix:///?socket={tmp_path / 'none.sock'}"))
    with pytest.raises(ValueError, match="bad NBD URI"):
        asyncio.run(NBDClient.connect("nbd+unix:///"))


# -- the acceptance rule, on hand-made histories -------------------------------------------


def _model_with(*ops: tuple[str, int, int, int | None]) -> tuple[Any, dict[int, Any]]:
    """A one-block model with ``(kind, tag, sent, done)`` write-type operations."""
    from pynbd.check import Model, Op

    model = Model(blocks=1, block_size=512, seed=5)
    made = {}
    for number, (kind, tag, sent, done) in enumerate(ops, 1):
        op = Op(number, kind, conn=number % 2, first=0, count=1, send=sent, done=done,
                tag=tag)
        model.add_write_type(op)
        model.next_write = max(model.next_write, tag + 1)
        made[number] = op
    return model, made


def _read(model: Any, sent: int, done: int, data: bytes) -> list[Any]:
    from pynbd.check import Op

    return list(model.check_read(Op(99, "read", 1, 0, 1, send=sent, done=done), data))


def test_model_latest_completed_write_and_concurrent_writes() -> None:
    model, _ = _model_with(("write", 1, 1, 2), ("write", 2, 3, 4), ("write", 3, 9, 12))
    content = model.content
    assert _read(model, 5, 8, content(2, 0)) == []  # the latest completed write
    (bad,) = _read(model, 5, 8, content(1, 0))  # replaced before the read was sent
    assert (bad.seen, bad.expected) == (1, [2])
    assert "write #1 had been replaced by WRITE #2" in bad.reason
    assert _read(model, 10, 11, content(3, 0)) == []  # concurrent with the read
    assert _read(model, 10, 11, content(2, 0)) == []  # ...or what was there before
    (future,) = _read(model, 5, 8, content(3, 0))  # sent after the read completed
    assert "sent only after this read completed" in future.reason
    (zeroes,) = _read(model, 5, 8, bytes(512))
    assert zeroes.seen == 0


def test_model_initial_zeroes_trims_and_overlapping_writes() -> None:
    model, _ = _model_with(("write", 1, 5, 20), ("write", 2, 6, 21), ("trim", 0, 30, 31))
    content = model.content
    assert _read(model, 1, 2, bytes(512)) == []  # nothing written yet: version 0
    # two writes that overlapped each other: either may have landed last
    assert _read(model, 25, 26, content(1, 0)) == []
    assert _read(model, 25, 26, content(2, 0)) == []
    assert len(_read(model, 25, 26, bytes(512))) == 1
    # after the trim: zeroes, or what was there before
    assert _read(model, 40, 41, bytes(512)) == []
    assert _read(model, 40, 41, content(2, 0)) == []
    # a torn mix of the two overlapping writes is no violation; a mix with junk is
    torn = content(1, 0)[:256] + content(2, 0)[256:]
    assert _read(model, 25, 26, torn) == []
    assert model.torn == 1
    (junk,) = _read(model, 25, 26, content(1, 0)[:256] + b"\x01" * 256)
    assert junk.seen == -1
    assert "neither zeroes nor a block the checker wrote" in junk.reason


def test_model_pruning_keeps_what_reads_in_flight_may_see() -> None:
    from pynbd.check import Op

    model, _ = _model_with(("write", 1, 1, 2))
    model.clock = 2
    reading = Op(1000, "read", 1, 0, 1, send=0)
    model.start_read(reading)  # a read sent at t=3 is still in flight
    assert reading.send == 3
    for tag in range(2, 40):  # 38 sequential writes, all completed after t=3
        model.add_write_type(Op(tag, "write", 0, 0, 1, send=2 * tag, done=2 * tag + 1,
                                tag=tag))
        model.next_write = tag + 1
    assert len(model.live[0]) == 39  # nothing may go while that read is out
    assert _read(model, 3, 200, model.content(1, 0)) == []  # still allowed for that read
    model.clock = 199
    model.end_read(reading)
    model.add_write_type(Op(40, "write", 0, 0, 1, send=201, done=202, tag=40))
    assert [op.tag for op in model.live[0]] == [39, 40]
    # the report keeps the block's recent history (bounded: see tests/unit/check) and
    # counts the older operations it dropped
    history, earlier = model.history(0)
    assert len(history) + earlier == 41  # 40 writes and one read
    assert [op.tag for op in history[-2:]] == [39, 40]
