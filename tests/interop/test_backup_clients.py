"""Incremental backup (#18) by real backup clients from outside the project.

- oVirt's imageio (PyPI ``ovirt-imageio``), through its own NBD client and the
  NBD backend its daemon serves ``/extents`` and ``/images`` from: it LISTs
  ``qemu:dirty-bitmap:`` (and takes the bitmap only when there is exactly one),
  SETs ``base:allocation``, ``qemu:allocation-depth`` and that bitmap together,
  and merges them into zero/hole and dirty/zero extents.  A ``pynbd daemon``
  exports a qcow2 node read-only with one bitmap and ``allocation-depth``; the
  extents are checked against nbdinfo's maps of the same export and against
  ``qemu-img map`` of the image, the dirty runs against what was written, and
  the data against a mirror that qemu-img compares with the image.
- virtnbdbackup (Debian's package), whose offline mode (a shut-off domain)
  starts ``qemu-nbd`` itself on the domain's disk image: here a ``qemu-nbd`` at
  the front of ``PATH`` that runs pynbd with the very same arguments.  The
  domain lives in libvirt's test driver (``test:///FILE``, built into libvirt's
  client library: no libvirtd, no hypervisor).  A full backup, writes recorded
  in a persistent qcow2 bitmap made by ``qemu-img bitmap --add``, an
  incremental backup through ``--bitmap``, then virtnbdrestore (whose
  ``qemu-nbd`` is pynbd too) and ``qemu-img compare`` with the image.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pytest
from tests.support.interop import bounded, require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
CLUSTER = 64 * KiB
#: bound for a daemon to start or exit, a tool to run, a client call
T = 30.0

#: (offset, length, zero, hole) or (offset, length, dirty, zero): imageio's two kinds
Run = tuple[int, int, bool, bool]


def tool(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         log: bool = False) -> str:
    """A tool's standard output (``log``: with its standard error after it); it must
    succeed."""
    require_tool(argv[0])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=T, check=False,
                          env=env, cwd=cwd)
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr if log else done.stdout


def write(image: Path, mirror: bytearray, *commands: str, uri: str | None = None) -> None:
    """qemu-io ``write -P BYTE OFF LEN`` / ``write -z OFF LEN`` on the image (or on an
    NBD export of it), and the same on the mirror."""
    args = [arg for command in commands for arg in ("-c", command)]
    if uri is None:
        tool("qemu-io", "-f", "qcow2", *args, str(image))
    else:
        tool("qemu-io", "-f", "raw", *args, uri)
    for command in commands:
        words = command.split()
        fill = 0 if words[1] == "-z" else int(words[2], 0)
        offset, length = (int(w) for w in words[-2:])
        mirror[offset:offset + length] = bytes([fill]) * length


def coalesce(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for run in runs:
        if out and out[-1][2:] == run[2:] and out[-1][0] + out[-1][1] == run[0]:
            out[-1] = (out[-1][0], out[-1][1] + run[1], *run[2:])
        else:
            out.append(run)
    return out


def overlay(a: list[dict[str, Any]], b: list[dict[str, Any]],
            flags: Callable[[int, int], tuple[bool, bool]]) -> list[Run]:
    """Two nbdinfo maps cut at each other's boundaries, ``flags(type_a, type_b)`` per
    piece, equal neighbours joined: the shape imageio gives its merged extents."""
    assert sum(e["length"] for e in a) == sum(e["length"] for e in b) == SIZE
    cuts = sorted({e["offset"] for e in a} | {e["offset"] for e in b} | {SIZE})

    def type_at(extents: list[dict[str, Any]], offset: int) -> int:
        return next(int(e["type"]) for e in extents
                    if e["offset"] <= offset < e["offset"] + e["length"])

    return coalesce([(start, end - start, *flags(type_at(a, start), type_at(b, start)))
                     for start, end in itertools.pairwise(cuts)])


def covering(runs: list[Run], offset: int) -> Run:
    return next(run for run in runs if run[0] <= offset < run[0] + run[1])


def nbdinfo_map(uri: str, context: str) -> list[dict[str, Any]]:
    return list(json.loads(tool("nbdinfo", "--json", f"--map={context}", uri)))


def qemu_nbd_maps(image: Path, sock: Path) -> tuple[list[dict[str, Any]],
                                                   list[dict[str, Any]]]:
    """``base:allocation`` and ``qemu:allocation-depth`` of a qcow2 image as qemu-nbd
    serves them."""
    pid = sock.with_suffix(".pid")  # written once it listens
    proc = subprocess.Popen([require_tool("qemu-nbd"), "-r", "-t", "-A", "-f", "qcow2",
                             "-k", str(sock), "--pid-file", str(pid), str(image)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + T
        while not pid.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        uri = f"nbd+unix:///?socket={sock}"
        return (nbdinfo_map(uri, "base:allocation"),
                nbdinfo_map(uri, "qemu:allocation-depth"))
    finally:
        proc.kill()
        proc.wait()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    qmp: str
    sock: str


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A ``pynbd daemon --qmp``, killed at the end if still running."""
    qmp_path, pid = str(tmp_path / "qmp.sock"), tmp_path / "daemon.pid"
    with open(tmp_path / "daemon.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path,
                                 "--pid-file", str(pid)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + T
        while not pid.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"daemon did not start: {(tmp_path / 'daemon.err').read_text()}")
            time.sleep(0.02)
        yield Daemon(proc, qmp_path, str(tmp_path / "nbd.sock"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ovirt_imageio_reads_extents_dirty_blocks_and_data(
        daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nbd_mod = pytest.importorskip(
        "ovirt_imageio._internal.nbd",
        reason="ovirt-imageio is not installed (it is in pyproject's test extra)")
    backends_nbd = pytest.importorskip("ovirt_imageio._internal.backends.nbd")
    image = tmp_path / "disk.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE))
    mirror = bytearray(SIZE)
    # before the bitmap: data, an allocated zero cluster, the rest unallocated
    write(image, mirror, "write -P 0x11 0 262144", "write -z 524288 65536")
    uri = f"nbd+unix:///r?socket={daemon.sock}"

    async def serve() -> None:
        async with qmp_session(daemon.qmp) as client:
            await qmp(client, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {
                "driver": "file", "filename": str(image)}})
            await qmp(client, "nbd-server-start", {"addr": {
                "type": "unix", "data": {"path": daemon.sock}}})
            await qmp(client, "block-dirty-bitmap-add", {"node": "q", "name": "b"})
            await qmp(client, "block-export-add", {"type": "nbd", "id": "w", "node-name": "q",
                                                   "name": "w", "writable": True})
            write(image, mirror, "write -P 0x22 65536 8192", "write -P 0x33 1048576 4096",
                  "write -z 3145728 65536", "write -P 0x44 4194303 1",
                  uri=f"nbd+unix:///w?socket={daemon.sock}")
            await qmp(client, "block-dirty-bitmap-disable", {"node": "q", "name": "b"})
            await qmp(client, "block-export-add", {
                "type": "nbd", "id": "r", "node-name": "q", "name": "r",
                "bitmaps": ["b"], "allocation-depth": True})
            # two bitmaps on another export (a bitmap goes on one export at a time):
            # imageio refuses to choose
            for name in ("c", "d"):
                await qmp(client, "block-dirty-bitmap-add", {"node": "q", "name": name,
                                                             "disabled": True})
            await qmp(client, "block-export-add", {"type": "nbd", "id": "r2", "node-name": "q",
                                                   "name": "r2", "bitmaps": ["c", "d"]})
    asyncio.run(serve())

    url = urlparse(f"nbd:unix:{daemon.sock}:exportname=r")
    client = bounded(nbd_mod.open, url, True, timeout=T)
    with backends_nbd.Backend(client, mode="r") as backend:
        assert (client.dirty_bitmap, client.has_base_allocation, client.has_allocation_depth,
                client.export_size) == ("qemu:dirty-bitmap:b", True, True, SIZE)
        zero: list[Run] = [(e.start, e.length, e.zero, e.hole)
                           for e in bounded(list, backend.extents("zero"), timeout=T)]
        dirty: list[Run] = [(e.start, e.length, e.dirty, e.zero)
                            for e in bounded(list, backend.extents("dirty"), timeout=T)]
        data = bytearray(SIZE)
        assert bounded(backend.readinto, data, timeout=T) == SIZE
        # what an incremental download reads: the dirty extents, zero ones skipped
        for offset, length, is_dirty, is_zero in dirty:
            if is_dirty and not is_zero:
                backend.seek(offset)
                piece = bytearray(length)
                assert bounded(backend.readinto, piece, timeout=T) == length
                assert piece == mirror[offset:offset + length]
            elif is_dirty:
                assert mirror[offset:offset + length] == bytes(length)
    assert data == mirror

    # the same export through libnbd's nbdinfo, merged the way imageio merges
    alloc = nbdinfo_map(uri, "base:allocation")
    assert zero == overlay(alloc, nbdinfo_map(uri, "qemu:allocation-depth"),
                           lambda a, d: (bool(a & 2), d == 0))
    assert dirty == overlay(nbdinfo_map(uri, "qemu:dirty-bitmap:b"), alloc,
                            lambda b, a: (bool(b & 1), bool(a & 2)))
    # the dirty runs are the written clusters (64 KiB granularity)
    dirty_runs = coalesce([(o, n, d, False) for o, n, d, _ in dirty])
    assert [(o, n) for o, n, d, _ in dirty_runs if d] == [
        (CLUSTER, CLUSTER), (MiB, CLUSTER), (3 * MiB, CLUSTER), (SIZE - CLUSTER, CLUSTER)]
    assert any(d and z for _, _, d, z in dirty)  # written with write -z

    # LIST of qemu:dirty-bitmap: answers both of r2's; imageio then takes none
    with caplog.at_level(logging.WARNING, logger="nbd"):
        two = bounded(nbd_mod.open, urlparse(f"nbd:unix:{daemon.sock}:exportname=r2"), True,
                      timeout=T)
    try:
        assert two.dirty_bitmap is None
        [warning] = [r.getMessage() for r in caplog.records if r.name == "nbd"]
        assert warning.startswith("Cannot use multiple dirty bitmaps"), warning
        assert all(f"'qemu:dirty-bitmap:{n}'" in warning for n in "cd"), warning
    finally:
        two.close()

    async def stop() -> None:
        async with qmp_session(daemon.qmp) as client:
            await qmp(client, "quit")
    asyncio.run(stop())
    assert daemon.proc.wait(T) == 0
    # qemu-nbd's view of the same image: the same holes (unallocated clusters), and zero
    # wherever pynbd says zero.  qemu-nbd may say zero in more places: it also asks the
    # host file, where the unwritten tail of a cluster pynbd allocated is a hole (the
    # spec lets a server report such a range as data)
    theirs = overlay(*qemu_nbd_maps(image, tmp_path / "qemu.sock"),
                     lambda a, d: (bool(a & 2), d == 0))
    for offset in sorted({run[0] for run in zero + theirs}):
        _, _, our_zero, our_hole = covering(zero, offset)
        _, _, their_zero, their_hole = covering(theirs, offset)
        assert (our_hole, our_zero or their_zero) == (their_hole, their_zero), offset
    tool("qemu-img", "check", "-q", str(image))
    (tmp_path / "mirror").write_bytes(mirror)
    tool("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image),
         str(tmp_path / "mirror"))


DOMAIN = """<node>
  <domain type="test" xmlns:test="http://libvirt.org/schemas/domain/test/1.0">
    <name>vm</name>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type="file" device="disk">
        <driver name="qemu" type="qcow2"/>
        <source file="{image}"/>
        <target dev="sda" bus="sata"/>
      </disk>
    </devices>
    <test:runstate>5</test:runstate>
  </domain>
</node>
"""
#: virtnbdbackup's name for the first checkpoint, and so for its bitmap
CHECKPOINT = "virtnbdbackup.0"


def pid_gone(pid: int) -> bool:
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def servers() -> Iterator[list[int]]:
    """Pids of the pynbd servers virtnbdbackup starts; any still running at the end is
    killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_virtnbdbackup_full_and_incremental_offline_backup_and_restore(
        tmp_path: Path, servers: list[int]) -> None:
    if "--bitmap" not in tool(sys.executable, "-m", "pynbd", "--help"):
        pytest.fail("pynbd has no -B/--bitmap: virtnbdbackup's offline incremental backup "
                    f"runs qemu-nbd --bitmap={CHECKPOINT}")
    backup, restored = tmp_path / "backup", tmp_path / "restored"
    image = tmp_path / "disk.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE))
    mirror = bytearray(SIZE)
    write(image, mirror, "write -P 0x11 0 262144", "write -P 0x22 2097152 65536")
    # the checkpoint a running domain's full backup would have made: a persistent,
    # enabled bitmap in the image that records every later write
    tool("qemu-img", "bitmap", "--add", "-f", "qcow2", str(image), CHECKPOINT)
    node = tmp_path / "node.xml"
    node.write_text(DOMAIN.format(image=image))
    uri = f"test://{node}"
    # every qemu-nbd that virtnbdbackup and virtnbdrestore start is pynbd
    shim = tmp_path / "bin"
    shim.mkdir()
    calls = tmp_path / "qemu-nbd.calls"
    (shim / "qemu-nbd").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n'
        f'exec {shlex.quote(sys.executable)} -m pynbd "$@"\n')
    (shim / "qemu-nbd").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path)}
    sock = str(tmp_path / "s")

    def backup_run(level: str, *options: str) -> None:
        log = tool("virtnbdbackup", "-U", uri, "-d", "vm", "-l", level, "-o", str(backup),
                   "-n", "-f", sock, *options, env=env, cwd=tmp_path, log=True)
        # the pid it read from the server's --pid-file; it stops the server itself
        started = re.search(r"Local NDB Service started, PID: \[(\d+)\]", log)
        assert started is not None, log
        servers.append(int(started[1]))
        assert pid_gone(servers[-1])

    # offline, "full" is a copy of the whole image, with no checkpoint of its own; its
    # extents come from libnbd's block status, the incremental's (-q) from nbdinfo --map
    backup_run("full")
    assert (backup / "sda.copy.data").exists()
    write(image, mirror, "write -P 0x33 61440 8192", "write -P 0x44 1048576 4096",
          "write -z 3145728 65536")
    # the checkpoint list that full backup would have left
    (backup / "vm.cpt").write_text(json.dumps([CHECKPOINT]))
    backup_run("inc", "-q")
    assert (backup / f"sda.inc.{CHECKPOINT}.data").exists()
    assert f"--bitmap={CHECKPOINT}" in calls.read_text()
    # pynbd left the image's bitmap as it found it (not "in-use")
    info = json.loads(tool("qemu-img", "info", "--output=json", str(image)))
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": CHECKPOINT, "granularity": CLUSTER}]
    tool("qemu-img", "check", "-q", str(image))
    # only the dirty clusters were saved: 0-128k (the 8k write straddles two clusters),
    # 1M and 3M
    saved = json.loads(tool("virtnbdrestore", "-i", str(backup), "-o", "dump",
                            "--logfile", str(tmp_path / "dump.log"), env=env, cwd=tmp_path))
    assert [(m["incremental"], m["dataSize"]) for m in saved] == [
        (False, 256 * KiB + CLUSTER), (True, 4 * CLUSTER)]

    tool("virtnbdrestore", "-U", uri, "-i", str(backup), "-o", str(restored), "-n",
         "-f", str(tmp_path / "r"), "--logfile", str(tmp_path / "restore.log"),
         env=env, cwd=tmp_path)
    assert calls.read_text().count("--discard=unmap") == 1  # the restore's server: pynbd
    tool("qemu-img", "check", "-q", str(restored / "disk.qcow2"))
    tool("qemu-img", "compare", "-q", str(restored / "disk.qcow2"), str(image))
    (tmp_path / "mirror").write_bytes(mirror)
    tool("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image),
         str(tmp_path / "mirror"))
