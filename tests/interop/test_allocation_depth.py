"""``-A``: the ``qemu:allocation-depth`` metadata context, with qemu-nbd as the oracle.

The same images are served by ``qemu-nbd -A`` and ``pynbd -A`` side by side;
``nbdinfo --map`` of both contexts must print the same maps, and LIST must
offer the same contexts.  The daemon's ``block-export-add`` takes the same
switch (``allocation-depth``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
from tests.support.interop import require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.conftest import ServerFactory

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 16 * MiB
LIMIT = 30.0


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
    return done.stdout


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    args = [require_tool("qemu-io"), "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, str(image))


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base.qcow2 <- mid.qcow2 <- top.qcow2, each layer holding different parts, with
    zero clusters, ranges no layer holds, and a base shorter than the top (past
    its end, qemu counts its zeroes as the base's own).  Also a sparse raw image,
    raw.img, with data and holes."""
    require_tool("qemu-img")
    raw = tmp_path / "raw.img"
    with open(raw, "wb") as fh:
        fh.truncate(SIZE)
    qemu_io(raw, "raw", "write -P 0x11 0 2M", "write -P 0x12 6M 1M")
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE // 2))
    qemu_io(base, "qcow2", "write -P 0x11 0 2M", "write -P 0x12 6M 1M")
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid),
        str(SIZE))
    qemu_io(mid, "qcow2", "write -P 0x21 1M 2M", "write -z 5M 1M", "write -P 0x22 9M 1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
        "-b", str(mid), "-F", "qcow2", str(top), str(SIZE))
    qemu_io(top, "qcow2", "write -P 0x31 1536K 64K", "write -z 9M 8K",
            "write -P 0x32 15M 4K", "write -P 0x33 12M 100K")
    return top


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[object]:
    """Factory: ``qemu_nbd(*args)`` serves with qemu-nbd on a Unix socket; its URI."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        path = str(tmp_path / f"qemu{len(procs)}.sock")
        proc = subprocess.Popen([require_tool("qemu-nbd"), "-t", "-k", path, *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        deadline = time.monotonic() + LIMIT
        while True:
            assert proc.poll() is None, f"qemu-nbd exited: {proc.returncode}"
            assert time.monotonic() < deadline, "qemu-nbd did not listen"
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(path)
                    probe.recv(18)
                break
            except OSError:
                time.sleep(0.05)
        return f"nbd+unix:///?socket={path}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(LIMIT)
        if proc.stderr is not None:
            proc.stderr.close()


def nbd_map(uri: str, context: str) -> str:
    return run(require_tool("nbdinfo"), f"--map={context}", uri)


def contexts(uri: str) -> list[str]:
    out = run(require_tool("nbdinfo"), uri)  # one export's "contexts:" section
    return sorted(line.strip() for line in out.splitlines()
                  if line.strip().startswith(("base:", "qemu:")))


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_maps_match_qemu_nbd(pynbd_server: ServerFactory, qemu_nbd: object, chain: Path,
                             fmt: str) -> None:
    image = chain if fmt == "qcow2" else chain.parent / "raw.img"
    theirs = qemu_nbd("-r", "-A", "-f", fmt, str(image))  # type: ignore[operator]
    ours = pynbd_server("-r", "-A", "-f", fmt, str(image)).uri
    depth_map = nbd_map(ours, "qemu:allocation-depth")
    assert depth_map == nbd_map(theirs, "qemu:allocation-depth")
    assert nbd_map(ours, "base:allocation") == nbd_map(theirs, "base:allocation")
    assert contexts(ours) == contexts(theirs) == ["base:allocation", "qemu:allocation-depth"]
    if fmt == "qcow2":  # every depth of the chain shows up, and unallocated (0)
        depths = {line.split()[2] for line in depth_map.splitlines()}
        assert depths == {"0", "1", "2", "3"}


def test_without_a_offers_only_base_allocation(pynbd_server: ServerFactory,
                                                chain: Path) -> None:
    ours = pynbd_server("-r", str(chain)).uri
    assert contexts(ours) == ["base:allocation"]
    done = subprocess.run([require_tool("nbdinfo"), "--map=qemu:allocation-depth", ours],
                          capture_output=True, text=True, timeout=LIMIT, check=False)
    assert done.returncode != 0  # the context is not there to select


def test_writes_change_the_depth(pynbd_server: ServerFactory, chain: Path) -> None:
    """A write through the export allocates in the top layer: depth 1 there after."""
    srv = pynbd_server("-A", str(chain))
    run(require_tool("qemu-io"), "-f", "raw", srv.uri, "-c", "write -P 0x44 14M 64K")
    lines = nbd_map(srv.uri, "qemu:allocation-depth").splitlines()
    assert any(line.split()[:3] == [str(14 * MiB), str(64 * 1024), "1"] for line in lines)
    assert srv.stop() == 0
    assert run("qemu-img", "check", "-q", str(chain)) == ""


def test_daemon_block_export_add_allocation_depth(tmp_path: Path, chain: Path) -> None:
    qmp_path, nbd_path = str(tmp_path / "q.sock"), str(tmp_path / "n.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + LIMIT
        while not os.path.exists(qmp_path):
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)

        async def session() -> None:
            async with qmp_session(qmp_path) as client:
                await qmp(client, "blockdev-add", {
                    "driver": "qcow2", "node-name": "disk", "read-only": True,
                    "file": {"driver": "file", "filename": str(chain), "read-only": True}})
                await qmp(client, "nbd-server-start",
                          {"addr": {"type": "unix", "data": {"path": nbd_path}}})
                await qmp(client, "block-export-add", {"type": "nbd", "id": "a",
                                                       "node-name": "disk", "name": "a",
                                                       "allocation-depth": True})
                await qmp(client, "block-export-add", {"type": "nbd", "id": "b",
                                                       "node-name": "disk", "name": "b"})

        asyncio.run(session())
        with_depth = f"nbd+unix:///a?socket={nbd_path}"
        assert contexts(with_depth) == ["base:allocation", "qemu:allocation-depth"]
        assert contexts(f"nbd+unix:///b?socket={nbd_path}") == ["base:allocation"]
        depths = {line.split()[2] for line in
                  nbd_map(with_depth, "qemu:allocation-depth").splitlines()}
        assert depths == {"0", "1", "2", "3"}
    finally:
        proc.terminate()
        proc.wait(LIMIT)
        if proc.stderr is not None:
            proc.stderr.close()
