"""Full and incremental backups of a disk a client keeps writing, with ``pynbd daemon``.

Each test starts a real ``pynbd daemon`` on a qcow2 disk made by qemu-img,
drives it with ``qemu.qmp``, and runs a writer: one libnbd client in a thread
writing 4 KiB blocks at random offsets through a writable export, one at a
time, each block stamped with the write's number and offset, every write
logged with when it started and when it was acknowledged.  A view of the disk
is frozen the way libvirt's pull-mode backup does it: one ``transaction`` with
``blockdev-backup`` sync=none into a qcow2 scratch image whose backing node is
the disk, ``block-dirty-bitmap-add`` of the next backup's bitmap and
``block-dirty-bitmap-disable`` of the previous one; or with ``blockdev-add``
of ``copy-before-write`` and ``snapshot-access`` nodes.  The view is exported
read-only; nbdcopy takes the full backup, and an incremental one reads only
the dirty extents of the previous bitmap (``nbdinfo --map``) and patches the
previous backup (libnbd).  Checked with qemu-img compare against a copy of the
disk taken at the freeze (the writer paused), or, while the writer never
stops, against the disk after exactly the writes acknowledged by then: one
moment, the same for the view and for the bitmaps, whose dirty granules are
exactly those written between two views.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import nbd
import pytest
from qemu.qmp import ExecuteError, QMPClient
from tests.support.interop import bounded, require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.interop.conftest import Daemon

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB
BLOCK = 4 * KiB
GRANULE = 64 * KiB
#: the first half of the disk holds a pattern before the tests; the rest is unallocated
FILLED = SIZE // 2
#: bound for the daemon to start or exit, a tool to run, an event to come
T = 30.0
#: the writer stops by itself after this long or this many writes
WRITER_SECONDS, MAX_WRITES = 120.0, 200_000


def tool(*argv: str) -> str:
    require_tool(argv[0])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=T, check=False)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


def refused(uri: str, offset: int) -> str:
    """What qemu-io says when a read of 4 KiB at ``offset`` fails."""
    done = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", f"read {offset} 4k", uri],
                          capture_output=True, text=True, timeout=T, check=False)
    assert "read 4096/4096" not in done.stdout, done.stdout
    return done.stdout + done.stderr


def identical(a: Path, b: Path) -> None:
    """qemu-img's word that two raw images hold the same data."""
    assert "Images are identical." in tool("qemu-img", "compare", "-f", "raw", "-F", "raw",
                                           str(a), str(b))


# -- the disk and its writer ------------------------------------------------------------


def initial(offset: int) -> bytes:
    """A block of the disk before any write of the writer."""
    return b"\x5a" * BLOCK if offset < FILLED else bytes(BLOCK)


def stamped(offset: int, number: int) -> bytes:
    """The block the writer's ``number``-th write (from 1) puts at ``offset``."""
    return struct.pack("<QQ", number, offset) * (BLOCK // 16)


def make_disk(path: Path) -> None:
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE))
    tool("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {FILLED}", str(path))


@dataclass
class Write:
    offset: int
    number: int
    start: float
    ack: float = float("inf")


class Writer:
    """One libnbd client writing stamped blocks at random offsets, one at a time."""

    def __init__(self, uri: str, seed: int) -> None:
        self.handle = nbd.NBD()
        bounded(self.handle.connect_uri, uri, timeout=T)
        self.log: list[Write] = []
        self.rng = random.Random(seed)
        self.error: BaseException | None = None
        self._going = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held across each write
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + WRITER_SECONDS
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if self._going.is_set() and len(self.log) < MAX_WRITES:
                        self._write()
                        continue
                self._going.wait(0.05)
        except BaseException as err:  # handed to the test thread
            self.error = err

    def _write(self) -> None:
        offset = self.rng.randrange(SIZE // BLOCK) * BLOCK
        entry = Write(offset, len(self.log) + 1, time.monotonic())
        self.log.append(entry)
        self.handle.pwrite(stamped(offset, entry.number), offset)
        entry.ack = time.monotonic()
        time.sleep(0.001)  # leave the shared cores to the daemon too

    def resume(self) -> None:
        self._going.set()

    def pause(self) -> int:
        """Stop after the write under way; the number of writes made."""
        self._going.clear()
        with self._lock:
            return len(self.log)

    def until(self, count: int) -> None:
        """Wait until at least ``count`` writes were made."""
        deadline = time.monotonic() + T
        while len(self.log) < count:
            if self.error is not None:
                raise AssertionError(f"write {len(self.log)} failed") from self.error
            assert time.monotonic() < deadline, f"the writer made {len(self.log)} writes"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()  # seen within 50 ms; a paused writer writes nothing more
        self._thread.join(T)
        assert not self._thread.is_alive(), "the writer hung"
        with contextlib.suppress(nbd.Error):
            self.handle.shutdown()
        if self.error is not None:
            raise self.error


def state(log: list[Write], count: int) -> list[int]:
    """The number of the write each block holds after the first ``count`` writes."""
    blocks = [0] * (SIZE // BLOCK)
    for entry in log[:count]:
        blocks[entry.offset // BLOCK] = entry.number
    return blocks


def image_of(blocks: list[int]) -> bytes:
    return b"".join(initial(i * BLOCK) if number == 0 else stamped(i * BLOCK, number)
                    for i, number in enumerate(blocks))


def numbers_in(image: bytes) -> list[int]:
    """The write each block of ``image`` holds (0: none); -1 for a block no write made."""
    found = []
    for i in range(SIZE // BLOCK):
        block = image[i * BLOCK:(i + 1) * BLOCK]
        number = struct.unpack_from("<Q", block)[0]
        if block == stamped(i * BLOCK, number):
            found.append(number)
        else:
            found.append(0 if block == initial(i * BLOCK) else -1)
    return found


def moment(image: bytes, log: list[Write], sent: float, replied: float) -> int:
    """The ``count`` such that ``image`` is the disk after exactly the first ``count``
    writes, and no earlier than the writes acknowledged before the freeze was sent,
    no later than those started before it was answered; fails if there is none."""
    first = sum(1 for entry in log if entry.ack < sent)
    last = sum(1 for entry in log if entry.start < replied)
    got = numbers_in(image)
    blocks = state(log, first)
    for count in range(first, last + 1):
        if blocks == got:
            return count
        if count < last:
            blocks[log[count].offset // BLOCK] = log[count].number
    wrong = [(i * BLOCK, number, blocks[i]) for i, number in enumerate(got)
             if number != blocks[i]][:5]
    raise AssertionError(f"no moment between writes {first} and {last} gives this image; "
                         f"(offset, found, expected after {last}): {wrong}")


def granules(log: list[Write], start: int, end: int) -> list[tuple[int, int]]:
    """The granule runs ``(offset, length)`` the writes ``start..end`` (0-based) touched."""
    return runs_of({entry.offset // GRANULE for entry in log[start:end]})


def runs_of(touched: set[int]) -> list[tuple[int, int]]:
    """Granule indexes as runs ``(offset, length)``."""
    runs: list[tuple[int, int]] = []
    for index in sorted(touched):
        if runs and runs[-1][0] + runs[-1][1] == index * GRANULE:
            runs[-1] = (runs[-1][0], runs[-1][1] + GRANULE)
        else:
            runs.append((index * GRANULE, GRANULE))
    return runs


def indexes(runs: list[tuple[int, int]]) -> set[int]:
    """The granules of runs ``(offset, length)``."""
    return {offset // GRANULE + i for offset, length in runs for i in range(length // GRANULE)}


# -- backups ----------------------------------------------------------------------------


def full_backup(uri: str, path: Path) -> None:
    tool("nbdcopy", uri, str(path))
    assert path.stat().st_size == SIZE


def dirty_extents(uri: str, bitmap: str) -> list[tuple[int, int]]:
    extents = json.loads(tool("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri))
    assert sum(e["length"] for e in extents) == SIZE
    return [(e["offset"], e["length"]) for e in extents if e["type"] & 1]


def incremental_backup(uri: str, bitmap: str, previous: Path, path: Path) -> int:
    """``previous`` patched with the dirty extents of ``bitmap`` read from ``uri``, as
    ``path``; the bytes read."""
    extents = dirty_extents(uri, bitmap)
    image = bytearray(previous.read_bytes())
    handle = nbd.NBD()
    bounded(handle.connect_uri, uri, timeout=T)
    try:
        for offset, length in extents:
            for pos in range(offset, offset + length, 4 * MiB):
                count = min(4 * MiB, offset + length - pos)
                image[pos:pos + count] = bounded(handle.pread, count, pos, timeout=T)
    finally:
        bounded(handle.shutdown, timeout=T)
    path.write_bytes(image)
    return sum(length for _, length in extents)


# -- QMP ------------------------------------------------------------------------------


async def fails(client: QMPClient, command: str, args: dict[str, Any]) -> str:
    with pytest.raises(ExecuteError) as info:
        await qmp(client, command, args)
    return f"{info.value.error_class}: {info.value}"


async def events_until(client: QMPClient, name: str, **data: Any) -> list[tuple[str, Any]]:
    """The events received until ``name`` with ``data`` (included)."""
    seen: list[tuple[str, Any]] = []
    async with asyncio.timeout(T):
        async for event in client.events:
            got = cast("dict[str, Any]", event.get("data", {}))
            seen.append((str(event["event"]), got))
            if event["event"] == name and all(got.get(k) == v for k, v in data.items()):
                return seen
    raise AssertionError("unreachable")


def export(export_id: str, node: str, **extra: Any) -> dict[str, Any]:
    return {"type": "nbd", "id": export_id, "node-name": node, "name": export_id, **extra}


async def setup(client: QMPClient, daemon: Daemon, disk: Path) -> None:
    """qcow2 node ``disk`` over file node ``file``, the NBD server, the writable
    export ``w``."""
    await qmp(client, "blockdev-add", {"driver": "file", "node-name": "file",
                                       "filename": str(disk)})
    await qmp(client, "blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                       "file": "file"})
    await qmp(client, "nbd-server-start", {"addr": {"type": "unix",
                                                    "data": {"path": daemon.sock}}})
    await qmp(client, "block-export-add", export("w", "disk", writable=True))


async def scratch(client: QMPClient, path: Path, name: str) -> None:
    """A qcow2 scratch image backed by ``disk``: a fleecing target (libvirt's)."""
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE))
    await qmp(client, "blockdev-add", {"driver": "qcow2", "node-name": name, "backing": "disk",
                                       "file": {"driver": "file", "filename": str(path)}})


def bitmap(kind: str, name: str) -> dict[str, Any]:
    return {"type": f"block-dirty-bitmap-{kind}", "data": {"node": "disk", "name": name}}


def backup(job: str, target: str) -> dict[str, Any]:
    return {"type": "blockdev-backup", "data": {"job-id": job, "device": "disk",
                                                "target": target, "sync": "none"}}


async def freeze(client: QMPClient, job: str, target: str, new: str,
                 old: str | None) -> tuple[float, float]:
    """The backup point: freeze ``disk`` into ``target``, start bitmap ``new``, stop
    ``old``, in one transaction; when it was sent and answered."""
    actions = [bitmap("add", new), backup(job, target)]
    if old is not None:
        actions.insert(1, bitmap("disable", old))
    sent = time.monotonic()
    assert await qmp(client, "transaction", {"actions": actions}) == {}
    return sent, time.monotonic()


async def release(client: QMPClient, job: str, target: str, export_id: str) -> None:
    """The backup is taken: the export goes, the job ends, the scratch image goes."""
    await qmp(client, "block-export-del", {"id": export_id, "mode": "hard"})
    await events_until(client, "BLOCK_EXPORT_DELETED", id=export_id)
    await qmp(client, "block-job-cancel", {"device": job})
    await events_until(client, "BLOCK_JOB_CANCELLED", device=job)
    await qmp(client, "blockdev-del", {"node-name": target})


def open_files(daemon: Daemon) -> list[str]:
    fds = f"/proc/{daemon.proc.pid}/fd"
    found = []
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"{fds}/{fd}"))
    return found


# -- the tests --------------------------------------------------------------------------


def test_full_and_incremental_backups_equal_the_disk_at_the_freeze(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    """The writer pauses at each backup point, a copy of the disk is taken, the view is
    frozen, and the writer writes on while the backup is read: the backups equal the
    copies.  The scratch image grows with the copies while the job runs, not after."""
    daemon = start()
    disk = tmp_path / "disk.qcow2"
    make_disk(disk)

    async def main() -> Writer:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            writer = Writer(daemon.uri("w"), seed=1)
            writer.resume()
            writer.until(200)
            previous: str | None = None
            frozen: list[int] = []
            for round_ in range(3):
                frozen.append(writer.pause())
                reference = tmp_path / f"reference{round_}.raw"
                full_backup(daemon.uri("w"), reference)  # the disk at the freeze
                work = tmp_path / f"scratch{round_}.qcow2"
                await scratch(client, work, f"tmp{round_}")
                await freeze(client, f"job{round_}", f"tmp{round_}", f"b{round_}", previous)
                writer.resume()
                await qmp(client, "block-export-add", export(
                    f"view{round_}", f"tmp{round_}",
                    **({"bitmaps": [previous]} if previous is not None else {})))
                writer.until(len(writer.log) + 100)  # the disk moves on under the view
                taken = tmp_path / f"backup{round_}.raw"
                view = daemon.uri(f"view{round_}")
                if previous is None:
                    full_backup(view, taken)
                else:
                    dirty = dirty_extents(view, previous)
                    assert dirty == granules(writer.log, frozen[-2], frozen[-1])  # paused
                    read = incremental_backup(view, previous, tmp_path / f"backup{round_ - 1}.raw",
                                              taken)
                    assert read == sum(length for _, length in dirty) < SIZE
                identical(taken, reference)
                jobs = await qmp(client, "query-block-jobs")
                assert [(j["device"], j["type"], j["status"]) for j in jobs] == [
                    (f"job{round_}", "backup", "running")]
                assert jobs[0]["offset"] > 0
                assert jobs[0]["offset"] % GRANULE == 0
                assert work.stat().st_size > 1 * MiB  # the copies
                await qmp(client, "block-export-del", {"id": f"view{round_}", "mode": "hard"})
                await qmp(client, "block-job-cancel", {"device": f"job{round_}"})
                await events_until(client, "BLOCK_JOB_CANCELLED", device=f"job{round_}")
                grown = work.stat().st_size
                writer.until(len(writer.log) + 50)
                assert work.stat().st_size == grown, "copies after the job ended"
                assert str(work) in open_files(daemon)
                await qmp(client, "blockdev-del", {"node-name": f"tmp{round_}"})
                assert str(work) not in open_files(daemon)
                if previous is not None:
                    await qmp(client, "block-dirty-bitmap-remove", {"node": "disk",
                                                                    "name": previous})
                previous = f"b{round_}"
            writer.pause()
            await qmp(client, "quit")
        return writer

    writer = asyncio.run(main())
    writer.stop()
    assert daemon.proc.wait(T) == 0
    tool("qemu-img", "check", "-q", str(disk))
    final = tmp_path / "final.raw"
    final.write_bytes(image_of(state(writer.log, len(writer.log))))
    tool("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(disk), str(final))


def test_backups_taken_while_a_client_writes_are_one_moment_each(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    """The writer never stops.  Each backup is the disk after exactly the writes up to
    one moment of its transaction, and the bitmap the transaction started marks
    exactly the granules written between that moment and the next backup's: no write
    between the freeze and the bitmap actions (the transaction runs them with no await
    between, on the loop that serves the writer)."""
    daemon = start()
    disk = tmp_path / "disk.qcow2"
    make_disk(disk)

    async def main() -> Writer:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            writer = Writer(daemon.uri("w"), seed=2)
            writer.resume()
            previous: str | None = None
            moments: list[int] = []
            dirty: list[tuple[int, int]] = []
            for round_ in range(4):
                writer.until(len(writer.log) + 150)
                await scratch(client, tmp_path / f"scratch{round_}.qcow2", f"tmp{round_}")
                sent, replied = await freeze(client, f"job{round_}", f"tmp{round_}",
                                             f"b{round_}", previous)
                await qmp(client, "block-export-add", export(
                    f"view{round_}", f"tmp{round_}",
                    **({"bitmaps": [previous]} if previous is not None else {})))
                view = daemon.uri(f"view{round_}")
                taken = tmp_path / f"backup{round_}.raw"
                if previous is None:
                    full_backup(view, taken)
                else:
                    dirty = dirty_extents(view, previous)
                    incremental_backup(view, previous, tmp_path / f"backup{round_ - 1}.raw",
                                       taken)
                moments.append(moment(taken.read_bytes(), writer.log, sent, replied))
                if previous is not None:
                    # every write between the two views; and beyond them only the write
                    # under way at the freeze, which a fast-path attempt marked before
                    # it and the copy-before-write hook caught after it (so it is in the
                    # next bitmap too)
                    marked = indexes(dirty)
                    assert indexes(granules(writer.log, moments[-2], moments[-1])) <= marked
                    started = sum(1 for entry in writer.log if entry.start < replied)
                    assert marked <= indexes(granules(writer.log, moments[-2], started))
                reference = tmp_path / f"reference{round_}.raw"
                reference.write_bytes(image_of(state(writer.log, moments[-1])))
                identical(taken, reference)
                await release(client, f"job{round_}", f"tmp{round_}", f"view{round_}")
                if previous is not None:
                    await qmp(client, "block-dirty-bitmap-remove", {"node": "disk",
                                                                    "name": previous})
                previous = f"b{round_}"
            assert moments == sorted(moments)
            assert moments[0] > 0
            writer.pause()
            await qmp(client, "quit")
        return writer

    writer = asyncio.run(main())
    writer.stop()
    assert daemon.proc.wait(T) == 0
    tool("qemu-img", "check", "-q", str(disk))


def test_a_read_of_the_view_holds_off_a_write_to_what_it_reads(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    """A read of an uncopied granule of the view goes to the disk (through the scratch
    image's backing node) and is held there (an injected delay); a write to that
    granule comes meanwhile: it copies the granule, then waits for the read, which
    returns the old data.  The same for a snapshot-access node.  A read held so when
    the job is cancelled fails (nothing holds off writes any more)."""
    daemon = start()
    disk = tmp_path / "disk.qcow2"
    make_disk(disk)
    old = b"\x5a" * GRANULE

    def race(view: str, offset: int) -> None:
        reader = nbd.NBD()
        bounded(reader.connect_uri, daemon.uri(view), timeout=T)
        got: list[bytes] = []
        done = threading.Thread(target=lambda: got.append(reader.pread(GRANULE, offset)),
                                daemon=True)
        started = time.monotonic()
        done.start()
        time.sleep(0.3)  # the read is held at the disk now
        tool("qemu-io", "-f", "raw", "-c", f"write -P 0x77 {offset} 4k", daemon.uri("w"))
        wrote = time.monotonic()
        done.join(T)
        assert got == [old]
        assert wrote - started > 0.9, "the write did not wait for the read"
        assert bounded(reader.pread, GRANULE, offset, timeout=T) == old  # copied now
        bounded(reader.shutdown, timeout=T)

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            await scratch(client, tmp_path / "scratch.qcow2", "tmp")
            await freeze(client, "job", "tmp", "b0", None)
            await qmp(client, "block-export-add", export("view", "tmp"))
            await qmp(client, "blockdev-add", {"driver": "memory", "node-name": "mem",
                                               "size": SIZE})
            await qmp(client, "blockdev-add", {"driver": "copy-before-write",
                                               "node-name": "cbw", "file": "disk",
                                               "target": "mem"})
            await qmp(client, "blockdev-add", {"driver": "snapshot-access",
                                               "node-name": "snap", "file": "cbw"})
            await qmp(client, "block-export-add", export("snap", "snap"))
            for view, offset in (("view", GRANULE), ("snap", 3 * GRANULE)):
                await qmp(client, "x-fault-add", {"node-name": "disk", "command": "read",
                                                  "delay": 1.2, "count": 1, "start": offset,
                                                  "end": offset + GRANULE})
                await asyncio.to_thread(race, view, offset)
            # a read under way when the job is cancelled fails: writes no longer wait
            await qmp(client, "x-fault-add", {"node-name": "disk", "command": "read",
                                              "delay": 1.0, "count": 1, "start": 7 * GRANULE,
                                              "end": 8 * GRANULE})
            reading = asyncio.create_task(asyncio.to_thread(refused, daemon.uri("view"),
                                                            7 * GRANULE))
            await asyncio.sleep(0.3)
            await qmp(client, "block-job-cancel", {"device": "job"})
            assert "Input/output error" in await reading
            await qmp(client, "quit")  # the snapshot-access node's copying still on

    asyncio.run(main())
    assert daemon.proc.wait(T) == 0
    for image in (disk, tmp_path / "scratch.qcow2"):
        tool("qemu-img", "check", "-q", str(image))
    assert tool("qemu-img", "map", "--output=json", "-f", "qcow2", "-U",
                str(tmp_path / "scratch.qcow2")).count('"data": true') == 2  # the copies


def test_a_write_in_flight_at_the_freeze_belongs_to_the_view(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    """A write recorded before the freeze but held under the disk (an injected delay at
    its file) while the transaction runs: the next bitmap does not record it, so the
    view must hold it: a read of the view made at once waits for it, and shows it."""
    daemon = start()
    disk = tmp_path / "disk.qcow2"
    make_disk(disk)
    offset = 5 * GRANULE

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            await scratch(client, tmp_path / "scratch.qcow2", "tmp")
            await qmp(client, "x-fault-add", {"node-name": "file", "command": "write",
                                              "delay": 1.0, "count": 1})
            writing = asyncio.create_task(asyncio.to_thread(
                tool, "qemu-io", "-f", "raw", "-c", f"write -P 0x66 {offset} 4k",
                daemon.uri("w")))
            await asyncio.sleep(0.4)  # the write is held at the file now
            await freeze(client, "job", "tmp", "b1", None)
            assert not writing.done()
            await qmp(client, "block-export-add", export("view", "tmp"))
            got = await asyncio.to_thread(tool, "qemu-io", "-r", "-f", "raw", "-c",
                                          f"read -P 0x66 {offset} 4k", daemon.uri("view"))
            assert "Pattern verification failed" not in got, got
            await writing
            nodes = await qmp(client, "query-named-block-nodes")
            assert [b["count"] for n in nodes if n["node-name"] == "disk"
                    for b in n["dirty-bitmaps"]] == [0]
            await qmp(client, "quit")

    asyncio.run(main())
    assert daemon.proc.wait(T) == 0


def test_copy_before_write_and_snapshot_access_nodes(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    """qemu 7.0's fleecing nodes, added with blockdev-add: a full backup of the
    snapshot-access node while the writer writes, then an incremental one through a
    copy-before-write node that copies only the previous bitmap's granules.  Deleting
    the nodes frees the copies (the in-memory target's pages)."""
    daemon = start()
    disk = tmp_path / "disk.qcow2"
    make_disk(disk)

    def memfds() -> list[int]:
        """The allocated bytes of each in-memory disk the daemon holds."""
        fds = f"/proc/{daemon.proc.pid}/fd"
        sizes = []
        for fd in os.listdir(fds):
            with contextlib.suppress(OSError):
                if os.readlink(f"{fds}/{fd}").startswith("/memfd:pynbd-memory"):
                    sizes.append(os.stat(f"{fds}/{fd}").st_blocks * 512)
        return sizes

    async def fleece(client: QMPClient, round_: int, copy: str | None) -> None:
        await qmp(client, "blockdev-add", {"driver": "memory", "node-name": f"mem{round_}",
                                           "size": SIZE})
        cbw: dict[str, Any] = {"driver": "copy-before-write", "node-name": f"cbw{round_}",
                               "file": "disk", "target": f"mem{round_}"}
        if copy is not None:
            cbw["bitmap"] = {"node": "disk", "name": copy}
        await qmp(client, "blockdev-add", cbw)
        await qmp(client, "blockdev-add", {"driver": "snapshot-access",
                                           "node-name": f"snap{round_}", "file": f"cbw{round_}"})

    async def main() -> Writer:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            writer = Writer(daemon.uri("w"), seed=3)
            writer.resume()
            writer.until(200)
            for round_, previous in enumerate((None, "b0")):
                writer.pause()
                reference = tmp_path / f"reference{round_}.raw"
                full_backup(daemon.uri("w"), reference)
                # not one transaction: the next bitmap first, the previous one stopped after
                await qmp(client, "block-dirty-bitmap-add", {"node": "disk",
                                                             "name": f"b{round_}"})
                await fleece(client, round_, previous)
                if previous is not None:
                    await qmp(client, "block-dirty-bitmap-disable", {"node": "disk",
                                                                     "name": previous})
                writer.resume()
                extra = {} if previous is None else {"bitmaps": [
                    {"node": "disk", "name": previous}]}
                await qmp(client, "block-export-add", export(f"snap{round_}",
                                                             f"snap{round_}", **extra))
                writer.until(len(writer.log) + 150)
                view, taken = daemon.uri(f"snap{round_}"), tmp_path / f"backup{round_}.raw"
                if previous is None:
                    full_backup(view, taken)
                else:
                    incremental_backup(view, previous, tmp_path / "backup0.raw", taken)
                    # outside the copy bitmap the snapshot holds nothing
                    clean = next(o for o in range(0, SIZE, GRANULE)
                                 if not any(s <= o < s + n
                                            for s, n in dirty_extents(view, previous)))
                    assert "Operation not permitted" in refused(view, clean)
                identical(taken, reference)
                held = memfds()
                assert max(held) > 256 * KiB, held  # the copies
                assert await fails(client, "blockdev-del", {"node-name": f"cbw{round_}"}) == (
                    f"GenericError: Node 'cbw{round_}' is busy: in use by node "
                    f"'snap{round_}'")
                await qmp(client, "block-export-del", {"id": f"snap{round_}", "mode": "hard"})
                await events_until(client, "BLOCK_EXPORT_DELETED", id=f"snap{round_}")
                for node in (f"snap{round_}", f"cbw{round_}", f"mem{round_}"):
                    await qmp(client, "blockdev-del", {"node-name": node})
                assert memfds() == [], "the in-memory target is still held"
            writer.pause()
            await qmp(client, "quit")
        return writer

    writer = asyncio.run(main())
    writer.stop()
    assert daemon.proc.wait(T) == 0
    tool("qemu-img", "check", "-q", str(disk))


def test_refusals_events_and_an_undone_transaction(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    daemon = start()
    disk = tmp_path / "disk.qcow2"
    make_disk(disk)
    work = tmp_path / "scratch.qcow2"

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            await scratch(client, work, "tmp")
            await qmp(client, "blockdev-add", {"driver": "memory", "node-name": "small",
                                               "size": SIZE // 2})
            await qmp(client, "block-dirty-bitmap-add", {"node": "disk", "name": "b"})
            data = {"job-id": "j", "device": "disk", "target": "tmp", "sync": "none"}
            refusals: list[tuple[dict[str, Any], str]] = [
                ({"device": "nope"}, "GenericError: Cannot find device=nope nor node-name=nope"),
                ({"target": "disk"}, "GenericError: Source and target cannot be the same"),
                ({"target": "small"},
                 "GenericError: Source and target image have different sizes"),
                ({"bitmap": "b"},
                 "GenericError: Bitmap sync mode must be given when providing a bitmap"),
                ({"bitmap": "b", "bitmap-mode": "always"},
                 "GenericError: sync mode 'none' does not produce meaningful bitmap outputs"),
                ({"bitmap": "zz", "bitmap-mode": "always"},
                 "GenericError: Bitmap 'zz' could not be found"),
                ({"bitmap-mode": "always"},
                 "GenericError: Cannot specify bitmap sync mode without a bitmap"),
                ({"sync": "incremental"},
                 "GenericError: must provide a valid bitmap name for 'incremental' sync mode"),
                ({"sync": "full"}, "GenericError: Backup sync mode 'full' is not supported: "
                 "pynbd runs pull-mode backups (sync 'none'), whose target a client copies "
                 "from"),
                ({"job-id": "0x"}, "GenericError: Invalid job ID '0x'"),
                ({"filter-node-name": "#x"}, "GenericError: Invalid node-name: '#x'"),
                ({"filter-node-name": "tmp"},
                 "GenericError: Duplicate nodes with node-name='tmp'")]
            for change, message in refusals:
                assert await fails(client, "blockdev-backup", {**data, **change}) == message
            no_id = {k: v for k, v in data.items() if k != "job-id"}
            assert await fails(client, "blockdev-backup", no_id) == (
                "GenericError: Invalid job ID ''")
            # undone with the transaction: no job, no filter, no bitmap, nothing copied
            before = work.stat().st_size
            assert await fails(client, "transaction", {"actions": [
                bitmap("add", "x"), backup("j", "tmp"), {"type": "abort", "data": {}}]}) == (
                "GenericError: Transaction aborted using Abort action")
            assert await qmp(client, "query-block-jobs") == []
            nodes = await qmp(client, "query-named-block-nodes")
            assert all(n["drv"] != "copy-before-write" for n in nodes)
            assert [b["name"] for n in nodes if n["node-name"] == "disk"
                    for b in n.get("dirty-bitmaps", [])] == ["b"]
            tool("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", daemon.uri("w"))
            assert work.stat().st_size == before
            # a job, and what it keeps busy
            assert await qmp(client, "blockdev-backup", {
                **data, "filter-node-name": "fl"}) == {}
            assert await fails(client, "blockdev-backup", {**data, "job-id": "k"}) == (
                "GenericError: Node 'tmp' is busy: block device is in use by block job: backup")
            assert await fails(client, "blockdev-del", {"node-name": "tmp"}) == (
                "GenericError: Node 'tmp' is busy: in use by node 'fl'")
            assert await fails(client, "blockdev-del", {"node-name": "fl"}) == (
                "GenericError: Node fl is not owned by the monitor")
            assert await fails(client, "blockdev-del", {"node-name": "disk"}) == (
                "GenericError: Node 'disk' is busy: in use by block export 'w', node 'tmp', "
                "node 'fl'")
            nodes = await qmp(client, "query-named-block-nodes")
            assert [(n["node-name"], n.get("backing_file")) for n in nodes
                    if n["node-name"] in ("fl", "tmp")] == [("tmp", str(disk)), ("fl", None)]
            tool("qemu-io", "-f", "raw", "-c", "write -P 2 1M 64k", daemon.uri("w"))
            assert await fails(client, "block-job-cancel", {"device": "zz"}) == (
                "DeviceNotActive: Block job 'zz' not found")
            await qmp(client, "block-job-cancel", {"device": "j"})
            events = await events_until(client, "JOB_STATUS_CHANGE", id="j", status="null")
            assert [(name, data) for name, data in events if name != "BLOCK_EXPORT_DELETED"][
                -6:] == [
                ("JOB_STATUS_CHANGE", {"id": "j", "status": "created"}),
                ("JOB_STATUS_CHANGE", {"id": "j", "status": "running"}),
                ("JOB_STATUS_CHANGE", {"id": "j", "status": "aborting"}),
                ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "j", "len": SIZE,
                                         "offset": GRANULE, "speed": 0}),
                ("JOB_STATUS_CHANGE", {"id": "j", "status": "concluded"}),
                ("JOB_STATUS_CHANGE", {"id": "j", "status": "null"})]
            assert await qmp(client, "query-block-jobs") == []
            assert await fails(client, "block-job-cancel", {"device": "j"}) == (
                "DeviceNotActive: Block job 'j' not found")
            await qmp(client, "blockdev-del", {"node-name": "tmp"})
            await qmp(client, "quit")

    asyncio.run(main())
    assert daemon.proc.wait(T) == 0
    tool("qemu-img", "check", "-q", str(work))
    tool("qemu-img", "check", "-q", str(disk))


def test_generic_job_commands_see_and_cancel_backup_jobs(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    """``query-jobs`` and ``job-cancel``, qemu's generic job commands (libvirt's newer
    backup code uses them), on the same jobs as ``query-block-jobs``."""
    daemon = start()
    disk = tmp_path / "disk.qcow2"
    make_disk(disk)

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            await scratch(client, tmp_path / "scratch.qcow2", "tmp")
            assert await qmp(client, "query-jobs") == []
            await qmp(client, "blockdev-backup", {"job-id": "j", "device": "disk",
                                                  "target": "tmp", "sync": "none"})
            tool("qemu-io", "-f", "raw", "-c", "write -P 2 1M 64k", daemon.uri("w"))
            assert await qmp(client, "query-jobs") == [
                {"id": "j", "type": "backup", "status": "running",
                 "current-progress": GRANULE, "total-progress": SIZE}]
            assert await fails(client, "job-cancel", {"id": "zz"}) == (
                "GenericError: Job not found")
            await qmp(client, "job-cancel", {"id": "j"})
            events = await events_until(client, "JOB_STATUS_CHANGE", id="j", status="null")
            assert ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "j", "len": SIZE,
                                            "offset": GRANULE, "speed": 0}) in events
            assert await qmp(client, "query-jobs") == []
            assert await qmp(client, "query-block-jobs") == []
            assert await fails(client, "job-cancel", {"id": "j"}) == (
                "GenericError: Job not found")
            await qmp(client, "blockdev-del", {"node-name": "tmp"})
            await qmp(client, "quit")

    asyncio.run(main())
    assert daemon.proc.wait(T) == 0
