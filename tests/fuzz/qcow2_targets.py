"""The ``qcow2-open`` fuzz target: any bytes as a qcow2 image, opened and used.

The input is an image file, written sparsely so that images with large
clusters (whose metadata lies 64 KiB apart) fit in a few KB of input::

    flags (1 byte)     bit 0: open read-only; bit 1: give the node a backing node
    where (2 bytes)    where the write goes, as a fraction of the virtual size
    size (3 bytes)     the file's size in 512-byte units (at least what the records hold)
    records            offset (4 bytes), length (2 bytes), that many bytes; until the end

The file is a ``MemoryNode`` (at most ``MAX_FILE`` bytes; records past it are cut).
``Qcow2Node.open`` it, read a few bounded ranges, ask ``block_status`` over the
whole disk (a bounded number of calls), and unless read-only write once, flush
and close.  ``Qcow2Error`` and ``OSError`` are the node's answers to a bad
image; anything else escaping, a reply that breaks the node interface, or
running longer than ``STALL`` seconds is a finding.

Seeds are images qemu-img makes at seed time (so qemu-img and qemu-io must be
installed to fuzz): versions 2 and 3, extended L2, compressed clusters, a
backing file name, an internal snapshot, lazy-refcounts images left dirty
(one with a snapshot and a bitmap), a persistent bitmap, refcounts of 1 and
64 bits, clusters of 512 bytes to 64 KiB, each with data, zeroes and holes written by qemu-io.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from pynbd.block.memory import MemoryNode
from pynbd.block.node import ExtentFlags
from pynbd.block.qcow2 import Qcow2Error, Qcow2Node

#: the largest image file (an L1 or refcount table can be no larger)
MAX_FILE = 1 << 20
#: the longest read
MAX_READ = 64 << 10
#: ``block_status`` calls to walk the disk
MAX_STATUS_CALLS = 16
#: bytes the one write writes (unaligned on purpose)
WRITE_LENGTH = 3000
#: seconds one input may take before it counts as a stall
STALL = 5.0
_HEAD = struct.Struct(">BH")
_RECORD = struct.Struct(">IH")
_VALID_FLAGS = ExtentFlags.HOLE | ExtentFlags.ZERO


class Stall(Exception):
    """The node did not finish with the input in time (an endless wait or walk)."""


_loop: asyncio.AbstractEventLoop | None = None


def _run(flags: int, where: int, image: MemoryNode) -> None:
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    _loop.run_until_complete(_exercise(flags, where, image))


def parse(data: bytes) -> tuple[int, int, int, list[tuple[int, bytes]]]:
    """``(flags, where, file size, records)`` of an input (never raises)."""
    head = data[:6].ljust(6, b"\0")
    flags, where = _HEAD.unpack_from(head)
    size = int.from_bytes(head[3:6], "big") * 512
    records: list[tuple[int, bytes]] = []
    pos = 6
    while pos < len(data):
        offset, length = _RECORD.unpack(data[pos:pos + _RECORD.size].ljust(_RECORD.size, b"\0"))
        pos += _RECORD.size
        chunk = data[pos:pos + length]
        pos += length
        if offset < MAX_FILE and chunk:
            chunk = chunk[:MAX_FILE - offset]
            records.append((offset, chunk))
            size = max(size, offset + len(chunk))
    return flags, where, min(size, MAX_FILE), records


def qcow2_open(data: bytes) -> None:
    flags, where, size, records = parse(data)
    image = MemoryNode(size)
    for offset, chunk in records:
        image.pwrite_nowait(chunk, offset)
    _run(flags, where, image)


async def _exercise(flags: int, where: int, image: MemoryNode) -> None:
    backing = MemoryNode(1 << 20) if flags & 2 else None
    try:
        if backing is not None:
            backing.pwrite_nowait(b"\x5a" * 4096, 4096)
        try:
            await asyncio.wait_for(_use(image, backing, read_only=bool(flags & 1),
                                        where=where), STALL)
        except TimeoutError as err:  # an OSError: it must not pass as the node's answer
            raise Stall(f"the input took more than {STALL} s") from err
        except (Qcow2Error, OSError):
            return
    finally:
        await image.close()
        if backing is not None:
            await backing.close()


async def _use(image: MemoryNode, backing: MemoryNode | None, *, read_only: bool,
               where: int) -> None:
    node = await Qcow2Node.open(image, backing=backing, read_only=read_only)
    try:
        size = node.size
        assert 0 <= size < 1 << 63, size
        spot = (size * where) >> 16
        for offset in sorted({0, spot, size // 2, max(0, size - MAX_READ)}):
            length = min(MAX_READ, size - offset)
            if length > 0:
                await node.pread(memoryview(bytearray(length)), offset)
        pos = 0
        for _ in range(MAX_STATUS_CALLS):
            if pos >= size:
                break
            length = min(size - pos, 1 << 32)
            extents = await node.block_status(pos, length)
            assert extents, f"block_status({pos}, {length}) gave no extent"
            total = sum(extent.length for extent in extents)
            assert 0 < total <= length, f"block_status({pos}, {length}) gave {total} bytes"
            for extent in extents:
                assert not extent.flags & ~_VALID_FLAGS, extent
            pos += total
        if not read_only and size:
            offset = min(spot, max(0, size - WRITE_LENGTH))
            data = b"\xa5" * min(WRITE_LENGTH, size - offset)
            await node.pwrite(data, offset)
            await node.flush()
            got = bytearray(len(data))
            await node.pread(memoryview(got), offset)
            assert got == data, f"a write at {offset} did not read back"
    finally:
        await node.close()


# -- seeds ---------------------------------------------------------------------------------

#: (qemu-img create options, virtual size, qemu-io commands, then an action)
_SEEDS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("", "1M", ("write -P 0x11 0 512", "write -z 64k 64k", "write -P 0x22 900k 1k"), ""),
    ("compat=0.10,cluster_size=4k", "2M", ("write -P 0x33 5k 512", "write -z 1M 8k"), ""),
    ("extended_l2=on,cluster_size=16k", "1M",
     ("write -P 0x44 1k 1k", "write -z 16k 2k", "write -P 0x45 40k 512"), ""),
    ("cluster_size=4k", "1M", ("write -c -P 0x55 0 4k", "write -c -P 0x56 64k 4k"), ""),
    ("cluster_size=1k", "1M", ("write -P 0x66 2k 1k",), "backing"),
    ("cluster_size=512", "1M", ("write -P 0x77 0 1k", "write -P 0x78 20k 512"), "snapshot"),
    ("cluster_size=512,refcount_bits=1", "2M", ("write -P 0x88 512 512",), ""),
    ("cluster_size=1k,refcount_bits=64", "4M", ("write -P 0x99 3M 1k",), ""),
    ("cluster_size=2k,lazy_refcounts=on", "1M", ("write -P 0xaa 0 2k",), "dirty"),
    ("cluster_size=4k", "1M", ("write -P 0xbb 8k 512",), "bitmap"),
    # a file of MAX_FILE bytes: the write's clusters outgrow the refcount table
    ("cluster_size=512,refcount_bits=64", "4M", ("write -P 0xcc 1M 512",), "pad"),
    # dirty with a snapshot and a bitmap: the rebuild counts their clusters too
    ("cluster_size=1k,lazy_refcounts=on", "1M", ("write -P 0xdd 0 3k",), "dirty-all"),
)


def _sparse(flags: int, where: int, image: bytes, size: int) -> bytes:
    """An image as this target's input: a file of ``size`` bytes holding ``image``,
    as records of its non-zero runs."""
    out = bytearray(_HEAD.pack(flags, where) + (-(-size // 512)).to_bytes(3, "big"))
    pos = 0
    while pos < len(image):
        start = next((i for i in range(pos, len(image)) if image[i]), len(image))
        if start == len(image):
            break
        end = start
        # a run ends at 16 zero bytes (a record costs 6), or at 60 KiB
        while end < len(image) and end - start < 60 << 10 and any(image[end:end + 16]):
            end += 16
        run = image[start:end].rstrip(b"\0")
        out += _RECORD.pack(start, len(run)) + run
        pos = end
    return bytes(out)


def _qemu(*args: str) -> None:
    tool = shutil.which(args[0])
    if tool is None:
        raise RuntimeError(f"{args[0]} is not installed: the qcow2-open seeds are images "
                           "that qemu-img makes")
    subprocess.run([tool, *args[1:]], check=True, capture_output=True, timeout=60)


def seeds() -> list[bytes]:
    """Images made by qemu-img and qemu-io, as inputs: each writable and read-only, and
    with a backing node where the image names one."""
    out: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="pynbd-qcow2-seeds-") as scratch:
        with open(Path(scratch) / "base.raw", "wb") as base:  # what "backing" images name
            base.truncate(1 << 20)
        for i, (options, virtual, commands, action) in enumerate(_SEEDS):
            path = Path(scratch) / f"s{i}.qcow2"
            create = ["qemu-img", "create", "-q", "-f", "qcow2"]
            if options:
                create += ["-o", options]
            if action == "backing":
                create += ["-u", "-b", "base.raw", "-F", "raw"]
            _qemu(*create, str(path), virtual)
            io = ["qemu-io", "-f", "qcow2"]
            for command in commands:
                io += ["-c", command]
            _qemu(*io, str(path))
            if action in ("snapshot", "dirty-all"):
                _qemu("qemu-img", "snapshot", "-c", "snap1", str(path))
                _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x79 0 512", str(path))
            if action in ("bitmap", "dirty-all"):
                _qemu("qemu-img", "bitmap", "--add", str(path), "b0")
            image = bytearray(path.read_bytes())
            if action in ("dirty", "dirty-all"):
                image[79] |= 1  # incompatible bit 0: refcounts are rebuilt on open
            where, size = (i * 7919) & 0xFFFF, MAX_FILE if action == "pad" else len(image)
            for flags in (0, 1, 2) if action == "backing" else (0, 1):
                out.append(_sparse(flags, where, bytes(image), size))
    return out
