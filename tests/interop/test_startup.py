"""How the server starts: socket activation, sd_notify, inetd mode, ``-L``,
``--max-payload`` and IPv6, against systemd-socket-activate, libnbd, nbdinfo
and qemu-nbd.

The systemd units of docs/systemd.md are read from the page and their
``ExecStart=`` lines run as systemd would run them (under
systemd-socket-activate, on their ``ListenStream=`` sockets moved to a
temporary directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import nbd
import pytest
from tests.support.interop import bounded, require_tool

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import ServerFactory

ROOT = Path(__file__).resolve().parents[2]
PYNBD = [sys.executable, "-m", "pynbd"]
MiB = 1024 * 1024
QEMU10_NBD = ROOT / ".qemu10" / "usr" / "bin" / "qemu-nbd"


def wait_for(path: Path, proc: subprocess.Popen[str] | None = None,
              timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared")
        time.sleep(0.02)


@contextlib.contextmanager
def activated(listen: list[str], command: list[str],
              env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``systemd-socket-activate -l ... COMMAND`` (which execs COMMAND on the
    first connection, in a fresh environment: ``env`` is passed with ``-E``);
    stopped at the end."""
    tool = require_tool("systemd-socket-activate")
    args = [tool]
    for address in listen:
        args += ["-l", address]
    for name, value in (env or {}).items():
        args += ["-E", f"{name}={value}"]
    proc = subprocess.Popen([*args, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        if proc.stderr is not None and not proc.stderr.closed:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def connect(uri: str) -> nbd.NBD:
    """libnbd connected to ``uri``, retrying while the socket is being set up."""
    deadline = time.monotonic() + 20.0
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            return h
        except nbd.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


#: /proc/net/unix's Flags for a listening socket (the kernel's __SO_ACCEPTCON)
_ACCEPTCON = 0x10000


def wait_listening(path: Path, timeout: float = 20.0) -> None:
    """The socket systemd-socket-activate made is there and listening.  Its file exists
    from ``bind``, a moment before ``listen``: a connection in between is refused.
    A probe connection would start the server, so the kernel's table is read."""
    wait_for(path, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & _ACCEPTCON:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{path} is not listening after {timeout} s")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- socket activation ------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_socket_activation_serves_the_inherited_socket(tmp_path: Path, tcp: bool) -> None:
    sock = tmp_path / "act.sock"
    port = free_port()
    listen = f"127.0.0.1:{port}" if tcp else str(sock)
    uri = f"nbd://127.0.0.1:{port}/disk" if tcp else f"nbd+unix:///disk?socket={sock}"
    with activated([listen], [*PYNBD, "-f", "raw", "-x", "disk", "memory:4M"]) as proc:
        if not tcp:
            wait_listening(sock)
        h = bounded(connect, uri, timeout=30)
        h.pwrite(b"a" * 4096, 0)
        assert h.pread(4096, 0) == b"a" * 4096
        assert h.get_size() == 4 * MiB
        h.shutdown()
        assert proc.wait(20) == 0  # the last client left: the server exits, as without


def test_libnbd_starts_pynbd_by_socket_activation(tmp_path: Path) -> None:
    h = nbd.NBD()
    h.set_export_name("disk")
    bounded(h.connect_systemd_socket_activation,
            [*PYNBD, "-f", "raw", "-x", "disk", "memory:2M"], timeout=30)
    assert h.get_size() == 2 * MiB
    h.pwrite(b"z" * 512, 512)
    assert h.pread(512, 512) == b"z" * 512
    h.shutdown()


def test_nbdinfo_starts_pynbd_by_socket_activation() -> None:
    nbdinfo = require_tool("nbdinfo")
    out = subprocess.run([nbdinfo, "--json", "--", "[", *PYNBD, "-f", "raw", "-x", "",
                          "-D", "activated", "memory:3M", "]"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    export = json.loads(out)["exports"][0]
    assert export["export-size"] == 3 * MiB
    assert export["description"] == "activated"


@pytest.mark.parametrize("option", [["-k", "/nonexistent/x.sock"], ["-b", "127.0.0.1"],
                                    ["-p", "10810"]], ids=["-k", "-b", "-p"])
def test_socket_activation_refuses_address_options_as_qemu_nbd(
        tmp_path: Path, option: list[str]) -> None:
    """Each clash is refused in one line, worded as qemu-nbd words it."""
    image = tmp_path / "img"
    image.write_bytes(b"\0" * 4096)
    outcomes = []
    for name, command in (("pynbd", [*PYNBD, "-f", "raw"]), ("qemu-nbd",
                                                           [require_tool("qemu-nbd")])):
        sock = tmp_path / f"{name}.sock"
        with activated([str(sock)], [*command, *option, "memory:1M" if name == "pynbd"
                                     else str(image)]) as proc:
            wait_listening(sock)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(sock))  # starts the server, which refuses to run
                _, stderr = proc.communicate(timeout=20)
                status = proc.returncode
        lines = [line for line in stderr.splitlines()
                 if line.startswith(f"{name}: ")]
        outcomes.append((status, lines))
    (ours, our_lines), (_, qemu_lines) = outcomes
    assert ours == 2
    assert len(our_lines) == 1
    assert our_lines[0].removeprefix("pynbd: ") == qemu_lines[0].removeprefix("qemu-nbd: ")


def test_socket_activation_with_two_sockets_is_refused_as_qemu_nbd(tmp_path: Path) -> None:
    first, second = tmp_path / "a.sock", tmp_path / "b.sock"
    with activated([str(first), str(second)], [*PYNBD, "-f", "raw", "memory:1M"]) as proc:
        wait_listening(second)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(first))
            _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 2
        assert "pynbd: pynbd does not support socket activation with LISTEN_FDS > 1" in stderr


def test_activation_variables_of_another_process_are_ignored(tmp_path: Path) -> None:
    """LISTEN_PID naming another process: pynbd binds its own socket."""
    sock = tmp_path / "own.sock"
    env = {**os.environ, "LISTEN_PID": "1", "LISTEN_FDS": "1"}
    proc = subprocess.Popen([*PYNBD, "--print-uri", "-k", str(sock), "-f", "raw",
                             "memory:1M"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"nbd+unix:///?socket={sock}"
        h = bounded(connect, f"nbd+unix:///?socket={sock}", timeout=30)
        assert h.get_size() == MiB
        h.shutdown()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# -- sd_notify ----------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_is_notified_once_clients_can_connect(tmp_path: Path, abstract: bool) -> None:
    name = f"@pynbd-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(
        tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name[1:] if abstract else name)
        notify.settimeout(30)
        sock = tmp_path / "n.sock"
        proc = subprocess.Popen([*PYNBD, "-k", str(sock), "-f", "raw", "memory:1M"],
                                env={**os.environ, "NOTIFY_SOCKET": name},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            message, _ = notify.recvfrom(4096)
            fields = dict(line.split("=", 1) for line in message.decode().splitlines())
            assert fields["READY"] == "1"
            assert fields["MAINPID"] == str(proc.pid)
            h = nbd.NBD()  # no retry: ready means a client can connect now
            h.connect_uri(f"nbd+unix:///?socket={sock}")
            h.shutdown()
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_fork_notifies_from_the_serving_child(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(30)
        sock, pid_file = tmp_path / "f.sock", tmp_path / "pid"
        result = subprocess.run([*PYNBD, "--fork", "--pid-file", str(pid_file), "-k", str(sock),
                                 "-f", "raw", "memory:1M"], timeout=60, check=False,
                                env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert result.returncode == 0
        child = int(pid_file.read_text())
        try:
            assert notify.recv(4096) == f"READY=1\nMAINPID={child}\n".encode()
        finally:
            os.kill(child, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # the child removes it as it exits
            assert not pid_file.exists()


def test_socket_activation_with_notify(tmp_path: Path) -> None:
    """A Type=notify unit with a socket: READY=1 arrives from the activated server."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(30)
        sock = tmp_path / "s.sock"
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
        with activated([str(sock)], [*PYNBD, "-f", "raw", "memory:1M"], env=env) as proc:
            wait_listening(sock)
            h = nbd.NBD()
            bounded(h.connect_uri, f"nbd+unix:///?socket={sock}", timeout=30)
            assert b"READY=1" in notify.recv(4096)
            h.shutdown()
            assert proc.wait(20) == 0


# -- the units of docs/systemd.md -----------------------------------------------------


def documented_units() -> dict[str, dict[str, dict[str, str]]]:
    """The units of docs/systemd.md, by file name: section -> key -> value."""
    text = (ROOT / "docs" / "systemd.md").read_text()
    units: dict[str, dict[str, dict[str, str]]] = {}
    for block in re.findall(r"^```ini\n(.*?)^```$", text, re.S | re.M):
        first, _, body = block.partition("\n")
        assert first.startswith("# /etc/systemd/system/"), first
        sections: dict[str, dict[str, str]] = {}
        current: dict[str, str] = {}
        for line in body.splitlines():
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
            elif "=" in line:
                key, _, value = line.partition("=")
                current[key.strip()] = value.strip()
        units[first.rsplit("/", 1)[1]] = sections
    return units


def test_documented_units_are_all_there() -> None:
    units = documented_units()
    assert set(units) == {"pynbd.socket", "pynbd.service", "pynbd@.socket", "pynbd@.service"}
    for name, unit in units.items():
        if name.endswith(".service"):
            assert unit["Service"]["Type"] == "notify"


@pytest.mark.parametrize(("stem", "instance"), [("pynbd", ""), ("pynbd@", "vm1")],
                         ids=["pair", "template"])
def test_documented_units_run_as_systemd_would(tmp_path: Path, stem: str,
                                               instance: str) -> None:
    units = documented_units()

    def expand(value: str) -> str:
        value = value.replace("%i", instance)
        for fixed, moved in (("/srv/nbd", str(tmp_path / "srv")),
                             ("/run", str(tmp_path / "run"))):
            value = value.replace(fixed, moved)
        return value

    listen = Path(expand(units[f"{stem}.socket"]["Socket"]["ListenStream"]))
    listen.parent.mkdir(parents=True, exist_ok=True)  # systemd makes the directory
    argv = shlex.split(expand(units[f"{stem}.service"]["Service"]["ExecStart"]))
    assert Path(argv[0]).name == "pynbd"
    image = Path(argv[-1])
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as fh:
        fh.truncate(8 * MiB)
    export = argv[argv.index("-x") + 1]
    assert export == (instance or "disk")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(30)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
        with activated([str(listen)], [*PYNBD, *argv[1:]], env=env) as proc:
            wait_listening(listen)
            h = bounded(connect, f"nbd+unix:///{export}?socket={listen}", timeout=30)
            assert notify.recv(4096).startswith(b"READY=1")
            h.pwrite(b"u" * 4096, 0)
            h.flush()
            h.shutdown()
            assert proc.wait(20) == 0
    assert image.read_bytes()[:4096] == b"u" * 4096


# -- inetd mode ------------------------------------------------------------------------


def test_inetd_serves_one_client_on_stdin() -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([*PYNBD, "--inetd", "-f", "raw", "-x", "one", "memory:1M"],
                            stdin=theirs.fileno(), stdout=theirs.fileno(),
                            stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        h = nbd.NBD()
        h.set_export_name("one")
        bounded(h.connect_socket, ours.detach(), timeout=30)
        h.pwrite(b"i" * 1024, 0)
        assert h.pread(1024, 0) == b"i" * 1024
        h.shutdown()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_inetd_exits_when_the_client_leaves_before_negotiating() -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([*PYNBD, "--inetd", "-f", "raw", "memory:1M"],
                            stdin=theirs.fileno(), stdout=theirs.fileno(),
                            stderr=subprocess.PIPE, text=True)
    theirs.close()
    ours.settimeout(20)
    assert ours.recv(8) == b"NBDMAGIC"  # greeted
    ours.close()
    assert proc.wait(20) == 0
    proc.communicate()


def test_libnbd_connect_command_runs_pynbd_inetd() -> None:
    h = nbd.NBD()
    bounded(h.connect_command, [*PYNBD, "--inetd", "-f", "raw", "memory:5M"], timeout=30)
    assert h.get_size() == 5 * MiB
    h.shutdown()


@pytest.mark.parametrize(("args", "message"), [
    (["--inetd", "-k", "x.sock"], "--inetd serves standard input: -k does not apply"),
    (["--inetd", "--fork"], "--inetd serves standard input: --fork does not apply"),
    (["--inetd"], "--inetd: standard input is not a socket"),
])
def test_inetd_refusals(args: list[str], message: str) -> None:
    result = subprocess.run([*PYNBD, *args, "memory:1M"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stderr) == (2, f"pynbd: {message}\n")


# -- pynbd -L ---------------------------------------------------------------------------


def qemu_list(*args: str) -> str:
    """``qemu-nbd -L`` output; qemu 10's if the suite installed it (it prints the
    transaction size line, as pynbd does), else the system's without that line."""
    tool = str(QEMU10_NBD) if QEMU10_NBD.exists() else require_tool("qemu-nbd")
    return subprocess.run([tool, "-L", *args], capture_output=True, text=True, timeout=60,
                          check=True).stdout


def pynbd_list(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYNBD, "-L", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("options", [
    ["-x", "disk", "-D", "a disk"],
    ["-r", "-e", "2", "-x", "ro"],
    ["-x", "big", "--max-payload", "64M"],
], ids=["plain", "read-only-multi", "max-payload"])
def test_list_prints_what_qemu_nbd_prints(pynbd_server: ServerFactory,
                                          options: list[str]) -> None:
    server = pynbd_server(*options, "-f", "raw", "memory:16M")
    assert server.socket is not None
    ours = pynbd_list("-k", server.socket)
    assert ours.returncode == 0, ours.stderr
    theirs = qemu_list("-k", server.socket)
    expected = theirs.splitlines()
    if not QEMU10_NBD.exists():  # qemu 7.2 has no transaction size line
        expected = [line for line in ours.stdout.splitlines()
                    if "transaction size" not in line]
        assert expected == theirs.splitlines()
    else:
        assert ours.stdout.splitlines() == expected


def test_list_against_qemu_nbd_and_over_tcp(tmp_path: Path) -> None:
    image = tmp_path / "q.img"
    with open(image, "wb") as fh:
        fh.truncate(MiB)
    port = free_port()
    proc = subprocess.Popen([require_tool("qemu-nbd"), "-t", "-f", "raw", "-x", "q",
                             "-D", "qemu's", "-b", "127.0.0.1", "-p", str(port), str(image)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            ours = pynbd_list("-b", "127.0.0.1", "-p", str(port))
            if ours.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert ours.returncode == 0, ours.stderr
        theirs = qemu_list("-b", "127.0.0.1", "-p", str(port))
        if QEMU10_NBD.exists():
            assert ours.stdout == theirs
        else:
            assert [line for line in ours.stdout.splitlines()
                    if "transaction size" not in line] == theirs.splitlines()
        by_uri = pynbd_list(f"nbd://127.0.0.1:{port}")
        assert by_uri.stdout == ours.stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_list_json(pynbd_server: ServerFactory) -> None:
    server = pynbd_server("-x", "j", "-D", "json", "-r", "-f", "raw", "memory:2M")
    result = pynbd_list("--json", f"nbd+unix:///?socket={server.socket}")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["tls"] is False
    (export,) = listing["exports"]
    assert export["name"] == "j"
    assert export["description"] == "json"
    assert export["size"] == 2 * MiB
    assert "readonly" in export["flags"]["names"]
    assert export["flags"]["value"] & 3 == 3
    assert export["block-sizes"] == {"minimum": 1, "preferred": 4096, "maximum": 32 * MiB}
    assert export["meta-contexts"] == ["base:allocation"]
    assert export["transaction-size"] in (32, 64)


def test_list_failures_are_one_line(tmp_path: Path) -> None:
    gone = pynbd_list("-k", str(tmp_path / "nobody.sock"))
    assert gone.returncode == 1
    assert gone.stderr == f"pynbd: cannot list unix:{tmp_path / 'nobody.sock'}: " \
                          "No such file or directory\n"
    both = pynbd_list("-k", "x", "nbd://localhost")
    assert (both.returncode, both.stderr.count("\n")) == (2, 1)


# -- --max-payload -----------------------------------------------------------------------


def test_max_payload_serves_48_mib_requests(pynbd_server: ServerFactory) -> None:
    """48 MiB writes and reads (nbd-tester-client's integrity test sends 47.6 MiB);
    over the limit still EINVAL (libnbd itself stops at 64 MiB, hence 56M)."""
    server = pynbd_server("--max-payload", "56M", "-f", "raw", "memory:128M")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 56 * MiB
    size = 48 * MiB
    data = os.urandom(MiB) * 48
    bounded(h.pwrite, data, 4096, timeout=60)
    assert bounded(h.pread, size, 4096, timeout=60) == data
    h.set_strict_mode(0)  # let the over-limit request reach the server
    with pytest.raises(nbd.Error) as err:
        h.pread(60 * MiB, 0)
    assert err.value.errno == "EINVAL"
    assert h.pread(4096, 4096) == data[:4096]  # the connection goes on
    h.shutdown()


def test_write_over_max_payload_ends_the_connection(pynbd_server: ServerFactory) -> None:
    """As at the default limit: an NBD_EINVAL reply, then the connection is closed
    (the payload is not read)."""
    server = pynbd_server("--max-payload", "40M", "-f", "raw", "memory:64M")
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(server.uri)
    h.pwrite(b"w" * (40 * MiB), 0)  # at the limit: fine
    with pytest.raises(nbd.Error):
        bounded(h.pwrite, b"w" * (48 * MiB), 0, timeout=60)
    with pytest.raises(nbd.Error):
        h.pread(512, 0)  # the server hung up


def test_default_max_payload_still_refuses_48_mib(pynbd_server: ServerFactory) -> None:
    server = pynbd_server("-f", "raw", "memory:64M")
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(server.uri)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    with pytest.raises(nbd.Error) as err:
        h.pread(48 * MiB, 0)
    assert err.value.errno == "EINVAL"
    h.shutdown()


def test_max_payload_bounds() -> None:
    result = subprocess.run([*PYNBD, "--max-payload", "512M", "memory:1M"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr == ("pynbd: argument --max-payload: '512M' must be between 4K "
                             "and 256M\n")


# -- IPv6 --------------------------------------------------------------------------------


def ipv6_loopback() -> str | None:
    """Why ::1 cannot be used here, or None if it can."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError as err:
        return f"this machine has no IPv6 loopback (binding ::1: {err.strerror})"
    return None


def test_bind_ipv6_loopback() -> None:
    reason = ipv6_loopback()
    if reason is not None:
        pytest.skip(reason)
    proc = subprocess.Popen([*PYNBD, "--print-uri", "-e", "2", "-b", "::1", "-p", "0", "-f", "raw",
                             "memory:1M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert re.fullmatch(r"nbd://\[::1\]:\d+/", uri), uri
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.get_size() == MiB
        listing = pynbd_list("-b", "::1", "-p", uri.rsplit(":", 1)[1].rstrip("/"))
        assert "exports available: 1" in listing.stdout
        h.shutdown()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_list_over_tls_as_qemu_nbd(tmp_path: Path, pynbd_server: ServerFactory) -> None:
    pki = tmp_path / "pki"
    subprocess.run([*PYNBD, "tls-setup", str(pki)], check=True, timeout=60)
    server = pynbd_server("--tls-creds", str(pki), "-x", "secret", "-f", "raw", "memory:1M")
    assert server.socket is not None
    plain = pynbd_list("-k", server.socket)
    assert plain.returncode == 1
    assert "NBD_REP_ERR_TLS_REQD" in plain.stderr
    assert "give --tls-creds" in plain.stderr
    ours = pynbd_list("--tls-creds", str(pki), "-k", server.socket)
    assert ours.returncode == 0, ours.stderr
    by_uri = pynbd_list(f"nbds+unix:///?socket={server.socket}&tls-certificates={pki}")
    assert by_uri.stdout == ours.stdout
    theirs = qemu_list("--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=client",
                       "--tls-creds", "tls0", "--tls-hostname", "localhost",
                       "-k", server.socket)
    if QEMU10_NBD.exists():
        assert ours.stdout == theirs
    else:
        assert [line for line in ours.stdout.splitlines()
                if "transaction size" not in line] == theirs.splitlines()
