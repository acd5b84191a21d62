"""The benchmark's workloads: the jobs, the image, fio and nbdcopy runs and their samples.

Jobs a-i are fio runs (``--ioengine=nbd``, time based); h and i run only on
the qcow2 backend, each run on a fresh empty image (bench/qcow2jobs.py).
nbdcopy-out copies an export to a local file, nbdcopy-in the image into a
fresh export.  ``measure`` times one client run against a server and reads
the server's CPU (and the OSD's, for rbd) and the host's background load.
Every measurement starts with the host's dirty pages written back
(``quiesce``), so that a run never pays for the write-back of the one before
it, and the order of servers does not decide the write rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from typing import TYPE_CHECKING, Any

# the throwaway Ceph cluster for the rbd column (this script runs from bench/)
import rbdcluster
from procs import children_cpu_seconds, cpu_seconds, host_busy_seconds, pid_alive, run_cmd
from servers import HAS_MEMORY, Server, settle, start_server, stop_server

if TYPE_CHECKING:
    from pathlib import Path

MIB = 1 << 20
COPY_MIN_MBPS = 10.0  # nbdcopy timeout: 60 s + size at this rate
#: ``quiesce``: the host counts as quiet below this many dirty + writeback bytes
QUIET_DIRTY = 32 * MIB
QUIESCE_TIMEOUT = 60.0


def _dirty_bytes() -> int:
    """Dirty and under-writeback page-cache bytes of the whole host (/proc/meminfo)."""
    total = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Dirty", "Writeback"):
                total += int(rest.split()[0]) * 1024
    return total


def quiesce() -> None:
    """Write back the host's dirty pages (bounded wait) before a measurement starts."""
    os.sync()
    deadline = time.monotonic() + QUIESCE_TIMEOUT
    while _dirty_bytes() > QUIET_DIRTY and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclasses.dataclass(frozen=True)
class FioJob:
    key: str
    title: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    backends: tuple[str, ...] = ()  # the only backends it runs on (empty: all)
    fresh: bool = False  # each run on a fresh empty image, checked and removed after

    def runs_on(self, backend: str) -> bool:
        return not self.backends or backend in self.backends


FIO_JOBS = (
    FioJob("a", "4k randread qd1", "randread", "4k", 1),
    FioJob("b", "4k randread qd32", "randread", "4k", 32),
    FioJob("c", "4k randwrite qd32", "randwrite", "4k", 32),
    FioJob("d", "1M seq read qd8", "read", "1M", 8),
    FioJob("e", "1M seq write qd8", "write", "1M", 8),
    FioJob("f", "4k randread qd32 x4 conns", "randread", "4k", 32, 4),
    FioJob("g", "1M seq read qd8 x4 conns", "read", "1M", 8, 4),
    FioJob("h", "4k randwrite qd32 into an empty qcow2", "randwrite", "4k", 32,
           backends=("qcow2",), fresh=True),
    FioJob("i", "1M seq write qd8 into an empty qcow2", "write", "1M", 8,
           backends=("qcow2",), fresh=True),
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


def unit_of(job: str) -> str:
    if job in COPY_JOBS:
        return "MB/s"
    return "MB/s" if next(j for j in FIO_JOBS if j.key == job).bs == "1M" else "IOPS"


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


def measure(server: Server, cmd: list[str], timeout: float,
            rnd: int) -> tuple[subprocess.CompletedProcess[str] | None, Sample]:
    """Run a client against ``server``: its output (None on failure) and a timed Sample.

    ``client_cpu_s`` is the client's CPU (it is our child); ``foreign_cores`` is
    the host's busy CPU outside server, client (and OSD), averaged over the run
    (noise).  With an ``osd_pid`` the OSD's CPU is ``osd_cpu_s``.
    """
    if not pid_alive(server.pid):
        return None, Sample(rnd, False, "server not running")
    quiesce()
    osd0 = None if server.osd_pid is None else cpu_seconds(server.osd_pid)
    cpu0, host0, kids0 = cpu_seconds(server.pid), host_busy_seconds(), children_cpu_seconds()
    t0 = time.monotonic()
    try:
        done = run_cmd(cmd, timeout)
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
    done, sample = measure(server, ["nbdcopy", src, dst], copy_timeout(size), rnd)
    if done is not None:
        sample.mbps = size / sample.seconds / 1e6
        sample.cpu_us = sample.cpu_s * 1e6 / (size / MIB)
        sample.client_cpu_us = sample.client_cpu_s * 1e6 / (size / MIB)
        if sample.osd_cpu_s is not None:
            sample.osd_cpu_us = sample.osd_cpu_s * 1e6 / (size / MIB)
    return sample


def copy_timeout(size: int) -> float:
    """The bound on one copy of ``size`` bytes (nbdcopy, qemu-img convert)."""
    return 60 + size / (COPY_MIN_MBPS * 1e6)


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
