"""The model-based half of the node contract: a hypothesis state machine that drives a
node (its requests and every fast path it offers) against a ``bytearray`` model.

Trimmed bytes are "undefined" in the model until rewritten: a read may return
either the old data or zeroes for them.  The fast paths are taken as the server
takes them: resolved once (``node.resolve().fast_paths()``), a declined one
followed by the ordinary request on the resolved node.

The model starts as ``initial_contents(stack)`` (zeroes: a fresh node).  Inside
``support.shared_loop()`` every run uses that loop (the stack is made on it too).
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..block.graph import close_subtree
from ..block.node import ExtentFlags, FastZeroUnsupported
from .support import (
    CHUNK,
    KIB,
    MODEL_SIZE,
    assert_no_hole,
    assert_old_or_zero,
    check_extents,
    check_guards,
    current_loop,
    first_difference,
    pattern,
    read,
    start_read,
    start_write,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .support import Stack

_T = TypeVar("_T")

#: offsets where bugs live: block and chunk boundaries, one byte either side
_EDGES = sorted({edge + delta
                 for edge in (0, 512, 4096, CHUNK, 2 * CHUNK, 3 * CHUNK,
                              MODEL_SIZE - 4096, MODEL_SIZE)
                 for delta in (-1, 0, 1)
                 if 0 <= edge + delta <= MODEL_SIZE})


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    """A non-empty ``(offset, length)`` inside the model disk; both ends like edges."""
    offset = draw(st.one_of(st.sampled_from([e for e in _EDGES if e < MODEL_SIZE]),
                            st.integers(0, MODEL_SIZE - 1)))
    end = draw(st.one_of(st.sampled_from([e for e in _EDGES if e > offset]),
                         st.integers(offset + 1, min(MODEL_SIZE, offset + 4 * KIB)),
                         st.integers(offset + 1, min(MODEL_SIZE, offset + 3 * CHUNK)),
                         st.integers(offset + 1, MODEL_SIZE)))
    return offset, end - offset


def _writable(machine: NodeMachine) -> bool:
    return machine.node.capabilities.can_write


class NodeMachine(RuleBasedStateMachine):
    """A node against a ``bytearray`` model; ``make_stack`` gives a fresh one each run."""

    def __init__(self) -> None:
        super().__init__()
        shared = current_loop()
        self.stack = self.make_stack()
        self._own_loop = shared is None
        self.loop = asyncio.new_event_loop() if shared is None else shared
        self.node = self.stack.top
        #: what the server talks to, and the fast paths it takes on it
        self.io = self.node.resolve()
        self.paths = self.io.fast_paths()
        self.model = bytearray(self.initial_contents(self.stack))
        assert len(self.model) == MODEL_SIZE
        #: 1 where a trim left the byte as "old data or zero"
        self.undefined = bytearray(MODEL_SIZE)

    def make_stack(self) -> Stack:
        raise NotImplementedError

    def initial_contents(self, stack: Stack) -> bytes:
        """What the stack's top reads before any write: zeroes (a fresh node)."""
        return bytes(MODEL_SIZE)

    def run(self, step: Awaitable[_T]) -> _T:
        return self.loop.run_until_complete(step)

    def teardown(self) -> None:
        try:
            try:
                self.run(check_guards(self.stack))
            finally:
                self.run(close_subtree(self.node))
        finally:
            if self._own_loop:
                self.loop.close()

    def _set(self, offset: int, data: bytes) -> None:
        self.model[offset:offset + len(data)] = data
        self.undefined[offset:offset + len(data)] = bytes(len(data))

    def check(self, got: bytes, offset: int) -> None:
        """``got`` was read at ``offset``: compare it with the model."""
        end = offset + len(got)
        if got == self.model[offset:end]:
            return
        pos = offset
        while pos < end:
            start = self.undefined.find(1, pos, end)
            stop = end if start < 0 else start
            want = self.model[pos:stop]
            assert got[pos - offset:stop - offset] == want, (
                f"read at {pos}: " + first_difference(got[pos - offset:stop - offset], want))
            if start < 0:
                return
            pos = self.undefined.find(0, start, end)
            pos = end if pos < 0 else pos
            assert_old_or_zero(got[start - offset:pos - offset], self.model[start:pos], start)

    # -- requests ----------------------------------------------------------

    @precondition(_writable)
    @rule(where=ranges(), seed=st.integers(0, 254), fua=st.booleans())
    def pwrite(self, where: tuple[int, int], seed: int, fua: bool) -> None:
        offset, length = where
        data = pattern(seed, length)
        self.run(self.node.pwrite(data, offset, fua=fua))
        self._set(offset, data)

    @rule(where=ranges())
    def pread(self, where: tuple[int, int]) -> None:
        offset, length = where
        self.check(self.run(read(self.node, offset, length)), offset)

    @rule(where=ranges())
    def pread_resolved(self, where: tuple[int, int]) -> None:
        """The node the server talks to reads what the node reads."""
        offset, length = where
        self.check(self.run(read(self.io, offset, length)), offset)

    @precondition(_writable)
    @rule(where=ranges(), fua=st.booleans())
    def trim(self, where: tuple[int, int], fua: bool) -> None:
        offset, length = where
        self.run(self.node.trim(offset, length, fua=fua))
        self.undefined[offset:offset + length] = b"\x01" * length

    @precondition(_writable)
    @rule(where=ranges(), may_trim=st.booleans(), fast=st.booleans(), fua=st.booleans())
    def write_zeroes(self, where: tuple[int, int], may_trim: bool, fast: bool,
                     fua: bool) -> None:
        offset, length = where
        try:
            self.run(self.node.write_zeroes(offset, length, may_trim=may_trim,
                                            fast=fast, fua=fua))
        except FastZeroUnsupported:
            assert fast, "FastZeroUnsupported without fast=True"
            return  # nothing changed: later reads check that
        self._set(offset, bytes(length))

    @rule()
    def flush(self) -> None:
        self.run(self.node.flush())

    @rule(where=ranges())
    def block_status(self, where: tuple[int, int]) -> None:
        self.run(check_extents(self.node, *where))

    @rule(where=ranges())
    def cache(self, where: tuple[int, int]) -> None:
        self.run(self.node.cache(*where))

    # -- fast paths --------------------------------------------------------

    @precondition(lambda self: _writable(self) and self.paths.pwrite_nowait is not None)
    @rule(where=ranges(), seed=st.integers(0, 254))
    def pwrite_nowait(self, where: tuple[int, int], seed: int) -> None:
        """Done now, or refused (then the server uses pwrite)."""
        offset, length = where
        data = pattern(seed, length)
        assert self.paths.pwrite_nowait is not None
        if not self.paths.pwrite_nowait(data, offset):
            self.run(self.io.pwrite(data, offset))
        self._set(offset, data)

    @precondition(lambda self: self.paths.pread_nowait is not None)
    @rule(where=ranges())
    def pread_nowait(self, where: tuple[int, int]) -> None:
        offset, length = where
        buf = bytearray(length)
        assert self.paths.pread_nowait is not None
        if self.paths.pread_nowait(memoryview(buf), offset):
            self.check(bytes(buf), offset)

    @precondition(lambda self: self.paths.sendfile_source is not None)
    @rule(where=ranges(), data_only=st.booleans())
    def sendfile_source(self, where: tuple[int, int], data_only: bool) -> None:
        """What ``os.sendfile`` would send from the source is the data."""
        offset, length = where
        assert self.paths.sendfile_source is not None
        source = self.paths.sendfile_source(offset, length, data_only)
        if source is None:
            return
        fd, position = source
        got = os.pread(fd, length, position)
        assert len(got) == length, f"the source holds {len(got)} of {length} bytes"
        self.check(got, offset)
        if data_only:
            self.run(assert_no_hole(self.node, offset, length))

    @precondition(lambda self: self.paths.read is not None)
    @rule(where=ranges())
    def own_buffer_read(self, where: tuple[int, int]) -> None:
        offset, length = where
        assert self.paths.read is not None
        got = self.run(self.paths.read(offset, length))
        assert len(got) == length
        self.check(bytes(got), offset)

    @precondition(lambda self: self.paths.start_read is not None)
    @rule(where=ranges())
    def start_read(self, where: tuple[int, int]) -> None:
        offset, length = where
        assert self.paths.start_read is not None
        got = self.run(start_read(self.paths.start_read, offset, length))
        self.check(got if got is not None else self.run(read(self.io, offset, length)),
                   offset)

    @precondition(lambda self: _writable(self) and self.paths.start_write is not None)
    @rule(where=ranges(), seed=st.integers(0, 254), fua=st.booleans())
    def start_write(self, where: tuple[int, int], seed: int, fua: bool) -> None:
        offset, length = where
        data = pattern(seed, length)
        assert self.paths.start_write is not None
        if not self.run(start_write(self.paths.start_write, data, offset, fua)):
            self.run(self.io.pwrite(data, offset, fua=fua))
        self._set(offset, data)

    # -- invariants --------------------------------------------------------

    @invariant()
    def zero_extents_match_the_model(self) -> None:
        """Walk the whole disk: ZERO extents read as zeroes, and so does the model."""
        offset = 0
        while offset < MODEL_SIZE:
            for extent in self.run(check_extents(self.node, offset, MODEL_SIZE - offset)):
                if extent.flags & ExtentFlags.ZERO:
                    self.check(bytes(extent.length), offset)
                offset += extent.length
