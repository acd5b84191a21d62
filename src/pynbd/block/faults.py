"""Fault injection: a filter node that fails or delays chosen requests.

In the spirit of nbdkit's error and delay filters and qemu's blkdebug: a
``FaultRule`` picks requests by command (read, write, flush, trim, zero,
block-status, cache), by an optional byte range they must overlap, by chance
(``rate``, drawn from the rule's own seeded generator) and up to an optional
number of hits (``count``); a picked request waits ``delay`` seconds and/or
fails with ``errno``.

Rules of this module:
- An injected error is an ``OSError`` with that errno, exactly what a failing
  node raises, so the server maps it in its one place
  (``pynbd.proto.errors.nbd_errno``): an errno NBD lacks reaches the client
  as EIO.
- A delay is an ``asyncio.sleep``: only the delayed request waits.
- Rules are evaluated in the order they were added; every rule that picks the
  request adds its delay, the first one with an errno decides the error and
  ends the evaluation (later rules neither draw nor count).  A rule with a
  range picks only requests overlapping it, so never a FLUSH (it has no
  range); a rule without one picks every request of its commands.
- Little cost without rules: the filter keeps its child's fast paths behind
  one check of whether a rule may pick the request (a set lookup while no rule
  is live).  When a rule could pick a cheap request, the fast path declines
  and the request takes the async path, where the rule applies.
- While a read rule could pick part of a range, ``block_status`` there reports
  no ZERO bit, so the server's sparse structured reads read that range (and
  meet the read rule) instead of answering a hole without reading.  Reporting
  data where there may be zeroes is always allowed by the protocol.
- ``block-status`` rules also pick the block-status lookups the server makes
  for sparse structured reads of 64 KiB or more, as qemu's blkdebug does.
- Rules may be added and cleared at any time (QMP); a request keeps the
  decision it got when it arrived.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno as _errno
import math
import os
import random
from typing import TYPE_CHECKING, Any

from .filter import FilterNode
from .node import Extent, ExtentFlags, FastPaths
from .sizes import parse_size

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .node import Data, Node, ReadDone, WriteDone

#: command names a rule can pick, in NBD's order ("all" picks every one)
COMMANDS = ("read", "write", "flush", "trim", "zero", "block-status", "cache")

def parse_errno(text: str) -> int:
    """An errno from its symbolic name (``"EIO"``, ``"enospc"``).

    Raises:
        ValueError: not an errno name this system knows.
    """
    value = getattr(_errno, text.strip().upper(), None) if text.strip() else None
    if not isinstance(value, int) or not text.strip().upper().startswith("E"):
        raise ValueError(f"unknown errno name {text!r} (expected e.g. EIO, ENOSPC, EPERM)")
    return value


def errno_name(value: int) -> str:
    """The symbolic name of an errno (``5 -> "EIO"``)."""
    return _errno.errorcode.get(value, str(value))


def parse_commands(text: str) -> frozenset[str]:
    """``"read"``, ``"all"`` or several joined by ``+`` (``"read+write"``)."""
    names = [name.strip().lower() for name in text.split("+")]
    if "all" in names:
        return frozenset(COMMANDS)
    unknown = [name for name in names if name not in COMMANDS]
    if unknown or not names:
        raise ValueError(f"unknown command {unknown[0] if unknown else text!r}: expected "
                         f"{', '.join(COMMANDS)} or all")
    return frozenset(names)


@dataclasses.dataclass(eq=False)
class FaultRule:
    """Which requests to fail or delay, and how.

    Args:
        commands: the command names it picks (see ``COMMANDS``).
        errno: fail picked requests with this errno; None: only delay them.
        rate: the chance (0..1) that a request the rule could pick is picked.
        start, end: pick only requests overlapping ``[start, end)``;
            ``end=None`` means to the end of the device.  With the default
            ``start=0, end=None`` the rule has no range and also picks FLUSH.
        count: pick at most this many requests; None: no limit.
        delay: seconds a picked request waits before it goes on (or fails).
        seed: seeds the rule's generator for ``rate``; None: the filter
            derives one from its own seed and the rule's id.

    Raises:
        ValueError: an impossible rule (rate outside 0..1, empty range, ...).
    """

    commands: frozenset[str]
    errno: int | None = None
    rate: float = 1.0
    start: int = 0
    end: int | None = None
    count: int | None = None
    delay: float = 0.0
    seed: int | None = None
    #: set by ``FaultFilter.add_rule``
    id: int = 0
    #: requests picked so far
    hits: int = 0
    _rng: random.Random = dataclasses.field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self.commands = frozenset(self.commands)
        if not self.commands or not self.commands <= frozenset(COMMANDS):
            raise ValueError(f"commands must be among {', '.join(COMMANDS)}")
        if self.errno is not None and self.errno <= 0:
            raise ValueError(f"errno must be positive, got {self.errno}")
        if not 0.0 <= self.rate <= 1.0:  # also rejects NaN
            raise ValueError(f"rate must be between 0 and 1, got {self.rate}")
        if self.start < 0:
            raise ValueError(f"range start must not be negative, got {self.start}")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"range end {self.end} must be greater than its start "
                             f"{self.start}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"delay must be a non-negative number of seconds, "
                             f"got {self.delay}")
        if self.errno is None and not self.delay:
            raise ValueError("a fault needs an errno or a delay")
        if self.seed is not None:
            self._rng.seed(self.seed)

    @property
    def ranged(self) -> bool:
        return self.start > 0 or self.end is not None

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.hits >= self.count

    def live_for(self, command: str) -> bool:
        """Whether this rule might still pick some request of ``command``."""
        return (command in self.commands and not self.exhausted and self.rate > 0.0
                and not (command == "flush" and self.ranged))

    def could_pick(self, command: str, offset: int, length: int) -> bool:
        """Whether this rule might pick such a request (no chance drawn)."""
        if not self.live_for(command):
            return False
        if not self.ranged:
            return True
        end = offset + max(length, 1)
        return offset < (self.end if self.end is not None else end) and end > self.start

    def pick(self, command: str, offset: int, length: int) -> bool:
        """Decide for one request (draws a chance, counts a hit)."""
        if not self.could_pick(command, offset, length):
            return False
        if self.rate < 1.0 and self._rng.random() >= self.rate:
            return False
        self.hits += 1
        return True

    def describe(self) -> dict[str, Any]:
        """The rule as QMP's ``x-query-faults`` shows it."""
        commands = "all" if self.commands == frozenset(COMMANDS) else "+".join(
            name for name in COMMANDS if name in self.commands)
        out: dict[str, Any] = {"id": self.id, "command": commands, "rate": self.rate,
                               "hits": self.hits, "seed": self.seed}
        if self.errno is not None:
            out["errno"] = errno_name(self.errno)
        if self.delay:
            out["delay"] = self.delay
        if self.ranged:
            out["start"] = self.start
            if self.end is not None:
                out["end"] = self.end
        if self.count is not None:
            out["count"] = self.count
        return out


def parse_fault_spec(text: str) -> FaultRule:
    """A rule from the command line's ``key=value,...`` form.

    Keys: ``cmd`` (a command, ``all``, or several joined by ``+``; default
    all), ``errno`` (a name; default EIO unless ``delay`` is given), ``rate``,
    ``range=START-END`` (sizes such as ``1M``; END exclusive, may be left out
    for "to the end"), ``count``, ``delay`` (seconds), ``seed``.

    Raises:
        ValueError: a malformed spec, with a message naming the problem.
    """
    fields: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"expected key=value, got {item!r}")
        if key not in ("cmd", "errno", "rate", "range", "count", "delay", "seed"):
            raise ValueError(f"unknown key {key!r} (expected cmd, errno, rate, range, "
                             "count, delay or seed)")
        if key in fields:
            raise ValueError(f"{key} given twice")
        fields[key] = value.strip()
    if not fields:
        raise ValueError("empty fault spec")
    commands = parse_commands(fields.get("cmd", "all"))
    delay = _number(fields, "delay", 0.0)
    errno = parse_errno(fields["errno"]) if "errno" in fields else (
        None if delay else _errno.EIO)
    start, end = 0, None
    if "range" in fields:
        first, dash, last = fields["range"].partition("-")
        if not dash:
            raise ValueError(f"range must be START-END, got {fields['range']!r}")
        start = parse_size(first)
        end = parse_size(last) if last.strip() else None
    count = None
    if "count" in fields:
        try:
            count = int(fields["count"], 10)
        except ValueError:
            raise ValueError(f"count must be an integer, got {fields['count']!r}") from None
    seed = None
    if "seed" in fields:
        try:
            seed = int(fields["seed"], 0)
        except ValueError:
            raise ValueError(f"seed must be an integer, got {fields['seed']!r}") from None
    return FaultRule(commands, errno=errno, rate=_number(fields, "rate", 1.0), start=start,
                     end=end, count=count, delay=delay, seed=seed)


def _number(fields: dict[str, str], key: str, default: float) -> float:
    if key not in fields:
        return default
    try:
        return float(fields[key])
    except ValueError:
        raise ValueError(f"{key} must be a number, got {fields[key]!r}") from None


class FaultFilter(FilterNode):
    """``child`` with faults injected by rules that may change at any time.

    Args:
        child: the node to wrap.
        rules: rules to start with (ids 1, 2, ... in order).
        seed: the seed rules without their own derive theirs from; None
            picks one at random (shown by ``describe`` so a run can be
            repeated).
    """

    driver = "x-faults"

    def __init__(self, child: Node, rules: Iterable[FaultRule] = (), *,
                 seed: int | None = None) -> None:
        super().__init__(child)
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
        self._rules: tuple[FaultRule, ...] = ()
        #: commands some rule may still pick
        self._live: frozenset[str] = frozenset()
        self._next_id = 1
        for rule in rules:
            self.add_rule(rule)

    def __repr__(self) -> str:
        return f"FaultFilter({self.child!r}, rules={len(self._rules)})"

    # -- rules ------------------------------------------------------------------

    @property
    def rules(self) -> tuple[FaultRule, ...]:
        return self._rules

    def add_rule(self, rule: FaultRule) -> int:
        """Start applying ``rule``; returns its id."""
        rule.id = self._next_id
        self._next_id += 1
        if rule.seed is None:
            rule.seed = (self.seed * 1_000_003 + rule.id) % (1 << 63)
            rule._rng.seed(rule.seed)
        self._rules = (*self._rules, rule)
        self._refresh()
        return rule.id

    def clear(self, rule_id: int | None = None) -> None:
        """Remove one rule (by id) or all of them.

        Raises:
            KeyError: no rule has that id.
        """
        if rule_id is None:
            self._rules = ()
        else:
            if not any(rule.id == rule_id for rule in self._rules):
                raise KeyError(rule_id)
            self._rules = tuple(rule for rule in self._rules if rule.id != rule_id)
        self._refresh()

    def describe(self) -> list[dict[str, Any]]:
        return [rule.describe() for rule in self._rules]

    def _refresh(self) -> None:
        self._live = frozenset(command for command in COMMANDS
                               if any(rule.live_for(command) for rule in self._rules))

    def _may_pick(self, command: str, offset: int, length: int) -> bool:
        return command in self._live and any(
            rule.could_pick(command, offset, length) for rule in self._rules)

    async def _inject(self, command: str, offset: int = 0, length: int = 0) -> None:
        """Apply the rules to one request: wait and/or raise."""
        if command not in self._live:
            return
        delay = 0.0
        failure: FaultRule | None = None
        exhausted = False
        for rule in self._rules:
            if rule.pick(command, offset, length):
                exhausted = exhausted or rule.exhausted
                delay += rule.delay
                if rule.errno is not None:
                    failure = rule
                    break
        if exhausted:
            self._refresh()
        if delay:
            await asyncio.sleep(delay)
        if failure is not None:
            assert failure.errno is not None
            raise OSError(failure.errno,
                          f"{os.strerror(failure.errno)} (injected by fault rule {failure.id})")

    # -- fast paths: the child's, while no rule may pick the request ------------------

    def fast_paths(self) -> FastPaths:
        inner = self.child.resolve().fast_paths()
        may_pick = self._may_pick
        pread_nowait, pwrite_nowait = inner.pread_nowait, inner.pwrite_nowait
        start_read, start_write = inner.start_read, inner.start_write
        sendfile_source, own_read = inner.sendfile_source, inner.read

        def checked_pread_nowait(buf: memoryview, offset: int) -> bool:
            assert pread_nowait is not None
            return not may_pick("read", offset, len(buf)) and pread_nowait(buf, offset)

        def checked_pwrite_nowait(data: Data, offset: int) -> bool:
            assert pwrite_nowait is not None
            return not may_pick("write", offset, len(data)) and pwrite_nowait(data, offset)

        # a request a rule may pick takes the task path, where ``_inject`` applies
        def checked_start_read(offset: int, length: int, done: ReadDone) -> bool:
            assert start_read is not None
            return not may_pick("read", offset, length) and start_read(offset, length, done)

        def checked_start_write(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
            assert start_write is not None
            return (not may_pick("write", offset, len(data))
                    and start_write(data, offset, fua, done))

        def checked_sendfile_source(offset: int, length: int,
                                    data_only: bool) -> tuple[int, int] | None:
            assert sendfile_source is not None
            if may_pick("read", offset, length):
                return None
            return sendfile_source(offset, length, data_only)

        async def checked_read(offset: int, length: int) -> bytes | bytearray:
            assert own_read is not None
            await self._inject("read", offset, length)
            return await own_read(offset, length)

        return FastPaths(
            pread_nowait=checked_pread_nowait if pread_nowait is not None else None,
            pwrite_nowait=checked_pwrite_nowait if pwrite_nowait is not None else None,
            start_read=checked_start_read if start_read is not None else None,
            start_write=checked_start_write if start_write is not None else None,
            sendfile_source=checked_sendfile_source if sendfile_source is not None else None,
            read=checked_read if own_read is not None else None,
        )

    # -- the node's requests, with the rules applied --------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._inject("read", offset, len(buf))
        await self.child.pread(buf, offset)

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        await self._inject("write", offset, len(data))
        await self.child.pwrite(data, offset, fua=fua)

    async def flush(self) -> None:
        await self._inject("flush")
        await self.child.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._inject("trim", offset, length)
        await self.child.trim(offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        await self._inject("zero", offset, length)
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._inject("block-status", offset, length)
        extents = await self.child.block_status(offset, length)
        if not self._may_pick("read", offset, length):
            return extents
        # a read rule may pick these bytes: do not let a sparse read skip reading them
        return [Extent(e.length, e.flags & ~ExtentFlags.ZERO) if e.flags & ExtentFlags.ZERO
                else e for e in extents]

    async def cache(self, offset: int, length: int) -> None:
        await self._inject("cache", offset, length)
        await self.child.cache(offset, length)
