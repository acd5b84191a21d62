"""qcow2 images served by pynbd, proven with qemu's own tools as the oracle.

Images are made by ``qemu-img`` and filled by ``qemu-io``; clients are qemu-io,
qemu-img, nbdinfo, nbdcopy and libnbd.  After every test that writes, the
server is stopped (its final flush and close) and ``qemu-img check`` must find
the image clean and ``qemu-img compare`` must find it identical to a raw mirror
that received the same writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
from tests.support.interop import require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import ServerFactory

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB
TIMEOUT = 60


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=check)


def qemu_img(*args: str) -> str:
    return run(require_tool("qemu-img"), *args).stdout


def qemu_io(target: str, *commands: str, fmt: str = "raw", read_only: bool = False) -> str:
    """Run qemu-io commands on an image or an NBD URI (which is always raw)."""
    args = [require_tool("qemu-io"), *(["-r"] if read_only else []), "-f", fmt, target]
    for command in commands:
        args += ["-c", command]
    done = run(*args)
    assert "error" not in done.stdout.lower() + done.stderr.lower(), done
    return done.stdout


def create(path: Path, *options: str, size: int = SIZE) -> str:
    qemu_img("create", "-q", "-f", "qcow2", *options, str(path), str(size))
    return str(path)


def assert_clean(image: str) -> None:
    """``qemu-img check`` finds no corruption (leaked clusters are allowed)."""
    done = run(require_tool("qemu-img"), "check", "--output=json", image, check=False)
    report = json.loads(done.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report


def assert_same(image: str, mirror: str) -> None:
    done = run(require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", image, mirror,
               check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def md5(path: str) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


WRITES = (
    "write -P 0x11 0 64k",
    "write -P 0x22 1000000 300000",  # unaligned, across clusters
    "write -z 4M 1M",
    "write -P 0x33 8M 4k",
    "discard 8M 4M",  # whole clusters for every cluster size tested (trim is a hint)
    "write -P 0x44 63M 1M",  # the last cluster
    "write -z 63M 4k",
)


def test_serves_the_virtual_disk_not_the_container(pynbd_server: ServerFactory,
                                                   tmp_path: Path) -> None:
    """-f qcow2 and a probe both serve the 64 MiB disk (the container is ~200 KiB), with
    the data qemu-io wrote into the image; a probed qcow2 says nothing on stderr."""
    image = create(tmp_path / "disk.qcow2")
    qemu_io(image, "write -P 0xab 1M 64k", "write -P 0xcd 60M 1M", fmt="qcow2")
    assert os.path.getsize(image) < 4 * MiB
    for args in (["-f", "qcow2"], []):
        srv = pynbd_server(*args, "-r", image)
        size = run(require_tool("nbdinfo"), "--size", srv.uri).stdout.strip()
        assert int(size) == SIZE
        qemu_io(srv.uri, "read -P 0xab 1M 64k", "read -P 0xcd 60M 1M", "read -P 0 0 1M",
                "read -P 0 2M 1M", read_only=True)
        assert srv.stop() == 0
        assert srv.proc.stderr is not None
        assert srv.proc.stderr.read() == ""


@pytest.mark.parametrize("options", [
    (),
    ("-o", "compat=0.10"),
    ("-o", "cluster_size=4096,refcount_bits=1"),
    ("-o", "cluster_size=2M,refcount_bits=64"),
    ("-o", "extended_l2=on,cluster_size=128k"),
    ("-o", "lazy_refcounts=on"),
], ids=["default", "v2", "4k-rc1", "2M-rc64", "extended-l2", "lazy"])
def test_writes_keep_the_image_consistent(pynbd_server: ServerFactory, tmp_path: Path,
                                          options: tuple[str, ...]) -> None:
    """Writes, zeroes and discards through NBD: qemu-img check is clean afterwards and
    the image reads the same as a raw mirror given the same writes."""
    image = create(tmp_path / "disk.qcow2", *options)
    mirror = str(tmp_path / "mirror.raw")
    with open(mirror, "wb") as fh:
        fh.truncate(SIZE)
    srv = pynbd_server("-f", "qcow2", image)
    qemu_io(srv.uri, *WRITES)
    qemu_io(mirror, *WRITES)
    assert srv.stop() == 0
    assert_clean(image)
    assert_same(image, mirror)


def test_backing_chain(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    """A qcow2 over a qcow2 over a raw base, named relatively in the headers: reads
    fall through the chain, writes land in the top image only."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as fh:
        fh.truncate(SIZE)
    qemu_io(str(base), "write -P 0xb0 0 8M", "write -P 0xb1 32M 1M")
    mid = create(tmp_path / "mid.qcow2", "-b", "base.raw", "-F", "raw")
    qemu_io(mid, "write -P 0x3a 4M 1M", fmt="qcow2")
    top = create(tmp_path / "top.qcow2", "-b", "mid.qcow2", "-F", "qcow2")
    before = md5(str(base)), md5(mid)
    srv = pynbd_server(top)
    qemu_io(srv.uri, "read -P 0xb0 0 4M", "read -P 0x3a 4M 1M", "read -P 0xb0 5M 3M",
            "read -P 0xb1 32M 1M", "read -P 0 40M 1M")
    qemu_io(srv.uri, "write -P 0x77 6M 100k", "write -z 32M 4k")
    assert srv.stop() == 0
    assert (md5(str(base)), md5(mid)) == before, "a backing image was written"
    assert_clean(top)
    qemu_io(top, "read -P 0x77 6M 100k", "read -P 0xb0 7M 1M", "read -P 0 32M 4k",
            "read -P 0xb1 32772k 1020k", fmt="qcow2")


def test_nbdcopy_out_matches_qemu_img_convert(pynbd_server: ServerFactory,
                                              tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", "-o", "cluster_size=16k")
    qemu_io(image, "write -P 0x5a 0 3M", "write -P 0xa5 17M 1234567", "write -z 30M 2M",
            fmt="qcow2")
    expected = str(tmp_path / "expected.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, expected)
    srv = pynbd_server("-r", "-e", "0", image)
    copy = str(tmp_path / "copy.raw")
    run(require_tool("nbdcopy"), srv.uri, copy)
    assert srv.stop() == 0
    assert md5(copy) == md5(expected)


def test_compressed_image_reads(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    source = create(tmp_path / "source.qcow2")
    qemu_io(source, "write -P 0x61 0 2M", "write -P 0x62 10M 1M", fmt="qcow2")
    packed = str(tmp_path / "packed.qcow2")
    qemu_img("convert", "-c", "-f", "qcow2", "-O", "qcow2", source, packed)
    srv = pynbd_server("-r", packed)
    qemu_io(srv.uri, "read -P 0x61 0 2M", "read -P 0x62 10M 1M", "read -P 0 3M 1M",
            read_only=True)
    assert srv.stop() == 0


def test_checker_passes_on_a_qcow2_export(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    """Several connections writing and reading one qcow2 node: the multi-conn promise
    holds (pynbd check), and the image is clean afterwards."""
    image = create(tmp_path / "disk.qcow2")
    srv = pynbd_server("-e", "0", image)
    done = run(sys.executable, "-m", "pynbd", "check", srv.uri, "--write", "--seconds", "3",
               "--connections", "4", "--seed", "7", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout
    assert srv.stop() == 0
    assert_clean(image)


def test_daemon_qcow2_node(tmp_path: Path) -> None:
    """blockdev-add qcow2 over an inline file child, with its backing opened from the
    header; query-named-block-nodes shows the chain; a client reads through it."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as fh:
        fh.truncate(SIZE)
    qemu_io(str(base), "write -P 0xee 0 1M")
    top = create(tmp_path / "top.qcow2", "-b", str(base), "-F", "raw")
    fresh = create(tmp_path / "fresh.qcow2")
    qmp_path, nbd_path = str(tmp_path / "q.sock"), str(tmp_path / "n.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(qmp_path):
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)

        async def session() -> list[dict[str, Any]]:
            async with qmp_session(qmp_path) as client:
                await qmp(client, "blockdev-add", {
                    "driver": "qcow2", "node-name": "disk",
                    "file": {"driver": "file", "filename": top}})
                await qmp(client, "nbd-server-start",
                          {"addr": {"type": "unix", "data": {"path": nbd_path}}})
                await qmp(client, "block-export-add", {"type": "nbd", "id": "e",
                                                       "node-name": "disk"})
                # a writable qcow2 node over a named file node: every node the daemon
                # makes has an implicit fault filter over it, which must let the
                # qcow2 node grow its file
                await qmp(client, "blockdev-add", {"driver": "file", "node-name": "f",
                                                   "filename": fresh})
                await qmp(client, "blockdev-add", {"driver": "qcow2", "node-name": "w",
                                                   "file": "f"})
                await qmp(client, "block-export-add", {"type": "nbd", "id": "ew",
                                                       "node-name": "w", "writable": True})
                nodes: list[dict[str, Any]] = await qmp(client, "query-named-block-nodes")
                return nodes

        nodes = asyncio.run(session())
        disk = next(n for n in nodes if n["node-name"] == "disk")
        assert disk["drv"] == "qcow2"
        assert disk["backing_file_depth"] == 1
        assert disk["backing_file"] == str(base)
        assert disk["image"]["backing-image"]["format"] == "raw"
        assert disk["image"]["virtual-size"] == SIZE
        qemu_io(f"nbd+unix:///disk?socket={nbd_path}", "read -P 0xee 0 1M", "read -P 0 1M 1M",
                read_only=True)
        qemu_io(f"nbd+unix:///w?socket={nbd_path}", "write -P 0x9c 0 5M",
                "write -P 0x9d 40M 300k")
    finally:
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0
    assert_clean(fresh)
    qemu_io(fresh, "read -P 0x9c 0 5M", "read -P 0x9d 40M 300k", "read -P 0 6M 1M",
            fmt="qcow2", read_only=True)
