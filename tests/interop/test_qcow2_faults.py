"""Faults under a qcow2 node: its metadata writes fail, and nothing acknowledged is lost.

``pynbd --fault`` wraps the exported node, so it cannot reach the qcow2
node's own writes to its file.  ``pynbd daemon`` can: every node it makes has
an implicit fault filter, and QMP's ``x-fault-add`` on the file node "f"
under the qcow2 node "q" fails the qcow2 node's writes to its file, chosen by
byte range: the refcount block, the L1 table or an L2 table of the image
(their offsets read from the image as qemu-img made it), or its flushes.

Each test drives two libnbd clients: the request that needs the failing
metadata write gets EIO (and its connection goes on); the other client's
reads and in-place writes are untouched; once the rule is cleared the failed
request is retried and succeeds.  Then the daemon is stopped (its final flush
and close), and qemu is the oracle: ``qemu-img check`` finds no corruption
(leaked clusters are allowed) and ``qemu-img compare`` finds the image equal to
a raw mirror of every acknowledged write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
from tests.interop.test_faults import Daemon, T, bounded, errnum, nbd_client, pattern
from tests.support.interop import require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB
CLUSTER = 4 * KiB
#: guest bytes one L2 table maps (512 entries of 4 KiB clusters)
L2_SPAN = CLUSTER // 8 * CLUSTER
#: bits 9..55 of an L1 or refcount table entry: the offset
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=T, check=False)


@dataclasses.dataclass
class Layout:
    """Where qemu-img put the image's metadata (byte offsets in the file)."""

    l1_table: int
    refcount_block: int
    #: the L2 table of guest offset 0
    l2_table: int

    @classmethod
    def read(cls, image: Path) -> Layout:
        data = image.read_bytes()
        # qcow2 header: l1_table_offset at byte 40, refcount_table_offset at 48
        l1_offset, reftable_offset = struct.unpack_from(">QQ", data, 40)
        (refblock,) = struct.unpack_from(">Q", data, reftable_offset)
        (l1_entry,) = struct.unpack_from(">Q", data, l1_offset)
        return cls(l1_offset, refblock & OFFSET_MASK, l1_entry & OFFSET_MASK)


class Mirror:
    """A raw file that takes the acknowledged writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "wb") as fh:
            fh.truncate(SIZE)

    def write(self, data: bytes, offset: int) -> None:
        with open(self.path, "r+b") as fh:
            fh.seek(offset)
            fh.write(data)


@dataclasses.dataclass
class Qcow2Daemon(Daemon):
    image: Path
    layout: Layout
    mirror: Mirror


@pytest.fixture
def qcow2_daemon(tmp_path: Path) -> Iterator[Qcow2Daemon]:
    """``pynbd daemon --qmp``, to be given a qcow2 node over a file node "f": the
    image (4 KiB clusters) has 1 MiB written at offset 0 by qemu-io."""
    image = tmp_path / "disk.qcow2"
    for cmd in (("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
                 str(image), str(SIZE)),
                ("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {MiB}", str(image))):
        done = run(require_tool(cmd[0]), *cmd[1:])
        assert done.returncode == 0, done.stderr
    mirror = Mirror(tmp_path / "mirror.raw")
    mirror.write(bytes([0x11]) * MiB, 0)
    qmp_path, pid_file = tmp_path / "qmp.sock", tmp_path / "daemon.pid"
    err = open(tmp_path / "daemon.err", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "pynbd", "daemon", "--qmp", str(qmp_path),
                             "--pid-file", str(pid_file)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + T
        while not pid_file.exists():  # written once the QMP socket listens
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"daemon did not start: {(tmp_path / 'daemon.err').read_text()}")
            time.sleep(0.02)
        yield Qcow2Daemon(proc, str(qmp_path), str(tmp_path / "nbd.sock"), image,
                          Layout.read(image), mirror)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err.close()


async def serve_qcow2(client: Any, daemon: Qcow2Daemon) -> None:
    """The qcow2 node "q" over the file node "f", exported writable as "disk"."""
    assert await qmp(client, "blockdev-add", {
        "driver": "qcow2", "node-name": "q",
        "file": {"driver": "file", "node-name": "f", "filename": str(daemon.image)}}) == {}
    assert await qmp(client, "nbd-server-start", {
        "addr": {"type": "unix", "data": {"path": daemon.nbd_sock}}}) == {}
    assert await qmp(client, "block-export-add", {
        "type": "nbd", "id": "e", "node-name": "q", "name": "disk", "writable": True}) == {}


def write(h: Any, daemon: Qcow2Daemon, data: bytes, offset: int) -> int:
    """Write through libnbd; 0 or the errno; the mirror takes what was acknowledged."""
    failed = errnum(h.pwrite, data, offset)
    if not failed:
        daemon.mirror.write(data, offset)
    return failed


def stop_and_verify(daemon: Qcow2Daemon) -> None:
    """SIGTERM (the final flush and close), then qemu's view of the image: no
    corruption, and every acknowledged write there."""
    daemon.proc.terminate()
    assert daemon.proc.wait(T) == 0
    done = run(require_tool("qemu-img"), "check", "--output=json", str(daemon.image))
    report = json.loads(done.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    done = run(require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw",
               str(daemon.image), str(daemon.mirror.path))
    assert done.returncode == 0, done.stdout + done.stderr


async def add_fault(client: Any, command: str, start: int | None = None,
                    length: int = 0, **extra: Any) -> int:
    """A rule on "f" failing ``command`` with EIO (over ``[start, start + length)``)."""
    args: dict[str, Any] = {"node-name": "f", "command": command, "errno": "EIO", **extra}
    if start is not None:
        args |= {"start": start, "end": start + length}
    added = await qmp(client, "x-fault-add", args)
    return int(added["id"])


async def hits(client: Any) -> int:
    return sum(rule["hits"] for rule in await qmp(client, "x-query-faults", {"node-name": "f"}))


def untouched(b: Any, daemon: Qcow2Daemon, seed: int) -> None:
    """The other client reads and writes in place (clusters qemu-io allocated)."""
    assert bounded(b.pread, 4 * KiB, 0) == bytes([0x11]) * 4 * KiB
    assert write(b, daemon, pattern(seed, 8 * KiB), 64 * KiB + 512) == 0
    assert bounded(b.pread, 8 * KiB, 64 * KiB + 512) == pattern(seed, 8 * KiB)


def test_a_failed_refcount_update_fails_that_write_only(qcow2_daemon: Qcow2Daemon) -> None:
    """Writes that allocate clusters need the refcount block: EIO while it cannot be
    written; writes in place go on; after the rule is cleared all works."""
    d = qcow2_daemon

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await serve_qcow2(client, d)
            with nbd_client(d.uri("disk")) as a, nbd_client(d.uri("disk")) as b:
                rule = await add_fault(client, "write", d.layout.refcount_block, CLUSTER)
                data = pattern(1, 64 * KiB)
                assert write(a, d, data, 4 * MiB) == errno.EIO
                assert write(a, d, data[:512], 10 * MiB + 100) == errno.EIO
                assert await hits(client) == 2
                assert not a.aio_is_dead()
                untouched(b, d, 2)
                assert bounded(a.pread, 4 * KiB, 4 * MiB) == bytes(4 * KiB)
                await qmp(client, "x-fault-clear", {"node-name": "f", "id": rule})
                assert write(a, d, data, 4 * MiB) == 0
                assert write(a, d, data[:512], 10 * MiB + 100) == 0
                assert write(b, d, pattern(3, 300 * KiB), 12 * MiB) == 0
                bounded(a.flush)
                assert bounded(b.pread, 64 * KiB, 4 * MiB) == data

    asyncio.run(main())
    stop_and_verify(d)


def test_a_failed_l2_update_loses_no_acknowledged_write(qcow2_daemon: Qcow2Daemon) -> None:
    """A write into an unallocated cluster changes its L2 table in memory; while the
    table cannot be written back, FLUSH fails with EIO (the table stays dirty, and
    writes go on); once cleared, the next flush writes it and nothing is lost."""
    d = qcow2_daemon

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await serve_qcow2(client, d)
            with nbd_client(d.uri("disk")) as a, nbd_client(d.uri("disk")) as b:
                rule = await add_fault(client, "write", d.layout.l2_table, CLUSTER)
                data = pattern(4, 4 * KiB)
                # 1 MiB .. 2 MiB: unallocated, in the L2 table of offset 0
                assert write(a, d, data, MiB + 8 * KiB) == 0
                assert errnum(a.flush) == errno.EIO
                assert errnum(b.flush) == errno.EIO  # still dirty: tried again
                assert await hits(client) == 2
                assert not a.aio_is_dead()
                untouched(b, d, 5)
                assert write(b, d, pattern(6, 4 * KiB), 3 * L2_SPAN) == 0  # another table
                assert write(a, d, pattern(7, 4 * KiB), MiB + 64 * KiB) == 0
                await qmp(client, "x-fault-clear", {"node-name": "f", "id": rule})
                bounded(a.flush)
                assert bounded(b.pread, 4 * KiB, MiB + 8 * KiB) == data

    asyncio.run(main())
    stop_and_verify(d)


def test_a_failed_l1_update_loses_no_acknowledged_write(qcow2_daemon: Qcow2Daemon) -> None:
    """A write that needs a new L2 table: FLUSH fails with EIO while the L1 entry
    cannot be written back; once cleared, the table is reachable after a restart."""
    d = qcow2_daemon

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await serve_qcow2(client, d)
            with nbd_client(d.uri("disk")) as a, nbd_client(d.uri("disk")) as b:
                rule = await add_fault(client, "write", d.layout.l1_table, CLUSTER)
                data = pattern(8, 4 * KiB)
                assert write(a, d, data, 2 * L2_SPAN + 4 * KiB) == 0
                assert errnum(a.flush) == errno.EIO
                assert await hits(client) == 1
                assert not a.aio_is_dead()
                untouched(b, d, 9)
                assert write(b, d, pattern(10, 4 * KiB), MiB + 4 * KiB) == 0  # L2 exists
                assert write(a, d, pattern(11, 4 * KiB), 2 * L2_SPAN + 8 * KiB) == 0
                await qmp(client, "x-fault-clear", {"node-name": "f", "id": rule})
                bounded(a.flush)
                assert bounded(b.pread, 4 * KiB, 2 * L2_SPAN + 4 * KiB) == data

    asyncio.run(main())
    stop_and_verify(d)


def test_failed_flushes_of_the_file_reach_the_client_as_eio(
        qcow2_daemon: Qcow2Daemon) -> None:
    """Allocating writes need no flush of their own (their metadata is written back
    at the next FLUSH); an NBD FLUSH gets EIO while the file cannot flush, and the
    next one, once it can, makes everything durable."""
    d = qcow2_daemon

    async def main() -> None:
        async with qmp_session(d.qmp) as client:
            await serve_qcow2(client, d)
            with nbd_client(d.uri("disk")) as a, nbd_client(d.uri("disk")) as b:
                await add_fault(client, "flush", count=1)
                data = pattern(11, 16 * KiB)
                assert write(a, d, data, 5 * MiB) == 0
                assert errnum(b.flush) == errno.EIO
                untouched(b, d, 12)
                bounded(b.flush)  # count=1 is used up
                assert write(a, d, data, 5 * MiB) == 0
                rule = await add_fault(client, "flush")
                assert errnum(a.flush) == errno.EIO
                assert errnum(b.flush) == errno.EIO
                assert not a.aio_is_dead()
                await qmp(client, "x-fault-clear", {"node-name": "f", "id": rule})
                bounded(a.flush)
                assert bounded(b.pread, 16 * KiB, 5 * MiB) == data

    asyncio.run(main())
    stop_and_verify(d)
