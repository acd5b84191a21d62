"""The NBD servers the benchmark compares: which backends each has, their command
lines, and starting and stopping them.

Each server listens on a Unix socket in the benchmark's temp dir and is ready
once ``nbdinfo --size`` sees its export with the right size.  Servers are
stopped by pid (SIGTERM to the process tree, SIGKILL after a bound);
nbd-server daemonizes itself, so its pid comes from its pid file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from procs import descendants, pid_alive, run_cmd

if TYPE_CHECKING:
    from pathlib import Path

#: "pynbd-base" is pynbd from another checkout (``--baseline DIR``), for A/B runs
#: "qemu-nbd-uring" is qemu-nbd at its best on files: io_uring, and glibc's malloc
#: tuned so that 1 MiB buffers are neither mmapped nor trimmed per request
#: "pynbd-metrics" is pynbd with --metrics (request counting on), for the A/B of its cost
ALL_SERVERS = ("pynbd", "qemu-nbd", "qemu-nbd-uring", "nbdkit", "nbd-server", "pynbd-base",
               "pynbd-metrics")
# the others get a fresh sparse raw file
HAS_MEMORY = ("pynbd", "nbdkit", "pynbd-base", "pynbd-metrics")
# nbdkit and nbd-server: no RBD support here
HAS_RBD = ("pynbd", "qemu-nbd", "pynbd-base", "pynbd-metrics")
# nbdkit and nbd-server: no qcow2 here
HAS_QCOW2 = ("pynbd", "qemu-nbd", "qemu-nbd-uring", "pynbd-base", "pynbd-metrics")
PYNBDS = ("pynbd", "pynbd-base", "pynbd-metrics")
#: qemu-nbd-uring's GLIBC_TUNABLES: no mmap/munmap or trim per 1 MiB request buffer
QEMU_MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=67108864:"
                        "glibc.malloc.trim_threshold=268435456")
RBD_IMAGE = "bench"  # the image every rbd server exports, in the cluster's pool
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
SETTLE_TIMEOUT = 5.0

#: the checkout "pynbd-base" runs from (set by ``set_baseline``, from ``--baseline``)
_baseline: Path | None = None


def set_baseline(path: Path | None) -> None:
    """Where server pynbd-base imports pynbd from (``path``/src)."""
    global _baseline
    _baseline = path


@dataclasses.dataclass
class Server:
    name: str
    backend: str  # file | memory | sparse (fresh sparse raw file) | rbd | qcow2
    uri: str
    pid: int
    proc: subprocess.Popen[bytes] | None  # None: nbd-server daemonizes itself
    log: Path
    osd_pid: int | None = None  # rbd: the cluster's OSD, whose CPU is measured too
    stopped: bool = False  # set by stop_server, which then does nothing again


def serves(name: str, backend: str) -> bool:
    """Whether server ``name`` has a column for ``backend``."""
    return {"file": True, "memory": name in HAS_MEMORY, "rbd": name in HAS_RBD,
            "qcow2": name in HAS_QCOW2}[backend]


def server_command(name: str, backend: str, target: str, size: int, sock: Path,
                   workdir: Path, tag: str) -> list[str]:
    """The command line; ``target`` is a raw file, a qcow2 file for backend qcow2, or an
    ``rbd:`` spec for backend rbd.

    rbd: neither server gets ``--discard`` (both ignore trims); qemu-nbd's
    ``--cache=none`` turns librbd's client cache off, as pynbd does by default.
    qcow2: the same command lines as for a raw file, with ``-f qcow2``.
    """
    fmt = "qcow2" if backend == "qcow2" else "raw"
    if name in PYNBDS:
        # pynbd-metrics: an exporter on a free loopback port (nobody scrapes it)
        pynbd = [sys.executable, "-m", "pynbd", *(
            ["--metrics", "127.0.0.1:0"] if name == "pynbd-metrics" else [])]
        if backend == "memory":
            return [*pynbd, "-t", "-e", "0", "-k", str(sock), f"memory:{size}"]
        # the format given, as for qemu-nbd (a probed raw image guards its first sector)
        return [*pynbd, "-t", "-e", "0", "-k", str(sock), "-f", fmt, target]
    if name == "qemu-nbd" and backend == "rbd":
        return ["qemu-nbd", "-f", "raw", "--cache=none", "-e", "8", "-t", "-k", str(sock),
                target]
    if name in ("qemu-nbd", "qemu-nbd-uring"):
        aio = "io_uring" if name == "qemu-nbd-uring" else "threads"
        return ["qemu-nbd", "-f", fmt, "-e", "8", "-t", "-k", str(sock),
                "--cache=writeback", f"--aio={aio}", target]
    if name == "nbdkit":
        plugin = ["memory", str(size)] if backend == "memory" else ["file", target]
        return ["nbdkit", "-f", "-U", str(sock), *plugin]
    config = workdir / f"nbd-server-{tag}.conf"
    config.write_text(f"[generic]\nunixsock = {sock}\n"
                      f"[bench]\nexportname = {target}\nreadonly = false\n"
                      "flush = true\nfua = true\ntrim = true\n")
    return ["nbd-server", "-C", str(config), "-p", str(workdir / f"nbd-server-{tag}.pid")]


def server_env(name: str) -> dict[str, str] | None:
    """The environment of server ``name``: pynbd-base imports pynbd from the baseline,
    qemu-nbd-uring gets its malloc tunables."""
    if name == "qemu-nbd-uring":
        return {**os.environ, "GLIBC_TUNABLES": QEMU_MALLOC_TUNABLES}
    if name != "pynbd-base":
        return None
    assert _baseline is not None
    return {**os.environ, "PYTHONPATH": str(_baseline / "src")}


def start_server(name: str, backend: str, target: str, size: int, workdir: Path,
                 tag: str, osd_pid: int | None = None) -> Server:
    """Start one server and return once ``nbdinfo`` sees the export with the right size."""
    sock = workdir / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    log = workdir / f"{tag}.log"
    cmd = server_command(name, backend, target, size, sock, workdir, tag)
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                start_new_session=True, env=server_env(name))
    export = "bench" if name == "nbd-server" else ""
    server = Server(name, backend, f"nbd+unix:///{export}?socket={sock}", proc.pid, proc, log,
                    osd_pid)
    try:
        if name == "nbd-server":  # it forks a daemon and writes its pid; the launcher exits
            if proc.wait(timeout=READY_TIMEOUT) != 0:
                raise RuntimeError(f"nbd-server failed: {log.read_text(errors='replace')}")
            server.pid, server.proc = _read_pid(workdir / f"nbd-server-{tag}.pid"), None
        _wait_ready(server, size)
    except BaseException:
        stop_server(server)
        raise
    return server


def _read_pid(path: Path) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):  # missing or half-written
            return int(path.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"no pid file {path}")


def _wait_ready(server: Server, size: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not pid_alive(server.pid):
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            probe = run_cmd(["nbdinfo", "--size", server.uri], 5)
            if probe.returncode == 0 and probe.stdout.strip() == str(size):
                return
        time.sleep(0.1)
    tail = server.log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{server.name} ({server.backend}) not ready: {tail}")


def stop_server(server: Server) -> None:
    """SIGTERM the server and its descendants by pid, SIGKILL after a bound (once)."""
    if server.stopped:
        return
    for pid in [server.pid, *descendants(server.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if server.proc is not None:
        try:
            server.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=STOP_TIMEOUT)
        server.stopped = True
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(server.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)
    server.stopped = True


def settle(server: Server) -> None:
    """Wait (bounded) until per-client child processes have exited and been reaped."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while descendants(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
