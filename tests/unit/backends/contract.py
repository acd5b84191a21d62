"""The contract every backend must keep, as tests a backend's module inherits.

A backend's test module subclasses ``BackendContract`` (zarr ``StoreTests``
style) and provides:

- ``make_backend(tmp_path, size)``: a *fresh* backend of ``size`` bytes whose
  contents read as zeroes (it is called again for every state-machine run, so
  it must not reuse a file name);
- optionally ``has_raw_access = True`` with ``read_raw``/``write_raw``, which
  reach the storage without the backend's own methods (ground truth).

The tests run the coroutines with ``asyncio.run``; the state machine owns one
event loop per run.  Rules checked: data round-trips at any offset, trimmed
bytes read as the old data or zeroes, zeroed ranges read as zeroes with their
neighbours untouched, ``fast`` zeroing either works or changes nothing, and
every extent that ``block_status`` reports with ``ZERO`` really reads as zeroes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pynbd.backends import Backend, Capabilities, Extent, ExtentFlags, FastZeroUnsupported

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Coroutine, Iterator

_T = TypeVar("_T")

KIB = 1024
#: a chunk size many backends use; test ranges straddle its multiples
CHUNK = 64 * KIB
#: size of the state machine's disk: not a multiple of any chunk or block size
MODEL_SIZE = 256 * KIB + 123

_BASE_PATTERN = bytes(range(1, 256))


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run one coroutine to completion on a new event loop."""
    return asyncio.run(coro)


def pattern(seed: int, length: int) -> bytes:
    """``length`` non-zero bytes; different seeds give different bytes."""
    start = seed % len(_BASE_PATTERN)
    block = _BASE_PATTERN[start:] + _BASE_PATTERN[:start]
    return (block * (length // len(block) + 1))[:length]


async def read(backend: Backend, offset: int, length: int) -> bytes:
    """``pread`` into a fresh buffer."""
    buf = bytearray(length)
    await backend.pread(memoryview(buf), offset)
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


async def check_extents(backend: Backend, offset: int, length: int) -> list[Extent]:
    """Call ``block_status`` and check the reply's shape and its ZERO promise."""
    extents = await backend.block_status(offset, length)
    assert extents, "block_status must return at least one extent"
    known = ExtentFlags.HOLE | ExtentFlags.ZERO
    pos = offset
    for extent in extents:
        assert extent.length > 0
        assert extent.flags & ~known == 0, f"unknown flags {extent.flags!r}"
        if extent.flags & ExtentFlags.ZERO:
            got = await read(backend, pos, extent.length)
            assert got.count(0) == len(got), (
                f"extent [{pos}, +{extent.length}) is reported ZERO but is not: "
                + first_difference(got, bytes(len(got))))
        pos += extent.length
    assert pos <= backend.size, f"extents run to {pos}, past the end {backend.size}"
    return extents


@contextlib.contextmanager
def raises_errno(code: int) -> Iterator[None]:
    """Like ``pytest.raises(OSError)``, for one errno value."""
    with pytest.raises(OSError, match=rf"\[Errno {code}\]") as info:
        yield
    assert info.value.errno == code


def _require_write(backend: Backend) -> None:
    if not backend.capabilities.can_write:
        pytest.skip("backend is read-only")


#: (name, offset, length) for round trips; negative offsets count from the end,
#: a length of None means "to the end"
ROUNDTRIP_CASES = [
    ("aligned", 0, 4 * KIB),
    ("aligned-two-chunks", CHUNK, 2 * CHUNK),
    ("unaligned", 1, 1000),
    ("unaligned-across-chunk-edge", CHUNK - 6, 20),
    ("unaligned-many-chunks", 3, 3 * CHUNK + 77),
    ("end-of-device", -777, None),
    ("last-byte", -1, None),
    ("whole-device", 0, None),
]


class BackendContract:
    """Tests every backend inherits; see the module docstring."""

    #: the size most tests ask for (not a multiple of 512 or of any chunk)
    size: ClassVar[int] = 1024 * KIB + 4 * KIB + 123
    #: whether ``read_raw``/``write_raw`` are implemented
    has_raw_access: ClassVar[bool] = False

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        raise NotImplementedError

    def read_raw(self, backend: Backend, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def write_raw(self, backend: Backend, offset: int, data: bytes) -> None:
        raise NotImplementedError

    @pytest.fixture
    def backend(self, tmp_path: pathlib.Path) -> Iterator[Backend]:
        backend = self.make_backend(tmp_path, self.size)
        yield backend
        run(backend.close())

    def _range(self, offset: int, length: int | None) -> tuple[int, int]:
        if offset < 0:
            offset += self.size
        return offset, self.size - offset if length is None else length

    # -- basics ------------------------------------------------------------

    def test_size(self, backend: Backend) -> None:
        assert backend.size == self.size

    def test_capabilities(self, backend: Backend) -> None:
        assert isinstance(backend.capabilities, Capabilities)

    def test_fresh_backend_reads_zeroes(self, backend: Backend) -> None:
        got = run(read(backend, 0, backend.size))
        assert got.count(0) == backend.size

    @pytest.mark.parametrize(("name", "offset", "length"), ROUNDTRIP_CASES,
                             ids=[case[0] for case in ROUNDTRIP_CASES])
    def test_roundtrip(self, backend: Backend, name: str, offset: int,
                       length: int | None) -> None:
        _require_write(backend)
        offset, length = self._range(offset, length)
        data = pattern(offset, length)
        before = min(offset, 100)
        after = min(backend.size - offset - length, 100)

        async def body() -> None:
            await backend.pwrite(data, offset)
            assert await read(backend, offset, length) == data
            # the bytes around the write are untouched
            got = await read(backend, offset - before, before + length + after)
            assert got == bytes(before) + data + bytes(after)

        run(body())
        if self.has_raw_access:
            assert self.read_raw(backend, offset, length) == data

    def test_read_returns_what_pread_fills(self, backend: Backend) -> None:
        _require_write(backend)
        data = pattern(7, 3 * CHUNK + 5)

        async def body() -> None:
            await backend.pwrite(data, CHUNK - 1)
            got = await backend.read(CHUNK - 1, len(data))
            assert bytes(got) == data
            assert await read(backend, CHUNK - 1, len(data)) == data
            # a hole reads as zeroes; an empty read is empty
            assert bytes(await backend.read(backend.size - 10, 10)) == bytes(10)
            assert len(await backend.read(0, 0)) == 0

        run(body())

    def test_pwrite_accepts_every_buffer_type(self, backend: Backend) -> None:
        _require_write(backend)
        data = pattern(5, 3000)

        async def body() -> None:
            await backend.pwrite(data, 10)
            await backend.pwrite(bytearray(data), 5000)
            await backend.pwrite(memoryview(data)[1000:2000], 9000)
            assert await read(backend, 10, 3000) == data
            assert await read(backend, 5000, 3000) == data
            assert await read(backend, 9000, 1000) == data[1000:2000]

        run(body())

    def test_nowait_fast_path(self, backend: Backend) -> None:
        """pread_nowait/pwrite_nowait either do the whole job at once or say no."""
        data = pattern(11, 9000)
        if backend.capabilities.can_write:
            if not backend.pwrite_nowait(data, CHUNK - 100):
                run(backend.pwrite(data, CHUNK - 100))
        else:
            data = bytes(9000)
        buf = bytearray(9000)
        if backend.pread_nowait(memoryview(buf), CHUNK - 100):
            assert bytes(buf) == data
        assert run(read(backend, CHUNK - 100, 9000)) == data

    def test_raw_write_is_read_back(self, backend: Backend) -> None:
        if not self.has_raw_access:
            pytest.skip("no out-of-band access to this backend's storage")
        data = pattern(9, 70_001)
        self.write_raw(backend, CHUNK - 5, data)
        assert run(read(backend, CHUNK - 5, len(data))) == data

    def test_write_is_visible_to_other_callers(self, backend: Backend) -> None:
        """Another task (another connection) sees a completed write at once."""
        _require_write(backend)
        first, second = pattern(1, 5000), pattern(2, 5000)

        async def body() -> None:
            await asyncio.create_task(backend.pwrite(first, 70_000))
            assert await asyncio.create_task(read(backend, 70_000, 5000)) == first
            # qemu's nbd-multiconn test: write on A, flush on B, read on C
            await asyncio.create_task(backend.pwrite(second, 70_000))
            await asyncio.create_task(backend.flush())
            assert await asyncio.create_task(read(backend, 70_000, 5000)) == second

        run(body())

    # -- trim and zero -----------------------------------------------------

    @pytest.mark.parametrize(("start", "length"), [
        (1000, 200_001), (0, CHUNK - 1), (1, CHUNK - 1), (CHUNK, CHUNK), (CHUNK + 1, CHUNK)])
    def test_trim(self, backend: Backend, start: int, length: int) -> None:
        _require_write(backend)
        data = pattern(3, 300_000)

        async def body() -> None:
            await backend.pwrite(data, 0)
            await backend.trim(start, length)
            got = await read(backend, 0, len(data))
            assert got[:start] == data[:start]
            assert_old_or_zero(got[start:start + length], data[start:start + length], start)
            assert got[start + length:] == data[start + length:]
            # writing into the trimmed range works as usual
            new = pattern(4, 100_000)
            await backend.pwrite(new, start + 50_000)
            assert await read(backend, start + 50_000, len(new)) == new

        run(body())

    @pytest.mark.parametrize("may_trim", [False, True])
    @pytest.mark.parametrize(("offset", "length"), [
        (4097, 200_003), (CHUNK, CHUNK), (0, CHUNK - 1), (1, CHUNK - 1), (CHUNK + 1, CHUNK),
        (-100, None), (0, None)])
    def test_write_zeroes(self, backend: Backend, may_trim: bool, offset: int,
                          length: int | None) -> None:
        _require_write(backend)
        offset, length = self._range(offset, length)
        data = pattern(6, backend.size)

        async def body() -> None:
            await backend.pwrite(data, 0)
            await backend.write_zeroes(offset, length, may_trim=may_trim)
            got = await read(backend, 0, backend.size)
            assert got[:offset] == data[:offset], first_difference(got[:offset], data[:offset])
            zeroed = got[offset:offset + length]
            assert zeroed.count(0) == length, first_difference(zeroed, bytes(length))
            assert got[offset + length:] == data[offset + length:]

        run(body())

    def test_write_zeroes_on_fresh_range(self, backend: Backend) -> None:
        _require_write(backend)

        async def body() -> None:
            await backend.write_zeroes(123, 3 * CHUNK)
            await backend.write_zeroes(5 * CHUNK, CHUNK, may_trim=True)
            assert (await read(backend, 0, backend.size)).count(0) == backend.size

        run(body())

    @pytest.mark.parametrize("may_trim", [False, True])
    def test_fast_zero(self, backend: Backend, may_trim: bool) -> None:
        _require_write(backend)
        data = pattern(8, 400_000)
        offset, length = 511, 300_000

        async def body() -> None:
            await backend.pwrite(data, 0)
            try:
                await backend.write_zeroes(offset, length, may_trim=may_trim, fast=True)
            except FastZeroUnsupported:
                assert await read(backend, 0, len(data)) == data, "fast zero changed data"
                return
            got = await read(backend, 0, len(data))
            assert got[:offset] == data[:offset]
            assert got[offset:offset + length].count(0) == length
            assert got[offset + length:] == data[offset + length:]

        run(body())

    def test_flush_and_fua(self, backend: Backend) -> None:
        _require_write(backend)
        data = pattern(10, 10_000)

        async def body() -> None:
            await backend.flush()
            await backend.pwrite(data, 333, fua=True)
            assert await read(backend, 333, len(data)) == data
            await backend.trim(0, 4096, fua=True)
            await backend.write_zeroes(5000, 1000, fua=True)
            await backend.write_zeroes(CHUNK, CHUNK, may_trim=True, fua=True)
            await backend.flush()
            got = await read(backend, 333, len(data))
            assert_old_or_zero(got[:4096 - 333], data[:4096 - 333], 333)
            assert got[4096 - 333:5000 - 333] == data[4096 - 333:5000 - 333]
            assert got[5000 - 333:6000 - 333].count(0) == 1000
            assert got[6000 - 333:] == data[6000 - 333:]

        run(body())

    def test_cache(self, backend: Backend) -> None:
        run(backend.cache(0, backend.size))
        run(backend.cache(CHUNK + 1, 10))

    # -- block status ------------------------------------------------------

    @pytest.mark.parametrize(("offset", "length"), [(0, None), (1, 4096), (CHUNK - 1, 2),
                                                    (-1, None), (-1000, None)])
    def test_block_status_fresh(self, backend: Backend, offset: int,
                                length: int | None) -> None:
        offset, length = self._range(offset, length)
        run(check_extents(backend, offset, length))

    def test_block_status_after_writes(self, backend: Backend) -> None:
        _require_write(backend)

        async def body() -> None:
            await backend.pwrite(pattern(1, 10), 0)
            await backend.pwrite(pattern(2, 3 * CHUNK), CHUNK + 17)
            await backend.pwrite(pattern(3, 1), backend.size - 1)
            await backend.write_zeroes(2 * CHUNK, CHUNK, may_trim=True)
            await backend.trim(8 * CHUNK, 2 * CHUNK)
            await backend.pwrite(pattern(4, 5), 8 * CHUNK + 100)
            for offset, length in [(0, backend.size), (5, 100), (2 * CHUNK - 3, CHUNK + 6),
                                   (backend.size - 10, 10)]:
                await self._walk_extents(backend, offset, length)

        run(body())

    async def _walk_extents(self, backend: Backend, offset: int, length: int) -> None:
        """Ask again from where each reply stopped, as a client does."""
        end = offset + length
        while offset < end:
            extents = await check_extents(backend, offset, end - offset)
            offset += sum(extent.length for extent in extents)

    # -- concurrency -------------------------------------------------------

    def test_concurrent_distinct_ranges(self, backend: Backend) -> None:
        _require_write(backend)
        tasks = 64
        stride = backend.size // tasks
        ranges = [(i * stride + i % 7, min(stride - 7, 1000 + 397 * i)) for i in range(tasks)]

        async def body() -> None:
            await asyncio.gather(*(backend.pwrite(pattern(i, length), offset)
                                   for i, (offset, length) in enumerate(ranges)))
            got = await asyncio.gather(*(read(backend, offset, length)
                                         for offset, length in ranges))
            for i, ((_, length), data) in enumerate(zip(ranges, got, strict=True)):
                assert data == pattern(i, length), f"range {i}"
            # writers of one half race readers of the other half
            half = tasks // 2
            writes = asyncio.gather(*(backend.pwrite(pattern(i + 100, length), offset)
                                      for i, (offset, length) in enumerate(ranges[:half])))
            reads = asyncio.gather(*(read(backend, offset, length)
                                     for offset, length in ranges[half:]))
            _, results = await asyncio.gather(writes, reads)
            for i, data in enumerate(results, start=half):
                assert data == pattern(i, ranges[i][1]), f"range {i}"
            for i, (offset, length) in enumerate(ranges[:half]):
                assert await read(backend, offset, length) == pattern(i + 100, length)

        run(body())

    # -- model-based -------------------------------------------------------

    def test_state_machine(self, tmp_path: pathlib.Path) -> None:
        contract = self

        class Machine(BackendMachine):
            def make_backend(self) -> Backend:
                return contract.make_backend(tmp_path, MODEL_SIZE)

        run_state_machine_as_test(Machine, settings=settings(
            max_examples=50, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow]))


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


class BackendMachine(RuleBasedStateMachine):
    """A backend against a ``bytearray`` model.

    Trimmed bytes are "undefined" in the model until rewritten: a read may
    return either the old data or zeroes for them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.backend = self.make_backend()
        self.model = bytearray(MODEL_SIZE)
        #: 1 where a trim left the byte as "old data or zero"
        self.undefined = bytearray(MODEL_SIZE)

    def make_backend(self) -> Backend:
        raise NotImplementedError

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.backend.close())
        finally:
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

    # -- rules -------------------------------------------------------------

    @precondition(lambda self: self.backend.capabilities.can_write)
    @rule(where=ranges(), seed=st.integers(0, 254), fua=st.booleans())
    def pwrite(self, where: tuple[int, int], seed: int, fua: bool) -> None:
        offset, length = where
        data = pattern(seed, length)
        self.run(self.backend.pwrite(data, offset, fua=fua))
        self._set(offset, data)

    @precondition(lambda self: self.backend.capabilities.can_write)
    @rule(where=ranges(), seed=st.integers(0, 254))
    def pwrite_nowait(self, where: tuple[int, int], seed: int) -> None:
        """The inline fast path: done now, or refused (then the server uses pwrite)."""
        offset, length = where
        data = pattern(seed, length)
        if not self.backend.pwrite_nowait(data, offset):
            self.run(self.backend.pwrite(data, offset))
        self._set(offset, data)

    @rule(where=ranges())
    def pread(self, where: tuple[int, int]) -> None:
        offset, length = where
        self.check(self.run(read(self.backend, offset, length)), offset)

    @rule(where=ranges())
    def pread_nowait(self, where: tuple[int, int]) -> None:
        offset, length = where
        buf = bytearray(length)
        if self.backend.pread_nowait(memoryview(buf), offset):
            self.check(bytes(buf), offset)

    @precondition(lambda self: self.backend.capabilities.can_write)
    @rule(where=ranges(), fua=st.booleans())
    def trim(self, where: tuple[int, int], fua: bool) -> None:
        offset, length = where
        self.run(self.backend.trim(offset, length, fua=fua))
        self.undefined[offset:offset + length] = b"\x01" * length

    @precondition(lambda self: self.backend.capabilities.can_write)
    @rule(where=ranges(), may_trim=st.booleans(), fast=st.booleans(), fua=st.booleans())
    def write_zeroes(self, where: tuple[int, int], may_trim: bool, fast: bool,
                     fua: bool) -> None:
        offset, length = where
        try:
            self.run(self.backend.write_zeroes(offset, length, may_trim=may_trim,
                                               fast=fast, fua=fua))
        except FastZeroUnsupported:
            assert fast, "FastZeroUnsupported without fast=True"
            return  # nothing changed: later reads check that
        self._set(offset, bytes(length))

    @rule()
    def flush(self) -> None:
        self.run(self.backend.flush())

    @rule(where=ranges())
    def block_status(self, where: tuple[int, int]) -> None:
        self.run(check_extents(self.backend, *where))

    @invariant()
    def zero_extents_match_the_model(self) -> None:
        """Walk the whole disk: ZERO extents read as zeroes, and so does the model."""
        offset = 0
        while offset < MODEL_SIZE:
            for extent in self.run(check_extents(self.backend, offset,
                                                 MODEL_SIZE - offset)):
                if extent.flags & ExtentFlags.ZERO:
                    self.check(bytes(extent.length), offset)
                offset += extent.length
