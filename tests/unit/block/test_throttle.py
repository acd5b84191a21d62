"""Throttling: the bucket arithmetic (pure, simulated time), the group's queues
(FIFO per member, round-robin between members), the throttle node over a
memory disk, the builder, ``--filter``/``--object`` parsing and the QMP engine.

The real-client proofs (measured rates within 10% of the limits, groups shared
by exports, multi-conn) are in ``tests/interop/test_filters.py``.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

import pytest
from tests.support.engine import fails, on_engine

from pynbd.block import BlockGraph, MemoryNode
from pynbd.block.blockdev import BlockdevError, add_all, build
from pynbd.block.filterspec import parse_filters, stack_filters
from pynbd.block.graph import close_subtree, one_store
from pynbd.block.throttle import ThrottleGroup, ThrottleNode
from pynbd.block.throttlemath import (
    LIMIT_KEYS,
    Bucket,
    ThrottleError,
    ThrottleLimits,
    ThrottleState,
    limits_from_properties,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from pynbd.block.node import Node
    from pynbd.qmp.engine import Engine

MIB = 1 << 20
SIZE = 4 * MIB


def limits(**values: int) -> ThrottleLimits:
    return ThrottleLimits().updated({k.replace("_", "-"): v for k, v in values.items()})


def refused(values: dict[str, Any]) -> str:
    with pytest.raises(ThrottleError) as info:
        ThrottleLimits().updated(values)
    return str(info.value)


def simulate(state: ThrottleState, *, write: bool, size: int, seconds: float,
             start: float = 0.0) -> list[float]:
    """A client that always has a request waiting: the start time of each request
    admitted from ``start`` for ``seconds`` (simulated time, no sleeping)."""
    now, admitted = start, list[float]()
    while True:
        wait = state.wait(write, now)
        if wait:
            now += wait
            continue
        if now >= start + seconds:
            return admitted
        state.account(write, size)
        admitted.append(now)


# -- the arithmetic ---------------------------------------------------------------------------


def test_no_limits_never_wait() -> None:
    state = ThrottleState(ThrottleLimits(), 0.0)
    for _ in range(10_000):
        assert state.wait(False, 0.0) == 0.0
        state.account(False, MIB)
    assert not ThrottleLimits().limited


def test_a_bucket_takes_a_tenth_of_a_second_then_holds_requests_back() -> None:
    state = ThrottleState(limits(iops_total=10), 0.0)  # bucket size: 1 operation
    assert state.wait(False, 0.0) == 0.0
    state.account(False, 512)
    assert state.wait(True, 0.0) == 0.0  # level 1 is not above 1
    state.account(True, 512)
    assert state.wait(False, 0.0) == pytest.approx(0.1)  # one op over, leaking 10/s
    assert state.wait(False, 0.05) == pytest.approx(0.05)
    assert state.wait(False, 0.1) == 0.0
    assert state.level(Bucket.OPS_TOTAL) == pytest.approx(1.0)


@pytest.mark.parametrize(("key", "size", "rate"), [
    ("iops-total", 4096, 100), ("iops-total", 4096, 3), ("bps-total", 65536, 4 * MIB),
    ("bps-total", 4096, 50_000), ("iops-read", 512, 250), ("bps-read", MIB, 10 * MIB)])
def test_the_long_run_rate_is_the_limit(key: str, size: int, rate: int) -> None:
    state = ThrottleState(ThrottleLimits().updated({key: rate}), 0.0)
    admitted = simulate(state, write=False, size=size, seconds=100.0)
    unit = size if key.startswith("bps") else 1
    done = len(admitted) * unit
    # the whole rate, plus the tenth of a second of slack and one request
    assert rate * 100 <= done <= rate * 100 + rate / 10 + unit
    late = [t for t in admitted if t >= 50.0]
    assert len(late) * unit == pytest.approx(rate * 50, rel=0.01, abs=unit)


def test_reads_and_writes_fill_their_own_buckets_and_the_total_ones() -> None:
    state = ThrottleState(limits(iops_read=10, bps_write=1000), 0.0)
    for _ in range(5):  # writes of 1 byte: far under the write limit, no read bucket
        state.account(True, 1)
    assert state.wait(True, 0.0) == 0.0
    assert state.wait(False, 0.0) == 0.0
    state.account(False, 1)
    state.account(False, 1)
    assert state.wait(False, 0.0) == pytest.approx(0.1)
    assert state.wait(True, 0.0) == 0.0  # the read bucket does not hold writes back
    state.account(True, 200)  # 205 bytes: 105 over the 100-byte bucket, at 1000/s
    assert state.wait(True, 0.0) == pytest.approx(0.105)
    assert limits(iops_read=1).limits(False)
    assert not limits(iops_read=1).limits(True)
    assert limits(bps_total=1).limits(True)
    assert limits(bps_total=1).limits(False)


def test_iops_size_counts_a_large_request_as_several_operations() -> None:
    state = ThrottleState(limits(iops_total=10, iops_size=4096), 0.0)
    state.account(False, 4 * 4096)  # 4 operations
    assert state.level(Bucket.OPS_TOTAL) == pytest.approx(4.0)
    assert state.wait(False, 0.0) == pytest.approx(0.3)
    state.account(False, 100)  # smaller than iops-size: one operation
    assert state.level(Bucket.OPS_TOTAL) == pytest.approx(5.0)
    plain = ThrottleState(limits(iops_total=10), 0.0)
    plain.account(False, 4 * 4096)
    assert plain.level(Bucket.OPS_TOTAL) == pytest.approx(1.0)


def test_bursts_run_at_the_burst_rate_for_their_length_then_at_the_rate() -> None:
    state = ThrottleState(limits(iops_total=10, iops_total_max=100,
                                 iops_total_max_length=2), 0.0)
    admitted = simulate(state, write=False, size=512, seconds=20.0)
    first = [t for t in admitted if t < 1.0]
    assert 100 <= len(first) <= 111  # at the burst rate (plus its tenth of slack)
    burst = [t for t in admitted if t < 2.0]
    assert 190 <= len(burst) <= 215
    steady = [t for t in admitted if t >= 10.0]
    assert len(steady) == pytest.approx(100, abs=2)  # back at 10/s


def test_without_a_burst_length_the_burst_rate_is_a_bigger_bucket() -> None:
    state = ThrottleState(limits(bps_total=1000, bps_total_max=5000), 0.0)
    state.account(False, 5000)
    assert state.wait(False, 0.0) == 0.0  # the bucket holds max * 1 s
    state.account(False, 1)
    assert state.wait(False, 0.0) == pytest.approx(0.001)


def test_configure_empties_the_buckets() -> None:
    state = ThrottleState(limits(iops_total=10), 0.0)
    for _ in range(5):
        state.account(False, 1)
    assert state.wait(False, 0.0) > 0
    state.configure(limits(iops_total=20), 0.0)
    assert state.wait(False, 0.0) == 0.0
    assert state.limits.buckets[Bucket.OPS_TOTAL].avg == 20


def test_time_going_backwards_leaks_nothing() -> None:
    state = ThrottleState(limits(iops_total=10), 5.0)
    state.account(False, 1)
    state.account(False, 1)
    assert state.wait(False, 4.0) == pytest.approx(0.1)


# -- the limits: qemu's names, checks and words -----------------------------------------------


def test_the_limit_keys_are_qemus_throttle_limits() -> None:
    assert len(LIMIT_KEYS) == 19
    assert {"iops-total", "iops-total-max", "iops-total-max-length", "bps-write-max",
            "bps-read-max-length", "iops-size"} <= set(LIMIT_KEYS)
    every = ThrottleLimits().updated({key: 1 if "length" in key else 0 for key in LIMIT_KEYS})
    assert every == ThrottleLimits()
    assert set(every.as_dict()) == set(LIMIT_KEYS)
    some = limits(bps_read=100, bps_read_max=300, bps_read_max_length=4, iops_write=9,
                  iops_size=512)
    assert some.as_dict() == {**ThrottleLimits().as_dict(), "bps-read": 100,
                              "bps-read-max": 300, "bps-read-max-length": 4,
                              "iops-write": 9, "iops-size": 512}
    assert ThrottleLimits().as_dict()["iops-write-max-length"] == 1  # qemu's default
    assert some.updated({"bps-write": 5}).as_dict()["bps-read-max"] == 300  # kept


@pytest.mark.parametrize(("values", "message"), [
    ({"iops-total": -1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"bps-write": 10**15 + 1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"iops-total": 100, "iops-total-max": 50},
     "bps_max/iops_max cannot be lower than bps/iops"),
    ({"bps-read-max": 50}, "bps_max/iops_max require corresponding bps/iops values"),
    ({"iops-total": 1, "iops-read": 2},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"bps-total": 1, "bps-total-max": 2, "bps-write": 1, "bps-write-max": 2},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"iops-size": 4096}, "iops size requires an iops value to be set"),
    ({"bps-total": 10, "bps-total-max-length": 0}, "the burst length cannot be 0"),
    ({"bps-total": 10, "bps-total-max-length": 5}, "burst length set without burst rate"),
    ({"iops-read-max-length": 1 << 32},
     "iops-read-max-length value must be in the range [0, 4294967295]"),
    ({"iops-size": -1}, "iops-size value must not be negative"),
    ({"iops-totl": 1}, "Parameter 'iops-totl' is unexpected"),
])
def test_bad_limits_are_refused_in_qemus_words(values: dict[str, int], message: str) -> None:
    assert refused(values) == message


def test_object_properties_limits_and_the_legacy_x_properties() -> None:
    both = limits_from_properties({"x-iops-total": 100, "limits": {"bps-total": 1000}})
    assert both.as_dict()["iops-total"] == 100
    assert both.as_dict()["bps-total"] == 1000
    assert limits_from_properties({}) == ThrottleLimits()
    cases: list[tuple[dict[str, object], str]] = [
            ({"x-iops-total": -1}, "Property values cannot be negative"),
            ({"x-iops-total-max-length": 1 << 33},
             "x-iops-total-max-length value must be in the range [0, 4294967295]"),
            ({"x-foo": 1}, "Parameter 'x-foo' is unexpected"),
            ({"limits": {"foo": 1}}, "Parameter 'limits.foo' is unexpected"),
            ({"limits": {"bps-total": "1"}},
             "Invalid parameter type for 'limits.bps-total', expected: integer"),
            ({"x-iops-total": 10, "x-iops-total-max": 5},
             "bps_max/iops_max cannot be lower than bps/iops")]
    for props, message in cases:
        with pytest.raises(ThrottleError) as info:
            limits_from_properties(props)
        assert str(info.value) == message


# -- the group: queues, order, fairness -------------------------------------------------------


class Clock:
    """A clock the test moves by hand (the group's timers still run in real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.002)
    pytest.fail(f"never: {what}")


def full_group(clock: Clock) -> ThrottleGroup:
    """1000 ops/s with a full bucket: the next operation waits 1 ms (fake time)."""
    group = ThrottleGroup("g", limits(iops_total=1000), clock)
    for _ in range(101):
        group.state.account(False, 0)
    return group


def test_requests_of_one_member_start_in_order_and_of_two_in_turn() -> None:
    async def main() -> None:
        clock = Clock()
        group = full_group(clock)
        a, b = (ThrottleNode(MemoryNode(MIB), group) for _ in range(2))
        order: list[str] = []

        async def request(member: ThrottleNode, label: str, write: bool) -> None:
            await group.intercept(member, 512, write)
            order.append(label)

        tasks = [asyncio.create_task(request(a, f"a{i}", i % 2 == 1)) for i in range(3)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request(b, f"b{i}", i % 2 == 1)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert order == []
        assert group.waiting(False) == 4
        assert group.waiting(True) == 2
        clock.now += 0.0015
        await until(lambda: len(order) == 1, "the first request")
        for count in range(2, 7):
            clock.now += 0.001
            await until(lambda: len(order) == count, f"request {count}")  # noqa: B023
        await asyncio.gather(*tasks)
        # one at a time; reads and writes share the total bucket, in turn per direction
        reads = [label for label in order if label[1] in "02"]
        assert reads == ["a0", "b0", "a2", "b2"]
        assert [label for label in order if label[1] == "1"] == ["a1", "b1"]
        assert group.waiting(False) == group.waiting(True) == 0

    asyncio.run(main())


def test_a_cancelled_request_leaves_the_queue_uncounted() -> None:
    async def main() -> None:
        clock = Clock()
        group = full_group(clock)
        node = ThrottleNode(MemoryNode(MIB), group)
        first = asyncio.create_task(group.intercept(node, 512, False))
        second = asyncio.create_task(group.intercept(node, 512, False))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0)
        assert group.waiting(False) == 1
        level = group.state.level(Bucket.OPS_TOTAL)
        clock.now += 0.0015
        await asyncio.wait_for(second, 5)
        assert first.cancelled()
        assert group.state.level(Bucket.OPS_TOTAL) == pytest.approx(level - 1.5 + 1)

    asyncio.run(main())


def test_new_limits_release_waiting_requests_and_leaving_releases_a_members() -> None:
    async def main() -> None:
        clock = Clock()
        group = full_group(clock)
        a, b = ThrottleNode(MemoryNode(MIB), group), ThrottleNode(MemoryNode(MIB), group)
        waiting = [asyncio.create_task(group.intercept(a, 1, False)) for _ in range(3)]
        await asyncio.sleep(0.01)
        group.configure(ThrottleLimits())
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert group.limited == [False, False]
        group.configure(limits(iops_total=10))
        assert group.limited == [True, True]
        for _ in range(5):
            group.state.account(False, 0)
        stuck = asyncio.create_task(group.intercept(b, 1, True))
        await asyncio.sleep(0.01)
        assert not stuck.done()
        assert group.members == [a, b]
        await b.close()  # leaving the group lets its requests go
        await asyncio.wait_for(stuck, 5)
        await a.close()
        assert not group.in_use
        assert group.members == []

    asyncio.run(main())


# -- the node -----------------------------------------------------------------------------------


def test_the_node_passes_data_through_whatever_the_limits() -> None:
    async def main() -> None:
        for lim in (ThrottleLimits(), limits(bps_total=100 * MIB, iops_total=100_000)):
            node = ThrottleNode(MemoryNode(SIZE), ThrottleGroup("g", lim))
            data = bytes(range(256)) * 64
            await node.pwrite(data, 4096, fua=True)
            buf = bytearray(len(data))
            await node.pread(memoryview(buf), 4096)
            assert buf == data
            await node.write_zeroes(4096, 512)
            await node.trim(MIB, 65536)
            await node.flush()
            await node.pread(memoryview(buf), 4096)
            assert buf[:512] == bytes(512)
            assert buf[512:] == data[512:]
            assert await node.block_status(0, SIZE)
            await close_subtree(node)

    asyncio.run(main())


def test_each_request_counts_its_bytes_in_its_direction() -> None:
    async def main() -> None:
        # a clock that stands still: nothing leaks, and nothing is over the buckets
        group = ThrottleGroup("g", limits(bps_read=10**9, bps_write=10**9), Clock())
        node = ThrottleNode(MemoryNode(SIZE), group)
        await node.pwrite(bytes(1000), 0)
        await node.write_zeroes(0, 3000)
        await node.trim(0, 4096)
        await node.flush()  # never counted
        assert group.state.level(Bucket.BPS_WRITE) == 8096
        await node.pread(memoryview(bytearray(700)), 0)
        assert group.state.level(Bucket.BPS_READ) == 700
        await node.block_status(0, SIZE)
        assert group.state.level(Bucket.BPS_READ) == 700

    asyncio.run(main())


def test_fast_paths_are_kept_for_a_direction_the_group_does_not_limit() -> None:
    async def main() -> None:
        group = ThrottleGroup("g", ThrottleLimits())
        node = ThrottleNode(MemoryNode(SIZE), group)
        paths = node.fast_paths()
        assert paths.pread_nowait is not None
        assert paths.pwrite_nowait is not None
        assert paths.sendfile_source is not None
        assert paths.pwrite_nowait(b"x" * 512, 0)
        buf = bytearray(512)
        assert paths.pread_nowait(memoryview(buf), 0)
        assert buf == b"x" * 512
        group.configure(limits(iops_read=10))  # the connection's paths see it at once
        assert not paths.pread_nowait(memoryview(buf), 0)
        assert paths.sendfile_source(0, 65536, False) is None
        assert paths.pwrite_nowait(b"y" * 512, 0)
        group.configure(limits(bps_write=10))
        assert not paths.pwrite_nowait(b"y" * 512, 0)
        assert paths.pread_nowait(memoryview(buf), 0)
        assert node.fast_paths().pread_nowait is not None
        await close_subtree(node)

    asyncio.run(main())


def test_capabilities_no_sparse_reads_multi_conn_kept_read_only_honoured() -> None:
    async def main() -> None:
        group = ThrottleGroup("g", limits(iops_total=5))
        node = ThrottleNode(MemoryNode(SIZE), group)
        assert not node.capabilities.sparse_reads
        assert node.capabilities.can_multi_conn
        assert one_store(node)
        assert node.capabilities.can_write
        assert node.driver == "throttle"
        ro = ThrottleNode(MemoryNode(SIZE), group, read_only=True)
        assert not ro.capabilities.can_write
        assert ro.fast_paths().pwrite_nowait is None
        assert group.members == [node, ro]
        await close_subtree(node)
        await close_subtree(ro)

    asyncio.run(main())


# -- building: blockdev options, --object and --filter ---------------------------------------


async def built(options: dict[str, Any], groups: dict[str, ThrottleGroup]) -> Node:
    graph = BlockGraph()
    opened: list[Node] = []
    try:
        return add_all(graph, await build(graph, options, opened, throttle_groups=groups))
    except BlockdevError:
        for node in reversed(opened):
            await node.close()
        raise


def test_blockdev_options_make_a_member_of_the_named_group() -> None:
    async def main() -> None:
        group = ThrottleGroup("tg0", limits(iops_total=100))
        memory = {"driver": "memory", "size": MIB}
        node = await built({"driver": "throttle", "throttle-group": "tg0", "file": memory},
                           {"tg0": group})
        assert isinstance(node, ThrottleNode)
        assert node.group is group
        with pytest.raises(BlockdevError, match=r"^Throttle group 'tg1' does not exist$"):
            await built({"driver": "throttle", "throttle-group": "tg1", "file": memory},
                        {"tg0": group})
        assert group.members == [node]
        await close_subtree(node)
        assert group.members == []

    asyncio.run(main())


def test_command_line_groups_and_filters_parse_and_stack_in_order(tmp_path: Any) -> None:
    log = str(tmp_path / "log.txt")
    objects: dict[str, tuple[str, dict[str, object]]] = {
        "tg0": ("throttle-group", {"limits": {"bps-total": "10M"}, "x-iops-total": "0x100"}),
        "tls0": ("tls-creds-x509", {"dir": "/nowhere"})}
    groups, specs = parse_filters(objects, ["throttle,throttle-group=tg0",
                                            f"log,logfile={log},logappend=on",
                                            "throttle,iops-total=500,limits.bps-read=50M"])
    assert groups["tg0"].as_dict()["bps-total"] == 10 * MIB
    assert groups["tg0"].as_dict()["iops-total"] == 256
    assert [spec.driver for spec in specs] == ["throttle", "log", "throttle"]
    assert specs[2].limits is not None
    assert specs[2].limits.as_dict()["bps-read"] == 50 * MIB

    async def main() -> None:
        graph = BlockGraph()
        image = MemoryNode(SIZE)
        graph.add(image, graph.generated_name())
        top = await stack_filters(graph, image, specs, groups)
        chain = [top.driver, top.children["file"].driver,
                 top.children["file"].children["file"].driver]
        assert chain == ["throttle", "log", "throttle"]
        assert top.children["file"].children["file"].children["file"] is image
        assert await stack_filters(graph, image, (), groups) is image
        await graph.close()

    asyncio.run(main())


@pytest.mark.parametrize(("spec", "message"), [
    ("throttle,iops-total=-5",
     "--filter throttle,iops-total=-5: bps/iops/max values must be within "
     "[0, 1000000000000000]"),
    ("throttle,iops-total=100,iops-total-max=10",
     "--filter throttle,iops-total=100,iops-total-max=10: bps_max/iops_max cannot be "
     "lower than bps/iops"),
    ("throttle,iops=5", "--filter throttle,iops=5: Parameter 'iops' is unexpected"),
    ("throttle,throttle-group=tg9",
     "--filter throttle,throttle-group=tg9: Throttle group 'tg9' does not exist"),
    ("throttle,throttle-group=tg0,iops-total=5",
     "--filter throttle,throttle-group=tg0,iops-total=5: give either throttle-group=ID "
     "or limits, not both"),
    ("throttle", "--filter throttle: give throttle-group=ID (an --object throttle-group) "
     "or limits such as iops-total=500 or bps-total=50M"),
    ("throttle,bps-total=lots", "--filter throttle,bps-total=lots: Parameter 'bps-total' "
     "expects an integer or a size (such as 100 or 10M), got 'lots'"),
    ("log", "--filter log: Parameter 'logfile' is missing"),
    ("log,logfile=/x,level=9", "--filter log,logfile=/x,level=9: Parameter 'level' is "
     "unexpected"),
    ("log,logfile=/x,logappend=maybe", "--filter log,logfile=/x,logappend=maybe: "
     "Parameter 'logappend' expects 'on' or 'off'"),
    ("cache,size=1", "--filter cache,size=1: unknown filter 'cache' (expected throttle or "
     "log)"),
    ("logfile=/x", "--filter logfile=/x: expected a filter name first (throttle or log)"),
])
def test_bad_filters_are_one_line(spec: str, message: str) -> None:
    objects = {"tg0": ("throttle-group", {"limits": {"iops-total": "5"}})}
    with pytest.raises(ValueError, match=r"^--filter ") as info:
        parse_filters(objects, [spec])
    assert str(info.value) == message


def test_a_bad_object_names_itself() -> None:
    with pytest.raises(ValueError, match=r"^--object ") as info:
        parse_filters({"tg0": ("throttle-group", {"limits": {"iops-total": "-1"}})}, [])
    assert str(info.value) == ("--object throttle-group,id=tg0: bps/iops/max values must "
                               "be within [0, 1000000000000000]")


# -- QMP: object-add, blockdev-add, object-del, qom-get, qom-set -------------------------------


def test_qmp_groups_and_throttle_nodes() -> None:
    async def body(engine: Engine) -> None:
        await engine.execute("object-add", {"qom-type": "throttle-group", "id": "tg0",
                                            "limits": {"iops-total": 100}})
        await engine.execute("object-add", {"qom-type": "throttle-group", "id": "tg1",
                                            "x-bps-total": 1000, "x-bps-total-max": 2000})
        await engine.execute("blockdev-add", {"driver": "memory", "node-name": "m",
                                              "size": MIB})
        await engine.execute("blockdev-add", {"driver": "throttle", "node-name": "t",
                                              "throttle-group": "tg0", "file": "m"})
        nodes = {n["node-name"]: n for n in await engine.execute("query-named-block-nodes",
                                                                 {})}
        assert nodes["t"]["drv"] == "throttle"
        assert await fails(engine, "object-del", {"id": "tg0"}) == (
            "object 'tg0' is in use, can not be deleted")
        assert await fails(engine, "blockdev-add", {
            "driver": "throttle", "node-name": "u", "throttle-group": "nope",
            "file": "m"}) == "Throttle group 'nope' does not exist"
        assert await fails(engine, "blockdev-add", {"driver": "throttle", "node-name": "u",
                                                    "file": "m"}) == (
            "Parameter 'throttle-group' is missing")
        assert await fails(engine, "object-add", {
            "qom-type": "throttle-group", "id": "bad", "limits": {"iops-total": -1}}) == (
            "bps/iops/max values must be within [0, 1000000000000000]")
        assert await fails(engine, "object-add", {
            "qom-type": "throttle-group", "id": "bad", "x-iops-total": -1}) == (
            "Property values cannot be negative")
        assert await fails(engine, "object-add", {
            "qom-type": "throttle-group", "id": "bad", "limits": {"iops": 1}}) == (
            "Parameter 'limits.iops' is unexpected")
        assert await fails(engine, "object-add", {
            "qom-type": "throttle-group", "id": "bad",
            "limits": {"bps-total": 100, "bps-total-max": 50}}) == (
            "bps_max/iops_max cannot be lower than bps/iops")
        assert "bad" not in engine.objects
        assert "bad" not in engine.throttle_groups
        # qom-get and qom-set
        got = await engine.execute("qom-get", {"path": "tg1", "property": "limits"})
        assert got["bps-total"] == 1000
        assert got["bps-total-max"] == 2000
        assert await engine.execute("qom-get", {"path": "/objects/tg1",
                                                "property": "x-bps-total-max"}) == 2000
        await engine.execute("qom-set", {"path": "tg0", "property": "limits",
                                         "value": {"bps-read": 5000}})
        after = engine.throttle_groups["tg0"].limits.as_dict()
        assert after["iops-total"] == 100
        assert after["bps-read"] == 5000
        assert await fails(engine, "qom-set", {"path": "tg0", "property": "limits",
                                               "value": {"bps-total": 1}}) == (
            "bps/iops/max total values and read/write values cannot be used at the same "
            "time")
        assert await fails(engine, "qom-set", {"path": "tg0", "property": "x-iops-total",
                                               "value": 1}) == (
            "Property cannot be set after initialization")
        assert await fails(engine, "qom-get", {"path": "tg9", "property": "limits"},
                           error_class="DeviceNotFound") == "Device 'tg9' not found"
        assert await fails(engine, "qom-get", {"path": "tg0", "property": "nope"}) == (
            "Property 'throttle-group.nope' not found")
        # once its node is gone the group can go
        await engine.execute("blockdev-del", {"node-name": "t"})
        await engine.execute("object-del", {"id": "tg0"})
        assert "tg0" not in engine.throttle_groups
        assert "tg0" not in engine.objects

    on_engine(body)


def test_qmp_log_nodes(tmp_path: Any) -> None:
    path = tmp_path / "log.txt"

    async def body(engine: Engine) -> None:
        await engine.execute("blockdev-add", {
            "driver": "log", "node-name": "l", "logfile": str(path), "logappend": True,
            "file": {"driver": "memory", "size": MIB}})
        nodes = {n["node-name"]: n for n in await engine.execute("query-named-block-nodes",
                                                                 {})}
        assert nodes["l"]["drv"] == "log"
        assert await fails(engine, "blockdev-add", {
            "driver": "log", "node-name": "l2", "logfile": str(tmp_path / "no" / "x"),
            "file": "l"}) == f"Could not open '{tmp_path / 'no' / 'x'}': No such file or " \
                             "directory"
        assert "l2" not in engine.graph
        await engine.execute("blockdev-del", {"node-name": "l"})

    on_engine(body)
    assert path.exists()


def test_rate_is_finite_for_every_valid_bucket() -> None:
    # a sanity check of wait(): never NaN or infinite, whatever the level
    state = ThrottleState(limits(bps_total=1, bps_total_max=10**15,
                                 bps_total_max_length=2), 0.0)
    for size in (0, 1, 10**12, 10**18):
        state.account(True, size)
        assert math.isfinite(state.wait(True, 0.0))
