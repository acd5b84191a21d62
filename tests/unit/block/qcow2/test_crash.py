"""Crash safety: the file stops taking writes at every point of a run of requests;
the image left behind must have no corruption (leaks are allowed)."""

from __future__ import annotations

import contextlib
import errno
import random
import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.unit.block.qcow2.images import (
    assert_clean,
    check,
    close_node,
    create,
    in_new_loop,
    needs_qemu,
    open_file,
    same_as_raw,
)
from tests.unit.block.support import pattern, run

from pynbd.block.file import FileNode
from pynbd.block.filter import FilterNode
from pynbd.block.qcow2 import Qcow2Node

if TYPE_CHECKING:
    import pathlib

    from pynbd.block.node import Data

pytestmark = needs_qemu
KIB, MIB = 1024, 1024 * 1024


class Crash(Exception):
    """The simulated crash: the process stops here."""


class CrashingFile(FilterNode):
    """A ``FileNode`` that takes ``budget`` writes, then none (a power cut)."""

    def __init__(self, child: FileNode, budget: int) -> None:
        super().__init__(child)
        self.file = child
        self.budget = budget
        self.writes = 0

    def _spend(self) -> None:
        if self.writes >= self.budget:
            raise Crash
        self.writes += 1

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        self._spend()
        await self.child.pwrite(data, offset, fua=fua)

    async def grow(self, size: int) -> None:
        self._spend()
        await self.file.grow(size)
        self.size = self.file.size


async def _requests(node: Qcow2Node, seed: int) -> None:
    rng = random.Random(seed)
    for step in range(30):
        offset = rng.randrange(node.size)
        length = rng.randrange(1, min(node.size - offset, 40000) + 1)
        choice = rng.random()
        if choice < 0.6:
            await node.pwrite(pattern(step, length), offset)
        elif choice < 0.8:
            await node.write_zeroes(offset, length, may_trim=rng.random() < 0.5)
        else:
            await node.trim(offset, length)


def _count_writes(image: pathlib.Path, seed: int) -> int:
    file = CrashingFile(FileNode(str(image)), budget=1 << 30)
    node = in_new_loop(lambda: Qcow2Node.open(file))
    run(_requests(node, seed))
    return file.writes


@pytest.mark.parametrize("options", [("cluster_size=512", "refcount_bits=64"),
                                     ("cluster_size=4k", "refcount_bits=1"),
                                     ("extended_l2=on", "cluster_size=16k"),
                                     ("compat=0.10", "cluster_size=1k")],
                         ids=["c512-ref64", "c4k-ref1", "extl2", "v2"])
def test_crash_at_every_write(tmp_path: pathlib.Path, options: tuple[str, ...]) -> None:
    template = create(tmp_path / "t.qcow2", 256 * KIB, *options).read_bytes()
    probe = tmp_path / "probe.qcow2"
    probe.write_bytes(template)
    total = _count_writes(probe, seed=3)
    assert total > 20
    image = tmp_path / "a.qcow2"
    step = max(1, total // 20)
    for budget in range(0, total, step):
        image.write_bytes(template)
        file = CrashingFile(FileNode(str(image)), budget)
        node = in_new_loop(lambda file=file: Qcow2Node.open(file))  # type: ignore[misc]
        with pytest.raises(Crash):
            run(_requests(node, seed=3))
        run(file.file.close())
        assert_clean(image, leaks_allowed=True)


class _CannotGrow(FilterNode):
    """A file that is full: growing fails as a full block device does."""

    async def grow(self, size: int) -> None:
        raise OSError(errno.ENOSPC, "this node cannot grow")


def test_writes_fail_cleanly_when_the_file_cannot_grow(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "n.qcow2", MIB)
    file = _CannotGrow(FileNode(str(image)))
    node = in_new_loop(lambda: Qcow2Node.open(file))
    with pytest.raises(OSError, match="cannot grow") as info:
        run(node.pwrite(b"x", 0))
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize("options", [("cluster_size=4k",), ("extended_l2=on",),
                                     ("cluster_size=512", "refcount_bits=1")],
                         ids=["c4k", "extl2", "c512-ref1"])
def test_dirty_image_is_repaired_on_open(tmp_path: pathlib.Path,
                                         options: tuple[str, ...]) -> None:
    """qemu with lazy refcounts dies after writing: refcounts are missing and the dirty
    bit is set.  Opening read-write rebuilds them; the image is then clean."""
    image = create(tmp_path / "l.qcow2", 4 * MIB, "lazy_refcounts=on", *options)
    done = subprocess.run(
        ["sh", "-c", f"ulimit -c 0; exec qemu-io -c 'write -P 1 0 1m' "
                     f"-c 'write -P 2 2m 100k' -c abort {image}"],
        capture_output=True, check=False)
    assert done.returncode != 0
    assert check(image)["corruptions"] > 0
    node = open_file(image)
    assert not node.header.incompatible & 1
    run(node.pwrite(pattern(3, 5000), 3 * MIB))
    run(close_node(node))
    assert_clean(image)
    raw = tmp_path / "want.raw"
    raw.write_bytes(b"\1" * MIB + bytes(MIB) + b"\2" * 102400 + bytes(MIB - 102400)
                    + pattern(3, 5000) + bytes(MIB - 5000))
    assert same_as_raw(image, raw)


def test_lazy_refcount_images_are_dirty_while_written(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "z.qcow2", MIB, "lazy_refcounts=on")
    node = open_file(image)
    run(node.pwrite(b"a" * 100, 0))
    assert image.read_bytes()[79] & 1  # incompatible bit 0, the dirty bit
    run(close_node(node))
    assert not image.read_bytes()[79] & 1
    assert_clean(image)


class PowerCutFile(CrashingFile):
    """A ``CrashingFile`` that also keeps what a flush made durable: after the cut,
    ``lost_writes_image`` is the durable state plus any subset of the later writes
    (a disk's cache may write them back in any order, or not at all)."""

    def __init__(self, child: FileNode, budget: int, path: pathlib.Path) -> None:
        super().__init__(child, budget)
        self.path = path
        self.durable = path.read_bytes()
        self.pending: list[tuple[int, bytes]] = []

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await super().pwrite(data, offset, fua=fua)
        self.pending.append((offset, bytes(data)))
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await self.child.flush()
        self.durable = self.path.read_bytes()
        self.pending = []

    def lost_writes_image(self, rng: random.Random) -> bytes:
        image = bytearray(self.durable)
        if rng.random() < 0.5:  # the last size change reached the disk, or not
            image.extend(bytes(max(0, self.size - len(image))))
        for offset, data in self.pending:
            if rng.random() < 0.5:
                if offset + len(data) > len(image):
                    image.extend(bytes(offset + len(data) - len(image)))
                image[offset:offset + len(data)] = data
        return bytes(image)


@pytest.mark.parametrize("options", [("cluster_size=512", "refcount_bits=64"),
                                     ("cluster_size=4k", "refcount_bits=2"),
                                     ("extended_l2=on", "cluster_size=16k")],
                         ids=["c512-ref64", "c4k-ref2", "extl2"])
def test_power_cut_with_writes_reordered(tmp_path: pathlib.Path,
                                         options: tuple[str, ...]) -> None:
    """Unflushed writes lost in any combination: still no corruption."""
    template = create(tmp_path / "t.qcow2", 256 * KIB, *options).read_bytes()
    work, image = tmp_path / "work.qcow2", tmp_path / "cut.qcow2"
    rng = random.Random(4)
    for budget in (5, 17, 40, 80, 130, 200, 300):
        work.write_bytes(template)
        file = PowerCutFile(FileNode(str(work)), budget, work)
        node = in_new_loop(lambda file=file: Qcow2Node.open(file))  # type: ignore[misc]
        with contextlib.suppress(Crash):
            run(_requests(node, seed=budget))
        run(file.file.close())
        for _ in range(3):
            image.write_bytes(file.lost_writes_image(rng))
            assert_clean(image, leaks_allowed=True)
