"""What the fleecing tests share: filters that shuffle, count and hold requests, random
disks and writes, and the check that a snapshot still shows what it froze.

The writers write, zero and trim through the source's tracking filter (as every
writer of a daemon's node does) from several tasks at once; ``Jitter`` filters
under the source and over the target make every request yield a random number
of times, so the copies, the writes and the snapshot reads interleave.  ``Gate``
holds one chosen request, for the races that need one exact order.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

from tests.unit.block.support import read

from pynbd.block.filter import FilterNode
from pynbd.block.fleece import CopyBeforeWrite
from pynbd.block.memory import MemoryNode
from pynbd.block.node import ExtentFlags
from pynbd.block.snapshotaccess import SnapshotAccess
from pynbd.block.tracking import TrackingFilter

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any

    from pynbd.block.node import Data, Extent, Node

G = 64 * 1024
#: not a multiple of the granule: the last granule is short
SIZE = 16 * G + 12345
#: no test waits longer than this for its coroutines
BOUND = 60.0

Op = tuple[str, int, int]


def bounded(body: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(body, BOUND))


class Jitter(FilterNode):
    """Yields to the loop a random number of times before each request."""

    def __init__(self, child: Node, seed: int) -> None:
        super().__init__(child)
        self.rng = random.Random(seed)
        self.implicit = True  # the copy granule is still the target's cluster size

    async def _yield(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._yield()
        await self.child.pread(buf, offset)
        await self._yield()

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self._yield()
        await self.child.pwrite(data, offset, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self._yield()
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._yield()
        await self.child.trim(offset, length, fua=fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._yield()
        got = await self.child.block_status(offset, length)
        await self._yield()
        return got


class Counting(FilterNode):
    """Counts the writes and zeroings that reach each granule (the copies)."""

    def __init__(self, child: Node) -> None:
        super().__init__(child)
        self.writes: dict[int, int] = {}

    def _count(self, offset: int, length: int) -> None:
        assert offset % G == 0, f"a copy starts at {offset}, inside a granule"
        assert length % G == 0 or offset + length == self.size, (
            f"a copy of [{offset}, +{length}) is not whole granules")
        for granule in range(offset // G, -(-(offset + length) // G)):
            self.writes[granule] = self.writes.get(granule, 0) + 1

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        self._count(offset, len(data))
        await self.child.pwrite(data, offset, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        self._count(offset, length)
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)


class Gate(FilterNode):
    """Holds the next request of an armed kind (``read``, ``write``) until released."""

    def __init__(self, child: Node) -> None:
        super().__init__(child)
        self.armed: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}

    def arm(self, kind: str) -> asyncio.Event:
        self.armed[kind], self.arrived[kind] = asyncio.Event(), asyncio.Event()
        return self.armed[kind]

    async def _pass(self, kind: str) -> None:
        release = self.armed.pop(kind, None)
        if release is not None:
            self.arrived[kind].set()
            await release.wait()

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._pass("read")
        await self.child.pread(buf, offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self._pass("write")
        await self.child.pwrite(data, offset, fua=fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._pass("status")
        return await self.child.block_status(offset, length)


def content(rng: random.Random, size: int = SIZE) -> bytes:
    """Random bytes with runs of zeroes (holes and zeroes in the snapshot too)."""
    data = bytearray(rng.randbytes(size))
    for _ in range(6):
        start = rng.randrange(size)
        stop = min(size, start + rng.randrange(1, 3 * G))
        data[start:stop] = bytes(stop - start)
    return bytes(data)


async def source_with(data: bytes, seed: int) -> tuple[MemoryNode, TrackingFilter]:
    base = MemoryNode(len(data))
    await base.pwrite(data, 0)
    for start in range(0, len(data), G):  # the zero runs become holes where whole
        if data[start:start + G].count(0) == len(data[start:start + G]):
            await base.trim(start, min(G, len(data) - start))
    return base, TrackingFilter(Jitter(base, seed))


def random_ops(rng: random.Random, count: int, size: int = SIZE) -> list[Op]:
    ops = []
    for _ in range(count):
        offset = rng.randrange(size)
        length = rng.randint(1, min(size - offset, 3 * G))
        ops.append((rng.choice(("write", "write", "zero", "trim")), offset, length))
    return ops


async def apply(node: Node, op: Op, rng: random.Random) -> None:
    kind, offset, length = op
    if kind == "write":
        await node.pwrite(rng.randbytes(length), offset)
    elif kind == "zero":
        await node.write_zeroes(offset, length, may_trim=rng.random() < 0.5)
    else:
        await node.trim(offset, length)


async def check_frozen(snap: SnapshotAccess, original: bytes, offset: int,
                       length: int) -> None:
    """Reads and block status of the range show ``original``."""
    got = await read(snap, offset, length)
    assert got == original[offset:offset + length], f"the snapshot changed at [{offset}, " \
        f"+{length})"
    pos = offset
    for extent in await snap.block_status(offset, length):
        chunk = original[pos:pos + extent.length]
        if extent.flags & ExtentFlags.ZERO:
            assert chunk.count(0) == len(chunk), f"ZERO reported at {pos} over data"
        pos += extent.length
    assert offset < pos <= offset + length


async def fleece_run(seed: int, source: TrackingFilter, target: Node, original: bytes,
                     plans: list[list[Op]]) -> CopyBeforeWrite:
    """Writers (one per plan) and two readers at once; every snapshot read and the
    final one equal ``original``."""
    cbw = CopyBeforeWrite(source, Jitter(target, seed + 1))
    snap = SnapshotAccess(cbw)
    size = len(original)
    writing = True

    async def writer(plan: list[Op], rng: random.Random) -> None:
        for op in plan:
            await apply(source, op, rng)

    async def reader(rng: random.Random) -> None:
        rounds = 0
        while writing or not rounds:
            offset = rng.randrange(size)
            await check_frozen(snap, original, offset, rng.randint(1, size - offset))
            rounds += 1

    readers = [asyncio.create_task(reader(random.Random(seed * 7 + k))) for k in range(2)]
    try:
        await asyncio.gather(*(writer(plan, random.Random(seed * 13 + k))
                               for k, plan in enumerate(plans)))
    finally:
        writing = False
        await asyncio.gather(*readers)
    await check_frozen(snap, original, 0, size)
    granule = cbw.granule
    touched = {index for plan in plans for _, offset, length in plan
               for index in range(offset // granule, -(-(offset + length) // granule))}
    assert copied(cbw) == sorted(touched)
    return cbw


def copied(cbw: CopyBeforeWrite) -> list[int]:
    """The indexes of the granules ``cbw`` copied."""
    return [index for index in range(-(-cbw.size // cbw.granule))
            if cbw.done.is_dirty(index * cbw.granule)]
