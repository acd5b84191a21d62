"""The checker's model: operations, block contents, the acceptance rule for reads.

This module owns what ``pynbd check`` knows and decides, with no I/O and no
asyncio: ``Op`` (one request sent), the tagged content of every written block
and its decoding, ``Model`` (each block's state and the rule a read must obey)
and ``Violation`` (a read that broke it, with the block's recent history and a
one-sentence reason).

What is kept per block, so that memory stays bounded however long a run lasts:

- ``live``: the write-type operations a read of the block can still be judged
  against.  An operation is dropped once it completed before the send time of
  the newest write or zero that completed before every read of the block still
  in flight (and before any future read) was sent: every such read has that
  newer write as its "latest", so the dropped one can no longer be a content it
  may return, nor change which contents it may return.  What stays: operations
  in flight, the newest completed write or zero before that horizon, and what
  came after it.  Only a read that stays in flight keeps its own blocks' writes
  from going (it may still see any of them); other blocks are not held back.
- ``recent``: the last ``HISTORY_KEEP`` to ``2 * HISTORY_KEEP`` operations
  (reads included) that touched the block, for violation reports, and the
  number of older ones dropped.

The verdicts are those of the unbounded history: dropping never changes the
contents a read may return.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

#: operations a block's recent history keeps at least (at most twice as many)
HISTORY_KEEP = 16
#: a block's live operations are pruned when there are more than this many
LIVE_LIMIT = 24
#: what a read returned that is neither zeroes nor a block the checker wrote
GARBAGE = -1

_TAG = struct.Struct(">QQ")
_WORD = struct.Struct(">Q")


@dataclasses.dataclass(slots=True, eq=False)
class Op:
    """One request the checker sent."""

    id: int
    kind: str
    conn: int
    first: int
    count: int
    send: int
    done: int | None = None
    #: the write id of a write (0 for other kinds)
    tag: int = 0
    fua: bool = False
    no_hole: bool = False
    #: reads: what each block held (write id, 0 for zeroes, -1 for neither)
    seen: tuple[int, ...] = ()

    def label(self) -> str:
        text = {"write": f"WRITE #{self.tag}", "zero": "WRITE_ZEROES", "trim": "TRIM",
                "read": "READ", "flush": "FLUSH"}[self.kind]
        if self.fua:
            text += " FUA"
        if self.no_hole:
            text += " NO_HOLE"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.id, "kind": self.kind, "conn": self.conn, "first_block": self.first,
                "blocks": self.count, "sent": self.send, "completed": self.done,
                "tag": self.tag or None, "fua": self.fua}


def describe(value: int) -> str:
    """A decoded block content in words."""
    if value == 0:
        return "zeroes"
    if value == GARBAGE:
        return "unknown data"
    return f"write #{value}"


def saw(op: Op, block: int) -> str | None:
    """What read ``op`` saw in ``block`` (None for other operations)."""
    index = block - op.first
    if op.kind != "read" or index >= len(op.seen):
        return None
    return describe(op.seen[index])


@dataclasses.dataclass(slots=True)
class Violation:
    """A block a read returned that the model does not allow."""

    block: int
    offset: int
    read: Op
    seen: int
    expected: list[int]
    head: bytes
    #: the block's kept operations, in send order
    history: list[Op]
    reason: str
    #: operations on the block older than ``history`` that were not kept
    earlier: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"block": self.block, "offset": self.offset, "read": self.read.as_dict(),
                "seen": describe(self.seen), "first_bytes": self.head.hex(),
                "reason": self.reason,
                "expected": [describe(v) for v in self.expected],
                "history": [{**op.as_dict(), "label": op.label(), "saw": saw(op, self.block)}
                            for op in self.history],
                "history_not_kept": self.earlier}


class Model:
    """Each block's state and the acceptance rule for reads."""

    def __init__(self, blocks: int, block_size: int, seed: int) -> None:
        self.block_size = block_size
        self.clock = 0
        self.zero = bytes(block_size)
        self._salt = seed & 0xFFFF_FFFF_FFFF_FFFF
        #: write-type operations a read of each block may still be judged against
        self.live: list[list[Op]] = [[] for _ in range(blocks)]
        #: each block's recent operations (reads included), for reports
        self.recent: list[list[Op]] = [[] for _ in range(blocks)]
        #: how many older operations each block's ``recent`` dropped
        self.dropped: list[int] = [0] * blocks
        #: reads sent and not completed, by operation id
        self.reads_in_flight: dict[int, Op] = {}
        self.next_write = 1
        self.torn = 0
        self.verified = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # -- content ------------------------------------------------------------------------

    def content(self, write_id: int, block: int) -> bytes:
        """What block ``block`` of write ``write_id`` holds."""
        x = (write_id * 0x9E3779B97F4A7C15 + self._salt) & 0xFFFF_FFFF_FFFF_FFFF
        x ^= x >> 31
        words = (self.block_size - _TAG.size) // 8
        return _TAG.pack(write_id, block) + _WORD.pack(x | 1) * words

    def decode(self, block: int, data: bytes) -> int:
        """The write id ``data`` is block ``block`` of, 0 for zeroes, else ``GARBAGE``."""
        if data == self.zero:
            return 0
        write_id, number = _TAG.unpack_from(data)
        if number != block or not 0 < write_id < self.next_write:
            return GARBAGE
        return write_id if data == self.content(write_id, block) else GARBAGE

    # -- recording ----------------------------------------------------------------------

    def add_write_type(self, op: Op) -> None:
        """Record a write, zero or trim just sent (``op.send`` set)."""
        for block in range(op.first, op.first + op.count):
            self._remember(block, op)
            live = self.live[block]
            live.append(op)
            if len(live) > LIVE_LIMIT:
                self._prune(block)

    def start_read(self, op: Op) -> None:
        """A read is sent now."""
        op.send = self.tick()
        self.reads_in_flight[op.id] = op

    def end_read(self, op: Op) -> None:
        """A read's reply (or failure) came now; ``check_read`` it before anything else."""
        op.done = self.tick()
        del self.reads_in_flight[op.id]

    def _remember(self, block: int, op: Op) -> None:
        recent = self.recent[block]
        recent.append(op)
        if len(recent) > 2 * HISTORY_KEEP:
            del recent[:HISTORY_KEEP]
            self.dropped[block] += HISTORY_KEEP

    def _prune(self, block: int) -> None:
        # the oldest read of this block still in flight; later reads are sent after now
        horizon = min((read.send for read in self.reads_in_flight.values()
                       if read.first <= block < read.first + read.count), default=self.clock)
        latest = 0
        for op in self.live[block]:
            if op.kind != "trim" and op.done is not None and op.done < horizon:
                latest = max(latest, op.send)
        self.live[block] = [op for op in self.live[block]
                            if op.done is None or op.done >= latest]

    def history(self, block: int) -> tuple[list[Op], int]:
        """The block's kept operations in send order, and how many older were not kept."""
        kept = {id(op): op for op in self.recent[block]}
        kept.update((id(op), op) for op in self.live[block])
        ops = sorted(kept.values(), key=lambda op: op.send)
        return ops, self.dropped[block] + len(self.recent[block]) - len(ops)

    # -- checking -----------------------------------------------------------------------

    def candidates(self, block: int, read: Op) -> tuple[set[int], bool]:
        """Write ids a read may see, and whether zeroes are allowed."""
        sent, done = read.send, read.done
        assert done is not None
        ops = self.live[block]
        latest = 0  # send time of the newest write/zero completed before the read was sent
        for op in ops:
            if op.kind != "trim" and op.done is not None and op.done < sent:
                latest = max(latest, op.send)
        writes: set[int] = set()
        zeroes = latest == 0  # nothing completed before: the initial zeroes may remain
        for op in ops:
            if op.send > done:
                continue
            # concurrent with the read, or completed before it and not superseded
            # (``latest`` < ``sent``, so "done > latest" covers "done > sent")
            if op.done is None or op.done > latest:
                if op.kind == "write":
                    writes.add(op.tag)
                else:
                    zeroes = True
        return writes, zeroes

    def check_read(self, read: Op, data: bytes) -> list[Violation]:
        """Judge every block of a completed read; record what it saw."""
        violations = []
        size = self.block_size
        read.seen = tuple(self.decode(read.first + i, data[i * size:(i + 1) * size])
                          for i in range(read.count))
        for i, seen in enumerate(read.seen):
            block = read.first + i
            chunk = data[i * size:(i + 1) * size]
            self._remember(block, read)
            self.verified += 1
            writes, zeroes = self.candidates(block, read)
            if (seen == 0 and zeroes) or seen in writes:
                continue
            if seen == GARBAGE and self._torn(block, chunk, writes, zeroes):
                self.torn += 1
                continue
            expected = sorted(writes) + ([0] if zeroes else [])
            history, earlier = self.history(block)
            violations.append(Violation(block, block * size, read, seen, expected,
                                        chunk[:16], history,
                                        self._explain(history, read, seen), earlier))
        return violations

    @staticmethod
    def _explain(history: list[Op], read: Op, seen: int) -> str:
        """Why ``seen`` is not allowed, in one sentence."""
        if seen == GARBAGE:
            return ("the block holds neither zeroes nor a block the checker wrote (nor a mix "
                    "of the contents allowed)")
        makers = [op for op in history if op.kind != "read" and op.done is not None
                  and (op.tag == seen if seen else op.kind in ("zero", "trim"))]
        maker = max(makers, key=lambda op: op.done or 0, default=None)
        if maker is not None and maker.send > (read.done or 0):
            return f"{describe(seen)} was sent only after this read completed"
        replaced = [op for op in history if op.kind in ("write", "zero")
                    and op.done is not None and op.done < read.send]
        if maker is not None and maker.done is not None:
            # the first write or zero sent after it completed
            since = maker.done
            by = next((op for op in replaced if op.send > since), None)
        else:
            # no longer kept: it had completed before the newest such write was sent
            by = max(replaced, key=lambda op: op.send, default=None)
        if by is not None:
            return (f"{describe(seen)} had been replaced by {by.label()} on connection "
                    f"{by.conn} (sent t={by.send}, done t={by.done}), which completed "
                    "before this read was sent")
        return f"{describe(seen)} is not among the contents allowed"

    def _torn(self, block: int, data: bytes, writes: set[int], zeroes: bool) -> bool:
        """Is ``data`` a byte-by-byte mix of at least two allowed contents?"""
        options = [self.content(w, block) for w in writes] + ([self.zero] if zeroes else [])
        if len(options) < 2:
            return False
        for start in range(0, len(data), 8):
            word = data[start:start + 8]
            if any(word == o[start:start + 8] for o in options):
                continue
            for pos in range(start, min(start + 8, len(data))):
                if all(data[pos] != o[pos] for o in options):
                    return False
        return True
