"""systemd's start-up protocols (``server.activation``): inherited sockets and
READY=1, each in a child process that owns descriptor 3 and its environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest

from pynbd.server.activation import activation_count, notify_ready

if TYPE_CHECKING:
    from pathlib import Path

CHILD = textwrap.dedent("""
    import os, socket, sys
    from pynbd.server.activation import ActivationError, inherited_sockets
    pid = os.getpid()
    mode = sys.argv[1]
    if mode == "listening":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(sys.argv[2])
        sock.listen()
    else:
        sock = socket.socket(socket.AF_UNIX)  # not listening
    os.dup2(sock.fileno(), 3, inheritable=True)
    os.environ.update(LISTEN_PID=str(pid), LISTEN_FDS="1", LISTEN_FDNAMES="nbd")
    try:
        found = inherited_sockets()
    except ActivationError as err:
        print("error", err)
        raise SystemExit(0)
    left = [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ]
    print(len(found), found[0].fileno(), found[0].get_inheritable(),
          found[0].getblocking(), left)
""")


def child(*args: str) -> str:
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def test_inherits_fd_3_and_clears_the_variables(tmp_path: Path) -> None:
    assert child("listening", str(tmp_path / "s")) == "1 3 False False []"


def test_a_socket_that_does_not_listen_is_refused() -> None:
    out = child("plain")
    assert out == "error Socket activation failed: fd 3 is not a listening stream socket"


@pytest.mark.parametrize(("pid", "fds", "count"), [
    ("self", "1", 1), ("self", "2", 2), ("1", "1", 0), (None, "1", 0), ("self", None, 0),
    ("self", "x", 0), ("x", "1", 0),
])
def test_activation_count(monkeypatch: pytest.MonkeyPatch, pid: str | None,
                          fds: str | None, count: int) -> None:
    for name, value in (("LISTEN_PID", pid), ("LISTEN_FDS", fds)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert activation_count() == count
    assert ("LISTEN_FDS" in os.environ) is (fds is not None)  # read, not changed


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_ready(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, abstract: bool) -> None:
    name = f"@pynbd-unit-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert notify_ready() is True
        assert sock.recv(100) == f"READY=1\nMAINPID={os.getpid()}\n".encode()
        assert "NOTIFY_SOCKET" not in os.environ
        assert notify_ready() is False  # once


def test_notify_without_a_listener_is_harmless(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert notify_ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative")
    assert notify_ready() is False
