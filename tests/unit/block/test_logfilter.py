"""The log filter node: one parseable line per request, on every path, data unchanged.

Driven directly over a memory disk (and a fault filter for errors); the
real-client runs (qemu-io, nbdcopy) are in ``tests/interop/test_filters.py``.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any

import pytest

from pynbd.block import MemoryNode
from pynbd.block.faults import FaultFilter, FaultRule
from pynbd.block.graph import close_subtree, one_store
from pynbd.block.logfilter import FLUSH_BYTES, LogNode, log_node
from pynbd.block.node import FastPaths, Node

if TYPE_CHECKING:
    from pathlib import Path

    from pynbd.block.node import Data, ReadDone, WriteDone

MIB = 1 << 20

#: the documented line format (docs/filters.md)
LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) id=(?P<id>\d+) cmd=(?P<cmd>[a-z-]+) "
    r"offset=(?P<offset>0x[0-9a-f]+) count=(?P<count>0x[0-9a-f]+) "
    r"flags=(?P<flags>none|[a-z+-]+) result=(?P<result>ok|cancelled|E[A-Z0-9]+) "
    r"elapsed=(?P<elapsed>\d+\.\d{6})")


def lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, parsed (failing on one that does not parse)."""
    parsed = []
    for text in path.read_text().splitlines():
        match = LINE.fullmatch(text)
        assert match is not None, text
        fields: dict[str, Any] = match.groupdict()
        fields["id"] = int(fields["id"])
        fields["offset"], fields["count"] = int(fields["offset"], 16), int(fields["count"], 16)
        fields["elapsed"] = float(fields["elapsed"])
        parsed.append(fields)
    return parsed


def brief(parsed: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(p["id"], p["cmd"], p["offset"], p["count"], p["flags"], p["result"])
            for p in parsed]


def test_one_line_per_request_with_its_fields(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"

    async def main() -> None:
        node = LogNode(MemoryNode(MIB), str(path))
        await node.pwrite(b"a" * 512, 4096)
        await node.pwrite(b"b" * 512, 0, fua=True)
        buf = bytearray(512)
        await node.pread(memoryview(buf), 4096)
        assert buf == b"a" * 512
        await node.write_zeroes(8192, 1024, may_trim=True, fua=True)
        await node.write_zeroes(8192, 1024, fast=True)
        await node.trim(65536, 65536)
        await node.flush()
        assert await node.block_status(0, MIB)
        assert await node.allocation_depth(0, MIB) == [(MIB, 1)]
        await node.cache(0, 4096)
        await close_subtree(node)

    asyncio.run(main())
    parsed = lines(path)
    assert brief(parsed) == [
        (1, "write", 4096, 512, "none", "ok"),
        (2, "write", 0, 512, "fua", "ok"),
        (3, "read", 4096, 512, "none", "ok"),
        (4, "zero", 8192, 1024, "fua+may-trim", "ok"),
        (5, "zero", 8192, 1024, "fast", "ok"),
        (6, "trim", 65536, 65536, "none", "ok"),
        (7, "flush", 0, 0, "none", "ok"),
        (8, "block-status", 0, MIB, "none", "ok"),
        (9, "allocation-depth", 0, MIB, "none", "ok"),
        (10, "cache", 0, 4096, "none", "ok")]
    assert all(0 <= p["elapsed"] < 10 for p in parsed)


def test_errors_are_logged_by_errno_name_and_still_raised(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"

    async def main() -> None:
        faults = FaultFilter(MemoryNode(MIB), [FaultRule(frozenset({"read"}), errno=5),
                                               FaultRule(frozenset({"write"}), errno=28)])
        node = LogNode(faults, str(path))
        with pytest.raises(OSError, match="injected") as read_error:
            await node.pread(memoryview(bytearray(512)), 0)
        assert read_error.value.errno == 5
        with pytest.raises(OSError, match="injected"):
            await node.pwrite(b"x", 0)
        await node.flush()
        await close_subtree(node)

    asyncio.run(main())
    assert [(p["cmd"], p["result"]) for p in lines(path)] == [
        ("read", "EIO"), ("write", "ENOSPC"), ("flush", "ok")]


def test_an_abandoned_request_is_logged_as_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"

    async def main() -> None:
        slow = FaultFilter(MemoryNode(MIB), [FaultRule(frozenset({"read"}), delay=30.0)])
        node = LogNode(slow, str(path))
        task = asyncio.create_task(node.pread(memoryview(bytearray(512)), 0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await close_subtree(node)

    asyncio.run(main())
    assert [(p["cmd"], p["result"]) for p in lines(path)] == [("read", "cancelled")]


def test_the_fast_paths_log_what_they_complete_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"

    async def main() -> None:
        memory = MemoryNode(MIB)
        node = LogNode(memory, str(path))
        paths = node.fast_paths()
        assert paths.pread_nowait is not None
        assert paths.pwrite_nowait is not None
        assert paths.sendfile_source is None  # would let one request log twice
        assert paths.pwrite_nowait(b"z" * 4096, 8192)
        buf = bytearray(4096)
        assert paths.pread_nowait(memoryview(buf), 8192)
        assert buf == b"z" * 4096
        await close_subtree(node)

    asyncio.run(main())
    assert brief(lines(path)) == [(1, "write", 8192, 4096, "none", "ok"),
                                  (2, "read", 8192, 4096, "none", "ok")]


class Direct(MemoryNode):
    """A memory disk with direct I/O paths that complete later (as librbd's do), and
    an inline read that always declines."""

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        return False

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        if offset >= MIB // 2:
            return False  # "not now": the caller takes pread
        data = bytearray(length)
        super().pread_nowait(memoryview(data), offset)
        asyncio.get_running_loop().call_soon(done, data, None)
        return True

    def start_write(self, data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
        asyncio.get_running_loop().call_soon(done, OSError(28, "full"))
        return True

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return bytes(length)


def test_direct_and_own_buffer_paths_log_on_completion(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"

    async def main() -> None:
        node = LogNode(Direct(MIB), str(path))
        paths = node.fast_paths()
        assert not paths.pread_nowait or not paths.pread_nowait(memoryview(bytearray(8)), 0)
        assert paths.start_read is not None
        assert paths.start_write is not None
        assert paths.read is not None
        got: list[Any] = []
        assert not paths.start_read(MIB - 512, 512, lambda d, e: got.append(e))
        assert paths.start_read(512, 512, lambda d, e: got.append((bytes(d or b""), e)))
        assert paths.start_write(b"w" * 100, 0, True, got.append)
        await asyncio.sleep(0.01)
        assert got[0] == (bytes(512), None)
        assert isinstance(got[1], OSError)
        assert await paths.read(0, 16) == bytes(16)
        await close_subtree(node)

    asyncio.run(main())
    assert brief(lines(path)) == [(1, "read", 512, 512, "none", "ok"),
                                  (2, "write", 0, 100, "fua", "ENOSPC"),
                                  (3, "read", 0, 16, "none", "ok")]


def test_lines_are_buffered_then_written_in_bulk_on_time_and_at_close(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"

    async def main() -> None:
        node = LogNode(MemoryNode(MIB), str(path))
        await node.flush()
        assert path.read_text() == ""  # buffered
        node.write_out()
        assert len(lines(path)) == 1
        count = FLUSH_BYTES // 80 + 10  # lines are under 120 bytes: some go out in bulk
        for _ in range(count):
            await node.flush()
        assert 1 < len(lines(path)) < count + 1
        await node.flush()
        for _ in range(300):  # the timer writes the rest within a second or so
            if len(lines(path)) == count + 2:
                break
            await asyncio.sleep(0.01)
        assert len(lines(path)) == count + 2
        await node.flush()
        await close_subtree(node)  # and close writes what is left
        assert [p["id"] for p in lines(path)] == list(range(1, count + 4))

    asyncio.run(main())


def test_the_file_is_truncated_or_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("")

    async def twice(append: bool) -> None:
        for _ in range(2):
            node = LogNode(MemoryNode(MIB), str(path), append=append)
            await node.flush()
            await close_subtree(node)

    asyncio.run(twice(False))
    assert [p["id"] for p in lines(path)] == [1]
    asyncio.run(twice(True))
    assert [p["id"] for p in lines(path)] == [1, 1, 1]


def test_capabilities_and_the_builder(tmp_path: Path) -> None:
    async def main() -> None:
        node: Node = log_node({"logfile": str(tmp_path / "a.log")}, MemoryNode(MIB), False)
        assert isinstance(node, LogNode)
        assert node.driver == "log"
        assert not node.capabilities.sparse_reads
        assert node.capabilities.can_write
        assert one_store(node)
        ro = log_node({"logfile": str(tmp_path / "b.log"), "logappend": True},
                      MemoryNode(MIB), True)
        assert not ro.capabilities.can_write
        paths = ro.fast_paths()
        assert paths == FastPaths(pread_nowait=paths.pread_nowait)  # no write path
        assert paths.pread_nowait is not None
        with pytest.raises(ValueError, match=r"^Could not open '/nonexistent/x\.log': No such "
                                             r"file or directory$"):
            log_node({"logfile": "/nonexistent/x.log"}, MemoryNode(MIB), False)
        await close_subtree(node)
        await close_subtree(ro)

    asyncio.run(main())
