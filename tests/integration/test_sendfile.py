"""Large reads of a file or memory export go out with sendfile, whole and in order.

A server runs in-process over a ``FileNode``, a ``MemoryNode`` (a memfd),
a file seen through ``RawNode`` (``-o``) or ``FaultFilter`` (every
node of ``pynbd daemon``), or a qcow2 image whose clusters follow each
other in its file (one lookup finds the run to send); a raw client floods it with
1 MiB reads it does not collect at first, so the socket fills up part way
through a reply (the rest is then queued the ordinary way), and checks every
byte of every reply afterwards.  The backend's ``sendfile_source`` answers None for
ranges that are not all in the page cache or, when asked, hold a hole.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.support.inprocess import open_raw, serving

from pynbd.block import FileNode, MemoryNode, Node, RawNode, fileio
from pynbd.block.faults import FaultFilter, parse_fault_spec
from pynbd.block.graph import close_subtree
from pynbd.block.qcow2 import Qcow2Node
from pynbd.proto import wire
from pynbd.proto.constants import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Cmd,
)
from pynbd.server import fastpath

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

MIB = 1 << 20
SIZE = 16 * MIB
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="qemu-img makes the qcow2 image")
TIMEOUT = 30.0


def make_file(tmp_path: Path) -> tuple[str, bytes]:
    data = random.Random(7).randbytes(SIZE)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    with path.open("rb") as fh:  # into the page cache
        fh.read()
    return str(path), data


#: where the -o window starts: not page-aligned
WINDOW = 5000


async def open_backend(kind: str, tmp_path: Path) -> tuple[Node, bytes]:
    """The node to serve and the bytes it must show."""
    image, content = make_file(tmp_path)
    if kind == "memory":
        memory = MemoryNode(SIZE)
        await memory.pwrite(content, 0)
        return memory, content
    if kind == "file-offset":
        return RawNode(FileNode(image), offset=WINDOW), content[WINDOW:]
    if kind == "qcow2":  # qemu-img's copy: every cluster allocated, one after another
        converted = tmp_path / "disk.qcow2"
        await asyncio.to_thread(
            subprocess.run, ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image,
                             str(converted)], check=True, capture_output=True)
        with converted.open("rb") as fh:  # into the page cache
            fh.read()
        return await Qcow2Node.open(FileNode(str(converted))), content
    if kind == "file-faults":  # a rule that never picks a read
        return FaultFilter(FileNode(image), [parse_fault_spec("cmd=flush,errno=EIO")]), \
            content
    return FileNode(image), content


@pytest.mark.parametrize("kind", ["file", "memory", "file-offset", "file-faults",
                                  pytest.param("qcow2", marks=needs_qemu_img)])
def test_flooded_large_reads_are_whole_and_correct(tmp_path: Path, kind: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    backend_class: type[FileNode | MemoryNode] = (
        MemoryNode if kind == "memory" else FileNode)
    calls = {"sendfile": 0, "rest": 0, "copied": 0}
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls["sendfile"] += 1
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    real_rest = fileio.pread_all

    def counting_rest(fd: int, buf: memoryview, offset: int) -> None:
        calls["rest"] += 1
        real_rest(fd, buf, offset)

    monkeypatch.setattr(fastpath, "pread_all", counting_rest)
    real_nowait = backend_class.pread_nowait

    def counting_nowait(self: FileNode | MemoryNode, buf: memoryview,
                        offset: int) -> bool:
        if len(buf) >= 64 * 1024:
            calls["copied"] += 1
        return real_nowait(self, buf, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(backend_class, "pread_nowait", counting_nowait)

    async def body() -> None:
        backend, content = await open_backend(kind, tmp_path)
        try:
            async with serving(tmp_path, backend) as (_, path):
                reader, writer = await open_raw(path, limit=4 * MIB)
                rng = random.Random(3)
                plan = []
                for cookie in range(96):
                    length = rng.choice([MIB, 256 * 1024, 96 * 1024, 64 * 1024 + 512, 4096])
                    offset = rng.randrange(0, len(content) - length)
                    if cookie % 3 == 0:
                        offset -= offset % 4096  # some page-aligned, most not
                    plan.append((cookie, offset, length))
                    writer.write(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, cookie,
                                                   offset, length))
                await writer.drain()
                await asyncio.sleep(0.2)  # let the server fill the socket before we read
                pending = {cookie: (offset, length) for cookie, offset, length in plan}
                while pending:  # replies may come in any order; each must be whole
                    magic, error, cookie = wire.SIMPLE_REPLY.unpack(
                        await reader.readexactly(wire.SIMPLE_REPLY.size))
                    assert (magic, error) == (SIMPLE_REPLY_MAGIC, 0)
                    offset, length = pending.pop(cookie)
                    data = await reader.readexactly(length)
                    assert data == content[offset:offset + length], cookie
                writer.close()
        finally:
            await close_subtree(backend)

    async def bounded() -> None:
        async with asyncio.timeout(TIMEOUT):
            await body()

    asyncio.run(bounded())
    assert calls["sendfile"] > 0, "no read went out with sendfile"
    assert calls["rest"] > 0, "the socket never filled part way through a reply"
    # while a reply waits on the transport the server takes no new request, so
    # later large reads still go out with sendfile instead of being copied
    assert calls["copied"] == 0


@pytest.fixture
def cached(tmp_path: Path) -> Iterator[tuple[str, FileNode]]:
    """A cached image file and a ``FileNode`` on it (skips without cachestat(2))."""
    image, _ = make_file(tmp_path)
    backend = FileNode(image)
    try:
        if backend.sendfile_source(0, MIB, False) is None:
            pytest.skip("this kernel has no cachestat(2)")
        yield image, backend
    finally:
        asyncio.run(backend.close())


def test_sendfile_source_only_for_cached_data(cached: tuple[str, FileNode]) -> None:
    image, backend = cached
    assert backend.sendfile_source(MIB, MIB, True) == (backend._fd, MIB)
    assert backend.sendfile_source(SIZE - 4096, 8192, False) is None  # past the end
    # a hole: cached (it reads as zeroes) but not data
    os.truncate(image, SIZE + 4 * MIB)
    with open(image, "rb") as fh:
        fh.seek(SIZE)
        fh.read(4 * MIB)
    grown = FileNode(image)
    try:
        assert grown.sendfile_source(SIZE, MIB, True) is None
        # out of the page cache: no sendfile (it could block on the disk)
        fd = os.open(image, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert grown.sendfile_source(2 * MIB, MIB, False) is None
    finally:
        asyncio.run(grown.close())


def test_filters_pass_the_sendfile_source_through(cached: tuple[str, FileNode]) -> None:
    _, backend = cached
    window = RawNode(backend, offset=WINDOW).fast_paths().sendfile_source
    assert window is not None
    assert window(MIB, MIB, False) == (backend._fd, WINDOW + MIB)
    faults = FaultFilter(backend, [parse_fault_spec("cmd=write,errno=EIO")])
    source = faults.fast_paths().sendfile_source  # resolved once, as a connection does
    assert source is not None
    assert source(MIB, MIB, False) == (backend._fd, MIB)
    # a read that a rule added later may pick must take the path where the rule applies
    faults.add_rule(parse_fault_spec("cmd=read,errno=EIO,range=0-4096"))
    assert source(0, MIB, False) is None
    assert source(MIB, MIB, False) == (backend._fd, MIB)
