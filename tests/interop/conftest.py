"""Fixtures the interop tests share: ``start``, a factory of ``pynbd daemon`` processes
(the QMP daemon), each killed at the end of its test if still running."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

#: bound for a daemon to start
T = 30.0


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    qmp: str
    sock: str

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[], Daemon]]:
    """``start()`` runs ``pynbd daemon --qmp``; every daemon still running at the end is
    killed."""
    started: list[Daemon] = []

    def factory() -> Daemon:
        index = len(started)
        qmp_path, pid = str(tmp_path / f"q{index}.sock"), tmp_path / f"d{index}.pid"
        err = open(tmp_path / f"d{index}.err", "wb")  # noqa: SIM115 - the daemon's
        proc = subprocess.Popen([sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path,
                                 "--pid-file", str(pid)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        err.close()
        daemon = Daemon(proc, qmp_path, str(tmp_path / f"n{index}.sock"))
        started.append(daemon)
        deadline = time.monotonic() + T
        while not pid.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"daemon did not start: {(tmp_path / f'd{index}.err').read_text()}")
            time.sleep(0.02)
        return daemon

    yield factory
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
