"""FileNode durability: the group commit, and the latch after a failed ``fdatasync``.

Each flush (or FUA write) must be covered by an ``fdatasync`` that started
after it was called; flushes that arrive while one runs share the next.  Once
an ``fdatasync`` has failed, every later flush and FUA request fails with EIO.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from typing import TYPE_CHECKING

import pytest
from tests.unit.block.support import raises_errno, read, run

from pynbd.block import FileNode

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator


class SlowSync:
    """An ``os.fdatasync`` stand-in that takes a while and records when it started."""

    def __init__(self, seconds: float = 0.02, fail: int = 0) -> None:
        self.seconds = seconds
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.starts.append(time.monotonic())
        time.sleep(self.seconds)
        with self.lock:
            self.ends.append(time.monotonic())
            if self.fail:
                self.fail -= 1
                raise OSError(errno.EIO, "simulated writeback error")


@pytest.fixture
def file_node(tmp_path: pathlib.Path) -> Iterator[FileNode]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    node = FileNode(str(path), discard=True)
    yield node
    asyncio.run(node.close())


def test_concurrent_flushes_share_fdatasync_and_each_is_covered(
        file_node: FileNode, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = SlowSync()
    monkeypatch.setattr(os, "fdatasync", sync)

    async def flush(delay: float) -> tuple[float, float]:
        await asyncio.sleep(delay)
        await file_node.pwrite(b"x" * 4096, 0)
        called = time.monotonic()
        await file_node.flush()
        return called, time.monotonic()

    async def main() -> list[tuple[float, float]]:
        return await asyncio.gather(*(flush(i * 0.003) for i in range(20)))

    spans = asyncio.run(main())
    assert len(sync.starts) <= 8, "20 flushes within ~60 ms should need a few fdatasyncs"
    for called, returned in spans:
        # some fdatasync started after the flush was called and ended before it returned
        assert any(called <= start and end <= returned
                   for start, end in zip(sync.starts, sync.ends, strict=True))


def test_a_lone_flush_syncs_at_once(file_node: FileNode,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sync = SlowSync(0.0)
    monkeypatch.setattr(os, "fdatasync", sync)
    for _ in range(3):
        asyncio.run(file_node.flush())
    assert len(sync.starts) == 3  # nothing is skipped: every flush gets its own


def test_a_failed_round_fails_its_waiters_and_latches(
        file_node: FileNode, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = SlowSync(0.02, fail=1)
    monkeypatch.setattr(os, "fdatasync", sync)

    async def main() -> list[BaseException | None]:
        first = asyncio.ensure_future(file_node.flush())
        await asyncio.sleep(0.005)  # the next two wait for the round after the failing one
        rest = [asyncio.ensure_future(file_node.flush()) for _ in range(2)]
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    first, *rest = asyncio.run(main())
    assert isinstance(first, OSError)
    assert first.errno == errno.EIO
    assert "simulated" in str(first)
    for error in rest:
        assert isinstance(error, OSError)
        assert error.errno == errno.EIO
        assert "earlier fdatasync failed" in str(error)
    assert len(sync.starts) == 1  # the shared round never started: the latch refused it


def test_a_cancelled_waiter_does_not_cancel_the_shared_round(
        file_node: FileNode, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = SlowSync(0.02)
    monkeypatch.setattr(os, "fdatasync", sync)

    async def main() -> None:
        first = asyncio.ensure_future(file_node.flush())
        await asyncio.sleep(0.005)
        quitter = asyncio.ensure_future(file_node.flush())
        stayer = asyncio.ensure_future(file_node.flush())
        await asyncio.sleep(0)
        quitter.cancel()
        await first
        await stayer
        with pytest.raises(asyncio.CancelledError):
            await quitter

    asyncio.run(main())
    assert len(sync.starts) == 2


# -- the durability latch ------------------------------------------------------------


def test_failed_fdatasync_latches(file_node: FileNode, monkeypatch: pytest.MonkeyPatch) -> None:
    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "simulated writeback error")

    run(file_node.pwrite(b"data", 0))
    run(file_node.flush())
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with raises_errno(errno.EIO):
        run(file_node.flush())
    monkeypatch.undo()
    for attempt in (file_node.flush(), file_node.pwrite(b"more", 0, fua=True),
                    file_node.write_zeroes(0, 10, fua=True), file_node.trim(0, 10, fua=True),
                    file_node.flush()):
        with raises_errno(errno.EIO):
            run(attempt)
    # writes without FUA still work; only durability is refused
    run(file_node.pwrite(b"more", 0))
    assert run(read(file_node, 0, 4)) == b"more"
    # a new node on the same file starts clean
    fresh = FileNode(file_node.path)
    try:
        run(fresh.flush())
        run(fresh.pwrite(b"x", 0, fua=True))
    finally:
        run(fresh.close())


def test_every_sync_failure_latches(file_node: FileNode,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def fdatasync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "simulated")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(OSError, match="simulated"):
        run(file_node.pwrite(b"x", 0, fua=True))
    monkeypatch.undo()
    with pytest.raises(OSError, match="earlier fdatasync failed"):
        run(file_node.flush())
