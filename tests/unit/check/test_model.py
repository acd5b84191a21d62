"""The checker's model keeps bounded state and the verdicts of the unbounded history.

``pynbd.check.model.Model`` drops operations no read can be judged against
any more and keeps a bounded recent history per block for reports.  These
tests drive it with seeded random schedules of overlapping writes, zeroes,
trims and reads (as the runner does: a tick at each send and each reply) and
check that (1) what it keeps per block stays under a constant however many
operations run, and (2) every read gets the same allowed contents, and the same
verdict, as from the reference rule applied to the whole history.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

from pynbd.check import GARBAGE, Model, Op
from pynbd.check.model import HISTORY_KEEP, LIVE_LIMIT
from pynbd.check.report import HISTORY_LINES, _history_lines

if TYPE_CHECKING:
    from collections.abc import Iterable

BLOCK = 512


def reference_candidates(ops: Iterable[Op], read: Op) -> tuple[set[int], bool]:
    """The acceptance rule over a block's whole history (what the checker had kept)."""
    ops = list(ops)
    assert read.done is not None
    latest = max((op.send for op in ops
                  if op.kind != "trim" and op.done is not None and op.done < read.send),
                 default=0)
    writes: set[int] = set()
    zeroes = latest == 0
    for op in ops:
        if op.send <= read.done and (op.done is None or op.done > latest):
            if op.kind == "write":
                writes.add(op.tag)
            else:
                zeroes = True
    return writes, zeroes


class Schedule:
    """A seeded random workload on a few blocks, fed to the model as the runner does."""

    def __init__(self, blocks: int, seed: int, inflight: int = 12, span: int = 2, *,
                 reference: bool = True) -> None:
        self.model = Model(blocks, BLOCK, seed)
        self.rng = random.Random(seed)
        self.blocks = blocks
        self.inflight_limit = inflight
        self.span = span
        #: keep the whole history and compare every read with the rule applied to it
        self.reference = reference
        #: every write-type operation on each block, never pruned: the reference
        self.everything: list[list[Op]] = [[] for _ in range(blocks)]
        self.inflight: list[Op] = []
        self.next_id = 0
        self.reads = 0
        self.violations = 0
        self.stale_reads = 0
        #: operations that touched each block, reads included
        self.touched = [0] * blocks

    def new_op(self, kind: str, first: int | None = None, count: int = 1) -> Op:
        self.next_id += 1
        if first is None:
            count = self.rng.randint(1, min(self.span, self.blocks))
            first = self.rng.randrange(self.blocks - count + 1)
        return Op(self.next_id, kind, self.next_id % 4, first, count, send=0)

    def send(self, op: Op) -> Op:
        model = self.model
        if op.kind == "read":
            model.start_read(op)
        else:
            if op.kind == "write":
                op.tag = model.next_write
                model.next_write += 1
            op.send = model.tick()
            model.add_write_type(op)
            for block in range(op.first, op.first + op.count):
                if self.reference:
                    self.everything[block].append(op)
                self.touched[block] += 1
        self.inflight.append(op)
        return op

    def complete(self, op: Op) -> None:
        self.inflight.remove(op)
        if op.kind != "read":
            op.done = self.model.tick()
            return
        self.model.end_read(op)
        self.reads += 1
        self.judge(op)

    def judge(self, read: Op) -> None:
        """Compare the model with the reference on every block, then on a chosen reply."""
        model, data, bad = self.model, [], set()
        for block in range(read.first, read.first + read.count):
            self.touched[block] += 1
            expected = model.candidates(block, read)
            if self.reference:
                history = self.everything[block]
                assert expected == reference_candidates(history, read), (block, read)
                old = [op.tag for op in history if op.kind == "write"]
            else:  # the first writes, long replaced if the run is long
                old = [op.tag for op in model.recent[block][:3] if op.kind == "write"]
            writes, zeroes = expected
            old = [tag for tag in old if tag not in writes]
            # the reply: an allowed content mostly, sometimes an old one or junk
            choice = self.rng.random()
            if choice < 0.08 and old:
                seen = self.rng.choice(old)
            elif choice < 0.1:
                seen = GARBAGE
            elif choice < 0.15 or not writes:
                seen = 0
            else:
                seen = self.rng.choice(sorted(writes))
            if seen == GARBAGE:
                data.append(b"\x01" * BLOCK)
            else:
                data.append(model.content(seen, block) if seen else bytes(BLOCK))
            if not ((seen == 0 and zeroes) or seen in writes):
                bad.add(block)
                self.stale_reads += seen not in (0, GARBAGE)
        found = model.check_read(read, b"".join(data))
        assert {v.block for v in found} == bad
        self.violations += len(found)

    def step(self) -> None:
        rng = self.rng
        if self.inflight and (len(self.inflight) >= self.inflight_limit or rng.random() < 0.5):
            # mostly the oldest, sometimes any: replies come out of order
            op = self.inflight[0] if rng.random() < 0.3 else rng.choice(self.inflight)
            self.complete(op)
            return
        kind = rng.choices(["read", "write", "zero", "trim"], [45, 35, 10, 10])[0]
        self.send(self.new_op(kind))

    def kept(self, block: int) -> int:
        return len(self.model.live[block]) + len(self.model.recent[block])

    def run(self, steps: int) -> int:
        """Run ``steps`` steps; return the most operations any block kept meanwhile."""
        most = 0
        for _ in range(steps):
            self.step()
            most = max(most, *(self.kept(b) for b in range(self.blocks)))
        return most


# -- the bound ---------------------------------------------------------------------------------

#: what a block may keep: a full recent history, plus live operations that recent
#: already dropped (fewer than the limit, plus those in flight)
BOUND = 2 * HISTORY_KEEP + LIVE_LIMIT + 12


@pytest.mark.parametrize("steps", [2_000, 40_000])
def test_kept_state_per_block_stays_under_a_constant(steps: int) -> None:
    schedule = Schedule(blocks=2, seed=11, reference=False)
    most = schedule.run(steps)
    assert most <= BOUND
    model = schedule.model
    for block in range(2):
        assert len(model.recent[block]) <= 2 * HISTORY_KEEP
        assert len(model.live[block]) <= LIVE_LIMIT + schedule.inflight_limit
        # the report accounts for every operation on the block, kept or not
        history, earlier = model.history(block)
        assert len(history) + earlier == schedule.touched[block]
    if steps > 10_000:
        assert sum(model.dropped) > steps // 2  # most of the history went
    assert len(model.reads_in_flight) <= schedule.inflight_limit


def test_many_more_operations_keep_no_more_state() -> None:
    """The same workload ten times longer: the same ceiling, not ten times more."""
    short = Schedule(blocks=3, seed=4, reference=False)
    long = Schedule(blocks=3, seed=4, reference=False)
    short_most, long_most = short.run(3_000), long.run(30_000)
    assert long_most <= BOUND
    assert long_most <= short_most + LIVE_LIMIT
    distinct = {id(op) for lists in (long.model.live, long.model.recent)
                for ops in lists for op in ops}
    assert len(distinct) <= 3 * BOUND


# -- the verdicts ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_same_verdicts_as_the_whole_history(seed: int) -> None:
    """Every read: the same allowed contents and violations as the unbounded rule."""
    schedule = Schedule(blocks=4, seed=seed, inflight=16, span=3)
    schedule.run(5_000)
    assert schedule.reads > 1_000
    assert schedule.stale_reads > 20  # old writes were offered, and flagged
    assert sum(schedule.model.dropped) > 0


def _write(model: Model, number: int, send: int, done: int | None, block: int = 0) -> Op:
    op = Op(number, "write", number % 3, block, 1, send=send, done=done, tag=model.next_write)
    model.next_write += 1
    model.add_write_type(op)
    return op


def test_a_stale_read_after_many_writes_is_still_flagged() -> None:
    model = Model(blocks=1, block_size=BLOCK, seed=3)
    first = _write(model, 1, send=1, done=2)
    model.clock = 2
    for number in range(2, 5_002):  # sequential writes on block 0, each read back
        write = Op(number, "write", number % 3, 0, 1, send=0, tag=model.next_write)
        model.next_write += 1
        write.send = model.tick()
        model.add_write_type(write)
        write.done = model.tick()
        read = Op(10_000 + number, "read", (number + 1) % 3, 0, 1, send=0)
        model.start_read(read)
        model.end_read(read)
        assert model.check_read(read, model.content(write.tag, 0)) == []
    assert len(model.live[0]) <= LIVE_LIMIT
    assert len(model.recent[0]) <= 2 * HISTORY_KEEP
    # a connection that still returns the very first write, long since replaced
    stale = Op(99_999, "read", 1, 0, 1, send=0)
    model.start_read(stale)
    model.end_read(stale)
    (violation,) = model.check_read(stale, model.content(first.tag, 0))
    assert violation.seen == first.tag
    assert violation.expected == [model.next_write - 1]
    assert violation.reason.startswith(f"write #{first.tag} had been replaced by WRITE #"
                                       f"{model.next_write - 1} on connection ")
    assert violation.reason.endswith("which completed before this read was sent")
    assert violation.history[-1] is stale
    assert len(violation.history) <= 2 * HISTORY_KEEP + LIVE_LIMIT
    assert violation.earlier + len(violation.history) == 2 * 5_001
    lines = _history_lines(violation)
    shown = min(len(violation.history), HISTORY_LINES)
    hidden = violation.earlier + len(violation.history) - shown
    assert lines[2] == f"  ... {hidden} earlier operations not shown"
    assert len(lines) == 3 + shown
    assert lines[-1].endswith("<== violation")
    assert violation.as_dict()["history_not_kept"] == violation.earlier


def test_a_read_in_flight_holds_back_only_its_own_blocks() -> None:
    model = Model(blocks=2, block_size=BLOCK, seed=8)
    old = _write(model, 1, send=1, done=2, block=1)
    model.clock = 2
    slow = Op(500, "read", 0, 1, 1, send=0)
    model.start_read(slow)  # block 1 only, sent at t=3
    tags: dict[int, list[int]] = {0: [], 1: []}
    for number in range(2, 400):
        block = number % 2
        write = Op(number, "write", 1, block, 1, send=0, tag=model.next_write)
        model.next_write += 1
        write.send = model.tick()
        model.add_write_type(write)
        write.done = model.tick()
        tags[block].append(write.tag)
    assert len(model.live[0]) <= LIVE_LIMIT  # block 0 was pruned all along
    assert len(model.live[1]) == 200  # block 1: everything the slow read may see
    model.end_read(slow)
    # what block 1 held when the read was sent, or any write sent meanwhile
    for tag in (old.tag, tags[1][0], tags[1][-1]):
        assert model.check_read(slow, model.content(tag, 1)) == []
    (zeroes,) = model.check_read(slow, bytes(BLOCK))
    assert zeroes.seen == 0
    # once it is over, the next write prunes block 1 too
    _write(model, 401, send=model.tick(), done=model.tick() + 1, block=1)
    assert len(model.live[1]) <= 2
