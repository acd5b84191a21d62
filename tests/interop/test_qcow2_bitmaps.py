"""Persistent dirty bitmaps of qcow2 images through ``pynbd`` and ``pynbd daemon``.

Bitmaps are made by ``qemu-img bitmap``; qemu-io writes (through qemu, which
records them, or through pynbd); ``nbdinfo --map=qemu:dirty-bitmap:NAME`` reads
them from ``pynbd -B NAME`` and from ``qemu-nbd -B NAME`` (the reference), and
``qemu-img info``/``check``/``compare`` judge the image pynbd leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
from qemu.qmp import ExecuteError
from tests.support.interop import require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import ServerFactory

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
T = 60.0
Runs = list[tuple[int, int]]


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=T, check=False)
    if check:
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done


def create(path: Path, *options: str) -> str:
    run("qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), str(SIZE))
    return str(path)


def add(image: str, name: str, *options: str) -> None:
    run("qemu-img", "bitmap", "--add", *options, image, name)


def qemu_io(target: str, *commands: str, fmt: str = "raw") -> None:
    args = [arg for command in commands for arg in ("-c", command)]
    done = run("qemu-io", "-f", fmt, *args, target)
    assert "error" not in (done.stdout + done.stderr).lower(), done


def flags(image: str) -> dict[str, list[str]]:
    done = run("qemu-img", "info", "--output=json", image)
    data = json.loads(done.stdout)["format-specific"]["data"]
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


def assert_clean(image: str, *, leaks: bool = False) -> None:
    report = json.loads(run("qemu-img", "check", "--output=json", image,
                            check=False).stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    assert leaks or report.get("leaks", 0) == 0, report


def dirty_map(uri: str, bitmap: str) -> Runs:
    """The dirty runs of ``bitmap`` as nbdinfo reads them."""
    extents = json.loads(run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}",
                             uri).stdout)
    assert sum(e["length"] for e in extents) == SIZE
    return [(e["offset"], e["length"]) for e in extents if e["type"] & 1]


def expected(writes: Runs, granularity: int) -> Runs:
    dirty = sorted({i for offset, length in writes
                    for i in range(offset // granularity,
                                   (offset + length - 1) // granularity + 1)})
    runs: Runs = []
    for i in dirty:
        if runs and sum(runs[-1]) == i * granularity:
            runs[-1] = (runs[-1][0], runs[-1][1] + granularity)
        else:
            runs.append((i * granularity, granularity))
    return runs


def io_commands(writes: Runs, seed: int) -> list[str]:
    return [f"write -P {seed + i} {offset} {length}" for i, (offset, length)
            in enumerate(writes)]


def qemu_nbd_map(image: str, bitmap: str, sock: str) -> Runs:
    """The reference: ``qemu-nbd -r -B NAME`` and nbdinfo."""
    proc = subprocess.Popen([require_tool("qemu-nbd"), "-r", "-f", "qcow2", "-t", "-B",
                             bitmap, "-k", sock, image], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + T
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        return dirty_map(f"nbd+unix:///?socket={sock}", bitmap)
    finally:
        proc.terminate()
        proc.wait(T)
        if proc.stderr is not None:
            proc.stderr.close()


FIRST = [(0, 4096), (3 * MiB + 100, 70000), (SIZE - 512, 512)]
SECOND = [(8 * MiB, 1), (9 * MiB - 1, 2)]


@pytest.mark.parametrize("options", [(), ("-o", "cluster_size=4k"),
                                     ("-o", "extended_l2=on,cluster_size=32k")],
                         ids=["default", "c4k", "extl2"])
def test_qemu_img_bitmaps_are_served_exactly(pynbd_server: ServerFactory, tmp_path: Path,
                                             options: tuple[str, ...]) -> None:
    image = create(tmp_path / "b.qcow2", *options)
    add(image, "fine", "-g", "512")
    add(image, "wide", "-g", "1M")
    add(image, "frozen", "-g", "64k")
    qemu_io(image, *io_commands(FIRST, 1), fmt="qcow2")
    run("qemu-img", "bitmap", "--disable", image, "frozen")
    qemu_io(image, *io_commands(SECOND, 9), fmt="qcow2")
    srv = pynbd_server("-r", "-f", "qcow2", "-e", "0", "-B", "fine", "-B", "wide",
                       "-B", "frozen", image)
    listing = run("nbdinfo", "--list", srv.uri).stdout
    for name in ("fine", "wide", "frozen"):
        assert f"qemu:dirty-bitmap:{name}" in listing
    for name, granularity, writes in (("fine", 512, FIRST + SECOND),
                                      ("wide", MiB, FIRST + SECOND),
                                      ("frozen", 64 * KiB, FIRST)):
        got = dirty_map(srv.uri, name)
        assert got == expected(writes, granularity), name
        assert got == qemu_nbd_map(image, name, str(tmp_path / f"q-{name}.sock"))
    assert srv.stop() == 0


def test_writes_through_pynbd_are_recorded_and_stored(pynbd_server: ServerFactory,
                                                      tmp_path: Path) -> None:
    """No -B: the image's enabled bitmap records every write of the writable export;
    after the server exits the image is clean, equal to a raw mirror, and qemu-img
    uses the bitmap."""
    image = create(tmp_path / "w.qcow2")
    add(image, "on", "-g", "64k")
    add(image, "off", "-g", "64k", "--disable")
    mirror = tmp_path / "mirror.raw"
    mirror.write_bytes(bytes(SIZE))
    qemu_io(image, *io_commands(FIRST, 1), fmt="qcow2")
    qemu_io(str(mirror), *io_commands(FIRST, 1))
    ours = [(5 * MiB, 4096), (6 * MiB + 1, 2), (7 * MiB, 300 * KiB)]
    commands = [*io_commands(ours, 20), "write -z 12M 64k", "discard 14M 1M"]
    srv = pynbd_server("-f", "qcow2", image)
    qemu_io(srv.uri, *commands)
    qemu_io(str(mirror), *commands)
    assert srv.stop() == 0
    assert flags(image) == {"on": ["auto"], "off": []}
    assert_clean(image)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, str(mirror))
    want = expected([*FIRST, *ours, (12 * MiB, 64 * KiB), (14 * MiB, MiB)], 64 * KiB)
    assert qemu_nbd_map(image, "on", str(tmp_path / "q.sock")) == want
    srv = pynbd_server("-r", "-f", "qcow2", "-B", "on", image)
    assert dirty_map(srv.uri, "on") == want
    assert srv.stop() == 0
    run("qemu-img", "bitmap", "--merge", "on", image, "off")
    run("qemu-img", "bitmap", "--remove", image, "on")
    assert flags(image) == {"off": []}
    assert qemu_nbd_map(image, "off", str(tmp_path / "q2.sock")) == want
    assert_clean(image)


def test_a_writable_export_with_b_records_its_own_writes(pynbd_server: ServerFactory,
                                                         tmp_path: Path) -> None:
    image = create(tmp_path / "x.qcow2")
    add(image, "b", "-g", "4k")
    srv = pynbd_server("-f", "qcow2", "-e", "0", "-B", "b", image)
    assert dirty_map(srv.uri, "b") == []
    qemu_io(srv.uri, "write -P 7 1M 5000")
    assert dirty_map(srv.uri, "b") == [(MiB, 8 * KiB)]
    assert srv.stop() == 0
    assert flags(image) == {"b": ["auto"]}
    assert_clean(image)


def test_a_sigkilled_writer_leaves_the_bitmap_in_use(pynbd_server: ServerFactory,
                                                     tmp_path: Path) -> None:
    image = create(tmp_path / "k.qcow2")
    add(image, "b")
    srv = pynbd_server("-f", "qcow2", image)
    qemu_io(srv.uri, "write -P 3 0 64k")  # qemu-io flushes before it exits
    srv.stop(signal.SIGKILL)
    assert flags(image) == {"b": ["in-use", "auto"]}
    assert_clean(image, leaks=True)
    for tool in ([sys.executable, "-m", "pynbd"], [require_tool("qemu-nbd")]):
        done = subprocess.run([*tool, "-r", "-f", "qcow2", "-B", "b", "-k",
                               str(tmp_path / "n.sock"), image], capture_output=True,
                              text=True, timeout=T, check=False)
        assert done.returncode != 0
        assert done.stderr.splitlines()[-1].endswith(
            ": Bitmap 'b' is inconsistent and cannot be used"), done.stderr
        if tool[0] == sys.executable:
            assert done.returncode == 2
            assert done.stderr == "pynbd: Bitmap 'b' is inconsistent and cannot be used\n"
    run("qemu-img", "bitmap", "--remove", image, "b")
    assert_clean(image, leaks=True)


def test_an_unknown_bitmap_is_refused_in_qemu_nbds_words(tmp_path: Path) -> None:
    image = create(tmp_path / "u.qcow2")
    raw = tmp_path / "u.raw"
    raw.write_bytes(bytes(MiB))
    for path, fmt in ((image, "qcow2"), (str(raw), "raw")):
        done = subprocess.run([sys.executable, "-m", "pynbd", "-r", "-f", fmt, "-B", "nope",
                               "-k", str(tmp_path / "s.sock"), str(path)],
                              capture_output=True, text=True, timeout=T, check=False)
        assert (done.returncode, done.stderr) == (2, "pynbd: Bitmap 'nope' is not found\n")
    assert flags(image) == {}


def test_virtnbdbackups_offline_command_line(tmp_path: Path) -> None:
    """The command virtnbdbackup runs for an offline backup (``-e 2`` as one argument,
    ``--fork``, ``--pid-file``, ``--bitmap=``), with pynbd in place of qemu-nbd."""
    image = create(tmp_path / "vm.qcow2")
    add(image, "virtnbdbackup.0")
    qemu_io(image, "write -P 1 2M 64k", fmt="qcow2")
    sock, pid_file = str(tmp_path / "backup.sock"), tmp_path / "nbd.pid"
    argv = [sys.executable, "-m", "pynbd", "-r", "--format=qcow2", "-x", "sda", image,
            "-k", sock, "-t", "-e 2", "--fork", "--detect-zeroes=on",
            f"--pid-file={pid_file}", "--bitmap=virtnbdbackup.0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=T, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    pid = int(pid_file.read_text())
    try:
        uri = f"nbd+unix:///sda?socket={sock}"
        assert dirty_map(uri, "virtnbdbackup.0") == [(2 * MiB, 64 * KiB)]
        assert int(run("nbdinfo", "--size", uri).stdout) == SIZE
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + T
    while pid_file.exists():
        assert time.monotonic() < deadline, "the forked server did not exit"
        time.sleep(0.05)
    assert flags(image) == {"virtnbdbackup.0": ["auto"]}


def test_daemon_persistent_bitmaps(tmp_path: Path) -> None:
    """block-dirty-bitmap-add persistent=true on a qcow2 node: stored when the daemon
    quits; -remove of a stored one takes it out of the image at once; a v2 image is
    refused in qemu's words."""
    image = create(tmp_path / "d.qcow2")
    add(image, "old")
    v2 = create(tmp_path / "v2.qcow2", "-o", "compat=0.10")
    qmp_path, sock = str(tmp_path / "q.sock"), str(tmp_path / "n.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    async def main() -> None:
        async with qmp_session(qmp_path) as client:
            for name, path in (("q", image), ("v2", v2)):
                await qmp(client, "blockdev-add", {"driver": "qcow2", "node-name": name,
                                                   "file": {"driver": "file",
                                                            "filename": path}})
            with pytest.raises(ExecuteError, match=r"^Can't make bitmap 'p' persistent in "
                               r"'v2': Cannot store dirty bitmaps in qcow2 v2 files$"):
                await qmp(client, "block-dirty-bitmap-add",
                          {"node": "v2", "name": "p", "persistent": True})
            await qmp(client, "block-dirty-bitmap-add",
                      {"node": "q", "name": "new", "persistent": True, "granularity": 4096})
            await qmp(client, "nbd-server-start",
                      {"addr": {"type": "unix", "data": {"path": sock}}})
            await qmp(client, "block-export-add", {"type": "nbd", "id": "e", "node-name": "q",
                                                   "name": "e", "writable": True})
            qemu_io(f"nbd+unix:///e?socket={sock}", "write -P 5 1M 100")
            await qmp(client, "block-dirty-bitmap-remove", {"node": "q", "name": "old"})
            info = run("qemu-img", "info", "-U", "--output=json", image).stdout
            assert "old" not in json.dumps(json.loads(info)["format-specific"])
            await qmp(client, "quit")
    try:
        deadline = time.monotonic() + T
        while not os.path.exists(qmp_path):
            assert proc.poll() is None, "the daemon exited"
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.02)
        asyncio.run(asyncio.wait_for(main(), T))
        assert proc.wait(T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert flags(image) == {"new": ["auto"]}
    assert_clean(image)
    assert qemu_nbd_map(image, "new", str(tmp_path / "r.sock")) == [(MiB, 4096)]
