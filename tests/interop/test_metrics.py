"""Prometheus metrics (``--metrics``) and QMP ``query-blockstats`` seen by real clients.

Every test runs a real ``pynbd`` or ``pynbd daemon`` process, drives it with libnbd,
nbdcopy and qemu's QMP client, scrapes ``/metrics`` over HTTP with urllib, and
parses what it got with ``prometheus_client``'s own parser.  Counts are exact:
each test knows every request it sent.  Also: handshakes broken on purpose
through a raw socket, rbd call latency against a real Ceph cluster, a missing
``prometheus_client`` (imports of it fail in the server's process), and bad
``--metrics`` values (one line, exit status 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import ExecuteError
from tests.support.interop import bounded, require_tool
from tests.support.qmp import qmp, qmp_open, qmp_session

from pynbd.proto.constants import IHAVEOPT, NBDMAGIC, ClientFlag, Opt

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.ceph import CephCluster

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1 << 20
SIZE = 16 * MiB
#: bound for a server to start, one libnbd call, one scrape, one QMP exchange
T = 20.0
NO_PROMETHEUS = ("import sys; sys.modules['prometheus_client'] = None; "
                 "from pynbd.cli import main; sys.exit(main())")
LIBRARY_LINE = ("metrics need the Python library prometheus-client "
                "(pip install 'pynbd[metrics]')")


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    stderr: Path
    sock: str
    metrics: str = ""  # http://HOST:PORT

    def uri(self, name: str = "") -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test starts; killed at the end if still running."""
    started: list[Proc] = []
    yield started
    for each in started:
        if each.proc.poll() is None:
            each.proc.kill()
        each.proc.wait()


def launch(procs: list[Proc], tmp_path: Path, argv: list[str], *, wait_for: str) -> Proc:
    """Run ``python -m pynbd ARGV`` and wait (bounded) until ``wait_for`` exists or,
    for "metrics", until stderr says where the exporter listens."""
    index = len(procs)
    stderr = tmp_path / f"p{index}.err"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pynbd", *argv],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
    each = Proc(proc, stderr, str(tmp_path / f"n{index}.sock"))
    procs.append(each)
    deadline = time.monotonic() + T
    while True:
        if wait_for == "metrics":
            found = re.search(r"metrics: serving (http://\S+)/metrics", stderr.read_text())
            if found:
                each.metrics = found.group(1)
                return each
        elif Path(wait_for).exists():
            return each
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"pynbd {argv} did not start: {stderr.read_text()}")
        time.sleep(0.02)


def start_pynbd(procs: list[Proc], tmp_path: Path, *args: str) -> Proc:
    sock = str(tmp_path / f"n{len(procs)}.sock")
    return launch(procs, tmp_path, ["-v", "-t", "-e", "0", "-k", sock, "--metrics",
                                    "127.0.0.1:0", *args], wait_for="metrics")


def scrape(base: str) -> dict[str, Any]:
    """The metric families at ``base``/metrics, parsed by prometheus_client."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=T) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The one sample ``name`` with ``labels`` (0 if its family has none such)."""
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    family = family.removesuffix("_bucket")
    found = [s.value for s in families[family].samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return float(found[0]) if found else 0.0


def connect(uri: str) -> Any:
    h = nbd.NBD()
    h.set_strict_mode(0)  # let requests the server must refuse go out
    bounded(h.connect_uri, uri, timeout=T)
    return h


def close(h: Any) -> None:
    """Disconnect (NBD_CMD_DISC); libnbd frees the handle when it is collected."""
    bounded(h.shutdown, timeout=T)


def until(check: Any, what: str) -> None:
    """Wait (bounded) until ``check()`` is true: the server notices a client leaving
    a moment after the client is gone."""
    deadline = time.monotonic() + T
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.05)


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(T)
    sock.connect(path)
    greeting = b""
    while len(greeting) < 18:
        greeting += sock.recv(18 - len(greeting))
    assert greeting[:8] == struct.pack(">Q", NBDMAGIC)
    sock.sendall(struct.pack(">I", ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))
    return sock


def _wait_closed(sock: socket.socket) -> None:
    """Read until the server closes the connection."""
    with sock:
        while sock.recv(4096):
            pass


# -- pynbd --metrics ------------------------------------------------------------------------


def test_requests_bytes_errors_and_durations_are_exact(procs: list[Proc],
                                                        tmp_path: Path) -> None:
    """libnbd's requests, one failed by the node (an injected ENOSPC) and one refused
    (out of range), then nbdcopy reading the whole disk: every count is exact."""
    srv = start_pynbd(procs, tmp_path, "--fault", "cmd=write,errno=ENOSPC,range=8M-9M",
                      f"memory:{SIZE}")
    before = scrape(srv.metrics)
    assert value(before, "pynbd_requests_total", export="", command="READ") == 0
    assert value(before, "pynbd_connections", export="") == 0

    h = connect(srv.uri())
    for i in range(8):
        h.pwrite(bytes([i + 1]) * (4 * KiB), i * 64 * KiB)
    h.pwrite(b"\xab" * MiB, MiB)
    for i in range(4):
        assert h.pread(4 * KiB, i * 64 * KiB) == bytes([i + 1]) * (4 * KiB)
    assert h.pread(MiB, MiB) == b"\xab" * MiB
    h.flush()
    h.trim(64 * KiB, 4 * MiB)
    h.zero(64 * KiB, 5 * MiB)
    with pytest.raises(nbd.Error) as failed:
        h.pwrite(b"x" * 512, 8 * MiB)
    assert failed.value.errno == "ENOSPC"
    with pytest.raises(nbd.Error) as refused:
        h.pread(512, SIZE)
    assert refused.value.errno == "EINVAL"

    during = scrape(srv.metrics)
    assert value(during, "pynbd_connections", export="") == 1
    assert value(during, "pynbd_in_flight_requests", export="") == 0
    close(h)
    expected = {"READ": 6, "WRITE": 10, "FLUSH": 1, "TRIM": 1, "WRITE_ZEROES": 1,
                "CACHE": 0, "BLOCK_STATUS": 0}
    after = scrape(srv.metrics)
    for command, count in expected.items():
        assert value(after, "pynbd_requests_total", export="", command=command) == count
        assert value(after, "pynbd_request_duration_seconds_count", export="",
                     command=command) == count
        assert value(after, "pynbd_request_duration_seconds_bucket", export="",
                     command=command, le="+Inf") == count
    assert value(after, "pynbd_request_duration_seconds_sum", export="",
                 command="WRITE") > 0
    assert value(after, "pynbd_bytes_total", export="", direction="read") == 4 * 4 * KiB + MiB
    assert value(after, "pynbd_bytes_total", export="", direction="write") == 8 * 4 * KiB + MiB
    errors = {(s.labels["command"], s.labels["errno"]): s.value
              for s in after["pynbd_request_errors"].samples
              if s.name == "pynbd_request_errors_total"}
    assert errors == {("WRITE", "ENOSPC"): 1, ("READ", "EINVAL"): 1}
    until(lambda: value(scrape(srv.metrics), "pynbd_connections", export="") == 0,
          "the client's connection is gone from the gauge")

    # nbdcopy, on connections of its own: every byte of the disk read once
    require_tool("nbdcopy")
    done = subprocess.run(["nbdcopy", "--no-extents", srv.uri(), "null:"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    final = scrape(srv.metrics)
    assert value(final, "pynbd_bytes_total", export="", direction="read") == (
        4 * 4 * KiB + MiB + SIZE)
    assert value(final, "pynbd_requests_total", export="", command="WRITE") == 10


def test_handshake_failures_by_reason(procs: list[Proc], tmp_path: Path) -> None:
    """A bad option magic, an unknown export asked for with NBD_OPT_EXPORT_NAME and a
    client that just leaves are counted once each; a listing (nbdinfo --list ends
    with NBD_OPT_ABORT) and a served client are not failures."""
    srv = start_pynbd(procs, tmp_path, f"memory:{SIZE}")

    def failures() -> dict[str, float]:
        return {s.labels["reason"]: s.value
                for s in scrape(srv.metrics)["pynbd_handshake_failures"].samples
                if s.name == "pynbd_handshake_failures_total"}

    assert failures() == dict.fromkeys(("protocol_error", "refused", "timeout", "tls",
                                        "disconnected"), 0)
    sock = _raw(srv.sock)
    sock.sendall(struct.pack(">QII", 0x1234, Opt.GO, 0))  # not IHAVEOPT
    _wait_closed(sock)
    sock = _raw(srv.sock)
    sock.sendall(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 4) + b"nope")
    _wait_closed(sock)
    _raw(srv.sock).close()
    listing = subprocess.run(["nbdinfo", "--list", srv.uri()], capture_output=True,
                             text=True, timeout=T, check=False)
    assert listing.returncode == 0, listing.stderr
    close(connect(srv.uri()))
    expected = {"protocol_error": 1, "refused": 1, "timeout": 0, "tls": 0,
                "disconnected": 1}
    until(lambda: failures() == expected, f"handshake failures {expected}")


def test_tls_and_timeout_failures(procs: list[Proc], tmp_path: Path) -> None:
    """A client whose TLS handshake fails after NBD_OPT_STARTTLS, and one that never
    negotiates within --handshake-limit, on a TLS-only server."""
    creds = tmp_path / "pki"
    setup = subprocess.run([sys.executable, "-m", "pynbd", "tls-setup", str(creds)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert setup.returncode == 0, setup.stderr
    srv = start_pynbd(procs, tmp_path, "--tls-creds", str(creds), "--handshake-limit", "1",
                      f"memory:{SIZE}")
    sock = _raw(srv.sock)
    sock.sendall(struct.pack(">QII", IHAVEOPT, Opt.STARTTLS, 0))
    reply = b""
    while len(reply) < 20:  # the option reply header: ACK, no data
        reply += sock.recv(20 - len(reply))
    sock.sendall(b"this is no TLS ClientHello\r\n" * 4)
    _wait_closed(sock)
    _wait_closed(_raw(srv.sock))  # says nothing: dropped after the limit

    def failures() -> dict[str, float]:
        return {s.labels["reason"]: s.value
                for s in scrape(srv.metrics)["pynbd_handshake_failures"].samples
                if s.name == "pynbd_handshake_failures_total"}

    expected = {"protocol_error": 0, "refused": 0, "timeout": 1, "tls": 1, "disconnected": 0}
    until(lambda: failures() == expected, f"handshake failures {expected}")


# -- pynbd daemon: --metrics, the QMP commands, query-blockstats -------------------------------


def start_daemon(procs: list[Proc], tmp_path: Path, *args: str,
                 python: list[str] | None = None) -> tuple[Proc, str]:
    qmp_path = str(tmp_path / f"q{len(procs)}.sock")
    pid = tmp_path / f"d{len(procs)}.pid"
    argv = ["daemon", "-v", "--qmp", qmp_path, "--pid-file", str(pid), *args]
    if python is None:
        return launch(procs, tmp_path, argv, wait_for=str(pid)), qmp_path
    index = len(procs)
    stderr = tmp_path / f"p{index}.err"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, *python, *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    procs.append(Proc(proc, stderr, ""))
    until(lambda: pid.exists() or proc.poll() is not None, "the daemon starts")
    assert proc.poll() is None, stderr.read_text()
    return procs[-1], qmp_path


def _url(addr: dict[str, str]) -> str:
    assert addr["type"] == "inet"
    return f"http://{addr['host']}:{addr['port']}"


def test_daemon_metrics_and_query_blockstats(procs: list[Proc], tmp_path: Path,
                                             busy_port: int) -> None:
    daemon, qmp_path = start_daemon(procs, tmp_path, "--metrics", "127.0.0.1:0")
    nbd_sock = str(tmp_path / "nbd.sock")

    def uri(name: str) -> str:
        return f"nbd+unix:///{name}?socket={nbd_sock}"

    async def setup() -> str:
        async with qmp_session(qmp_path) as c:
            status = await qmp(c, "x-pynbd-query-metrics")
            assert status["active"] is True
            for name, size in (("m0", SIZE), ("m1", MiB)):
                await qmp(c, "blockdev-add", {"driver": "memory", "node-name": name,
                                              "size": size})
            await qmp(c, "nbd-server-start",
                      {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
            await qmp(c, "block-export-add", {"type": "nbd", "id": "e0", "node-name": "m0",
                                              "writable": True})
            await qmp(c, "block-export-add", {"type": "nbd", "id": "e1", "node-name": "m1",
                                              "name": "ro"})
            with pytest.raises(ExecuteError, match="already running"):
                await qmp(c, "x-pynbd-metrics-start",
                          {"addr": {"type": "inet", "host": "127.0.0.1", "port": "0"}})
            return _url(status["addr"])

    base = asyncio.run(setup())
    h = connect(uri("m0"))
    h.pwrite(b"a" * (4 * KiB), 0)
    h.pwrite(b"b" * (4 * KiB), 4 * MiB)
    assert h.pread(4 * KiB, 0) == b"a" * (4 * KiB)
    assert h.pread(8 * KiB, 4 * MiB) == b"b" * (4 * KiB) + bytes(4 * KiB)
    h.flush()
    h.trim(64 * KiB, 8 * MiB)  # libnbd: count, then offset
    h.zero(64 * KiB, 12 * MiB)
    close(h)
    ro = connect(uri("ro"))
    with pytest.raises(nbd.Error) as denied:
        ro.pwrite(b"x" * 512, 0)
    assert denied.value.errno == "EPERM"
    assert ro.pread(512, 0) == bytes(512)
    close(ro)

    async def blockstats(**args: Any) -> Any:
        async with qmp_session(qmp_path) as c:
            return await qmp(c, "query-blockstats", args or None)

    stats = asyncio.run(blockstats())
    assert [(s["device"], s["node-name"]) for s in stats] == [("", "m0"), ("", "m1")]
    assert all("qdev" not in s for s in stats)
    m0, m1 = stats[0]["stats"], stats[1]["stats"]
    counts = {k: v for k, v in m0.items() if not k.endswith("time_ns")}
    assert counts == {
        "rd_bytes": 12 * KiB, "wr_bytes": 8 * KiB, "unmap_bytes": 64 * KiB,
        "rd_operations": 2, "wr_operations": 3, "flush_operations": 1,
        "unmap_operations": 1, "wr_highest_offset": 12 * MiB + 64 * KiB,
        "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
        "failed_rd_operations": 0, "failed_wr_operations": 0, "failed_flush_operations": 0,
        "failed_unmap_operations": 0, "invalid_rd_operations": 0,
        "invalid_wr_operations": 0, "invalid_flush_operations": 0,
        "invalid_unmap_operations": 0, "account_invalid": True, "account_failed": True,
        "timed_stats": []}
    # READs and WRITEs of a RAM disk are answered inline, not timed (docs/metrics.md);
    # write-zeroes, flush and trim run as tasks and are
    assert m0["rd_total_time_ns"] == 0
    assert all(m0[f"{k}_total_time_ns"] > 0 for k in ("wr", "flush", "unmap"))
    assert m0["idle_time_ns"] >= 0
    assert (m1["rd_operations"], m1["rd_bytes"], m1["wr_operations"]) == (1, 512, 0)
    assert m1["invalid_wr_operations"] == 1
    nodes = asyncio.run(blockstats(**{"query-nodes": True}))
    assert {n["node-name"]: n["stats"]["rd_operations"] for n in nodes} == {"m0": 2, "m1": 1}
    assert all("device" not in n for n in nodes)

    families = scrape(base)
    assert value(families, "pynbd_requests_total", export="m0", command="WRITE") == 2
    assert value(families, "pynbd_requests_total", export="m0", command="WRITE_ZEROES") == 1
    assert value(families, "pynbd_bytes_total", export="m0", direction="read") == 12 * KiB
    assert value(families, "pynbd_requests_total", export="ro", command="WRITE") == 1
    assert value(families, "pynbd_request_errors_total", export="ro", command="WRITE",
                 errno="EPERM") == 1

    async def restart() -> str:
        async with qmp_session(qmp_path) as c:
            await qmp(c, "x-pynbd-metrics-stop")
            assert await qmp(c, "x-pynbd-query-metrics") == {"active": False}
            with pytest.raises(ExecuteError, match="not running"):
                await qmp(c, "x-pynbd-metrics-stop")
            with pytest.raises(ExecuteError, match="expects a port number"):
                await qmp(c, "x-pynbd-metrics-start",
                          {"addr": {"type": "inet", "host": "127.0.0.1", "port": "99999"}})
            with pytest.raises(ExecuteError, match=rf"^Failed to bind socket to 127\.0\.0\.1:"
                               rf"{busy_port}: Address already in use$"):
                await qmp(c, "x-pynbd-metrics-start", {"addr": {
                    "type": "inet", "host": "127.0.0.1", "port": str(busy_port)}})
            with pytest.raises(ExecuteError, match=r"'addr\.type' does not accept"):
                await qmp(c, "x-pynbd-metrics-start",
                          {"addr": {"type": "unix", "path": "/nowhere"}})
            await qmp(c, "x-pynbd-metrics-start",
                      {"addr": {"type": "inet", "host": "127.0.0.1", "port": "0"}})
            return _url((await qmp(c, "x-pynbd-query-metrics"))["addr"])

    new_base = asyncio.run(restart())
    assert new_base != base
    with pytest.raises(urllib.error.URLError):
        scrape(base)
    families = scrape(new_base)  # counting never stopped
    assert value(families, "pynbd_requests_total", export="m0", command="READ") == 2

    async def quit_daemon() -> None:
        client = await qmp_open(qmp_path)
        try:
            assert await qmp(client, "quit") == {}
        finally:
            with contextlib.suppress(EOFError):  # the daemon went away under the client
                async with asyncio.timeout(T):
                    await client.disconnect()

    asyncio.run(quit_daemon())
    assert daemon.proc.wait(T) == 0
    with pytest.raises(urllib.error.URLError):
        scrape(new_base)


# -- rbd ------------------------------------------------------------------------------------------


def test_rbd_call_latency(ceph: CephCluster, procs: list[Proc], tmp_path: Path) -> None:
    """Requests on an rbd image take the direct path (librbd completes them); each is
    counted when it completes, and every librbd aio call is timed."""
    srv = start_pynbd(procs, tmp_path, ceph.spec(ceph.new_image(8 * MiB)))
    h = connect(srv.uri())
    h.pwrite(b"r" * (64 * KiB), 0)
    h.pwrite(b"s" * (4 * KiB), 4 * MiB)
    assert h.pread(64 * KiB, 0) == b"r" * (64 * KiB)
    assert h.pread(4 * KiB, 4 * MiB) == b"s" * (4 * KiB)
    h.flush()
    families = scrape(srv.metrics)
    close(h)
    assert value(families, "pynbd_requests_total", export="", command="READ") == 2
    assert value(families, "pynbd_requests_total", export="", command="WRITE") == 2
    assert value(families, "pynbd_bytes_total", export="", direction="write") == 68 * KiB
    calls = [s for s in families["pynbd_rbd_call_duration_seconds"].samples
             if s.name == "pynbd_rbd_call_duration_seconds_count"]
    assert len(calls) == 1  # one rbd node
    assert calls[0].value == 5  # 2 aio_write, 2 aio_read, 1 aio_flush
    assert value(families, "pynbd_rbd_call_duration_seconds_sum",
                 node=calls[0].labels["node"]) > 0


# -- no library, bad values -----------------------------------------------------------------------


def test_missing_library_is_one_line(procs: list[Proc], tmp_path: Path) -> None:
    """prometheus_client cannot be imported in the server's process: pynbd and pynbd
    daemon refuse --metrics in one line with status 2; a daemon without --metrics
    refuses x-pynbd-metrics-start in the same words and goes on."""
    done = subprocess.run([sys.executable, "-c", NO_PROMETHEUS, "--metrics", "127.0.0.1:0",
                           f"memory:{MiB}"], capture_output=True, text=True, timeout=T,
                          check=False)
    assert (done.returncode, done.stderr) == (2, f"pynbd: argument --metrics: {LIBRARY_LINE}\n")
    qmp_path = str(tmp_path / "q.sock")
    done = subprocess.run([sys.executable, "-c", NO_PROMETHEUS, "daemon", "--qmp", qmp_path,
                           "--metrics", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=T, check=False)
    assert (done.returncode, done.stderr) == (
        2, f"pynbd daemon: --metrics 127.0.0.1:0: {LIBRARY_LINE}\n")

    daemon, qmp_path = start_daemon(procs, tmp_path, python=["-c", NO_PROMETHEUS])

    async def ask() -> None:
        async with qmp_session(qmp_path) as c:
            with pytest.raises(ExecuteError) as refused:
                await qmp(c, "x-pynbd-metrics-start",
                          {"addr": {"type": "inet", "host": "127.0.0.1", "port": "0"}})
            assert refused.value.error_class == "GenericError"
            assert str(refused.value) == LIBRARY_LINE
            assert await qmp(c, "query-blockstats") == []
            assert await qmp(c, "x-pynbd-query-metrics") == {"active": False}

    asyncio.run(ask())
    assert daemon.proc.poll() is None


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(("text", "line"), [
    ("127.0.0.1", "argument --metrics: expected ADDR:PORT, got '127.0.0.1'"),
    ("", "argument --metrics: expected ADDR:PORT, got ''"),
    ("127.0.0.1:http", "argument --metrics: invalid port 'http'"),
    ("127.0.0.1:65536", "argument --metrics: port 65536 is out of range 0-65535"),
    ("::1:9100", "argument --metrics: an IPv6 address goes in brackets: [::1]:9100"),
    ("no-such-host.invalid:9100", "cannot listen on no-such-host.invalid:9100 for metrics: "),
    ("BUSY", "cannot listen on 127.0.0.1:BUSY for metrics: Address already in use"),
])
def test_bad_metrics_values(tmp_path: Path, busy_port: int, text: str, line: str) -> None:
    if text == "BUSY":  # a port something else listens on
        text, line = f"127.0.0.1:{busy_port}", line.replace("BUSY", str(busy_port))
    sock = str(tmp_path / "n.sock")
    done = subprocess.run([sys.executable, "-m", "pynbd", "-k", sock, "--metrics", text,
                           f"memory:{MiB}"], capture_output=True, text=True, timeout=T,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"pynbd: {line}"), done.stderr
    assert not Path(sock).exists()


def test_fork_reports_a_busy_metrics_port(tmp_path: Path, busy_port: int) -> None:
    """With --fork the exporter starts before the parent is told the server is ready:
    the parent exits 2 with the child's one line, and the child is gone."""
    sock, pid = tmp_path / "n.sock", tmp_path / "pid"
    done = subprocess.run([sys.executable, "-m", "pynbd", "--fork", "--pid-file", str(pid),
                           "-k", str(sock), "--metrics", f"127.0.0.1:{busy_port}",
                           f"memory:{MiB}"], capture_output=True, text=True, timeout=T,
                          check=False)
    assert (done.returncode, done.stderr) == (
        2, f"pynbd: cannot listen on 127.0.0.1:{busy_port} for metrics: "
           "Address already in use\n")
    until(lambda: not sock.exists(), "the child removes its socket")
    assert not pid.exists()


@pytest.mark.parametrize(("text", "desc"), [
    ("9100", "expected ADDR:PORT, got '9100'"),
    ("127.0.0.1:99999", "port 99999 is out of range 0-65535"),
])
def test_bad_daemon_metrics_values(tmp_path: Path, text: str, desc: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pynbd", "daemon", "--qmp",
                           str(tmp_path / "q.sock"), "--metrics", text],
                          capture_output=True, text=True, timeout=T, check=False)
    assert (done.returncode, done.stderr) == (2, f"pynbd daemon: --metrics {text}: {desc}\n")
