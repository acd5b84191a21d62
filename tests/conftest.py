"""Shared fixtures: start real pynbd (and reference) servers on private sockets."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.ceph import CephCluster

#: every server start waits at most this long for the URI line
START_TIMEOUT = 20.0


@dataclass
class RunningServer:
    """A pynbd process started by a test."""

    proc: subprocess.Popen[str]
    uri: str
    socket: str | None
    args: list[str]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def uri_for(self, name: str) -> str:
        """The URI of another export name on the same socket."""
        assert self.socket is not None
        return f"nbd+unix:///{name}?socket={self.socket}"


ServerFactory = Callable[..., RunningServer]


def _start(args: list[str], *, socket_path: str | None) -> RunningServer:
    cmd = [sys.executable, "-m", "pynbd", "--print-uri", *args]
    return launch(cmd, socket_path=socket_path)


def launch(cmd: list[str], *, socket_path: str | None, **popen: object) -> RunningServer:
    """Start ``cmd`` (a server given ``--print-uri``) and wait for the URI it prints."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)  # type: ignore[call-overload]
    assert proc.stdout is not None
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(START_TIMEOUT):
            proc.kill()
            raise RuntimeError(f"pynbd did not start: {cmd}")
    line = proc.stdout.readline().strip()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait()
        raise RuntimeError(f"pynbd exited ({proc.returncode}): {err}")
    return RunningServer(proc, line, socket_path, cmd)


@pytest.fixture
def pynbd_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Factory: ``pynbd_server("-e", "0", image)`` serves on a Unix socket in tmp_path.

    Pass ``tcp=True`` to listen on 127.0.0.1 with a free port instead.  Every
    server still running at teardown is stopped with SIGTERM.
    """
    started: list[RunningServer] = []

    def factory(*args: str, tcp: bool = False, persistent: bool = True) -> RunningServer:
        extra = ["-t"] if persistent else []
        if tcp:
            server = _start([*extra, "-b", "127.0.0.1", "-p", "0", *args], socket_path=None)
        else:
            sock = str(tmp_path / f"nbd{len(started)}.sock")
            server = _start([*extra, "-k", sock, *args], socket_path=sock)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.stop()
        for stream in (server.proc.stdout, server.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def raw_image(tmp_path: Path) -> Callable[[int], Path]:
    """Factory for a sparse raw image file of a given size."""

    def make(size: int, name: str = "disk.img") -> Path:
        path = tmp_path / name
        with open(path, "wb") as fh:
            fh.truncate(size)
        return path

    return make




@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One real single-node Ceph cluster for the whole session (tests/support/ceph.py)."""
    from tests.support.ceph import CephCluster

    cluster = CephCluster.start(tmp_path_factory.mktemp("ceph") / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()
