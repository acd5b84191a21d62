"""What the block-node tests share: running coroutines, test data, the checks every
reply must pass, the fast paths driven as the server drives them, and the layers
(raw, windows, fault filters) that the contract runs every protocol node under.
Part of ``pynbd.testing`` (pytest and hypothesis are needed here only); pynbd's
own tests and plugin authors' tests use it alike.

A layer turns a factory of fresh protocol nodes into a ``Stack``: the node the
tests talk to (``top``), the protocol node under it, where the top's byte 0 lies
in the protocol node (``shift``), and guard bytes written around a window, which
must still be there when the stack is closed (a request shifted wrongly would
overwrite them).  Over a node that cannot write, the guards are the bytes that
were there.

``run`` runs each coroutine on a new event loop, or, inside ``shared_loop()``, all
of them on one (for nodes whose storage keeps loop-bound state: connections,
locks, as a plugin may).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import threading
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from ..block.bitmap import DirtyBitmap
from ..block.faults import COMMANDS, FaultFilter, FaultRule
from ..block.node import Extent, ExtentFlags, Node
from ..block.raw import RawNode
from ..block.tracking import TrackingFilter, bitmaps_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from ..block.node import Data, ReadDone, WriteDone

_T = TypeVar("_T")

KIB = 1024
MIB = 1024 * KIB
#: a chunk size many nodes use; test ranges straddle its multiples
CHUNK = 64 * KIB
#: size of the state machine's disk: not a multiple of any chunk or block size
MODEL_SIZE = 256 * KIB + 123
#: where a window starts in its protocol node (unaligned on purpose) ...
WINDOW_START = 2 * CHUNK + 77
#: ... and how many bytes of the protocol node follow it
WINDOW_TAIL = CHUNK + 5

HOLE = ExtentFlags.HOLE | ExtentFlags.ZERO
DATA = ExtentFlags.DATA

_BASE_PATTERN = bytes(range(1, 256))


#: the loop ``run`` uses inside ``shared_loop()``
_shared: asyncio.AbstractEventLoop | None = None


def run(step: Awaitable[_T]) -> _T:
    """Run one coroutine (or other awaitable) to completion on a new event loop (or
    the shared one, inside ``shared_loop()``)."""
    async def main() -> _T:
        return await step

    if _shared is not None:
        return _shared.run_until_complete(main())
    return asyncio.run(main())


def current_loop() -> asyncio.AbstractEventLoop | None:
    """The loop of ``shared_loop()``, if inside it."""
    return _shared


@contextlib.contextmanager
def shared_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """Inside: ``run`` runs everything on one event loop, closed at the end."""
    global _shared
    if _shared is not None:  # already inside one
        yield _shared
        return
    with asyncio.Runner() as runner:
        _shared = runner.get_loop()
        try:
            yield _shared
        finally:
            _shared = None


def pattern(seed: int, length: int) -> bytes:
    """``length`` non-zero bytes; different seeds give different bytes."""
    start = seed % len(_BASE_PATTERN)
    block = _BASE_PATTERN[start:] + _BASE_PATTERN[:start]
    return (block * (length // len(block) + 1))[:length]


async def read(node: Node, offset: int, length: int) -> bytes:
    """``pread`` into a fresh buffer."""
    buf = bytearray(length)
    await node.pread(memoryview(buf), offset)
    return bytes(buf)


def first_difference(got: bytes, want: bytes | bytearray) -> str:
    """A short description of where two equal-length byte strings differ."""
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            return f"first difference at +{index}: got {a:#04x}, want {b:#04x}"
    return "no difference"


def assert_old_or_zero(got: bytes, old: bytes | bytearray, where: int = 0) -> None:
    """Every byte of ``got`` is either the matching byte of ``old`` or zero."""
    assert len(got) == len(old)
    step = 512
    for pos in range(0, len(got), step):
        g, o = got[pos:pos + step], old[pos:pos + step]
        if g == o or g.count(0) == len(g):
            continue
        for index, (a, b) in enumerate(zip(g, o, strict=True)):
            assert a in (0, b), (f"byte {where + pos + index} is {a:#04x}: "
                                 f"neither the old {b:#04x} nor zero")


async def check_extents(node: Node, offset: int, length: int) -> list[Extent]:
    """Call ``block_status`` and check the reply's shape and its ZERO promise."""
    extents = await node.block_status(offset, length)
    assert extents, "block_status must return at least one extent"
    known = ExtentFlags.HOLE | ExtentFlags.ZERO
    pos = offset
    for extent in extents:
        assert isinstance(extent, Extent)
        assert extent.length > 0
        assert extent.flags & ~known == 0, f"unknown flags {extent.flags!r}"
        if extent.flags & ExtentFlags.ZERO:
            got = await read(node, pos, extent.length)
            assert got.count(0) == len(got), (
                f"extent [{pos}, +{extent.length}) is reported ZERO but is not: "
                + first_difference(got, bytes(len(got))))
        pos += extent.length
    assert pos <= node.size, f"extents run to {pos}, past the end {node.size}"
    return extents


async def assert_no_hole(node: Node, offset: int, length: int) -> None:
    """``block_status`` reports no HOLE anywhere in the range (asked as a client asks)."""
    end = offset + length
    while offset < end:
        for extent in await node.block_status(offset, end - offset):
            assert not extent.flags & ExtentFlags.HOLE, (
                f"a sendfile source with data_only covers a hole at {offset}")
            offset += extent.length


@contextlib.contextmanager
def raises_errno(code: int) -> Iterator[None]:
    """Like ``pytest.raises(OSError)``, for one errno value."""
    with pytest.raises(OSError, match=rf"\[Errno {code}\]") as info:
        yield
    assert info.value.errno == code


async def outcome(call: Awaitable[object]) -> int:
    """0 if the call succeeds, else the errno it raised."""
    try:
        await call
    except OSError as err:
        return err.errno if err.errno is not None else -1
    return 0




# -- the direct fast paths, driven as the server drives them --------------------------------

class _Completion:
    """The ``done`` callback of a direct request: records every call (and its thread) and
    wakes the awaiting task, so that the checks run on the task, not in the callback."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.future: asyncio.Future[tuple[Any, ...]] = self.loop.create_future()
        #: (on the loop's thread, arguments) of every call
        self.calls: list[tuple[bool, tuple[Any, ...]]] = []

    def __call__(self, *args: Any) -> None:
        on_loop = threading.get_ident() == self.thread
        self.calls.append((on_loop, args))
        if on_loop and not self.future.done():
            self.future.set_result(args)
        elif not on_loop:  # wake the task anyway: it reports the wrong thread
            self.loop.call_soon_threadsafe(
                lambda: None if self.future.done() else self.future.set_result(args))

    async def wait(self, what: str) -> tuple[Any, ...]:
        args = await self.future
        await asyncio.sleep(0)  # a second call would be made by now
        assert [on_loop for on_loop, _ in self.calls] == [True], (
            f"{what}'s done must be called once, on the loop's thread: {self.calls}")
        return args


async def start_read(call: Callable[[int, int, ReadDone], bool], offset: int,
                     length: int) -> bytes | None:
    """The data a ``start_read`` delivers, or None if it declined (use ``pread``)."""
    done = _Completion()
    if not call(offset, length, done):
        assert not done.calls, "a declined start_read called done"
        return None
    assert not done.calls, "done was called from within start_read"
    data, error = await done.wait("start_read")
    if error is not None:
        raise error
    assert data is not None
    return bytes(data)


async def start_write(call: Callable[[Data, int, bool, WriteDone], bool], data: bytes,
                      offset: int, fua: bool) -> bool:
    """Whether a ``start_write`` took the write (then it has completed), or declined."""
    done = _Completion()
    lent = bytearray(data)
    if not call(lent, offset, fua, done):
        assert not done.calls, "a declined start_write called done"
        return False
    assert not done.calls, "done was called from within start_write"
    (error,) = await done.wait("start_write")
    if error is not None:
        raise error
    return True


# -- layers ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stack:
    """A node under test and what it is made of."""

    #: the node the tests talk to
    top: Node
    #: the protocol node holding the data
    protocol: Node
    #: where the top's byte 0 lies in ``protocol``
    shift: int = 0
    #: ``(offset, bytes)`` of ``protocol`` outside the top's range, to be kept
    guards: tuple[tuple[int, bytes], ...] = ()


async def check_guards(stack: Stack) -> None:
    """The protocol bytes outside the window are what they were."""
    for offset, data in stack.guards:
        got = await read(stack.protocol, offset, len(data))
        assert got == data, (f"the bytes at {offset} of the node under the window changed: "
                             + first_difference(got, data))


def idle_rules(size: int) -> list[FaultRule]:
    """Rules that are there but never pick: a range past the end of a node of ``size``
    bytes (so every request is checked, and passes), and an exhausted delay."""
    return [FaultRule(frozenset(COMMANDS), errno=errno.EIO, start=size + 1),
            FaultRule(frozenset(COMMANDS), delay=60.0, count=1, hits=1)]


def _window(make: Callable[[int], Node], size: int) -> Stack:
    protocol = make(WINDOW_START + size + WINDOW_TAIL)
    head, tail = pattern(201, WINDOW_START), pattern(202, WINDOW_TAIL)

    async def guard() -> None:
        await protocol.pwrite(head, 0)
        await protocol.pwrite(tail, WINDOW_START + size)

    if protocol.capabilities.can_write:
        run(guard())
    else:  # what is there is kept
        head = run(read(protocol, 0, WINDOW_START))
        tail = run(read(protocol, WINDOW_START + size, WINDOW_TAIL))
    return Stack(RawNode(protocol, offset=WINDOW_START, size=size), protocol, WINDOW_START,
                 ((0, head), (WINDOW_START + size, tail)))


def build_node(make: Callable[[int], Node], size: int) -> Stack:
    protocol = make(size)
    return Stack(protocol, protocol)


def build_raw(make: Callable[[int], Node], size: int) -> Stack:
    protocol = make(size)
    return Stack(RawNode(protocol), protocol)


def build_window(make: Callable[[int], Node], size: int) -> Stack:
    return _window(make, size)


def build_faults(make: Callable[[int], Node], size: int) -> Stack:
    protocol = make(size)
    return Stack(FaultFilter(protocol, seed=1), protocol)


def build_faults_idle(make: Callable[[int], Node], size: int) -> Stack:
    protocol = make(size)
    return Stack(FaultFilter(protocol, idle_rules(size), seed=1), protocol)


def build_stack(make: Callable[[int], Node], size: int) -> Stack:
    """The daemon's shape: idle fault rules over write tracking (an enabled dirty
    bitmap) over a raw window."""
    window = _window(make, size)
    bitmaps_of(window.top).add(DirtyBitmap("contract", size, 4096))
    tracked = TrackingFilter(window.top)
    return dataclasses.replace(window, top=FaultFilter(tracked, idle_rules(size), seed=1))


@dataclasses.dataclass(frozen=True)
class Layer:
    """How the node under test is put together from a protocol node."""

    name: str
    build: Callable[[Callable[[int], Node], int], Stack]
    #: state-machine runs for this layer (each builds a fresh stack)
    examples: int


#: every layer the contract runs a protocol node under
LAYERS = (
    Layer("node", build_node, 50),
    Layer("raw", build_raw, 15),
    Layer("raw-window", build_window, 25),
    Layer("faults", build_faults, 15),
    Layer("faults-idle", build_faults_idle, 20),
    Layer("stack", build_stack, 15),
)
