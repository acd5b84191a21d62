"""The qcow2 backend's images and its writing runs, each checked with ``qemu-img check``.

Every qcow2 server gets its own copy of the raw image (``qemu-img convert -f
raw -O qcow2``: 64 KiB clusters, every cluster allocated since the image is
random data); two writers never share one qcow2 file.  Jobs h and i and
nbdcopy-in each write into a fresh empty qcow2 (``qemu-img create``) served
by a server started for that run; after the run the server is stopped, the
image must pass ``qemu-img check`` (and, after nbdcopy-in, ``qemu-img
compare`` with the raw image) or the sample fails, and the image is removed.
"""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from procs import run_cmd
from servers import start_server, stop_server
from workloads import Sample, copy_timeout, run_copy, run_fio

if TYPE_CHECKING:
    from pathlib import Path

    from servers import Server
    from workloads import FioJob

CREATE_TIMEOUT = 30.0


def copy_path(workdir: Path, name: str) -> Path:
    """The qcow2 copy of the image that server ``name`` exports for the whole run."""
    return workdir / f"image-{name}.qcow2"


def make_copy(image: Path, target: Path, size: int) -> None:
    """``target``: a fully allocated qcow2 copy of the raw ``image``, synced to disk."""
    done = run_cmd(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image),
                    str(target)], copy_timeout(size))
    if done.returncode != 0:
        raise RuntimeError(f"qemu-img convert failed: {done.stderr.strip()[-300:]}")
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)  # no write-back of the copy during the first runs
    finally:
        os.close(fd)


def create_empty(target: Path, size: int) -> None:
    """A fresh empty qcow2 image of ``size`` bytes (qemu-img's defaults)."""
    target.unlink(missing_ok=True)
    done = run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)],
                   CREATE_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"qemu-img create failed: {done.stderr.strip()[-300:]}")


def check(target: Path, size: int, raw: Path | None = None) -> str:
    """"" if ``qemu-img check`` finds ``target`` clean (no corruption, no leak) and, with
    ``raw``, ``qemu-img compare`` finds the same data as in it; else what is wrong."""
    commands = [["qemu-img", "check", "-f", "qcow2", str(target)]]
    if raw is not None:
        # -U: the file column's servers hold a lock on the raw image (no one writes it now)
        commands.append(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(raw),
                         str(target)])
    for cmd in commands:
        try:
            done = run_cmd(cmd, copy_timeout(size))
        except subprocess.TimeoutExpired:
            return f"qemu-img {cmd[1]} timed out"
        if done.returncode != 0:
            out = " ".join((done.stderr + done.stdout).split())  # the summary last
            return f"qemu-img {cmd[1]} exit {done.returncode}: {out[-300:]}"
    return ""


def _verified(sample: Sample, target: Path, size: int, raw: Path | None = None) -> Sample:
    """``sample``, failed if the image it wrote is not clean (or not ``raw``'s data)."""
    problem = check(target, size, raw if sample.ok else None)
    if problem:
        sample.ok = False
        sample.error = f"{sample.error}; {problem}" if sample.error else problem
    return sample


def run_fio_fresh(name: str, job: FioJob, runtime: int, size: int, workdir: Path,
                  rnd: int) -> Sample:
    """Run fio ``job`` against server ``name`` on a fresh empty qcow2 image, checked after."""
    target = workdir / f"fresh-{name}-{job.key}.qcow2"
    create_empty(target, size)
    try:
        server = start_server(name, "qcow2", str(target), size, workdir,
                              f"{name}-{job.key}-{rnd}")
        try:
            sample = run_fio(server, job, runtime, size, rnd)
        finally:
            stop_server(server)
        return _verified(sample, target, size)
    finally:
        target.unlink(missing_ok=True)


def copy_in_qcow2(name: str, image: Path, size: int, workdir: Path, rnd: int) -> Sample:
    """Copy the raw image into a fresh empty qcow2 served by ``name`` (an allocating copy)."""
    target = workdir / f"copy-in-{name}.qcow2"
    create_empty(target, size)
    try:
        server = start_server(name, "qcow2", str(target), size, workdir,
                              f"{name}-qcow2-in-{rnd}")
        try:
            sample = run_copy(server, str(image), server.uri, size, rnd)
        finally:
            stop_server(server)
        return _verified(sample, target, size, image)
    finally:
        target.unlink(missing_ok=True)


def check_copies(servers: list[Server], workdir: Path, size: int) -> dict[str, str]:
    """Stop the qcow2 servers and check their copies: "clean" or what is wrong, per server."""
    found: dict[str, str] = {}
    for server in servers:
        stop_server(server)
        found[server.name] = check(copy_path(workdir, server.name), size) or "clean"
    return found
