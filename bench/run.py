"""Benchmark pynbd against qemu-nbd, nbdkit and nbd-server with fio and nbdcopy.

Every server exports the same raw image (filled with random data, kept in the
page cache) on a Unix socket in a private temp dir.  For each round, for each
job, each server runs in turn, the order rotated by one every round (A B C D,
B C D A, C D A B, ...).  Server CPU is read from /proc/PID/stat (utime+stime+cutime+
cstime summed over the process tree, so nbd-server's per-client children
count) before and after each run.  Results:
a table on stdout, ``results.json`` and, if matplotlib is importable,
``ratios.png`` in --out.  Servers are stopped by pid in a ``finally``.

``--backends ...,rbd`` adds a Ceph RBD column (not in the default run): the
script starts a throwaway one-OSD cluster in its temp dir (bench/rbdcluster.py,
stopped in a ``finally``), imports the same image into one RBD image, and
runs pynbd and qemu-nbd (the only servers here with RBD support) on that
image; the OSD's CPU is measured next to the server's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

# the throwaway Ceph cluster for the rbd column (this script runs from bench/)
import rbdcluster

from pynbd.block import parse_size

_S = TypeVar("_S")

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: "pynbd-base" is pynbd from another checkout (``--baseline DIR``), for A/B runs
ALL_SERVERS = ("pynbd", "qemu-nbd", "nbdkit", "nbd-server", "pynbd-base")
HAS_MEMORY = ("pynbd", "nbdkit", "pynbd-base")  # the others get a fresh sparse raw file
HAS_RBD = ("pynbd", "qemu-nbd", "pynbd-base")  # nbdkit and nbd-server: no RBD support here
#: the checkout "pynbd-base" runs from (set by ``--baseline``)
BASELINE: Path | None = None
ALL_BACKENDS = ("file", "memory", "rbd")
DEFAULT_BACKENDS = ("file", "memory")
RBD_IMAGE = "bench"  # the image every rbd server exports, in the cluster's pool
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
SETTLE_TIMEOUT = 5.0
COPY_MIN_MBPS = 10.0  # nbdcopy timeout: 60 s + size at this rate


@dataclasses.dataclass(frozen=True)
class FioJob:
    key: str
    title: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1


FIO_JOBS = (
    FioJob("a", "4k randread qd1", "randread", "4k", 1),
    FioJob("b", "4k randread qd32", "randread", "4k", 32),
    FioJob("c", "4k randwrite qd32", "randwrite", "4k", 32),
    FioJob("d", "1M seq read qd8", "read", "1M", 8),
    FioJob("e", "1M seq write qd8", "write", "1M", 8),
    FioJob("f", "4k randread qd32 x4 conns", "randread", "4k", 32, 4),
    FioJob("g", "1M seq read qd8 x4 conns", "read", "1M", 8, 4),
)
COPY_JOBS = ("nbdcopy-out", "nbdcopy-in")
ALL_JOBS = tuple(j.key for j in FIO_JOBS) + COPY_JOBS
TITLES = {j.key: f"{j.key} {j.title}" for j in FIO_JOBS} | {
    "nbdcopy-out": "nbdcopy out (server -> file)", "nbdcopy-in": "nbdcopy in (file -> server)"}


@dataclasses.dataclass
class Sample:
    round: int
    ok: bool
    error: str = ""
    seconds: float = 0.0
    iops: float = 0.0
    mbps: float = 0.0
    total_ios: int = 0
    cpu_s: float = 0.0
    cpu_us: float | None = None  # per I/O for fio jobs, per MiB for nbdcopy
    client_cpu_s: float = 0.0
    client_cpu_us: float | None = None
    foreign_cores: float = 0.0
    lat_mean_us: float | None = None
    lat_p99_us: float | None = None
    osd_cpu_s: float | None = None  # rbd: the Ceph OSD's CPU over the run
    osd_cpu_us: float | None = None  # per I/O or per MiB, as cpu_us


@dataclasses.dataclass
class Server:
    name: str
    backend: str  # file | memory | sparse (fresh sparse raw file) | rbd
    uri: str
    pid: int
    proc: subprocess.Popen[bytes] | None  # None: nbd-server daemonizes itself
    log: Path
    osd_pid: int | None = None  # rbd: the cluster's OSD, whose CPU is measured too


# -- processes -----------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (bounded), capturing its text output."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (found by scanning /proc for parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo and len(found) < 10_000:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(root: int) -> float:
    """utime+stime+cutime+cstime of ``root`` and its live descendants (threads included)."""
    ticks = 0
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def pid_alive(pid: int) -> bool:
    try:
        state = _stat_fields(pid)[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def settle(server: Server) -> None:
    """Wait (bounded) until per-client child processes have exited and been reaped."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while descendants(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- servers -------------------------------------------------------------------------------

def serves(name: str, backend: str) -> bool:
    """Whether server ``name`` has a column for ``backend``."""
    return {"file": True, "memory": name in HAS_MEMORY, "rbd": name in HAS_RBD}[backend]


def server_command(name: str, backend: str, target: str, size: int, sock: Path,
                   workdir: Path, tag: str) -> list[str]:
    """The command line; ``target`` is a raw file, or an ``rbd:`` spec for backend rbd.

    rbd: neither server gets ``--discard`` (both ignore trims); qemu-nbd's
    ``--cache=none`` turns librbd's client cache off, as pynbd does by default.
    """
    if name in ("pynbd", "pynbd-base"):
        if backend == "memory":
            return [sys.executable, "-m", "pynbd", "-t", "-e", "0", "-k", str(sock),
                    f"memory:{size}"]
        # the format given, as for qemu-nbd (a probed raw image guards its first sector)
        return [sys.executable, "-m", "pynbd", "-t", "-e", "0", "-k", str(sock), "-f", "raw",
                target]
    if name == "qemu-nbd" and backend == "rbd":
        return ["qemu-nbd", "-f", "raw", "--cache=none", "-e", "8", "-t", "-k", str(sock),
                target]
    if name == "qemu-nbd":
        return ["qemu-nbd", "-f", "raw", "-e", "8", "-t", "-k", str(sock),
                "--cache=writeback", "--aio=threads", target]
    if name == "nbdkit":
        plugin = ["memory", str(size)] if backend == "memory" else ["file", target]
        return ["nbdkit", "-f", "-U", str(sock), *plugin]
    config = workdir / f"nbd-server-{tag}.conf"
    config.write_text(f"[generic]\nunixsock = {sock}\n"
                      f"[bench]\nexportname = {target}\nreadonly = false\n"
                      "flush = true\nfua = true\ntrim = true\n")
    return ["nbd-server", "-C", str(config), "-p", str(workdir / f"nbd-server-{tag}.pid")]


def server_env(name: str) -> dict[str, str] | None:
    """The environment of server ``name``: pynbd-base imports pynbd from the baseline."""
    if name != "pynbd-base":
        return None
    assert BASELINE is not None
    return {**os.environ, "PYTHONPATH": str(BASELINE / "src")}


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
            probe = _run(["nbdinfo", "--size", server.uri], 5)
            if probe.returncode == 0 and probe.stdout.strip() == str(size):
                return
        time.sleep(0.1)
    tail = server.log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{server.name} ({server.backend}) not ready: {tail}")


def stop_server(server: Server) -> None:
    """SIGTERM the server and its descendants by pid, SIGKILL after a bound."""
    for pid in [server.pid, *descendants(server.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if server.proc is not None:
        try:
            server.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=STOP_TIMEOUT)
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(server.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)


# -- workloads -----------------------------------------------------------------------------

def make_image(path: Path, size: int) -> None:
    """A raw image of distinct random 1 MiB blocks, written once and read back into cache."""
    block = bytearray(os.urandom(MIB))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, size, MIB):
            block[:8] = offset.to_bytes(8, "little")  # no two blocks alike
            os.pwrite(fd, memoryview(block)[:min(MIB, size - offset)], offset)
        os.fsync(fd)
        for offset in range(0, size, 16 * MIB):
            os.pread(fd, 16 * MIB, offset)
    finally:
        os.close(fd)


def fio_command(job: FioJob, uri: str, runtime: int, size: int) -> list[str]:
    cmd = ["fio", f"--name={job.key}", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
           f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--numjobs={job.numjobs}",
           "--group_reporting", "--time_based", f"--runtime={runtime}", "--norandommap",
           "--randrepeat=0", "--output-format=json"]
    if job.numjobs > 1 and not job.rw.startswith("rand"):  # one region per connection
        part = size // job.numjobs // MIB * MIB
        cmd += [f"--size={part}", f"--offset_increment={part}"]
    return cmd


def _fio_stats(text: str) -> dict[str, Any]:
    data = json.loads(text[text.index("{"):])  # the nbd engine prints a line first
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']}")
    return dict(job)


def host_busy_seconds() -> float:
    """Non-idle CPU time of the whole host (user nice system irq softirq steal)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(server: Server, cmd: list[str], timeout: float,
            rnd: int) -> tuple[subprocess.CompletedProcess[str] | None, Sample]:
    """Run a client against ``server``: its output (None on failure) and a timed Sample.

    ``client_cpu_s`` is the client's CPU (it is our child); ``foreign_cores`` is
    the host's busy CPU outside server, client (and OSD), averaged over the run
    (noise).  With an ``osd_pid`` the OSD's CPU is ``osd_cpu_s``.
    """
    if not pid_alive(server.pid):
        return None, Sample(rnd, False, "server not running")
    osd0 = None if server.osd_pid is None else cpu_seconds(server.osd_pid)
    cpu0, host0, kids0 = cpu_seconds(server.pid), host_busy_seconds(), children_cpu_seconds()
    t0 = time.monotonic()
    try:
        done = _run(cmd, timeout)
    except subprocess.TimeoutExpired:
        return None, Sample(rnd, False, f"{cmd[0]} timed out after {timeout:.0f} s")
    seconds, host = time.monotonic() - t0, host_busy_seconds() - host0
    client = children_cpu_seconds() - kids0
    settle(server)
    cpu = cpu_seconds(server.pid) - cpu0
    osd = None if server.osd_pid is None or osd0 is None else cpu_seconds(server.osd_pid) - osd0
    sample = Sample(rnd, done.returncode == 0, seconds=seconds, cpu_s=cpu, client_cpu_s=client,
                    foreign_cores=max(0.0, host - cpu - client - (osd or 0.0)) / seconds,
                    osd_cpu_s=osd)
    if done.returncode != 0:
        sample.error = f"{cmd[0]} exit {done.returncode}: {done.stderr.strip()[-300:]}"
        return None, sample
    return done, sample


def run_fio(server: Server, job: FioJob, runtime: int, size: int, rnd: int) -> Sample:
    done, sample = measure(server, fio_command(job, server.uri, runtime, size), runtime + 60,
                           rnd)
    if done is None:
        return sample
    try:
        stats = _fio_stats(done.stdout)
        sections = [stats[d] for d in ("read", "write") if stats[d]["total_ios"]]
        main = max(sections, key=lambda s: int(s["total_ios"]))
    except (ValueError, KeyError, IndexError, RuntimeError) as err:
        sample.ok, sample.error = False, f"bad fio output or no I/O: {err!r}"
        return sample
    p99 = main["clat_ns"].get("percentile", {}).get("99.000000")
    sample.total_ios = sum(int(s["total_ios"]) for s in sections)
    sample.iops = sum(float(s["iops"]) for s in sections)
    sample.mbps = sum(float(s["bw_bytes"]) for s in sections) / 1e6
    sample.cpu_us = sample.cpu_s * 1e6 / sample.total_ios
    sample.client_cpu_us = sample.client_cpu_s * 1e6 / sample.total_ios
    if sample.osd_cpu_s is not None:
        sample.osd_cpu_us = sample.osd_cpu_s * 1e6 / sample.total_ios
    sample.lat_mean_us = float(main["lat_ns"]["mean"]) / 1e3
    sample.lat_p99_us = None if p99 is None else float(p99) / 1e3
    return sample


def run_copy(server: Server, src: str, dst: str, size: int, rnd: int) -> Sample:
    """Time one ``nbdcopy SRC DST`` (default multi-conn); CPU is per MiB copied."""
    done, sample = measure(server, ["nbdcopy", src, dst], 60 + size / (COPY_MIN_MBPS * 1e6),
                           rnd)
    if done is not None:
        sample.mbps = size / sample.seconds / 1e6
        sample.cpu_us = sample.cpu_s * 1e6 / (size / MIB)
        sample.client_cpu_us = sample.client_cpu_s * 1e6 / (size / MIB)
        if sample.osd_cpu_s is not None:
            sample.osd_cpu_us = sample.osd_cpu_s * 1e6 / (size / MIB)
    return sample


def copy_in(name: str, image: Path, size: int, workdir: Path, rnd: int) -> Sample:
    """Copy the image into a fresh memory export (or fresh sparse raw file) of ``name``."""
    target = workdir / f"copy-in-{name}.img"
    backend = "memory" if name in HAS_MEMORY else "sparse"
    if backend == "sparse":
        with target.open("wb") as fh:
            fh.truncate(size)
    try:
        server = start_server(name, backend, str(target), size, workdir, f"{name}-in-{rnd}")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    try:
        return run_copy(server, str(image), server.uri, size, rnd)
    finally:
        stop_server(server)
        target.unlink(missing_ok=True)


def copy_in_rbd(name: str, cluster: rbdcluster.Cluster, image: Path, size: int,
                workdir: Path, rnd: int) -> Sample:
    """Copy the image into a fresh RBD image (layering only, ``size`` bytes) served by ``name``.

    Each server and round gets its own image, removed afterwards, so every copy
    writes into objects that do not exist yet, as the first copy would.
    """
    target = f"copy-in-{name}-{rnd}"
    rbdcluster.create_image(cluster, target, size)
    try:
        server = start_server(name, "rbd", cluster.spec(target), size, workdir,
                              f"{name}-rbd-in-{rnd}", cluster.osd_pid)
        try:
            return run_copy(server, str(image), server.uri, size, rnd)
        finally:
            stop_server(server)
    finally:
        try:
            rbdcluster.remove_image(cluster, target, size)
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # the copy's result stands
            print(f"warning: cannot remove rbd image {target}: {err}", flush=True)


def copy_out(server: Server, size: int, workdir: Path, rnd: int) -> Sample:
    out = workdir / "copy-out.img"
    out.unlink(missing_ok=True)
    try:
        sample = run_copy(server, server.uri, str(out), size, rnd)
        if sample.ok and out.stat().st_size != size:
            return Sample(rnd, False, f"copied {out.stat().st_size} bytes, expected {size}")
        return sample
    finally:
        out.unlink(missing_ok=True)


# -- summary -------------------------------------------------------------------------------

def unit_of(job: str) -> str:
    if job in COPY_JOBS:
        return "MB/s"
    return "MB/s" if next(j for j in FIO_JOBS if j.key == job).bs == "1M" else "IOPS"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(results: dict[tuple[str, str], dict[str, list[Sample]]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (job, backend), per_server in results.items():
        unit = unit_of(job)
        servers: dict[str, Any] = {}
        for name, samples in per_server.items():
            good = [s for s in samples if s.ok]
            thr = [s.iops if unit == "IOPS" else s.mbps for s in good]
            servers[name] = {
                "throughput": _median(thr), "iops": _median([s.iops for s in good]),
                "mbps": _median([s.mbps for s in good]),
                "cpu_us": _median([s.cpu_us for s in good if s.cpu_us is not None]),
                "client_cpu_us": _median([s.client_cpu_us for s in good
                                          if s.client_cpu_us is not None]),
                "foreign_cores": _median([s.foreign_cores for s in good]),
                "failures": [s.error for s in samples if not s.ok],
                "samples": [dataclasses.asdict(s) for s in samples]}
            osd = [s.osd_cpu_us for s in good if s.osd_cpu_us is not None]
            if osd:  # rbd: the OSD's share, and server + OSD
                servers[name]["osd_cpu_us"] = _median(osd)
                servers[name]["cpu_with_osd_us"] = _median(
                    [s.cpu_us + s.osd_cpu_us for s in good
                     if s.cpu_us is not None and s.osd_cpu_us is not None])
        mine = servers.get("pynbd", {})
        others = [v for k, v in servers.items() if k != "pynbd"]
        best_thr = max((v["throughput"] for v in others if v["throughput"]), default=None)
        best_cpu = min((v["cpu_us"] for v in others if v["cpu_us"]), default=None)
        row = {
            "job": job, "title": TITLES[job], "backend": backend, "unit": unit,
            "cpu_unit": "us/MiB" if job in COPY_JOBS else "us/IO", "servers": servers,
            "ratio_throughput": (mine["throughput"] / best_thr
                                 if mine.get("throughput") and best_thr else None),
            "ratio_cpu": (best_cpu / mine["cpu_us"]
                          if mine.get("cpu_us") and best_cpu else None)}
        if any("cpu_with_osd_us" in v for v in servers.values()):
            best_all = min((v["cpu_with_osd_us"] for v in others
                            if v.get("cpu_with_osd_us")), default=None)
            row["ratio_cpu_with_osd"] = (best_all / mine["cpu_with_osd_us"]
                                         if mine.get("cpu_with_osd_us") and best_all else None)
        rows.append(row)
    return rows


def _fmt_thr(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}k" if unit == "IOPS" else f"{value:.0f}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], servers: list[str]) -> str:
    head = f"{'job':<31}{'backend':<9}{'unit':<5}"
    head += "".join(f"| {name:>10} {'cpu':>7} " for name in servers)
    head += "| pynbd/best  best/pynbd cpu"
    lines = [head, "-" * len(head)]
    for row in rows:
        line = f"{row['title']:<31}{row['backend']:<9}{row['unit']:<5}"
        for name in servers:
            cell = row["servers"].get(name)
            if cell is None:
                line += f"| {'n/a':>10} {'':>7} "
                continue
            mark = ("*" if row["job"] == "nbdcopy-in" and row["backend"] == "memory"
                    and name not in HAS_MEMORY else "")
            thr = "FAIL" if cell["throughput"] is None else _fmt_thr(cell["throughput"],
                                                                      row["unit"]) + mark
            line += f"| {thr:>10} {_fmt(cell['cpu_us'], '.1f'):>7} "
        line += (f"| {_fmt(row['ratio_throughput'], '.2f'):>10} "
                 f"{_fmt(row['ratio_cpu'], '.2f'):>15}")
        lines.append(line)
    lines.append("cpu = server CPU us per I/O (fio jobs) or per MiB copied (nbdcopy); "
                 "ratios > 1 mean pynbd is faster / cheaper than the best other server.")
    noise = [x["foreign_cores"] for r in rows for x in r["servers"].values()
             if x["foreign_cores"] is not None]
    if noise:
        lines.append(f"background load (host CPU busy outside server and client, cores): "
                     f"median {statistics.median(noise):.2f}, max {max(noise):.2f} of "
                     f"{os.cpu_count()}" + ("  <- noisy host" if max(noise) > 0.25 else ""))
    if any(r["job"] == "nbdcopy-in" and r["backend"] == "memory" for r in rows):
        lines.append("nbdcopy-in targets: pynbd memory:SIZE, nbdkit memory SIZE; "
                     "* = no memory backend, fresh sparse raw file instead.")
    if any(r["backend"] == "rbd" for r in rows):
        lines.append("rbd: pynbd and qemu-nbd (--cache=none) on the same RBD image, no "
                     "--discard for either; nbdcopy-in: a fresh image per server and round; "
                     "n/a: no RBD support.")
        lines += ["", osd_table(rows, [n for n in servers if n in HAS_RBD])]
    return "\n".join(lines)


def osd_table(rows: list[dict[str, Any]], servers: list[str]) -> str:
    """rbd rows: each server's CPU, the Ceph OSD's CPU during its runs, and their sum."""
    head = f"{'rbd job':<31}{'cpu unit':<9}"
    head += "".join(f"| {name:>8} {'osd':>7} {'sum':>7} " for name in servers)
    head += "| best/pynbd sum"
    lines = [head, "-" * len(head)]
    for row in rows:
        if row["backend"] != "rbd":
            continue
        line = f"{row['title']:<31}{row['cpu_unit']:<9}"
        for name in servers:
            cell = row["servers"].get(name, {})
            line += (f"| {_fmt(cell.get('cpu_us'), '.1f'):>8} "
                     f"{_fmt(cell.get('osd_cpu_us'), '.1f'):>7} "
                     f"{_fmt(cell.get('cpu_with_osd_us'), '.1f'):>7} ")
        lines.append(line + f"| {_fmt(row.get('ratio_cpu_with_osd'), '.2f'):>14}")
    lines.append("osd = the Ceph OSD's CPU during that server's runs (librbd hands it part "
                 "of the work); sum = server + osd.")
    return "\n".join(lines)


def write_chart(rows: list[dict[str, Any]], path: Path) -> str:
    """Grouped bars of the pynbd ratios per job; returns a note for the report."""
    try:
        mpl: Any = importlib.import_module("matplotlib")
        mpl.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib not installed: no chart"
    backends = sorted({r["backend"] for r in rows})
    jobs = list(dict.fromkeys(r["job"] for r in rows))
    # (label, backend, key) per bar series; rbd's CPU also counted with the OSD's
    thr = [(b, b, "ratio_throughput") for b in backends]
    cpu = [(b, b, "ratio_cpu") for b in backends]
    if any(r.get("ratio_cpu_with_osd") for r in rows):
        cpu.append(("rbd incl. osd", "rbd", "ratio_cpu_with_osd"))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(jobs) * 1.1), 8), sharex=True)
    width = 0.8 / max(len(thr), len(cpu), 1)
    for ax, series, label in ((axes[0], thr, "throughput: pynbd / best other"),
                              (axes[1], cpu, "CPU per I/O: best other / pynbd")):
        for i, (name, backend, key) in enumerate(series):
            by_job = {r["job"]: r.get(key) for r in rows if r["backend"] == backend}
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(jobs))]
            ax.bar(xs, [by_job.get(job) or 0.0 for job in jobs], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
        ax.legend()
    axes[1].set_xticks(list(range(len(jobs))))
    axes[1].set_xticklabels(jobs)
    axes[0].set_title("pynbd vs best of the other NBD servers (>1: pynbd better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart: {path}"


def environment(servers: list[str], rbd: bool = False) -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            done = _run(cmd, 10)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"unknown ({err})"
        return ((done.stdout + done.stderr).strip().splitlines() or ["unknown"])[0]

    commands = {"pynbd": [sys.executable, "-m", "pynbd", "-V"], "qemu-nbd": ["qemu-nbd", "-V"],
                "pynbd-base": ["git", "-C", str(BASELINE), "rev-parse", "--short", "HEAD"],
                "nbdkit": ["nbdkit", "--version"], "nbd-server": ["nbd-server", "-V"],
                "fio": ["fio", "--version"], "nbdcopy": ["nbdcopy", "--version"],
                "pynbd-commit": ["git", "-C", str(Path(__file__).resolve().parent.parent),
                                 "rev-parse", "--short", "HEAD"],
                "ceph": ["ceph", "--version"]}
    wanted = {*servers, "fio", "nbdcopy", "pynbd-commit"} | ({"ceph"} if rbd else set())
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"kernel": f"{platform.release()} {platform.version()}", "cpu_model": cpu,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "versions": {k: version(v) for k, v in commands.items() if k in wanted}}


# -- main ----------------------------------------------------------------------------------

def _csv(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return [x for x in allowed if x in items]
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 round of 3 s runs")
    p.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    p.add_argument("--runtime", type=int, help="seconds per fio run (default 10, --quick 3)")
    p.add_argument("--size", type=parse_size, default=parse_size("2G"), help="image size (2G)")
    p.add_argument("--servers", type=_csv(ALL_SERVERS), default=list(ALL_SERVERS))
    p.add_argument("--backends", type=_csv(ALL_BACKENDS), default=list(DEFAULT_BACKENDS),
                   help="file,memory (default) and/or rbd (a throwaway Ceph cluster; pynbd "
                   "and qemu-nbd only)")
    p.add_argument("--jobs", type=_csv(ALL_JOBS), default=list(ALL_JOBS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tmpdir", help="where the image and sockets go (default: system temp)")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="a checkout of pynbd to run as server pynbd-base, for A/B runs "
                   "(e.g. git worktree add DIR REV; then --servers pynbd,pynbd-base)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.runtime = args.runtime or (3 if args.quick else 10)
    if args.rounds < 1 or args.runtime < 1 or args.size < 16 * MIB or args.size % MIB:
        p.error("rounds and runtime must be >= 1, size a multiple of 1M and >= 16M")
    if ("pynbd-base" in args.servers) != (args.baseline is not None):
        p.error("--baseline DIR and the server pynbd-base go together")
    if args.baseline is not None and not (args.baseline / "src" / "pynbd").is_dir():
        p.error(f"--baseline {args.baseline}: no src/pynbd there")
    return args


def plan(args: argparse.Namespace) -> tuple[dict[str, list[str]], float]:
    """Servers per backend, and the expected duration in seconds."""
    per_backend = {b: [s for s in args.servers if serves(s, b)] for b in args.backends}
    per_backend = {b: s for b, s in per_backend.items() if s}
    fio_runs = sum(len(s) for s in per_backend.values()) * sum(
        j.key in args.jobs for j in FIO_JOBS)
    copy_s = args.size / 400e6 + 2  # a guess: ~400 MB/s plus start-up
    copies = sum(len(s) for s in per_backend.values()) * ("nbdcopy-out" in args.jobs)
    copies += len(args.servers) * ("nbdcopy-in" in args.jobs and memory_copy_in(args))
    copies += len(per_backend.get("rbd", [])) * ("nbdcopy-in" in args.jobs)
    setup = args.size / 500e6 + 5 * len(args.servers)
    if "rbd" in per_backend:  # cluster start, rbd import
        setup += 10 + args.size / 300e6
    return per_backend, setup + args.rounds * (fio_runs * (args.runtime + 1.5) + copies * copy_s)


def memory_copy_in(args: argparse.Namespace) -> bool:
    """The memory-target nbdcopy-in row runs unless rbd is the only backend asked for."""
    return any(b != "rbd" for b in args.backends)


def run_round(rnd: int, args: argparse.Namespace, servers: dict[str, list[Server]],
              image: Path, workdir: Path,
              results: dict[tuple[str, str], dict[str, list[Sample]]],
              cluster: rbdcluster.Cluster | None = None) -> None:
    def record(job: str, backend: str, name: str, run: Callable[[], Sample]) -> None:
        try:
            sample = run()
        except Exception as err:  # one broken run must not lose the others
            sample = Sample(rnd, False, f"harness error: {err!r}"[:300])
        results.setdefault((job, backend), {}).setdefault(name, []).append(sample)
        cpu = "" if sample.cpu_us is None else f", cpu {sample.cpu_us:.1f}"
        iops = f"{sample.iops:,.0f} IOPS, " if sample.iops else f"{sample.seconds:.1f} s, "
        value = (f"{iops}{sample.mbps:,.0f} MB/s{cpu}" if sample.ok
                 else f"FAILED: {sample.error}")
        print(f"  r{rnd + 1} {TITLES[job]:<30} {backend:<7} {name:<10} {value}", flush=True)

    def order(group: Sequence[_S]) -> list[_S]:
        """Servers in turn, the order rotated by one each round, so that over as
        many rounds as servers each goes first once: whoever goes first meets
        colder caches (the in-memory OSD's heap, the page cache), and the first
        copy of a copy phase ran 2-3x slower in every run here, whoever made it.
        (Reversing every other round, as before, put only the first and the
        last server of the list first.)"""
        shift = rnd % len(group) if group else 0
        return [*group[shift:], *group[:shift]]

    for job in FIO_JOBS:
        if job.key in args.jobs:
            for backend, group in servers.items():
                for srv in order(group):
                    record(job.key, backend, srv.name, functools.partial(
                        run_fio, srv, job, args.runtime, args.size, rnd))
    if "nbdcopy-out" in args.jobs:
        for backend, group in servers.items():
            for srv in order(group):
                record("nbdcopy-out", backend, srv.name,
                       functools.partial(copy_out, srv, args.size, workdir, rnd))
    if "nbdcopy-in" in args.jobs and memory_copy_in(args):
        for name in order(args.servers):
            record("nbdcopy-in", "memory", name,
                   functools.partial(copy_in, name, image, args.size, workdir, rnd))
    if "nbdcopy-in" in args.jobs and cluster is not None:
        for srv in order(servers.get("rbd", [])):
            record("nbdcopy-in", "rbd", srv.name, functools.partial(
                copy_in_rbd, srv.name, cluster, image, args.size, workdir, rnd))


def start_cluster(args: argparse.Namespace, image: Path, workdir: Path,
                  stack: contextlib.ExitStack) -> rbdcluster.Cluster:
    """A throwaway Ceph cluster (stopped by ``stack``) holding a copy of ``image``."""
    root = workdir / "ceph"
    stack.callback(rbdcluster.stop, root)  # first, so that a half-started cluster stops too
    t0 = time.monotonic()
    cluster = rbdcluster.start(root, max(8 << 30, 4 * args.size))
    rbdcluster.import_image(cluster, image, RBD_IMAGE, args.size)
    if "nbdcopy-in" in args.jobs:
        # warm-up: the first copy into fresh objects grows the in-memory OSD's heap, and
        # cost whichever server went first 4-5x the OSD CPU of later copies (measured)
        rbdcluster.import_image(cluster, image, "warm-up", args.size)
        rbdcluster.remove_image(cluster, "warm-up", args.size)
    print(f"ceph cluster {cluster.conf} (osd pid {cluster.osd_pid}), image "
          f"{rbdcluster.POOL}/{RBD_IMAGE} imported in {time.monotonic() - t0:.1f} s", flush=True)
    return cluster


def start_all(args: argparse.Namespace, per_backend: dict[str, list[str]], image: Path,
              workdir: Path, stack: contextlib.ExitStack,
              cluster: rbdcluster.Cluster | None = None) -> dict[str, list[Server]]:
    servers: dict[str, list[Server]] = {}
    for backend, names in per_backend.items():
        for name in names:
            if backend == "rbd":
                assert cluster is not None
                srv = start_server(name, backend, cluster.spec(RBD_IMAGE), args.size,
                                   workdir, f"{name}-{backend}", cluster.osd_pid)
            else:
                srv = start_server(name, backend, str(image), args.size, workdir,
                                   f"{name}-{backend}")
            stack.callback(stop_server, srv)
            if backend == "memory":  # fill it, so that reads return real data
                done = _run(["nbdcopy", str(image), srv.uri], 60 + args.size / 10e6)
                if done.returncode != 0:
                    raise RuntimeError(f"cannot fill {name} memory: {done.stderr.strip()}")
            servers.setdefault(backend, []).append(srv)
            print(f"started {name:<10} {backend:<6} pid {srv.pid:<7} {srv.uri}", flush=True)
    return servers


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]],
               extra: dict[str, Any]) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"rounds": args.rounds, "runtime_s": args.runtime, "size": args.size,
              "servers": args.servers, "backends": args.backends, "jobs": args.jobs, **extra}
    doc: dict[str, Any] = {
        "config": config,
        "fio_jobs": [dataclasses.asdict(j) for j in FIO_JOBS],
        "notes": ["all servers on Unix sockets (nbd-server via unixsock in its config)",
                  "nbdcopy-in: qemu-nbd and nbd-server have no memory backend, so they "
                  "get a fresh sparse raw file",
                  "cpu_us: server CPU (utime+stime+cutime+cstime over the process tree) "
                  "per I/O for fio jobs, per MiB for nbdcopy"],
        "rows": rows}
    if "rbd" in args.backends:
        doc["config"]["rbd"] = {
            "cluster": "scripts/ceph-cluster: one mon, one memstore OSD, 127.0.0.1, pool size 1",
            "image": f"{rbdcluster.POOL}/{RBD_IMAGE}, layering only, rbd import of the file "
                     "image; every rbd server exports it",
            "nbdcopy_in": "a fresh image (layering only, same size) per server and round, "
                          "removed after the copy",
            "commands": {"pynbd": "python -m pynbd -t -e 0 -k SOCK rbd:POOL/IMAGE:conf=CONF",
                         "qemu-nbd": "qemu-nbd -f raw --cache=none -e 8 -t -k SOCK "
                                     "rbd:POOL/IMAGE:conf=CONF"},
            "discard": "neither server gets --discard (both ignore trims)"}
        doc["notes"].append("rbd: osd_cpu_us is the Ceph OSD's CPU during the run, per I/O or "
                            "per MiB; cpu_with_osd_us = cpu_us + osd_cpu_us; "
                            "ratio_cpu_with_osd compares those sums")
    path: Path = args.out / "results.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    global BASELINE
    args = parse_args(argv)
    BASELINE = args.baseline.resolve() if args.baseline is not None else None
    missing = [t for t in ("fio", "nbdcopy", "nbdinfo", *args.servers)
               if t not in ("pynbd", "pynbd-base") and shutil.which(t) is None]
    if "rbd" in args.backends:
        missing += rbdcluster.missing_requirements()
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    per_backend, expected = plan(args)
    print(f"servers per backend: {per_backend}; jobs: {','.join(args.jobs)}; "
          f"{args.rounds} round(s) x {args.runtime} s; image {args.size / MIB:.0f} MiB")
    extra: dict[str, Any] = {"loadavg_at_start": os.getloadavg(),
                             "environment": environment(args.servers,
                                                        "rbd" in args.backends)}
    print(f"expected duration: ~{expected / 60:.1f} min; load average now "
          f"{extra['loadavg_at_start'][0]:.2f}" + (" (busy host: expect noisy numbers)"
          if extra["loadavg_at_start"][0] > 0.5 else ""), flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C
    interrupted = False
    results: dict[tuple[str, str], dict[str, list[Sample]]] = {}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="nbd-bench-", dir=args.tmpdir))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        image = workdir / "image.raw"
        make_image(image, args.size)
        cluster = start_cluster(args, image, workdir, stack) if "rbd" in per_backend else None
        servers = start_all(args, per_backend, image, workdir, stack, cluster)
        try:
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
                run_round(rnd, args, servers, image, workdir, results, cluster)
                write_json(args, summarize(results), extra)  # keep what we have so far
        except KeyboardInterrupt:
            print("interrupted: reporting the samples taken so far", flush=True)
            interrupted = True
    elapsed = time.monotonic() - started
    rows = summarize(results)
    print()
    print(format_table(rows, args.servers))
    extra |= {"elapsed_s": round(elapsed, 1), "loadavg_at_end": os.getloadavg()}
    path = write_json(args, rows, extra)
    print(f"\nresults: {path}; {write_chart(rows, args.out / 'ratios.png')}"
          f"; took {elapsed / 60:.1f} min")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
