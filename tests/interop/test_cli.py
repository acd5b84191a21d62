"""The ``pynbd`` command line, driven as a user would, checked with real clients.

Argument errors (one ``pynbd:`` line, status 2), quiet success, ``--print-uri``,
``-x``/``-D``/``-o``/``-r``, ``--fork``/``--pid-file``, server lifetime with and
without ``-t``, and orderly exit on SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from tests.support.interop import require_tool

from pynbd.server.runtime import STOP_WAIT_REPORT

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.interop

MiB = 1 << 20
#: every subprocess and every wait in this file is bounded by this
TIMEOUT = 20.0
#: how long a server gets to (wrongly) exit after something that must not stop it
SETTLE = 0.3

MODULE = [sys.executable, "-m", "pynbd"]
SCRIPT = [str(Path(sys.executable).parent / "pynbd")]
RUNNERS = {"module": MODULE, "script": SCRIPT}


# -- helpers -----------------------------------------------------------------------


def run_cli(cmd: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)


def connect(uri: str) -> Any:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def wait_exit(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> int:
    """The exit status of ``proc``; fails the test if it does not exit in time."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"pynbd did not exit within {timeout} s")


def read_line(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    """One line of the server's stdout, waiting at most ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail(f"pynbd printed nothing within {timeout} s")
    return proc.stdout.readline()


@contextlib.contextmanager
def cli_server(cmd: list[str], *args: str) -> Iterator[subprocess.Popen[str]]:
    """Start ``cmd args`` with piped output; it is always gone afterwards."""
    proc = subprocess.Popen([*cmd, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def wait_for_socket(path: Path, proc: subprocess.Popen[str] | None = None) -> None:
    """Wait (bounded) until the server has bound its Unix socket.

    It only looks at the file: a probe connection would count against the
    server's connection limit until the server notices it left.
    """
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"pynbd exited early with status {proc.returncode}")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.stat().st_mode):
                # bind and listen are back to back; allow for that instant
                time.sleep(0.05)
                return
        time.sleep(0.05)
    pytest.fail(f"{path} did not appear within {TIMEOUT} s")


def unix_uri(path: Path, name: str = "") -> str:
    return f"nbd+unix:///{urllib.parse.quote(name, safe='')}?socket={path}"


def session(uri: str) -> None:
    """A short client session: write, flush, read back, disconnect."""
    h = connect(uri)
    try:
        data = os.urandom(4096)
        h.pwrite(data, 8192)
        h.flush()
        assert h.pread(4096, 8192) == data
    finally:
        h.shutdown()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


# -- bad arguments ------------------------------------------------------------------

BAD_ARGS: list[tuple[str, list[str], list[str]]] = [
    # id, arguments ({tmp} is the test's directory), words the message must contain
    ("missing-image", [], ["IMAGE", "required"]),
    ("missing-file", ["{tmp}/absent.img"], ["absent.img", "No such file"]),
    ("shared-negative", ["-e", "-1", "memory:1M"], ["--shared", "-1", "negative"]),
    ("shared-not-number", ["-e", "x", "memory:1M"], ["--shared", "'x'"]),
    ("port-range", ["-p", "70000", "memory:1M"], ["--port", "70000", "range"]),
    ("port-not-number", ["-p", "abc", "memory:1M"], ["--port", "'abc'"]),
    ("unknown-option", ["--bogus", "memory:1M"], ["unrecognized", "--bogus"]),
    ("format", ["-f", "vmdk", "memory:1M"], ["format", "vmdk"]),
    ("qcow2-memory", ["-f", "qcow2", "memory:1M"], ["memory", "qcow2"]),
    ("memory-size", ["memory:abc"], ["size", "'abc'"]),
    ("offset-past-end", ["-o", "2M", "{tmp}/small.img"], ["Offset (2097152)", "containing file"]),
    ("socket-dir", ["-k", "{tmp}/nodir/s.sock", "memory:1M"],
     ["nodir/s.sock", "No such file"]),
    ("long-name", ["-x", "n" * 4097, "memory:1M"], ["export name", "4096"]),
    ("long-description", ["-D", "d" * 4097, "memory:1M"], ["description", "4096"]),
    ("discard", ["--discard", "maybe", "memory:1M"], ["--discard", "maybe"]),
    ("memory-too-large", ["memory:8E"], ["memory", "too large"]),
    ("poll-negative", ["--poll-max-ns", "-5", "memory:1M"], ["--poll-max-ns", "'-5'"]),
    ("poll-too-long", ["--poll-max-ns", "2000000", "memory:1M"],
     ["--poll-max-ns", "1000000"]),
    ("poll-not-number", ["--poll-max-ns", "1us", "memory:1M"], ["--poll-max-ns", "'1us'"]),
]


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize(("args", "words"), [(a, w) for _, a, w in BAD_ARGS],
                         ids=[i for i, _, _ in BAD_ARGS])
def test_bad_arguments(tmp_path: Path, runner: str, args: list[str],
                       words: list[str]) -> None:
    (tmp_path / "small.img").write_bytes(bytes(MiB))
    result = run_cli(RUNNERS[runner], *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pynbd: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    # nothing was left behind
    assert not (tmp_path / "nodir").exists()


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_version_and_help(runner: str) -> None:
    from pynbd import __version__

    version = run_cli(RUNNERS[runner], "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"pynbd {__version__}"
    assert version.stderr == ""
    helped = run_cli(RUNNERS[runner], "--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: pynbd")
    for option in ("--read-only", "--shared", "--persistent", "--export-name", "--offset",
                   "--fork", "--pid-file", "--print-uri", "IMAGE"):
        assert option in helped.stdout
    assert helped.stderr == ""


# -- quiet success and --print-uri ----------------------------------------------------


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("name", ["disk1", "a b/c"], ids=["plain", "quoted"])
def test_print_uri_unix(tmp_path: Path, runner: str, name: str) -> None:
    sock = tmp_path / "s.sock"
    with cli_server(RUNNERS[runner], "--print-uri", "-k", str(sock), "-x", name,
                    "memory:1M") as proc:
        line = read_line(proc)
        quoted = urllib.parse.quote(name, safe="")
        assert line == f"nbd+unix:///{quoted}?socket={sock}\n"
        h = connect(line.strip())
        try:
            assert h.get_export_name() == name
            h.pwrite(b"\x77" * 4096, 0)
            assert h.pread(4096, 0) == b"\x77" * 4096
        finally:
            h.shutdown()
        # without -t the server leaves with its only client; nothing else printed
        assert wait_exit(proc) == 0
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.read() == ""
        assert proc.stderr.read() == ""
    assert not sock.exists()


def test_print_uri_tcp(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("memory:1M", tcp=True)
    match = re.fullmatch(r"nbd://127\.0\.0\.1:([0-9]+)/", srv.uri)
    assert match is not None, srv.uri
    assert 0 < int(match.group(1)) < 65536
    session(srv.uri)
    session(srv.uri)  # -t (the fixture's default): a second session works too
    assert srv.stop() == 0
    assert srv.proc.stdout.read() == ""
    assert srv.proc.stderr.read() == ""


def test_success_is_silent_without_print_uri(tmp_path: Path) -> None:
    sock = tmp_path / "quiet.sock"
    with cli_server(MODULE, "-k", str(sock), "memory:1M") as proc:
        wait_for_socket(sock, proc)
        session(unix_uri(sock))
        assert wait_exit(proc) == 0
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.read() == ""
        assert proc.stderr.read() == ""


def test_verbose_logs_to_stderr(tmp_path: Path) -> None:
    sock = tmp_path / "loud.sock"
    with cli_server(MODULE, "-v", "-k", str(sock), "memory:1M") as proc:
        wait_for_socket(sock, proc)
        session(unix_uri(sock))
        assert wait_exit(proc) == 0
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.read() == ""
        lines = proc.stderr.read().splitlines()
        assert lines
        assert all(line.startswith("pynbd: ") for line in lines), lines


# -- -x, -D, -o, -r --------------------------------------------------------------------


def test_export_name_and_description(pynbd_server: Callable[..., Any]) -> None:
    nbdinfo = require_tool("nbdinfo")
    name, text = "vol-7", "Seven: the test volume"
    srv = pynbd_server("-e", "0", "-x", name, "-D", text, "memory:2M")
    assert srv.uri == srv.uri_for(name)

    h = nbd.NBD()
    h.set_full_info(True)
    h.connect_uri(srv.uri)
    try:
        assert h.get_export_name() == name
        assert h.get_export_description() == text
        assert h.get_size() == 2 * MiB
    finally:
        h.shutdown()

    shown = subprocess.run([nbdinfo, "--json", srv.uri], capture_output=True, text=True,
                           timeout=TIMEOUT, check=True)
    (export,) = json.loads(shown.stdout)["exports"]
    assert export["export-name"] == name
    assert export["description"] == text
    assert export["export-size"] == 2 * MiB

    listed = subprocess.run([nbdinfo, "--list", srv.uri_for("")], capture_output=True,
                            text=True, timeout=TIMEOUT, check=True)
    assert f'export="{name}":' in listed.stdout
    assert f"description: {text}" in listed.stdout
    assert listed.stdout.count("export=") == 1

    # a name that is not served is refused
    other = nbd.NBD()
    with pytest.raises(nbd.Error):
        other.connect_uri(srv.uri_for("not-" + name))


def test_offset(pynbd_server: Callable[..., Any], tmp_path: Path) -> None:
    header = b"PYNBD-HEADER-V1\n" * 256  # 4096 bytes that must never be exported
    body = os.urandom(MiB)
    path = tmp_path / "with-header.img"
    path.write_bytes(header + body)
    srv = pynbd_server("-o", "4096", str(path))
    h = connect(srv.uri)
    try:
        assert h.get_size() == len(header) + len(body) - 4096
        assert h.pread(MiB, 0) == body
        h.pwrite(b"\xee" * 512, 0)
        h.pwrite(b"\xdd" * 512, MiB - 512)
        h.flush()
    finally:
        h.shutdown()
    assert srv.stop() == 0
    content = path.read_bytes()
    assert len(content) == 4096 + MiB
    assert content[:4096] == header
    assert content[4096:4096 + 512] == b"\xee" * 512
    assert content[4096 + 512:4096 + MiB - 512] == body[512:MiB - 512]
    assert content[-512:] == b"\xdd" * 512


def test_read_only(pynbd_server: Callable[..., Any], tmp_path: Path) -> None:
    original = os.urandom(MiB)
    path = tmp_path / "ro.img"
    path.write_bytes(original)
    os.chmod(path, 0o444)  # -r must not even need write permission
    srv = pynbd_server("-r", "-e", "2", str(path))
    h = connect(srv.uri)
    try:
        assert h.is_read_only() is True
        assert h.pread(4096, 4096) == original[4096:8192]
        # libnbd's own check refuses the write with EPERM
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"x" * 512, 0)
        assert info.value.errnum == errno.EPERM
        assert info.value.errno == "EPERM"
    finally:
        h.shutdown()
    # with client-side checks off, the requests reach the server: EPERM too
    loose = nbd.NBD()
    loose.set_strict_mode(0)
    loose.connect_uri(srv.uri)
    try:
        attempts: list[tuple[str, tuple[object, ...]]] = [
            ("pwrite", (b"x" * 512, 0)), ("zero", (512, 0)), ("trim", (512, 0))]
        for method, args in attempts:
            with pytest.raises(nbd.Error) as info:
                getattr(loose, method)(*args)
            assert info.value.errnum == errno.EPERM, (method, info.value.string)
        assert loose.pread(512, 0) == original[:512]  # still connected, still reads
    finally:
        loose.shutdown()
    assert path.read_bytes() == original


# -- --fork and --pid-file ----------------------------------------------------------------


def test_fork_and_pid_file(tmp_path: Path) -> None:
    sock, pid_file = tmp_path / "bg.sock", tmp_path / "pynbd.pid"
    result = run_cli(MODULE, "--fork", "--pid-file", str(pid_file), "-t", "-k", str(sock),
                     "memory:1M")
    pid = 0
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert result.stderr == ""
        text = pid_file.read_text()
        assert re.fullmatch(r"[0-9]+\n", text), text
        pid = int(text)
        assert pid_alive(pid)
        # ready when --fork returned: no waiting needed before connecting
        session(unix_uri(sock))
        session(unix_uri(sock))  # -t: still there
        assert pid_alive(pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), "SIGTERM did not end the forked server"
        # it cleaned up on its way out (its exit status belongs to its new parent)
        deadline = time.monotonic() + TIMEOUT
        while (pid_file.exists() or sock.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_file.exists()
        assert not sock.exists()
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- lifetime --------------------------------------------------------------------------


def test_exits_after_last_client_but_not_after_a_probe(
        pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("memory:1M", persistent=False)
    # a port probe: connect and close without a word
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(srv.socket)
    # a probe that reads the greeting, then hangs up
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(TIMEOUT)
        probe.connect(srv.socket)
        greeting = b""
        while len(greeting) < 18:
            chunk = probe.recv(18 - len(greeting))
            assert chunk, "server closed before its greeting"
            greeting += chunk
        assert greeting[:8] == b"NBDMAGIC"
    time.sleep(SETTLE)
    assert srv.proc.poll() is None, "a probe that never negotiated stopped the server"
    session(srv.uri)
    assert wait_exit(srv.proc) == 0
    assert not Path(srv.socket).exists()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("poll", ["default", "0", "1000000"])
def test_polling_serves_and_an_idle_server_does_not_spin(
        pynbd_server: Callable[..., Any], poll: str) -> None:
    """The event loop's adaptive polling (--poll-max-ns) serves clients as usual,
    and once they stop it sleeps: an idle server uses no CPU even after a busy
    session, whatever the limit."""
    srv = pynbd_server(*([] if poll == "default" else ["--poll-max-ns", poll]), "memory:1M")
    h = connect(srv.uri)
    try:
        for i in range(300):  # queue depth 1: the case polling is for
            h.pwrite(bytes([i % 256]) * 4096, (i % 64) * 4096)
            assert h.pread(4096, (i % 64) * 4096) == bytes([i % 256]) * 4096
        time.sleep(0.2)
        before = _cpu_seconds(srv.proc.pid)
        time.sleep(1.0)  # the client is still connected, but quiet
        assert _cpu_seconds(srv.proc.pid) - before < 0.05
    finally:
        h.shutdown()


def test_persistent_keeps_running(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("memory:1M")  # the fixture passes -t
    session(srv.uri)
    time.sleep(SETTLE)
    assert srv.proc.poll() is None
    session(srv.uri)
    time.sleep(SETTLE)
    assert srv.proc.poll() is None
    assert srv.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("persistent", [True, False], ids=["t", "no-t"])
def test_signal_with_idle_client(pynbd_server: Callable[..., Any], tmp_path: Path,
                                 sig: int, persistent: bool) -> None:
    path = tmp_path / "sig.img"
    path.write_bytes(bytes(MiB))
    srv = pynbd_server("-f", "raw", str(path), persistent=persistent)
    h = connect(srv.uri)
    data = os.urandom(64 * 1024)
    try:
        h.pwrite(data, 128 * 1024)  # no flush: the server's shutdown must keep it
        assert srv.stop(sig) == 0
        assert srv.proc.stderr.read() == ""
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
        assert h.aio_is_dead() is True
    finally:
        if not h.aio_is_dead():
            h.shutdown()
    content = path.read_bytes()
    assert content[128 * 1024:192 * 1024] == data
    assert content[:128 * 1024] == bytes(128 * 1024)
    assert not Path(srv.socket).exists()


def test_stop_reports_a_request_the_storage_keeps(pynbd_server: Callable[..., Any],
                                                  tmp_path: Path) -> None:
    """SIGTERM while a client's read waits on storage that does not answer: the
    server says on stderr what it waits for (not 30 s of silence), and a second
    signal exits at once."""
    path = tmp_path / "slow.img"
    path.write_bytes(bytes(MiB))
    srv = pynbd_server("--fault", "cmd=read,delay=600", str(path))
    h = connect(srv.uri)
    try:
        h.aio_pread(nbd.Buffer(512), 0)
        time.sleep(0.2)  # the read has reached the server
        srv.proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            srv.proc.wait(STOP_WAIT_REPORT + 1.0)
        assert srv.stop(signal.SIGTERM, timeout=10.0) == 1
    finally:
        if not h.aio_is_dead():
            h.shutdown()
    stderr = srv.proc.stderr.read()
    assert ("stopping: still waiting for 1 request in flight to finish (at most 30 s) "
            "after 2 s (storage not answering?); a signal now exits without waiting") in stderr
    assert "second signal" in stderr


def test_second_signal_exits_when_the_final_flush_hangs(pynbd_server: Callable[..., Any],
                                                        tmp_path: Path) -> None:
    """Storage that never answers a flush (a Ceph cluster gone away) must not keep the
    server forever: the first SIGTERM waits for the final flush, a second one exits."""
    path = tmp_path / "hang.img"
    path.write_bytes(bytes(MiB))
    srv = pynbd_server("--fault", "cmd=flush,delay=600", str(path))
    h = connect(srv.uri)  # the server is serving (its signal handlers are in place)
    h.shutdown()
    srv.proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        srv.proc.wait(STOP_WAIT_REPORT + 1.0)  # the final flush waits, and says so
    assert srv.stop(signal.SIGTERM, timeout=10.0) == 1
    stderr = srv.proc.stderr.read()
    assert "still waiting for the final flush after 2 s" in stderr
    assert "a signal now exits without waiting" in stderr
    assert "second signal" in stderr


# -- listening sockets ------------------------------------------------------------------


def test_a_stale_socket_is_replaced_but_no_other_file(tmp_path: Path) -> None:
    """``-k PATH`` takes over a socket file a dead server left, but never removes a
    regular file: that is an error naming the path."""
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # closed without unlinking: what a killed server leaves
    with cli_server(MODULE, "--print-uri", "-k", str(stale), "memory:1M") as proc:
        # the file is a socket already: wait for the URI, printed once listening
        assert read_line(proc) == f"{unix_uri(stale)}\n"
        session(unix_uri(stale))
        assert wait_exit(proc) == 0
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    result = run_cli(MODULE, "-k", str(regular), "memory:1M")
    assert result.returncode == 2
    assert result.stderr == f"pynbd: cannot listen on {regular}: Address already in use\n"
    assert regular.read_text() == "keep me"


def test_listen_helpers_give_ready_sockets_and_close_them_on_failure(
        tmp_path: Path) -> None:
    from pynbd.server.listen import listen_tcp, listen_unix

    path = str(tmp_path / "l.sock")
    with listen_unix(path) as unix, listen_tcp("127.0.0.1", 0) as tcp:
        for sock in (unix, tcp):
            assert not sock.getblocking()
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        with socket.create_connection(tcp.getsockname()[:2], timeout=TIMEOUT):
            pass
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError, match="Address already in use"):
            listen_unix(path)  # a live server's socket is no stale one to replace
        failures: list[tuple[str, int | str, type[OSError], str | None]] = [
            ("127.0.0.1", tcp.getsockname()[1], OSError, "Address already in use"),
            # getaddrinfo alone would wrap these to port 0
            ("127.0.0.1", 65536, OSError, "out of range"),
            ("127.0.0.1", "65536", OSError, "out of range"),
            ("no-such-host.invalid", 0, socket.gaierror, None),  # resolvers word it apart
            # not encodable as a host name (a UnicodeError underneath)
            ("\udcff", 0, OSError, "idna"),
        ]
        for host, port, kind, words in failures:
            with pytest.raises(kind, match=words):
                listen_tcp(host, port)
        with pytest.raises(FileNotFoundError):
            listen_unix(str(tmp_path / "no-dir" / "s.sock"), replace_stale=True)
        assert len(os.listdir("/proc/self/fd")) == fds  # every failed socket was closed
    # replace_stale: the closed socket left its file behind
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with listen_unix(path, replace_stale=True) as again:
        assert again.getsockname() == path


# -- format probing (no -f): qemu-nbd's rules ----------------------------------------------


def test_a_probed_raw_image_guards_its_first_sector(pynbd_server: Callable[..., Any],
                                                     tmp_path: Path) -> None:
    """Without -f a raw image is probed: one stderr line says so, and a client may not
    write a qcow2 header into its first sector (EPERM) nor part of that sector
    (EINVAL), so the next probe cannot take the image for qcow2; with -f raw it may."""
    path = tmp_path / "probed.img"
    path.write_bytes(bytes(MiB))
    srv = pynbd_server(str(path))
    h = connect(srv.uri)
    try:
        header = b"QFI\xfb" + bytes(508)
        with pytest.raises(nbd.Error) as refused:
            h.pwrite(header, 0)
        assert refused.value.errno == "EPERM"
        with pytest.raises(nbd.Error) as partial:
            h.pwrite(b"x" * 100, 0)
        assert partial.value.errno == "EINVAL"
        h.pwrite(b"\xab" * 512, 0)  # a whole first sector that probes as raw: fine
        h.pwrite(header, 4096)  # a qcow2 magic anywhere else: fine
        h.flush()
    finally:
        h.shutdown()
    assert srv.stop() == 0
    stderr = srv.proc.stderr.read().splitlines()
    assert len(stderr) == 1
    assert "probed raw" in stderr[0]
    assert "-f raw" in stderr[0]
    assert path.read_bytes()[:512] == b"\xab" * 512
    assert path.read_bytes()[4096:4100] == b"QFI\xfb"

    explicit = pynbd_server("-f", "raw", str(path))
    h = connect(explicit.uri)
    try:
        h.pwrite(header, 0)  # the user said raw: nothing is guarded
        h.flush()
    finally:
        h.shutdown()
    assert explicit.stop() == 0
    assert explicit.proc.stderr.read() == ""
    assert path.read_bytes()[:4] == b"QFI\xfb"
