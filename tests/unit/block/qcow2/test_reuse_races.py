"""Reuse of freed clusters under races and power cuts (see ``test_reuse``): a request
in flight keeps the clusters it looked up from reuse, so no read ever returns
another offset's data; a power cut at any point of a run that frees, punches and
reuses clusters leaves no corruption and no offset reading another's words."""

from __future__ import annotations

import asyncio
import contextvars
import random
from typing import TYPE_CHECKING

import pytest
from tests.unit.block.qcow2.images import (
    assert_clean,
    close_node,
    create,
    needs_qemu,
    same_as_raw,
    to_raw,
)
from tests.unit.block.qcow2.test_reuse import foreign, opened, stamp, write_raw
from tests.unit.block.support import read, run

from pynbd.block.file import FileNode
from pynbd.block.filter import FilterNode

if TYPE_CHECKING:
    import pathlib

    from pynbd.block.node import Data
    from pynbd.block.qcow2 import Qcow2Node

KIB, MIB = 1024, 1 << 20


# -- races: reads and in-place writes against trims and reuse ------------------------

class GatedFile(FilterNode):
    """Holds the first read or write that touches ``armed`` until ``gate`` is set."""

    def __init__(self, child: FileNode) -> None:
        super().__init__(child)
        self.file = child
        self.armed: tuple[int, int] | None = None
        self.gate = asyncio.Event()
        self.reached = asyncio.Event()

    async def _hold(self, offset: int, length: int) -> None:
        armed = self.armed
        if armed is not None and offset < armed[1] and armed[0] < offset + length:
            self.armed = None
            self.reached.set()
            await self.gate.wait()

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._hold(offset, len(buf))
        await self.child.pread(buf, offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self._hold(offset, len(memoryview(data)))
        await self.child.pwrite(data, offset, fua=fua)

    async def grow(self, size: int) -> None:
        await self.file.grow(size)
        self.size = self.file.size


async def _host_of(node: Qcow2Node, offset: int) -> int:
    pieces = await node.walk(offset, 1)
    assert pieces[0].host, pieces
    return pieces[0].host


async def _drain_spare(node: Qcow2Node, mirror: bytearray, start: int) -> int:
    """Write new clusters from ``start`` until no reserved cluster is spare (the next
    allocation then searches the refcounts); the next free guest offset."""
    cluster = node.cluster_size
    while node._spare:
        data = stamp(start, cluster, 9)
        await node.pwrite(data, start)
        mirror[start:start + cluster] = data
        start += cluster
    return start


@pytest.mark.parametrize("racer", ["read", "write"])
@needs_qemu
def test_a_request_in_flight_keeps_its_cluster_from_reuse(tmp_path: pathlib.Path,
                                                          racer: str) -> None:
    """A read (or an in-place write) looks a cluster up, then waits in the file; the
    cluster's offset is trimmed and flushed, and a write to another offset needs a
    cluster.  It must not get that one while the request is in flight: the read
    would return the other offset's data, the late write would overwrite it."""
    size = 4 * MIB
    image = create(tmp_path / "g.qcow2", size)
    mirror = bytearray(size)

    async def body() -> None:
        file = GatedFile(FileNode(str(image), discard=True))
        node = await opened(image, file=file)
        cluster = node.cluster_size
        first = stamp(0, cluster, 1)
        await node.pwrite(first, 0)
        mirror[:cluster] = first
        await node.flush()
        host = await _host_of(node, 0)
        other = await _drain_spare(node, mirror, cluster)
        file.armed = (host, host + cluster)
        buf = bytearray(cluster)
        late = stamp(0, cluster, 2)
        racing = asyncio.ensure_future(
            node.pread(memoryview(buf), 0) if racer == "read" else node.pwrite(late, 0))
        await asyncio.wait_for(file.reached.wait(), 10)
        await node.trim(0, cluster)
        mirror[:cluster] = bytes(cluster)
        await node.flush()
        second = stamp(other, cluster, 3)
        await node.pwrite(second, other)
        mirror[other:other + cluster] = second
        assert await _host_of(node, other) != host
        file.gate.set()
        await asyncio.wait_for(racing, 10)
        if racer == "read":
            assert bytes(buf) in (first, bytes(cluster))
        assert await read(node, other, cluster) == second
        await node.flush()  # the request is over: now the cluster is free
        assert await node.refcounts.get(host // cluster) == 0
        await close_node(node)

    run(body())
    assert_clean(image)
    assert same_as_raw(image, write_raw(tmp_path / "mirror.raw", mirror))


#: set in the racing readers' tasks: their reads of the file are slow
SLOW_READS = contextvars.ContextVar("SLOW_READS", default=False)


class JitterFile(FilterNode):
    """Every call first yields to the other tasks a random number of times; the
    racing readers' reads sleep up to 40 ms instead (many flushes)."""

    def __init__(self, child: FileNode, seed: int) -> None:
        super().__init__(child)
        self.file = child
        self.rng = random.Random(seed)

    async def _jitter(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)

    async def pread(self, buf: memoryview, offset: int) -> None:
        if SLOW_READS.get():
            await asyncio.sleep(self.rng.random() * 0.04)
        else:
            await self._jitter()
        await self.child.pread(buf, offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self._jitter()
        await self.child.pwrite(data, offset, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._jitter()
        await self.child.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self._jitter()
        await self.child.flush()

    async def grow(self, size: int) -> None:
        await self.file.grow(size)
        self.size = self.file.size


@pytest.mark.parametrize("options", [("cluster_size=64k",),
                                     ("extended_l2=on", "cluster_size=16k")],
                         ids=["c64k", "extl2"])
@needs_qemu
def test_reads_racing_trims_and_reuse_never_see_another_offset(
        tmp_path: pathlib.Path, options: tuple[str, ...]) -> None:
    """Workers each own every fourth cluster and write, trim, zero, flush and check
    it; readers meanwhile read anywhere.  Clusters are freed and reused all the
    time; no read ever returns a word stamped for another offset."""
    size, workers = 768 * KIB, 4
    image = create(tmp_path / "s.qcow2", size, *options)
    mirror = bytearray(size)
    done = False
    reads = 0

    async def worker(node: Qcow2Node, index: int) -> None:
        rng = random.Random(index)
        cluster = node.cluster_size
        mine = [c for c in range(size // cluster) if c % workers == index]
        for step in range(2000):  # at least 120 steps, and until readers raced enough
            if step >= 120 and reads > 100:
                break
            start = rng.choice(mine) * cluster
            offset = start + 8 * rng.randrange(cluster // 16)
            length = start + cluster - offset if rng.random() < 0.5 else cluster // 2
            op = rng.random()
            if op < 0.5:
                data = stamp(offset, length, step)
                await node.pwrite(data, offset)
                mirror[offset:offset + length] = data
            elif op < 0.75:
                await node.trim(start, cluster)
                mirror[start:start + cluster] = bytes(cluster)
            elif op < 0.85:
                await node.write_zeroes(start, cluster, may_trim=rng.random() < 0.5)
                mirror[start:start + cluster] = bytes(cluster)
            else:
                await node.flush()
            assert await read(node, start, cluster) == mirror[start:start + cluster]

    async def reader(node: Qcow2Node, seed: int) -> None:
        nonlocal reads
        SLOW_READS.set(True)
        rng = random.Random(seed)
        while not done:
            offset = 8 * rng.randrange(size // 8)
            length = min(size - offset, 8 * rng.randrange(1, 20_000))
            got = await read(node, offset, length)
            assert not foreign(got, offset), foreign(got, offset)[:4]
            reads += 1
            await asyncio.sleep(0)  # a read may complete without yielding

    async def body() -> None:
        nonlocal done
        node = await opened(image, file=JitterFile(FileNode(str(image), discard=True), 5))
        readers = [asyncio.ensure_future(reader(node, seed)) for seed in range(3)]
        try:
            await asyncio.wait_for(asyncio.gather(
                *(worker(node, index) for index in range(workers))), 120)
        finally:
            done = True
            await asyncio.wait_for(asyncio.gather(*readers), 60)
        assert reads > 100
        await close_node(node)

    run(body())
    assert_clean(image)
    assert same_as_raw(image, write_raw(tmp_path / "mirror.raw", mirror))
    assert image.stat().st_size <= 4 * MIB  # without reuse: over 6 MiB (c64k)


# -- a power cut with reuse and punching ---------------------------------------------

class Crash(Exception):
    """The simulated crash: the process stops here."""


class PowerCut(FilterNode):
    """A file that takes ``budget`` writes, punches and size changes, then none; after
    the cut, ``left_behind`` is what a flush made durable plus any subset of the
    later writes and punches (a disk cache may write them back in any order)."""

    def __init__(self, child: FileNode, path: pathlib.Path, budget: int) -> None:
        super().__init__(child)
        self.file, self.path, self.budget = child, path, budget
        self.spent = 0
        self.durable = path.read_bytes()
        self.pending: list[tuple[int, bytes]] = []
        self.punched: list[tuple[int, int]] = []
        self.reused = 0

    def _spend(self) -> None:
        if self.spent >= self.budget:
            raise Crash
        self.spent += 1

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        self._spend()
        raw = bytes(data)
        await self.child.pwrite(raw, offset)
        self.pending.append((offset, raw))
        if any(start < offset + len(raw) and offset < end for start, end in self.punched):
            self.reused += 1
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._spend()
        await self.child.trim(offset, length)
        self.pending.append((offset, bytes(length)))
        self.punched.append((offset, offset + length))

    async def grow(self, size: int) -> None:
        self._spend()
        await self.file.grow(size)
        self.size = self.file.size

    async def flush(self) -> None:
        await self.child.flush()
        self.durable = self.path.read_bytes()
        self.pending = []

    def left_behind(self, rng: random.Random) -> bytes:
        image = bytearray(self.durable)
        if rng.random() < 0.5:
            image.extend(bytes(max(0, self.size - len(image))))
        for offset, data in self.pending:
            if rng.random() < 0.5:
                image.extend(bytes(max(0, offset + len(data) - len(image))))
                image[offset:offset + len(data)] = data
        return bytes(image)


async def _crash_requests(node: Qcow2Node, seed: int) -> None:
    rng = random.Random(seed)
    cluster = node.cluster_size
    for step in range(100):
        start = rng.randrange(node.size // cluster) * cluster
        op = rng.random()
        if op < 0.5:
            offset = start + 8 * rng.randrange(cluster // 8)
            length = min(node.size - offset, 8 * rng.randrange(1, cluster // 4))
            await node.pwrite(stamp(offset, length, step), offset)
        elif op < 0.75:
            await node.trim(start, 2 * cluster)
        elif op < 0.88:
            await node.write_zeroes(start, cluster, may_trim=True)
        else:
            await node.flush()


@pytest.mark.parametrize("options", [("refcount_bits=1",), ("refcount_bits=64",),
                                     ("extended_l2=on",), ("compat=0.10",)],
                         ids=["ref1", "ref64", "extl2", "v2"])
@needs_qemu
def test_power_cut_while_clusters_are_reused(tmp_path: pathlib.Path,
                                             options: tuple[str, ...]) -> None:
    """Cut at points through a run that frees, punches and reuses clusters, with any
    unflushed writes and punches lost: no corruption, and no offset ever reads
    a word another offset wrote (a freed cluster's old entry never comes back).
    64 KiB clusters: the run uses up several batches of 16, so it reuses."""
    template = create(tmp_path / "t.qcow2", MIB, *options).read_bytes()
    work, image = tmp_path / "work.qcow2", tmp_path / "cut.qcow2"
    work.write_bytes(template)
    probe = PowerCut(FileNode(str(work), discard=True), work, 1 << 30)
    run(_crash_requests(run(opened(work, file=probe)), seed=11))
    run(probe.file.close())
    assert probe.reused > 3
    assert probe.spent > 40
    rng = random.Random(2)
    for budget in range(1, probe.spent, 3):
        work.write_bytes(template)
        file = PowerCut(FileNode(str(work), discard=True), work, budget)
        with pytest.raises(Crash):
            run(_crash_requests(run(opened(work, file=file)), seed=11))
        run(file.file.close())
        for _ in range(2):
            image.write_bytes(file.left_behind(rng))
            assert_clean(image, leaks_allowed=True)
            data = to_raw(image, tmp_path / "cut.raw")
            assert not foreign(data, 0), (budget, foreign(data, 0)[:4])
