"""Durability of qcow2 images: test_durability.py's power loss and SIGKILL, on a qcow2 node.

The power-loss backend of test_durability.py holds a qcow2 image that qemu-img
made (half of its blocks already written, so writes land both in clusters qemu
allocated and in unallocated ones); a ``Qcow2Node`` over it is served to three
writing connections (writes of one block or of whole clusters, TRIM,
WRITE_ZEROES, some with FUA) and a fourth that flushes.  Crashes happen at
seeded random moments, of two kinds (one per test): only what FLUSH made
durable survives (the backend's own crash), or that plus any subset of the
blocks written since (a disk's cache wrote some back, in any order).  Each
crash image is written to a file and must pass ``qemu-img check`` (leaked
clusters allowed); a fresh ``Qcow2Node`` over it and ``qemu-img convert`` must
read the same disk, holding every write that was acknowledged and then covered
by a completed FLUSH, and every acknowledged FUA write.

Also a real ``pynbd -f qcow2`` killed with SIGKILL mid-load: the image passes
``qemu-img check`` and holds every acknowledged write.

Two bugs these loads found are pinned by small tests marked xfail (strict: they
fail the suite once fixed, to drop the mark); the loads step around them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
import zlib
from typing import TYPE_CHECKING, Any

import pytest
from tests.integration.test_durability import (
    BLOCK,
    BLOCKS,
    SIZE,
    WRITERS,
    Ledger,
    PowerLossBackend,
    tagged,
)
from tests.support.inprocess import serving
from tests.support.interop import require_tool

from pynbd.block import MemoryNode
from pynbd.block.file import FileNode
from pynbd.block.qcow2 import Qcow2Node
from pynbd.block.qcow2.header import parse_header
from pynbd.client import NBDClient

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from pynbd.block.node import Data

#: the "write id" of a TRIM or WRITE_ZEROES: the block reads as zeroes
ZEROED = 0
#: a crash may keep part of an unflushed write: the check is per sector then
SECTOR = 512
CRASHES = 24
TIMEOUT = 60


def contents(write_id: int, block: int) -> bytes:
    return bytes(BLOCK) if write_id == ZEROED else tagged(write_id, block)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def assert_no_corruption(image: Path) -> dict[str, Any]:
    """``qemu-img check`` finds no corruption (leaked clusters are allowed)."""
    done = run(require_tool("qemu-img"), "check", "-f", "qcow2", "--output=json", str(image))
    assert done.stdout, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def qemu_read(image: Path) -> bytes:
    """The virtual disk as qemu reads it (``qemu-img convert`` to raw)."""
    out = image.with_suffix(".raw")
    done = run(require_tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw",
               str(image), str(out))
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def make_image(tmp_path: Path, options: tuple[str, ...],
               initial: dict[int, int]) -> Path:
    """A qcow2 image made by qemu-img from a raw disk holding ``initial`` (block ->
    write id); the other blocks are unallocated."""
    raw = bytearray(SIZE)
    for block, write_id in initial.items():
        raw[block * BLOCK:(block + 1) * BLOCK] = tagged(write_id, block)
    source, image = tmp_path / "initial.raw", tmp_path / "disk.qcow2"
    source.write_bytes(raw)
    done = run(require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2",
               "-o", ",".join(options), str(source), str(image))
    assert done.returncode == 0, done.stderr
    return image


class ImageBackend(PowerLossBackend):
    """test_durability's power-loss backend holding an image file that grows (qcow2
    allocates at the end of it); a crash may also keep some unflushed blocks."""

    def __init__(self, image: bytes, cluster_size: int) -> None:
        # whole blocks, so that every block the backend tracks lies inside the file, and
        # whole clusters: qemu-img may end the file inside its last cluster (extended L2),
        # where Qcow2Node refuses to write (test_a_file_ending_inside_a_cluster_...)
        unit = max(BLOCK, cluster_size)
        size = -(-len(image) // unit) * unit
        super().__init__(size)
        MemoryNode.pwrite_nowait(self, image, 0)  # the starting state: durable, not dirty
        self.durable[:len(image)] = image
        #: the file size the last flush made durable
        self.durable_size = size

    async def grow(self, size: int) -> None:
        await super().grow(-(-size // BLOCK) * BLOCK)
        self.durable.extend(bytes(self.size - len(self.durable)))

    async def flush(self) -> None:
        size = self.size
        await super().flush()
        self.durable_size = max(self.durable_size, size)

    def crash_image(self) -> bytes:
        return bytes(self.durable[:self.durable_size])

    def crash_image_keeping(self, blocks: set[int], *, size: int) -> bytes:
        """What survives a power cut after the disk's cache wrote back ``blocks`` (of
        those written since the last flush, each as it is now) and ``size`` bytes."""
        image = bytearray(self.durable)
        buf = bytearray(BLOCK)
        for index in blocks & self.dirty:
            MemoryNode.pread_nowait(self, memoryview(buf), index * BLOCK)
            image[index * BLOCK:(index + 1) * BLOCK] = buf
        return bytes(image[:size])

    def reordered_crash_image(self, rng: random.Random) -> bytes:
        """A power cut after the disk's cache wrote back any subset of the blocks
        written since the last flush, and maybe the last size change."""
        kept = {index for index in self.dirty if rng.random() < 0.5}
        return self.crash_image_keeping(
            kept, size=self.size if rng.random() < 0.5 else self.durable_size)


class ZeroingLedger(Ledger):
    """test_durability's ledger, where a version may be ``ZEROED`` (TRIM, WRITE_ZEROES)
    and, after a reordered crash, an unflushed write may be torn at sector bounds."""

    def check(self, image: bytes, crash_time: int, *, torn_ok: bool = False) -> None:
        for block in range(BLOCKS):
            data = image[block * BLOCK:(block + 1) * BLOCK]
            versions = self.versions[block]
            need = self.required(block, crash_time)
            allowed = [contents(write_id, block) for write_id, _, _ in versions[max(need, 0):]]
            if need < 0:
                allowed.append(bytes(BLOCK))  # nothing durable yet: the disk's zeroes
            if data in allowed:
                continue
            held, of = int.from_bytes(data[:8], "big"), int.from_bytes(data[8:16], "big")
            lost = "nothing" if need < 0 else (
                "zeroes" if versions[need][0] == ZEROED else f"write #{versions[need][0]}")
            where = (f"block {block} (holds write #{held} to block {of}; {lost} was "
                     f"durable, crash at t={crash_time})")
            assert torn_ok, f"{where}: lost write or torn block"
            for start in range(0, BLOCK, SECTOR):
                assert any(data[start:start + SECTOR] == version[start:start + SECTOR]
                           for version in allowed), f"{where}: lost write in sector {start}"


#: qemu-img options of the images: every cluster size relation to the 4 KiB block
IMAGES = [
    ("c4k", ("cluster_size=4096",)),
    # a block is 8 clusters; new clusters come in 1 MiB batches, and the refcount table
    # (64 entries of 32 KiB at first) is moved to a larger one during the load
    ("c512-rc64", ("cluster_size=512", "refcount_bits=64")),
    # a cluster is 4 blocks: partial-cluster writes, 512-byte subclusters
    ("extl2-16k", ("cluster_size=16384", "extended_l2=on")),
    # version 2: no zero flag, WRITE_ZEROES writes zeroes
    ("v2-16k", ("compat=0.10", "cluster_size=16384")),
]


class Load:
    """Three writers on clusters of their own, one flusher, the crashes they meet."""

    def __init__(self, backend: ImageBackend, cluster_size: int, clients: list[NBDClient],
                 ledger: ZeroingLedger, *, seed: int, reordered: bool) -> None:
        self.backend = backend
        self.clients = clients
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.reordered = reordered
        self.cluster_size = cluster_size
        #: blocks per unit: a unit is whole clusters and whole blocks, one writer's
        self.unit = max(1, cluster_size // BLOCK)
        self.stop = asyncio.Event()
        self.next_id = iter(range(1000, 10**9))
        #: (crash time, image)
        self.crashes: list[tuple[int, bytes]] = []
        self.counts = {"write": 0, "trim": 0, "zero": 0, "fua": 0, "unflushed kept": 0}

    async def op(self, client: NBDClient, unit: int) -> None:
        """One request on ``unit``: a write of one block or of the whole unit, a TRIM or
        a WRITE_ZEROES of the unit, or a WRITE_ZEROES of one block in it."""
        rng, ledger = self.rng, self.ledger
        first = unit * self.unit
        blocks = list(range(first, first + self.unit))
        fua = rng.random() < 0.2
        choice = rng.random()
        if choice < 0.7:
            if choice < 0.55:
                blocks = [rng.choice(blocks)]
            ids = [next(self.next_id) for _ in blocks]
            data = b"".join(tagged(write_id, block)
                            for write_id, block in zip(ids, blocks, strict=True))
            await client.pwrite(data, blocks[0] * BLOCK, fua=fua)
            self.counts["write"] += 1
        else:
            if choice >= 0.9:
                blocks = [rng.choice(blocks)]  # zeroes inside a cluster
            ids = [ZEROED] * len(blocks)
            offset, length = blocks[0] * BLOCK, len(blocks) * BLOCK
            if choice < 0.8:
                await client.trim(offset, length, fua=fua)
                self.counts["trim"] += 1
            else:
                # NO_HOLE keeps zeroed clusters allocated; not with reordered crashes,
                # which then show a known bug (test_a_zeroed_cluster_written_again_...)
                no_hole = not self.reordered and rng.random() < 0.5
                await client.zero(offset, length, no_hole=no_hole, fua=fua)
                self.counts["zero"] += 1
        self.counts["fua"] += fua
        acked = ledger.tick()
        for write_id, block in zip(ids, blocks, strict=True):
            ledger.versions[block].append((write_id, acked, fua))

    async def writer(self, n: int) -> None:
        units = BLOCKS // self.unit
        mine = [u for u in range(units) if u % WRITERS == n]
        while not self.stop.is_set():
            batch = self.rng.sample(mine, min(3, len(mine)))
            await asyncio.gather(*(self.op(self.clients[n], unit) for unit in batch))

    async def flusher(self) -> None:
        while not self.stop.is_set():
            sent = self.ledger.tick()
            await self.clients[WRITERS].flush()
            self.ledger.flushes.append((sent, self.ledger.tick()))
            await asyncio.sleep(self.rng.random() * 0.005)

    async def crasher(self) -> None:
        for _ in range(CRASHES):
            await asyncio.sleep(self.rng.random() * 0.02)
            if self.reordered:
                self.counts["unflushed kept"] += len(self.backend.dirty)
                image = self.backend.reordered_crash_image(self.rng)
            else:
                image = self.backend.crash_image()
            self.crashes.append((self.ledger.tick(), image))
        self.stop.set()

    async def run(self) -> None:
        await asyncio.gather(*(self.writer(n) for n in range(WRITERS)), self.flusher(),
                             self.crasher())


async def read_disk(image: bytes) -> bytes:
    """The virtual disk as a fresh ``Qcow2Node`` (opened writable) reads it."""
    file = MemoryNode(len(image))
    await file.pwrite(image, 0)
    node = await Qcow2Node.open(file)
    try:
        assert node.size == SIZE
        buf = bytearray(SIZE)
        await node.pread(memoryview(buf), 0)
        return bytes(buf)
    finally:
        await node.close()
        await file.close()


def load_and_crash(tmp_path: Path, options: tuple[str, ...], *, seed: int,
                   reordered: bool) -> tuple[ImageBackend, ZeroingLedger, Load]:
    """Serve the image with half its blocks written to the writers and the flusher;
    crash ``CRASHES`` times; close the node."""
    ledger = ZeroingLedger()
    initial = {block: block + 1 for block in range(0, BLOCKS, 2)}
    for block, write_id in initial.items():
        ledger.versions[block].append((write_id, ledger.tick(), True))  # durable already
    image = make_image(tmp_path, options, initial)

    async def main() -> tuple[ImageBackend, Load]:
        data = image.read_bytes()
        backend = ImageBackend(data, parse_header(data, len(data)).cluster_size)
        node = await Qcow2Node.open(backend)
        async with serving(tmp_path, node) as (_, path):
            uri = f"nbd+unix:///?socket={path}"
            clients = [await NBDClient.connect(uri) for _ in range(WRITERS + 1)]
            load = Load(backend, node.cluster_size, clients, ledger, seed=seed,
                        reordered=reordered)
            await load.run()
            for client in clients:
                await client.close()
        await node.close()
        return backend, load

    backend, load = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    return backend, ledger, load


@pytest.mark.parametrize("reordered", [False, True], ids=["flushed", "reordered"])
@pytest.mark.parametrize(("name", "options"), IMAGES, ids=[name for name, _ in IMAGES])
def test_power_loss_keeps_flushed_and_fua_writes(tmp_path: Path, name: str,
                                                 options: tuple[str, ...],
                                                 reordered: bool) -> None:
    seed = zlib.crc32(name.encode()) + reordered
    backend, ledger, load = load_and_crash(tmp_path, options, seed=seed, reordered=reordered)
    counts = load.counts
    # the load really did what this test is about
    assert len(ledger.flushes) > 5, counts
    assert counts["write"] > 100, counts
    assert min(counts["trim"], counts["zero"]) > 5, counts
    assert counts["fua"] > 10, counts
    assert not reordered or counts["unflushed kept"] > 10, counts
    required = sum(ledger.required(b, t) >= 0 for t, _ in load.crashes for b in range(BLOCKS))
    assert required > 100
    # a request over several clusters is not atomic, nor is an unflushed write after a
    # reordered crash: then a block may mix versions, sector by sector
    torn_ok = reordered or load.cluster_size < BLOCK
    crash_file = tmp_path / "crash.qcow2"
    for crash_time, crash in load.crashes:
        crash_file.write_bytes(crash)
        assert_no_corruption(crash_file)
        ours = asyncio.run(read_disk(crash))
        assert ours == qemu_read(crash_file), \
            f"pynbd and qemu read the crash at t={crash_time} differently"
        ledger.check(ours, crash_time, torn_ok=torn_ok)
    # after the node's close, the image holds the last version of every block
    crash_file.write_bytes(backend.crash_image())
    report = assert_no_corruption(crash_file)
    assert report.get("leaks", 0) == 0, report
    final = qemu_read(crash_file)
    for block in range(BLOCKS):
        last = ledger.versions[block][-1][0] if ledger.versions[block] else ZEROED
        assert final[block * BLOCK:(block + 1) * BLOCK] == contents(last, block), block


def test_zeroing_ledger_catches_lost_trims_and_torn_sectors() -> None:
    """The extended check can fail: old data where a flushed TRIM left zeroes, and a
    torn block (allowed only after a reordered crash, and then only per sector)."""
    ledger = ZeroingLedger()
    ledger.versions[5].append((7, ledger.tick(), True))
    ledger.versions[5].append((ZEROED, ledger.tick(), True))
    image = bytearray(SIZE)
    image[5 * BLOCK:6 * BLOCK] = tagged(7, 5)
    with pytest.raises(AssertionError, match="lost write or torn"):
        ledger.check(bytes(image), ledger.tick())
    image[5 * BLOCK:6 * BLOCK] = bytes(BLOCK)
    ledger.check(bytes(image), ledger.tick())
    ledger.versions[6].append((8, ledger.tick(), True))
    ledger.versions[6].append((9, ledger.tick(), False))  # not durable: may be torn
    image[6 * BLOCK:7 * BLOCK] = tagged(8, 6)[:SECTOR] + tagged(9, 6)[SECTOR:]
    with pytest.raises(AssertionError, match="torn"):
        ledger.check(bytes(image), ledger.tick())
    ledger.check(bytes(image), ledger.tick(), torn_ok=True)
    image[6 * BLOCK + 2 * SECTOR] ^= 1  # a sector neither write made
    with pytest.raises(AssertionError, match="lost write in sector 1024"):
        ledger.check(bytes(image), ledger.tick(), torn_ok=True)


def test_a_zeroed_cluster_written_again_never_shows_its_old_data(tmp_path: Path) -> None:
    """WRITE_ZEROES with NO_HOLE keeps the cluster allocated; a later write into it
    must not let a power cut show the bytes from before the zeroing: the entry that
    clears the zero flag reaches the disk only after the new data is durable.  The
    crash is taken at every write of the flush that writes the entry back, keeping
    every block written since the last flush but the new data's."""
    image = make_image(tmp_path, ("cluster_size=4096",), {0: 1})
    data = image.read_bytes()
    backend = ImageBackend(data, BLOCK)
    crashes: list[bytes] = []

    async def main() -> None:
        node = await Qcow2Node.open(backend)
        await node.write_zeroes(0, BLOCK)  # NO_HOLE: the cluster stays allocated
        await node.flush()
        await node.pwrite(tagged(2, 0), 0)
        (piece,) = await node.walk(0, BLOCK)
        data_block = piece.host // BLOCK
        write = backend.pwrite

        async def crash_after(buf: Data, offset: int, *, fua: bool = False) -> None:
            await write(buf, offset, fua=fua)
            crashes.append(backend.crash_image_keeping(backend.dirty - {data_block},
                                                       size=backend.size))

        backend.pwrite = crash_after  # type: ignore[method-assign,assignment]
        await node.flush()  # writes the entry back
        crashes.append(backend.crash_image_keeping(set(), size=backend.size))

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert len(crashes) >= 2  # the table's write, and after the flush
    for crash in crashes:
        got = asyncio.run(read_disk(crash))[:BLOCK]
        assert got != tagged(1, 0), "the zeroed data came back"
        assert got in (bytes(BLOCK), tagged(2, 0))


def test_a_file_ending_inside_a_cluster_takes_writes_into_it(tmp_path: Path) -> None:
    last = BLOCKS - 4  # the first block of the last 16 KiB cluster
    image = make_image(tmp_path, ("cluster_size=16384", "extended_l2=on"), {last: 1})
    assert image.stat().st_size % 16384, "qemu-img ended the file on a cluster boundary"

    async def main() -> None:
        file = FileNode(str(image))
        node = await Qcow2Node.open(file)
        try:
            await node.pwrite(tagged(2, last + 1), (last + 1) * BLOCK)
        finally:
            await node.close()
            await file.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert_no_corruption(image)
    disk = qemu_read(image)
    assert disk[last * BLOCK:(last + 2) * BLOCK] == tagged(1, last) + tagged(2, last + 1)


def test_sigkill_mid_load_keeps_every_flushed_write(
        pynbd_server: Callable[..., Any], tmp_path: Path) -> None:
    """SIGKILL of ``pynbd -f qcow2`` under writes (allocating and in place), zeroes
    and flushes from three connections: the image is consistent, and every block
    holds the write it had at the last completed flush or one acknowledged (or in
    flight) after it.  (As with qemu-nbd, the L1/L2 changes of writes since the last
    flush live in the server's memory: a killed server loses those, and the
    clusters their data went to are leaks.)"""
    image = tmp_path / "disk.qcow2"
    done = run(require_tool("qemu-img"), "create", "-q", "-f", "qcow2",
               "-o", "cluster_size=4096", str(image), str(SIZE))
    assert done.returncode == 0, done.stderr
    srv = pynbd_server("-f", "qcow2", "-e", "0", str(image))
    #: per block: the write ids acknowledged, in order (ZEROED for zeroes)
    history: dict[int, list[int]] = {block: [] for block in range(BLOCKS)}
    #: per block: how many of its acknowledged writes a completed flush covers
    floor: dict[int, int] = dict.fromkeys(range(BLOCKS), 0)
    #: per writer: (block, write id) of the request it is waiting for
    in_flight: dict[int, tuple[int, int]] = {}
    flushes = 0

    async def load() -> None:
        nonlocal flushes
        clients = [await NBDClient.connect(srv.uri) for _ in range(WRITERS)]
        write_ids = iter(range(1, 10**9))

        async def writer(n: int) -> None:
            nonlocal flushes
            client = clients[n]
            mine = [b for b in range(BLOCKS) if b % WRITERS == n]
            rng = random.Random(n)
            try:
                for round_ in range(10**6):
                    if rng.random() < 0.05:
                        covered = {b: len(h) for b, h in history.items()}
                        await client.flush()
                        for b, count in covered.items():
                            floor[b] = max(floor[b], count)
                        flushes += 1
                        continue
                    block = mine[round_ % len(mine)]
                    write_id = ZEROED if rng.random() < 0.15 else next(write_ids)
                    in_flight[n] = (block, write_id)
                    if write_id == ZEROED:
                        await client.zero(block * BLOCK, BLOCK, no_hole=rng.random() < 0.5)
                    else:
                        await client.pwrite(tagged(write_id, block), block * BLOCK)
                    history[block].append(write_id)
                    del in_flight[n]
            except Exception:  # the server was killed under us
                return

        async def killer() -> None:
            await asyncio.sleep(0.5)
            os.kill(srv.proc.pid, signal.SIGKILL)

        await asyncio.gather(*(writer(n) for n in range(WRITERS)), killer())

    asyncio.run(asyncio.wait_for(load(), TIMEOUT))
    srv.proc.wait(10)
    time.sleep(0.1)
    assert sum(map(len, history.values())) > BLOCKS // 2
    assert flushes > 2
    assert_no_corruption(image)
    data = qemu_read(image)
    for block in range(BLOCKS):
        got = data[block * BLOCK:(block + 1) * BLOCK]
        done_ids = history[block]
        need = floor[block]
        allowed = [contents(w, block) for w in done_ids[max(need - 1, 0):]]
        if need == 0:
            allowed.append(bytes(BLOCK))  # nothing flushed yet: the image's zeroes
        allowed += [contents(w, block) for b, w in in_flight.values() if b == block]
        assert got in allowed, (f"block {block} lost write #{done_ids[need - 1]}, "
                                f"flushed before the kill")
