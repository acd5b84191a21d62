"""FaultBackend: transparent without faults, and each rule field doing exactly its job.

The end-to-end proofs (libnbd and qemu-io seeing the injected errors) are in
``tests/interop/test_faults.py``; here the wrapper is driven directly.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.backends.contract import BackendContract, pattern, read, run

from pynbd.backends import Backend, Extent, ExtentFlags, MemoryBackend, OffsetBackend
from pynbd.backends.faults import (
    COMMANDS,
    FaultBackend,
    FaultRule,
    errno_name,
    parse_commands,
    parse_errno,
    parse_fault_spec,
)
from pynbd.proto.constants import Errno
from pynbd.proto.errors import nbd_errno

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Awaitable, Callable

KIB = 1024
MIB = 1024 * KIB
SIZE = 4 * MIB

ALL = frozenset(COMMANDS)
#: every backend method the wrapper guards
METHODS = ("pread", "pread_nowait", "pwrite", "pwrite_nowait", "flush", "trim",
           "write_zeroes", "block_status", "cache")


def rule(*commands: str, **kwargs: Any) -> FaultRule:
    return FaultRule(frozenset(commands), **kwargs)


async def outcome(call: Awaitable[object]) -> int:
    """0 if the call succeeds, else the errno it raised."""
    try:
        await call
    except OSError as err:
        return err.errno if err.errno is not None else -1
    return 0


def read_outcome(backend: Backend, offset: int, length: int) -> int:
    return run(outcome(read(backend, offset, length)))


# -- the backend contract holds through the wrapper ----------------------------------------


class TestNoRules(BackendContract):
    """Without rules the wrapper is the inner backend."""

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        return FaultBackend(MemoryBackend(size))


class TestRulesThatNeverPick(BackendContract):
    """Rules for every command whose range lies past the end: the checking
    methods run (no method is bound straight through) and change nothing."""

    def make_backend(self, tmp_path: pathlib.Path, size: int) -> Backend:
        backend = FaultBackend(MemoryBackend(size),
                               [rule(*COMMANDS, errno=errno.EIO, start=size + 1)])
        # flush has no range, so a ranged rule cannot pick it: only flush is direct
        assert [m for m in METHODS if m in vars(backend)] == ["flush"]
        return backend


# -- no cost without rules ----------------------------------------------------------------


def test_without_rules_every_method_is_the_inner_one() -> None:
    inner = MemoryBackend(SIZE)
    backend = FaultBackend(inner)
    for method in METHODS:
        assert getattr(backend, method) == getattr(inner, method), method
    assert backend.size == inner.size
    assert backend.capabilities is inner.capabilities


def test_a_rule_unbinds_only_its_commands_and_clear_binds_them_again() -> None:
    inner = MemoryBackend(SIZE)
    backend = FaultBackend(inner)
    rule_id = backend.add_rule(rule("write", errno=errno.EIO))
    direct = {m for m in METHODS if getattr(backend, m) == getattr(inner, m)}
    assert direct == {"pread", "pread_nowait", "flush", "trim", "write_zeroes",
                      "block_status", "cache"}
    backend.add_rule(rule("read", errno=errno.EIO, start=MIB))
    direct = {m for m in METHODS if getattr(backend, m) == getattr(inner, m)}
    # a read rule also concerns block_status (sparse reads must meet it)
    assert direct == {"flush", "trim", "write_zeroes", "cache"}
    backend.clear(rule_id)
    assert {m for m in METHODS if getattr(backend, m) == getattr(inner, m)} == {
        "pwrite", "pwrite_nowait", "flush", "trim", "write_zeroes", "cache"}
    backend.clear()
    assert all(getattr(backend, m) == getattr(inner, m) for m in METHODS)
    assert backend.rules == ()


def test_nowait_calls_forward_only_when_no_rule_could_pick() -> None:
    inner = MemoryBackend(SIZE)
    run(inner.pwrite(pattern(1, 8 * KIB), 0))
    backend = FaultBackend(inner, [rule("read", errno=errno.EIO, start=4 * KIB, end=8 * KIB)])
    buf = bytearray(4 * KIB)
    assert backend.pread_nowait(memoryview(buf), 0) is True
    assert bytes(buf) == pattern(1, 4 * KIB)
    buf = bytearray(4 * KIB)
    assert backend.pread_nowait(memoryview(buf), 4 * KIB) is False
    assert buf == bytearray(4 * KIB), "nothing may be read when the async path must run"
    # the async path then applies the rule
    assert read_outcome(backend, 4 * KIB, 4 * KIB) == errno.EIO
    # writes are not concerned by a read rule
    assert backend.pwrite_nowait(b"x" * 512, 4 * KIB) is True
    assert run(read(inner, 4 * KIB, 512)) == b"x" * 512


def test_a_rule_on_a_wrapped_wrapper_reaches_the_outer_one() -> None:
    """A node over another node: the outer wrapper held the inner's bound methods."""
    memory = MemoryBackend(SIZE)
    inner = FaultBackend(memory)
    outer = FaultBackend(inner)
    windowed = FaultBackend(OffsetBackend(inner, MIB))
    assert outer.pread_nowait == memory.pread_nowait
    inner.add_rule(rule("read", errno=errno.ENOSPC))
    buf = memoryview(bytearray(512))
    assert outer.pread_nowait(buf, 0) is False
    assert windowed.pread_nowait(buf, 0) is False
    assert read_outcome(outer, 0, 512) == errno.ENOSPC
    assert read_outcome(windowed, 0, 512) == errno.ENOSPC
    inner.clear()
    assert outer.pread_nowait == memory.pread_nowait
    assert outer.pread_nowait(buf, 0) is True
    assert read_outcome(windowed, 0, 512) == 0


# -- what a rule picks ---------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_fails_only_its_own_requests(command: str) -> None:
    backend = FaultBackend(MemoryBackend(SIZE), [rule(command, errno=errno.EPERM)])
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "read": lambda: read(backend, 0, 512),
        "write": lambda: backend.pwrite(b"a" * 512, 0),
        "flush": backend.flush,
        "trim": lambda: backend.trim(0, 512),
        "zero": lambda: backend.write_zeroes(0, 512),
        "block-status": lambda: backend.block_status(0, 512),
        "cache": lambda: backend.cache(0, 512),
    }
    got = {name: run(outcome(call())) for name, call in calls.items()}
    assert got == {name: errno.EPERM if name == command else 0 for name in COMMANDS}


def test_all_fails_every_command() -> None:
    backend = FaultBackend(MemoryBackend(SIZE), [parse_fault_spec("cmd=all,errno=EINVAL")])
    for call in (read(backend, 0, 1), backend.pwrite(b"a", 0), backend.flush(),
                 backend.trim(0, 1), backend.write_zeroes(0, 1), backend.block_status(0, 1),
                 backend.cache(0, 1)):
        assert run(outcome(call)) == errno.EINVAL


@pytest.mark.parametrize(("offset", "length", "picked"), [
    (0, 100, False),           # ends where the range starts
    (0, 101, True),            # last byte is the range's first
    (150, 10, True),           # inside
    (199, 1, True),            # the range's last byte
    (200, 100, False),         # starts where the range ends
    (0, 1000, True),           # covers it
])
def test_a_range_picks_only_overlapping_requests(offset: int, length: int,
                                                 picked: bool) -> None:
    backend = FaultBackend(MemoryBackend(SIZE),
                           [rule("read", "write", errno=errno.EIO, start=100, end=200)])
    want = errno.EIO if picked else 0
    assert read_outcome(backend, offset, length) == want
    assert run(outcome(backend.pwrite(b"w" * length, offset))) == want


def test_an_open_range_runs_to_the_end_and_flush_has_no_range() -> None:
    backend = FaultBackend(MemoryBackend(SIZE),
                           [rule("read", "flush", errno=errno.EIO, start=SIZE - 512)])
    assert read_outcome(backend, SIZE - 1024, 512) == 0
    assert read_outcome(backend, SIZE - 1, 1) == errno.EIO
    assert run(outcome(backend.flush())) == 0, "a ranged rule never picks FLUSH"
    backend.add_rule(rule("flush", errno=errno.EIO))
    assert run(outcome(backend.flush())) == errno.EIO


def test_count_stops_after_n_hits_and_unbinds_nothing_afterwards() -> None:
    inner = MemoryBackend(SIZE)
    backend = FaultBackend(inner, [rule("read", errno=errno.EIO, count=3)])
    got = [read_outcome(backend, 0, 512) for _ in range(6)]
    assert got == [errno.EIO] * 3 + [0] * 3
    assert backend.rules[0].hits == 3
    # an exhausted rule costs nothing any more
    assert backend.pread_nowait == inner.pread_nowait


def test_the_first_rule_with_an_errno_decides_and_later_rules_do_not_count() -> None:
    backend = FaultBackend(MemoryBackend(SIZE), [
        rule("read", errno=errno.ENOMEM, count=1),
        rule("read", errno=errno.EPERM, count=1),
    ])
    assert [read_outcome(backend, 0, 1) for _ in range(3)] == [errno.ENOMEM, errno.EPERM, 0]
    assert [r.hits for r in backend.rules] == [1, 1]


def test_rate_is_reproducible_with_a_seed() -> None:
    def hits(seed: int, rate: float = 0.5) -> list[bool]:
        backend = FaultBackend(MemoryBackend(SIZE),
                               [rule("read", errno=errno.EIO, rate=rate)], seed=seed)
        return [read_outcome(backend, 0, 1) != 0 for _ in range(200)]

    first = hits(42)
    assert first == hits(42)
    assert first != hits(43)
    assert 60 <= sum(first) <= 140, sum(first)
    assert not any(hits(7, rate=0.0))
    assert all(hits(7, rate=1.0))
    # a rule's own seed wins over the backend's
    own = [FaultBackend(MemoryBackend(SIZE), [rule("read", errno=errno.EIO, rate=0.3,
                                                   seed=5)], seed=backend_seed)
           for backend_seed in (1, 2)]
    patterns = [[read_outcome(b, 0, 1) for _ in range(50)] for b in own]
    assert patterns[0] == patterns[1]
    assert errno.EIO in patterns[0]
    assert 0 in patterns[0]


def test_rules_of_one_backend_draw_independently() -> None:
    """Adding a rule for writes does not change which reads fail."""
    def read_hits(extra: bool) -> list[int]:
        backend = FaultBackend(MemoryBackend(SIZE), [rule("read", errno=errno.EIO,
                                                          rate=0.5)], seed=9)
        if extra:
            backend.add_rule(rule("write", errno=errno.EIO, rate=0.5))
        out = []
        for _ in range(60):
            out.append(read_outcome(backend, 0, 1))
            run(outcome(backend.pwrite(b"a", 0)))
        return out

    assert read_hits(False) == read_hits(True)


def test_a_delay_holds_only_the_request_it_picks() -> None:
    async def body() -> list[str]:
        backend = FaultBackend(MemoryBackend(SIZE),
                               [rule("read", delay=0.5, start=0, end=MIB)])
        order: list[str] = []

        async def reader(name: str, offset: int) -> None:
            await read(backend, offset, 512)
            order.append(name)

        slow = asyncio.ensure_future(reader("delayed", 0))
        await asyncio.sleep(0)  # the delayed read is now waiting
        for i in range(10):
            await reader(f"other{i}", 2 * MIB)
        assert not slow.done()
        await asyncio.wait_for(slow, 10)
        return order

    assert run(body()) == [f"other{i}" for i in range(10)] + ["delayed"]


def test_delay_then_errno() -> None:
    async def body() -> tuple[bool, int]:
        backend = FaultBackend(MemoryBackend(SIZE),
                               [rule("write", errno=errno.ENOSPC, delay=0.2)])
        task = asyncio.ensure_future(outcome(backend.pwrite(b"a", 0)))
        await asyncio.sleep(0.01)
        pending = not task.done()
        return pending, await asyncio.wait_for(task, 10)

    assert run(body()) == (True, errno.ENOSPC)


def test_read_rules_keep_sparse_reads_from_skipping_holes() -> None:
    inner = MemoryBackend(SIZE)
    backend = FaultBackend(inner, [rule("read", errno=errno.EIO, start=MIB, end=2 * MIB)])
    hole = run(inner.block_status(0, SIZE))
    assert all(e.flags & ExtentFlags.ZERO for e in hole)
    # outside the rule's range the inner answer is returned as it is
    assert run(backend.block_status(2 * MIB, MIB)) == run(inner.block_status(2 * MIB, MIB))
    # overlapping it, nothing claims to read as zeroes (the HOLE bit stays)
    got = run(backend.block_status(0, SIZE))
    assert sum(e.length for e in got) == sum(e.length for e in hole)
    assert all(not e.flags & ExtentFlags.ZERO for e in got)
    assert [e.flags & ExtentFlags.HOLE for e in got] == [e.flags & ExtentFlags.HOLE
                                                         for e in hole]
    backend.clear()
    assert run(backend.block_status(0, SIZE)) == hole
    assert isinstance(hole[0], Extent)


def test_errno_values_reach_the_nbd_mapping() -> None:
    """An injected errno is an ordinary OSError: names NBD lacks map to EIO."""
    backend = FaultBackend(MemoryBackend(SIZE))
    for name, want in [("EPERM", Errno.EPERM), ("EROFS", Errno.EPERM),
                       ("ENOSPC", Errno.ENOSPC), ("EDQUOT", Errno.ENOSPC),
                       ("ENOENT", Errno.EIO), ("EBUSY", Errno.EIO)]:
        backend.clear()
        backend.add_rule(rule("read", errno=parse_errno(name)))
        with pytest.raises(OSError, match="injected by fault rule") as info:
            run(read(backend, 0, 1))
        assert nbd_errno(info.value.errno) == want, name


def test_describe_and_clear_by_id() -> None:
    backend = FaultBackend(MemoryBackend(SIZE), seed=42)
    first = backend.add_rule(parse_fault_spec("cmd=read+write,errno=ENOSPC,range=1M-2M,"
                                              "count=3,rate=0.5"))
    second = backend.add_rule(parse_fault_spec("cmd=flush,delay=0.25,seed=7"))
    assert (first, second) == (1, 2)
    described = backend.describe()
    assert described[0] == {"id": 1, "command": "read+write", "errno": "ENOSPC", "rate": 0.5,
                            "start": MIB, "end": 2 * MIB, "count": 3, "hits": 0,
                            "seed": described[0]["seed"]}
    assert isinstance(described[0]["seed"], int)
    assert described[1] == {"id": 2, "command": "flush", "delay": 0.25, "rate": 1.0,
                            "hits": 0, "seed": 7}
    with pytest.raises(KeyError):
        backend.clear(3)
    backend.clear(first)
    assert [r["id"] for r in backend.describe()] == [2]
    assert backend.add_rule(rule("read", errno=errno.EIO)) == 3, "ids are never reused"


def test_closing_closes_the_inner_backend() -> None:
    class Closing(MemoryBackend):
        closed = 0

        async def close(self) -> None:
            self.closed += 1

    inner = Closing(SIZE)
    run(FaultBackend(inner).close())
    assert inner.closed == 1


# -- parsing -------------------------------------------------------------------------------


def test_parse_fault_spec_fields() -> None:
    r = parse_fault_spec("cmd=read,errno=EIO,range=0-1M,count=3")
    assert (r.commands, r.errno, r.start, r.end, r.count, r.rate, r.delay) == (
        frozenset({"read"}), errno.EIO, 0, MIB, 3, 1.0, 0.0)
    r = parse_fault_spec("cmd=write,delay=0.2")
    assert (r.commands, r.errno, r.delay) == (frozenset({"write"}), None, 0.2)
    r = parse_fault_spec("errno=enospc, rate=0.25 ,range=4K-")
    assert (r.commands, r.errno, r.rate, r.start, r.end) == (ALL, errno.ENOSPC, 0.25,
                                                             4 * KIB, None)
    r = parse_fault_spec("cmd=block-status+cache+zero+trim")
    assert (r.commands, r.errno) == (frozenset({"block-status", "cache", "zero", "trim"}),
                                     errno.EIO)
    assert parse_commands("all") == ALL
    assert parse_errno("EOVERFLOW") == errno.EOVERFLOW
    assert errno_name(errno.ENOMEM) == "ENOMEM"


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty fault spec"),
    ("cmd=reed", "unknown command 'reed'"),
    ("errno=ENOPE", "unknown errno name 'ENOPE'"),
    ("errno=O_RDONLY", "unknown errno name"),
    ("rate=1.5", "rate must be between 0 and 1"),
    ("rate=nan", "rate must be between 0 and 1"),
    ("rate=half", "rate must be a number"),
    ("range=1M", "range must be START-END"),
    ("range=2M-1M", "must be greater than its start"),
    ("range=x-1M", "invalid size"),
    ("count=0", "count must be at least 1"),
    ("count=two", "count must be an integer"),
    ("delay=-1", "delay must be a non-negative number"),
    ("delay=inf", "delay must be a non-negative number"),
    ("seed=x", "seed must be an integer"),
    ("colour=red", "unknown key 'colour'"),
    ("cmd=read,cmd=write", "cmd given twice"),
    ("read", "expected key=value"),
    ("errno=EIO,delay=0", None),  # fine: an errno without a delay
])
def test_parse_fault_spec_errors(spec: str, message: str | None) -> None:
    if message is None:
        assert parse_fault_spec(spec).errno == errno.EIO
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_fault_spec(spec)


def test_a_rule_needs_an_errno_or_a_delay() -> None:
    with pytest.raises(ValueError, match="needs an errno or a delay"):
        FaultRule(frozenset({"read"}))
    with pytest.raises(ValueError, match="commands must be among"):
        FaultRule(frozenset({"nope"}), errno=errno.EIO)
    with pytest.raises(ValueError, match="errno must be positive"):
        FaultRule(frozenset({"read"}), errno=0)


class _Direct(MemoryBackend):
    """Records the direct requests it is offered (as librbd's backend would take them)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.started: list[tuple[str, int]] = []

    def start_read(self, offset: int, length: int, done: Any) -> bool:
        self.started.append(("read", offset))
        return True

    def start_write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool,
                    done: Any) -> bool:
        self.started.append(("write", offset))
        return True


def test_wrappers_pass_direct_requests_through_unless_a_rule_may_pick_them() -> None:
    inner = _Direct(SIZE)
    offset = OffsetBackend(inner, 4096)
    faults = FaultBackend(offset, [parse_fault_spec("cmd=read,errno=EIO,range=0-8K")])
    # a read a rule may pick goes to the task path (False), where the rule applies
    assert faults.start_read(0, 512, lambda data, error: None) is False
    assert faults.start_read(16384, 512, lambda data, error: None) is True
    assert faults.start_write(b"x" * 512, 0, False, lambda error: None) is True
    assert inner.started == [("read", 16384 + 4096), ("write", 4096)]
