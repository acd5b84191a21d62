"""I/O throttling: throttle groups and the ``throttle`` filter node (qemu's).

A ``ThrottleGroup`` (qemu's ``throttle-group`` object) holds limits and the
bucket levels of ``pynbd.block.throttlemath``; every ``ThrottleNode`` over
it (qemu's ``throttle`` driver, a member of the group) makes its reads,
writes, write-zeroes and trims wait until the group's buckets have room.
Several nodes, and so several exports, can share one group and its limits.

Rules of this module:
- A request that may start at once (no request of its direction waiting in
  the group, and the buckets have room) is counted and goes on without
  yielding; otherwise it queues.  Queues are FIFO per member and direction,
  and the group serves its members round-robin (as qemu's throttle groups),
  so one busy export cannot starve another sharing its group.  One timer per
  direction wakes the queue when the buckets will have room.
- Throttled: READ (read direction), WRITE, WRITE_ZEROES and TRIM (write
  direction, their whole length counted in bytes), as in qemu.  FLUSH,
  BLOCK_STATUS and CACHE are never held back.
- While the group limits a direction, the node's fast paths for that
  direction decline (one attribute read per request) and the requests take
  the task path, where they wait; the other direction keeps its fast paths.
  Sendfile reads are offered only while reads are not limited.
- A throttle node never answers sparse reads (``sparse_reads=False``): a
  client READ is one throttled ``pread`` of its whole length, as in qemu,
  not a block-status probe plus a read per data extent.
- A node joins its group when made and leaves it when closed; a group with
  members is in use (``object-del`` is refused).  New limits
  (``configure``) empty the buckets and re-examine the queues at once.
- One node is shared by every connection (it keeps no per-caller data), so
  the export's multi-conn flag is the child's.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import TYPE_CHECKING

from .filter import FilterNode
from .node import FastPaths
from .throttlemath import ThrottleLimits, ThrottleState

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .node import Data, Node, ReadDone, WriteDone

#: directions: index 0 reads, 1 writes
_READ, _WRITE = 0, 1


class ThrottleGroup:
    """Limits shared by the throttle nodes that name the group.

    Args:
        name: the group's id (the object's ``id``).
        limits: validated limits (``ThrottleLimits.updated`` or
            ``limits_from_properties``).
        clock: monotonic seconds (the event loop's clock is ``time.monotonic``).
    """

    def __init__(self, name: str, limits: ThrottleLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.state = ThrottleState(limits, clock())
        #: whether reads (index 0) and writes (1) can be held back at all
        self.limited = [limits.limits(False), limits.limits(True)]
        self.members: list[ThrottleNode] = []
        #: per direction: each member's waiting requests (future, size), oldest first
        self._queues: tuple[dict[ThrottleNode, collections.deque[
            tuple[asyncio.Future[None], int]]], ...] = ({}, {})
        self._waiting = [0, 0]
        #: per direction: the index of the member served last (round-robin)
        self._token = [-1, -1]
        self._timers: list[asyncio.TimerHandle | None] = [None, None]

    def __repr__(self) -> str:
        return f"ThrottleGroup({self.name!r}, members={len(self.members)})"

    @property
    def limits(self) -> ThrottleLimits:
        return self.state.limits

    @property
    def in_use(self) -> bool:
        return bool(self.members)

    def waiting(self, write: bool) -> int:
        """How many requests of a direction wait in the group."""
        return self._waiting[write]

    def configure(self, limits: ThrottleLimits) -> None:
        """New limits: the buckets empty and waiting requests are looked at again."""
        self.state.configure(limits, self._clock())
        # in place: the fast paths of connections already open read this list
        self.limited[:] = [limits.limits(False), limits.limits(True)]
        for direction in (_READ, _WRITE):
            self._cancel_timer(direction)
            if self._waiting[direction]:
                self._serve(direction)

    def _cancel_timer(self, direction: int) -> None:
        timer = self._timers[direction]
        if timer is not None:
            timer.cancel()
            self._timers[direction] = None

    def join(self, member: ThrottleNode) -> None:
        self.members.append(member)

    def leave(self, member: ThrottleNode) -> None:
        """``member`` is closing: its waiting requests (if any) go on unthrottled."""
        if member not in self.members:
            return
        self.members.remove(member)
        for direction in (_READ, _WRITE):
            for future, _ in self._queues[direction].pop(member, ()):
                self._waiting[direction] -= 1
                if not future.done():
                    future.set_result(None)
            self._token[direction] = -1
            if not self._waiting[direction]:
                self._cancel_timer(direction)

    async def intercept(self, member: ThrottleNode, size: int, write: bool) -> None:
        """Return once a request of ``size`` bytes of ``member`` may start (counted)."""
        direction = int(write)
        if not self._waiting[direction] and not self.state.wait(write, self._clock()):
            self.state.account(write, size)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues[direction].setdefault(member, collections.deque()).append((future, size))
        self._waiting[direction] += 1
        if self._timers[direction] is None:
            self._serve(direction)
        try:
            await future
        except asyncio.CancelledError:
            self._forget(direction, member, future)
            raise

    def _forget(self, direction: int, member: ThrottleNode,
                future: asyncio.Future[None]) -> None:
        """A waiting request was cancelled (its connection went away)."""
        queue = self._queues[direction].get(member)
        if queue is None:
            return
        for entry in queue:
            if entry[0] is future:
                queue.remove(entry)
                self._waiting[direction] -= 1
                return

    def _next(self, direction: int) -> ThrottleNode:
        """The member to serve next: round-robin over those with waiting requests."""
        members, queues = self.members, self._queues[direction]
        count = len(members)
        for step in range(1, count + 1):
            index = (self._token[direction] + step) % count
            if queues.get(members[index]):
                self._token[direction] = index
                return members[index]
        raise AssertionError("no member has a waiting request")

    def _serve(self, direction: int) -> None:
        """Let waiting requests of a direction start while the buckets have room;
        arm the direction's timer for when they will have room again."""
        self._timers[direction] = None
        write = bool(direction)
        while self._waiting[direction]:
            wait = self.state.wait(write, self._clock())
            if wait > 0:
                self._timers[direction] = asyncio.get_running_loop().call_later(
                    wait, self._serve, direction)
                return
            member = self._next(direction)
            future, size = self._queues[direction][member].popleft()
            self._waiting[direction] -= 1
            if not future.done():  # a cancelled request is not counted
                self.state.account(write, size)
                future.set_result(None)


class ThrottleNode(FilterNode):
    """``child`` with its requests held to the limits of ``group``."""

    driver = "throttle"

    def __init__(self, child: Node, group: ThrottleGroup, *, read_only: bool = False) -> None:
        super().__init__(child)
        self.group = group
        caps = child.capabilities
        self.capabilities = dataclasses.replace(
            caps, sparse_reads=False, can_write=caps.can_write and not read_only)
        group.join(self)

    def __repr__(self) -> str:
        return f"ThrottleNode({self.child!r}, group={self.group.name!r})"

    async def close(self) -> None:
        self.group.leave(self)

    # -- fast paths: the child's, for a direction the group does not limit ---------------

    def fast_paths(self) -> FastPaths:
        inner = self.child.resolve().fast_paths()
        limited = self.group.limited
        pread_nowait, pwrite_nowait = inner.pread_nowait, inner.pwrite_nowait
        start_read, start_write = inner.start_read, inner.start_write
        sendfile_source, own_read = inner.sendfile_source, inner.read

        def checked_pread_nowait(buf: memoryview, offset: int) -> bool:
            assert pread_nowait is not None
            return not limited[_READ] and pread_nowait(buf, offset)

        def checked_pwrite_nowait(data: Data, offset: int) -> bool:
            assert pwrite_nowait is not None
            return not limited[_WRITE] and pwrite_nowait(data, offset)

        def checked_start_read(offset: int, length: int, done: ReadDone) -> bool:
            assert start_read is not None
            return not limited[_READ] and start_read(offset, length, done)

        def checked_start_write(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
            assert start_write is not None
            return not limited[_WRITE] and start_write(data, offset, fua, done)

        def checked_sendfile_source(offset: int, length: int,
                                    data_only: bool) -> tuple[int, int] | None:
            assert sendfile_source is not None
            return None if limited[_READ] else sendfile_source(offset, length, data_only)

        async def throttled_read(offset: int, length: int) -> bytes | bytearray:
            assert own_read is not None
            if limited[_READ]:
                await self.group.intercept(self, length, False)
            return await own_read(offset, length)

        writable = self.capabilities.can_write
        return FastPaths(
            pread_nowait=checked_pread_nowait if pread_nowait is not None else None,
            pwrite_nowait=checked_pwrite_nowait if pwrite_nowait and writable else None,
            start_read=checked_start_read if start_read is not None else None,
            start_write=checked_start_write if start_write and writable else None,
            sendfile_source=checked_sendfile_source if sendfile_source is not None else None,
            read=throttled_read if own_read is not None else None,
        )

    # -- the requests, held back while the group says so --------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        if self.group.limited[_READ]:
            await self.group.intercept(self, len(buf), False)
        await self.child.pread(buf, offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        if self.group.limited[_WRITE]:
            await self.group.intercept(self, len(data), True)
        await self.child.pwrite(data, offset, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        if self.group.limited[_WRITE]:
            await self.group.intercept(self, length, True)
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self.group.limited[_WRITE]:
            await self.group.intercept(self, length, True)
        await self.child.trim(offset, length, fua=fua)


def throttle_node(options: Mapping[str, object], child: Node,
                  groups: Mapping[str, ThrottleGroup], read_only: bool) -> ThrottleNode:
    """The ``throttle`` node blockdev ``options`` describe (qemu's
    BlockdevOptionsThrottle: ``throttle-group`` names a group of ``groups``).

    Raises:
        ValueError: no such group (qemu's wording).
    """
    name = options.get("throttle-group")
    if not isinstance(name, str) or not name:
        raise ValueError("Please specify a throttle group")
    group = groups.get(name)
    if group is None:
        raise ValueError(f"Throttle group '{name}' does not exist")
    return ThrottleNode(child, group, read_only=read_only)
