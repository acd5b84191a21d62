"""FaultFilter: transparent without faults, and each rule field doing exactly its job.

The node contract runs through the filter (without rules, and with rules that
cannot pick) for every protocol node, in those nodes' modules
(``support.LAYERS``).  The end-to-end proofs (libnbd and qemu-io seeing the
injected errors) are in ``tests/interop/test_faults.py``; here the filter is
driven directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.block.support import MIB, outcome, pattern, read, run

from pynbd.block import MemoryNode, RawNode
from pynbd.block.faults import (
    COMMANDS,
    FaultFilter,
    FaultRule,
    errno_name,
    parse_commands,
    parse_errno,
    parse_fault_spec,
)
from pynbd.block.node import Extent, ExtentFlags, FastPaths, Node
from pynbd.proto.constants import Errno
from pynbd.proto.errors import nbd_errno

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from pynbd.block.node import Data, ReadDone, WriteDone

KIB = 1024
SIZE = 4 * MIB

ALL = frozenset(COMMANDS)


def rule(*commands: str, **kwargs: Any) -> FaultRule:
    return FaultRule(frozenset(commands), **kwargs)


def read_outcome(node: Node, offset: int, length: int) -> int:
    return run(outcome(read(node, offset, length)))


def nowait_read(paths: FastPaths, offset: int, length: int) -> bytes | None:
    """What ``pread_nowait`` fills, or None when it declines."""
    assert paths.pread_nowait is not None
    buf = bytearray(length)
    return bytes(buf) if paths.pread_nowait(memoryview(buf), offset) else None


# -- no cost without rules ----------------------------------------------------------------


def test_without_rules_the_fast_paths_behave_as_the_childs() -> None:
    child = MemoryNode(SIZE)
    run(child.pwrite(pattern(1, 8 * KIB), 0))
    node = FaultFilter(child)
    assert node.size == child.size
    assert node.capabilities is child.capabilities
    assert (node.driver, node.children, node.filename) == ("x-faults", {"file": child}, "")
    assert node.resolve() is node
    paths, inner = node.fast_paths(), child.fast_paths()
    assert [f.name for f in dataclasses.fields(paths) if getattr(paths, f.name) is None] == [
        f.name for f in dataclasses.fields(inner) if getattr(inner, f.name) is None]
    assert nowait_read(paths, 100, 4 * KIB) == nowait_read(inner, 100, 4 * KIB)
    assert paths.pwrite_nowait is not None
    assert paths.pwrite_nowait(b"w" * 512, 3 * KIB)
    assert run(read(child, 3 * KIB, 512)) == b"w" * 512
    assert paths.sendfile_source is not None
    assert inner.sendfile_source is not None
    for data_only in (False, True):
        assert paths.sendfile_source(0, 8 * KIB, data_only) == inner.sendfile_source(
            0, 8 * KIB, data_only)


def test_a_rule_makes_only_its_fast_paths_decline_and_clear_restores_them() -> None:
    """The fast paths are taken once (per connection); rules added and cleared later
    still apply to them."""
    child = MemoryNode(SIZE)
    run(child.pwrite(pattern(1, 2 * MIB), 0))
    node = FaultFilter(child)
    paths = node.fast_paths()
    assert paths.pwrite_nowait is not None
    assert paths.sendfile_source is not None
    rule_id = node.add_rule(rule("write", errno=errno.EIO))
    assert not paths.pwrite_nowait(b"x" * 512, 0)
    assert run(read(child, 0, 512)) == pattern(1, 512), "a declined write writes nothing"
    assert nowait_read(paths, 0, 512) == pattern(1, 512)
    assert paths.sendfile_source(0, 512, False) is not None
    node.add_rule(rule("read", errno=errno.EIO, start=MIB))
    assert nowait_read(paths, 0, 512) == pattern(1, 512), "outside the rule's range"
    assert nowait_read(paths, MIB, 512) is None
    assert paths.sendfile_source(MIB - 1, 2, False) is None
    assert paths.sendfile_source(0, 512, False) is not None
    node.clear(rule_id)
    assert paths.pwrite_nowait(b"x" * 512, 0)
    assert nowait_read(paths, MIB, 512) is None
    node.clear()
    assert nowait_read(paths, MIB, 512) == pattern(1, 2 * MIB)[MIB:MIB + 512]
    assert paths.sendfile_source(MIB - 1, 2, False) is not None
    assert node.rules == ()


def test_nowait_calls_forward_only_when_no_rule_could_pick() -> None:
    child = MemoryNode(SIZE)
    run(child.pwrite(pattern(1, 8 * KIB), 0))
    node = FaultFilter(child, [rule("read", errno=errno.EIO, start=4 * KIB, end=8 * KIB)])
    paths = node.fast_paths()
    assert paths.pread_nowait is not None
    buf = bytearray(4 * KIB)
    assert paths.pread_nowait(memoryview(buf), 0) is True
    assert bytes(buf) == pattern(1, 4 * KIB)
    buf = bytearray(4 * KIB)
    assert paths.pread_nowait(memoryview(buf), 4 * KIB) is False
    assert buf == bytearray(4 * KIB), "nothing may be read when the async path must run"
    # the async path then applies the rule
    assert read_outcome(node, 4 * KIB, 4 * KIB) == errno.EIO
    # writes are not concerned by a read rule
    assert paths.pwrite_nowait is not None
    assert paths.pwrite_nowait(b"x" * 512, 4 * KIB) is True
    assert run(read(child, 4 * KIB, 512)) == b"x" * 512


def test_a_rule_on_an_inner_filter_reaches_the_outer_one() -> None:
    """A filter over another filter (or over a window over it) takes the inner one's
    fast paths, which keep checking the inner one's rules."""
    memory = MemoryNode(SIZE)
    inner = FaultFilter(memory)
    outer = FaultFilter(inner)
    windowed = FaultFilter(RawNode(inner, offset=MIB))
    outer_paths, windowed_paths = outer.fast_paths(), windowed.fast_paths()
    assert nowait_read(outer_paths, 0, 512) == bytes(512)
    inner.add_rule(rule("read", errno=errno.ENOSPC))
    assert nowait_read(outer_paths, 0, 512) is None
    assert nowait_read(windowed_paths, 0, 512) is None
    assert read_outcome(outer, 0, 512) == errno.ENOSPC
    assert read_outcome(windowed, 0, 512) == errno.ENOSPC
    inner.clear()
    assert nowait_read(outer_paths, 0, 512) == bytes(512)
    assert read_outcome(windowed, 0, 512) == 0


def test_closing_leaves_the_child_open() -> None:
    """A node closes only what it holds: the graph closes the child, once."""
    class Closing(MemoryNode):
        closed = 0

        async def close(self) -> None:
            self.closed += 1
            await super().close()

    child = Closing(SIZE)
    run(FaultFilter(child).close())
    assert child.closed == 0
    run(child.close())


# -- what a rule picks ---------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_fails_only_its_own_requests(command: str) -> None:
    node = FaultFilter(MemoryNode(SIZE), [rule(command, errno=errno.EPERM)])
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "read": lambda: read(node, 0, 512),
        "write": lambda: node.pwrite(b"a" * 512, 0),
        "flush": node.flush,
        "trim": lambda: node.trim(0, 512),
        "zero": lambda: node.write_zeroes(0, 512),
        "block-status": lambda: node.block_status(0, 512),
        "cache": lambda: node.cache(0, 512),
    }

    async def attempt(call: Callable[[], Awaitable[object]]) -> int:
        try:
            await call()
        except OSError as err:
            return err.errno or -1
        return 0

    got = {name: run(attempt(call)) for name, call in calls.items()}
    assert got == {name: errno.EPERM if name == command else 0 for name in COMMANDS}


def test_all_fails_every_command() -> None:
    node = FaultFilter(MemoryNode(SIZE), [parse_fault_spec("cmd=all,errno=EINVAL")])
    for call in (read(node, 0, 1), node.pwrite(b"a", 0), node.flush(),
                 node.trim(0, 1), node.write_zeroes(0, 1), node.block_status(0, 1),
                 node.cache(0, 1)):
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
    node = FaultFilter(MemoryNode(SIZE),
                       [rule("read", "write", errno=errno.EIO, start=100, end=200)])
    want = errno.EIO if picked else 0
    assert read_outcome(node, offset, length) == want
    assert run(outcome(node.pwrite(b"w" * length, offset))) == want
    paths = node.fast_paths()
    assert (nowait_read(paths, offset, length) is None) == picked


def test_an_open_range_runs_to_the_end_and_flush_has_no_range() -> None:
    node = FaultFilter(MemoryNode(SIZE),
                       [rule("read", "flush", errno=errno.EIO, start=SIZE - 512)])
    assert read_outcome(node, SIZE - 1024, 512) == 0
    assert read_outcome(node, SIZE - 1, 1) == errno.EIO
    assert run(outcome(node.flush())) == 0, "a ranged rule never picks FLUSH"
    node.add_rule(rule("flush", errno=errno.EIO))
    assert run(outcome(node.flush())) == errno.EIO


def test_count_stops_after_n_hits_and_costs_nothing_afterwards() -> None:
    node = FaultFilter(MemoryNode(SIZE), [rule("read", errno=errno.EIO, count=3)])
    paths = node.fast_paths()
    assert nowait_read(paths, 0, 512) is None
    got = [read_outcome(node, 0, 512) for _ in range(6)]
    assert got == [errno.EIO] * 3 + [0] * 3
    assert node.rules[0].hits == 3
    # an exhausted rule picks nothing any more: the fast path is taken again
    assert nowait_read(paths, 0, 512) == bytes(512)
    assert node.describe()[0]["hits"] == 3


def test_an_exhausted_delay_holds_nothing() -> None:
    node = FaultFilter(MemoryNode(SIZE), [rule("read", delay=60.0, count=1, hits=1)])

    async def body() -> bytes:
        return await asyncio.wait_for(read(node, 0, 512), 5)

    assert run(body()) == bytes(512)
    assert nowait_read(node.fast_paths(), 0, 512) == bytes(512)


def test_the_first_rule_with_an_errno_decides_and_later_rules_do_not_count() -> None:
    node = FaultFilter(MemoryNode(SIZE), [
        rule("read", errno=errno.ENOMEM, count=1),
        rule("read", errno=errno.EPERM, count=1),
    ])
    assert [read_outcome(node, 0, 1) for _ in range(3)] == [errno.ENOMEM, errno.EPERM, 0]
    assert [r.hits for r in node.rules] == [1, 1]


def test_rate_is_reproducible_with_a_seed() -> None:
    def hits(seed: int, rate: float = 0.5) -> list[bool]:
        node = FaultFilter(MemoryNode(SIZE), [rule("read", errno=errno.EIO, rate=rate)],
                           seed=seed)
        return [read_outcome(node, 0, 1) != 0 for _ in range(200)]

    first = hits(42)
    assert first == hits(42)
    assert first != hits(43)
    assert 60 <= sum(first) <= 140, sum(first)
    assert not any(hits(7, rate=0.0))
    assert all(hits(7, rate=1.0))
    # a rule's own seed wins over the filter's
    own = [FaultFilter(MemoryNode(SIZE), [rule("read", errno=errno.EIO, rate=0.3, seed=5)],
                       seed=filter_seed)
           for filter_seed in (1, 2)]
    patterns = [[read_outcome(n, 0, 1) for _ in range(50)] for n in own]
    assert patterns[0] == patterns[1]
    assert errno.EIO in patterns[0]
    assert 0 in patterns[0]


def test_rules_of_one_filter_draw_independently() -> None:
    """Adding a rule for writes does not change which reads fail."""
    def read_hits(extra: bool) -> list[int]:
        node = FaultFilter(MemoryNode(SIZE), [rule("read", errno=errno.EIO, rate=0.5)],
                           seed=9)
        if extra:
            node.add_rule(rule("write", errno=errno.EIO, rate=0.5))
        out = []
        for _ in range(60):
            out.append(read_outcome(node, 0, 1))
            run(outcome(node.pwrite(b"a", 0)))
        return out

    assert read_hits(False) == read_hits(True)


def test_a_delay_holds_only_the_request_it_picks() -> None:
    async def body() -> list[str]:
        node = FaultFilter(MemoryNode(SIZE), [rule("read", delay=0.5, start=0, end=MIB)])
        order: list[str] = []

        async def reader(name: str, offset: int) -> None:
            await read(node, offset, 512)
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
        node = FaultFilter(MemoryNode(SIZE), [rule("write", errno=errno.ENOSPC, delay=0.2)])
        task = asyncio.ensure_future(outcome(node.pwrite(b"a", 0)))
        await asyncio.sleep(0.01)
        pending = not task.done()
        return pending, await asyncio.wait_for(task, 10)

    assert run(body()) == (True, errno.ENOSPC)


def test_read_rules_keep_sparse_reads_from_skipping_holes() -> None:
    child = MemoryNode(SIZE)
    node = FaultFilter(child, [rule("read", errno=errno.EIO, start=MIB, end=2 * MIB)])
    hole = run(child.block_status(0, SIZE))
    assert all(e.flags & ExtentFlags.ZERO for e in hole)
    # outside the rule's range the child's answer is returned as it is
    assert run(node.block_status(2 * MIB, MIB)) == run(child.block_status(2 * MIB, MIB))
    # overlapping it, nothing claims to read as zeroes (the HOLE bit stays)
    got = run(node.block_status(0, SIZE))
    assert sum(e.length for e in got) == sum(e.length for e in hole)
    assert all(not e.flags & ExtentFlags.ZERO for e in got)
    assert [e.flags & ExtentFlags.HOLE for e in got] == [e.flags & ExtentFlags.HOLE
                                                         for e in hole]
    node.clear()
    assert run(node.block_status(0, SIZE)) == hole
    assert isinstance(hole[0], Extent)


def test_errno_values_reach_the_nbd_mapping() -> None:
    """An injected errno is an ordinary OSError: names NBD lacks map to EIO."""
    node = FaultFilter(MemoryNode(SIZE))
    for name, want in [("EPERM", Errno.EPERM), ("EROFS", Errno.EPERM),
                       ("ENOSPC", Errno.ENOSPC), ("EDQUOT", Errno.ENOSPC),
                       ("ENOENT", Errno.EIO), ("EBUSY", Errno.EIO)]:
        node.clear()
        node.add_rule(rule("read", errno=parse_errno(name)))
        with pytest.raises(OSError, match="injected by fault rule") as info:
            run(read(node, 0, 1))
        assert nbd_errno(info.value.errno) == want, name


def test_describe_and_clear_by_id() -> None:
    node = FaultFilter(MemoryNode(SIZE), seed=42)
    assert node.seed == 42
    first = node.add_rule(parse_fault_spec("cmd=read+write,errno=ENOSPC,range=1M-2M,"
                                           "count=3,rate=0.5"))
    second = node.add_rule(parse_fault_spec("cmd=flush,delay=0.25,seed=7"))
    assert (first, second) == (1, 2)
    described = node.describe()
    assert described[0] == {"id": 1, "command": "read+write", "errno": "ENOSPC", "rate": 0.5,
                            "start": MIB, "end": 2 * MIB, "count": 3, "hits": 0,
                            "seed": described[0]["seed"]}
    assert isinstance(described[0]["seed"], int)
    assert described[1] == {"id": 2, "command": "flush", "delay": 0.25, "rate": 1.0,
                            "hits": 0, "seed": 7}
    with pytest.raises(KeyError):
        node.clear(3)
    node.clear(first)
    assert [r["id"] for r in node.describe()] == [2]
    assert node.add_rule(rule("read", errno=errno.EIO)) == 3, "ids are never reused"


# -- the other fast paths ------------------------------------------------------------------


class _Direct(MemoryNode):
    """Records the direct requests it is offered (as librbd's node would take them), and
    offers own-buffer reads."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.started: list[tuple[str, int]] = []

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        self.started.append(("read", offset))
        return True

    def start_write(self, data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
        self.started.append(("write", offset))
        return True

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.pread(memoryview(buf), offset)
        return bytes(buf)


def _ignore(*_: Any) -> None:
    return None


def test_filters_pass_direct_requests_through_unless_a_rule_may_pick_them() -> None:
    inner = _Direct(SIZE)
    window = RawNode(inner, offset=4096)
    faults = FaultFilter(window, [parse_fault_spec("cmd=read,errno=EIO,range=0-8K")])
    paths = faults.fast_paths()
    assert paths.start_read is not None
    assert paths.start_write is not None
    # a read a rule may pick goes to the task path (False), where the rule applies
    assert paths.start_read(0, 512, _ignore) is False
    assert paths.start_read(16384, 512, _ignore) is True
    assert paths.start_write(b"x" * 512, 0, False, _ignore) is True
    assert inner.started == [("read", 16384 + 4096), ("write", 4096)]
    faults.add_rule(parse_fault_spec("cmd=write,errno=EIO"))
    assert paths.start_write(b"x" * 512, 0, False, _ignore) is False
    assert inner.started == [("read", 16384 + 4096), ("write", 4096)]


def test_own_buffer_reads_meet_the_read_rules() -> None:
    inner = _Direct(SIZE)
    run(inner.pwrite(b"\x05" * 512, 0))
    node = FaultFilter(inner)
    own_read = node.fast_paths().read
    assert own_read is not None
    assert run(own_read(0, 512)) == b"\x05" * 512
    node.add_rule(rule("read", errno=errno.ENOSPC, count=1))
    assert run(outcome(own_read(0, 512))) == errno.ENOSPC
    assert run(own_read(0, 512)) == b"\x05" * 512


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
