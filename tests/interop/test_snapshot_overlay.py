"""``pynbd -s``: the image served through a temporary qcow2 overlay, never written.

Real servers with ``$TMPDIR`` pointed at a directory of the test's own; clients are
qemu-io and libnbd.  While a server runs, its overlay is reached through
``/proc/PID/fd/N`` (the file is already unlinked) and judged by qemu-img; after it
exits the image's bytes are unchanged and nothing is left in ``$TMPDIR``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from tests.conftest import RunningServer, launch
from tests.support.interop import require_tool

from pynbd.commands.run import open_graph
from pynbd.commands.serve import parse_args

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB
TIMEOUT = 60

#: start a server: extra arguments; ``tmpdir=None`` leaves $TMPDIR unset
Start = Callable[..., RunningServer]


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=check)


def qemu_io(target: str, *commands: str, fmt: str = "raw", read_only: bool = False) -> str:
    args = [require_tool("qemu-io"), *(["-r"] if read_only else []), "-f", fmt, target]
    for command in commands:
        args += ["-c", command]
    done = run(*args, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "error" not in output.lower(), output
    assert "verification failed" not in output, output
    return done.stdout


def md5(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hashlib.md5(fh.read()).hexdigest()


def raw_image(path: Path, *writes: str) -> str:
    with open(path, "wb") as fh:
        fh.truncate(SIZE)
    if writes:
        qemu_io(str(path), *writes)
    return str(path)


@pytest.fixture
def temp(tmp_path: Path) -> Path:
    """The directory $TMPDIR names for the server."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    return directory


@pytest.fixture
def start(tmp_path: Path, temp: Path) -> Iterator[Start]:
    """Factory: ``start("-s", IMAGE)`` runs ``pynbd -t`` on a Unix socket with $TMPDIR
    set to ``temp`` (or unset with ``tmpdir=None``); stopped at teardown."""
    started: list[RunningServer] = []

    def factory(*args: str, tmpdir: Path | None = temp) -> RunningServer:
        env = {key: value for key, value in os.environ.items() if key != "TMPDIR"}
        if tmpdir is not None:
            env["TMPDIR"] = str(tmpdir)
        sock = str(tmp_path / f"nbd{len(started)}.sock")
        cmd = [sys.executable, "-m", "pynbd", "--print-uri", "-t", "-k", sock, *args]
        server = launch(cmd, socket_path=sock, env=env)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.stop()
        for stream in (server.proc.stdout, server.proc.stderr):
            if stream is not None:
                stream.close()


def overlay_fd(server: RunningServer, directory: Path | str) -> str:
    """``/proc/PID/fd/N`` of the server's overlay: the fd whose link names a deleted
    ``vl.*`` file in ``directory``."""
    fds = f"/proc/{server.proc.pid}/fd"
    found = []
    for name in os.listdir(fds):
        try:
            target = os.readlink(f"{fds}/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(os.path.join(str(directory), "vl.")):
            assert target.endswith(" (deleted)"), target
            found.append(f"{fds}/{name}")
    assert len(found) == 1, found
    return found[0]


def assert_overlay_clean(path: str, size: int = SIZE) -> None:
    """``qemu-img check`` finds no corruption in the live overlay (the clusters it
    holds in reserve show as leaks), and ``qemu-img info`` its size."""
    qemu_img = require_tool("qemu-img")
    done = run(qemu_img, "check", "--output=json", path, check=False)
    report = json.loads(done.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    info = json.loads(run(qemu_img, "info", "--output=json", path).stdout)
    assert (info["format"], info["virtual-size"]) == ("qcow2", size)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def stop_clean(server: RunningServer, temp: Path) -> None:
    """The server exits 0, said nothing, and left nothing in $TMPDIR."""
    assert server.stop() == 0
    assert server.proc.stderr is not None
    assert server.proc.stderr.read() == ""
    assert os.listdir(temp) == []


def test_raw_image_is_never_written(start: Start, temp: Path, tmp_path: Path) -> None:
    """Writes through the export read back (from later connections too) and land in
    the overlay; the probed raw image keeps its bytes and says nothing on stderr."""
    image = raw_image(tmp_path / "disk.raw", "write -P 0xb0 0 8M", "write -P 0xb1 60M 1M")
    before = md5(image)
    srv = start("-s", image)
    assert os.listdir(temp) == [], "the overlay is unlinked once open"
    qemu_io(srv.uri, "read -P 0xb0 0 8M", "write -P 0x77 1M 100k", "write -z 4M 64k",
            "write -P 0x78 63M 1M", "read -P 0x77 1M 100k", "read -P 0 4M 64k")
    qemu_io(srv.uri, "read -P 0xb0 0 1M", "read -P 0x77 1M 100k", "read -P 0xb0 1124k 1M",
            "read -P 0 4M 64k", "read -P 0xb1 60M 1M", "read -P 0x78 63M 1M",
            "read -P 0 62M 1M")
    overlay = overlay_fd(srv, temp)
    assert_overlay_clean(overlay)
    # the overlay itself (opened without its backing) holds what was written
    qemu_io(overlay, "read -P 0x77 1M 100k", "read -P 0x78 63M 1M", "read -P 0 0 1M",
            fmt="qcow2", read_only=True)
    assert md5(image) == before
    stop_clean(srv, temp)
    assert md5(image) == before


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_one_overlay_for_every_connection(start: Start, temp: Path, tmp_path: Path,
                                          backend: str) -> None:
    """-e 2 -s advertises multi-conn (one overlay node shared by every connection):
    a write on one connection, flushed, is read on the other."""
    image = (raw_image(tmp_path / "disk.raw", "write -P 0x5c 0 4M") if backend == "file"
             else f"memory:{SIZE}")
    before = md5(image) if backend == "file" else ""
    srv = start("-e", "2", "-s", image)
    handles = [nbd.NBD(), nbd.NBD()]
    try:
        for h in handles:
            h.connect_uri(srv.uri)
            assert h.can_multi_conn() is True
            assert h.is_read_only() is False
            assert h.get_size() == SIZE
        one, two = handles
        one.pwrite(b"\xa1" * 70000, 3 * MiB)
        one.flush()
        assert two.pread(70000, 3 * MiB) == b"\xa1" * 70000
        two.pwrite(b"\xa2" * 4096, 40 * MiB + 512)
        two.flush()
        assert one.pread(4096, 40 * MiB + 512) == b"\xa2" * 4096
        if backend == "file":
            assert one.pread(4096, 3 * MiB + 70000) == b"\x5c" * 4096
        assert_overlay_clean(overlay_fd(srv, temp))
    finally:
        for h in handles:
            if not h.aio_is_dead():
                h.shutdown()
    stop_clean(srv, temp)
    if backend == "file":
        assert md5(image) == before


def test_single_client_snapshot_has_no_multi_conn(start: Start, tmp_path: Path) -> None:
    """The overlay changes nothing about the rule: -e 1 (the default) means no multi-conn."""
    srv = start("-s", raw_image(tmp_path / "disk.raw"))
    h = nbd.NBD()
    try:
        h.connect_uri(srv.uri)
        assert h.can_multi_conn() is False
    finally:
        h.shutdown()


def test_read_only_snapshot(start: Start, temp: Path, tmp_path: Path) -> None:
    """-s -r: the export is read-only, the image reads through the overlay."""
    image = raw_image(tmp_path / "disk.raw", "write -P 0x3e 0 1M")
    before = md5(image)
    srv = start("-s", "-r", "-e", "2", image)
    h = nbd.NBD()
    try:
        h.connect_uri(srv.uri)
        assert h.is_read_only() is True
        assert h.pread(4096, 0) == b"\x3e" * 4096
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        overlay_fd(srv, temp)
    finally:
        h.shutdown()
    stop_clean(srv, temp)
    assert md5(image) == before


@pytest.mark.parametrize("fmt", [[], ["-f", "qcow2"]], ids=["probed", "qcow2"])
def test_qcow2_chain_is_never_written(start: Start, temp: Path, tmp_path: Path,
                                      fmt: list[str]) -> None:
    """A qcow2 image over a raw base, both untouched: the whole chain is the overlay's
    backing and reads fall through it."""
    base = raw_image(tmp_path / "base.raw", "write -P 0xb0 0 8M")
    top = str(tmp_path / "top.qcow2")
    run(require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F",
        "raw", top, str(SIZE))
    qemu_io(top, "write -P 0x3a 4M 1M", fmt="qcow2")
    before = md5(base), md5(top)
    srv = start(*fmt, "-s", top)
    qemu_io(srv.uri, "read -P 0xb0 0 4M", "read -P 0x3a 4M 1M", "read -P 0xb0 5M 3M",
            "write -P 0x99 4M 64k", "write -P 0x98 30M 100k", "write -z 6M 64k")
    qemu_io(srv.uri, "read -P 0x99 4M 64k", "read -P 0x3a 4160k 960k", "read -P 0x98 30M 100k",
            "read -P 0 6M 64k", "read -P 0xb0 7M 1M", "read -P 0 9M 1M")
    assert_overlay_clean(overlay_fd(srv, temp))
    stop_clean(srv, temp)
    assert (md5(base), md5(top)) == before
    done = run(require_tool("qemu-img"), "check", top, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_killed_server_leaves_no_file(start: Start, temp: Path, tmp_path: Path) -> None:
    """The overlay was unlinked when it was opened: nothing remains, however the
    server ends."""
    image = raw_image(tmp_path / "disk.raw")
    srv = start("-s", image)
    qemu_io(srv.uri, "write -P 0x11 0 1M")
    overlay_fd(srv, temp)
    assert srv.stop(signal.SIGKILL) == -signal.SIGKILL
    assert os.listdir(temp) == []


def test_default_directory_is_var_tmp(start: Start, tmp_path: Path) -> None:
    """Without $TMPDIR the overlay goes to /var/tmp, as qemu's."""
    srv = start("-s", raw_image(tmp_path / "disk.raw"), tmpdir=None)
    assert_overlay_clean(overlay_fd(srv, "/var/tmp"))


def test_unusable_directory(tmp_path: Path) -> None:
    """An overlay that cannot be made is one line and exit status 2."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "missing")}
    done = subprocess.run(
        [sys.executable, "-m", "pynbd", "-s", "-k", str(tmp_path / "s.sock"),
         raw_image(tmp_path / "disk.raw")],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False)
    assert done.returncode == 2
    assert done.stderr == (f"pynbd: Could not open temporary file "
                           f"'{tmp_path / 'missing'}/vl.XXXXXX': No such file or directory\n")
    assert not (tmp_path / "s.sock").exists()


def test_overlay_in_the_graph(temp: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlay and its file are named nodes of the graph (query-named-block-nodes):
    the overlay is writable qcow2 over the read-only image; closing the graph closes
    it."""
    monkeypatch.setenv("TMPDIR", str(temp))
    image = raw_image(tmp_path / "disk.raw")

    async def go() -> tuple[list[dict[str, Any]], str]:
        graph, node = await open_graph(parse_args(["-s", "-r", image]))
        try:
            return graph.query(), node.node_name
        finally:
            await graph.close()

    nodes, exported = asyncio.run(go())
    by_name = {each["node-name"]: each for each in nodes}
    assert all(name.startswith("#block") for name in by_name)
    top = by_name[exported]
    assert (top["drv"], top["ro"], top["backing_file"], top["backing_file_depth"]) == \
        ("qcow2", False, image, 1)
    assert top["file"].startswith(os.path.join(str(temp), "vl."))
    assert top["image"]["backing-image"]["filename"] == image
    base = [each for each in nodes if each["drv"] == "raw"]
    assert len(base) == 1
    assert base[0]["ro"] is True
    files = sorted(each["file"] for each in nodes if each["drv"] == "file")
    assert files == sorted([image, top["file"]])
    assert os.listdir(temp) == []


def test_snapshot_and_load_snapshot_together_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    done = subprocess.run([sys.executable, "-m", "pynbd", "-s", "-l", "snap", "-k",
                           str(tmp_path / "s.sock"), str(image)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cannot be used together" in lines[0]
