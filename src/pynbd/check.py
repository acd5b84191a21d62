"""``pynbd check``: a multi-connection consistency checker for any NBD server.

It opens several connections to one export (spread round-robin over the
URIs given), zeroes a region, then runs a seeded random mix of reads,
writes (some FUA), trims, write-zeroes and flushes over whole blocks of that
region, several requests in flight per connection, and checks every block
every read returns.

The model (what a server advertising NBD_FLAG_CAN_MULTI_CONN promises:
connections share one view of the data, so a completed write is visible to
later reads on every connection):

- A logical clock ticks at each request sent and each reply received; every
  write-type operation on a block is kept with its send and completion times.
- Every written block is tagged: its first 16 bytes are the 64-bit write id and
  the block number, the rest is derived from the id (and the seed), so every
  block read is traced to the write that produced it, to zeroes, or to neither.
- The region is zeroed (and flushed) on one connection first: zeroes are the
  block's "version 0", before the clock starts.
- A read R of a block may return the content left by any operation that is not
  superseded when R is sent (it completed before R was sent and no other write
  or zero to the block was sent after it completed and completed before R was
  sent), or by any operation concurrent with R (sent before R completed, not
  completed before R was sent).  A trim never supersedes anything and may
  leave zeroes.  When several contents are possible, a mix of them byte by
  byte (a torn read) is accepted too: NBD promises no atomicity.
- Anything else is a violation: the block's history is printed, exit 1.

FLUSH and FUA durability cannot be observed by reads: only visibility is
checked.  Exit status: 0 pass, 1 violation or the server failed during the run
(error reply, lost connection), 2 usage error, connection failure, or an export
that does not qualify (read-only, no multi-conn without ``--force``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import struct
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

from .backends import parse_size
from .client import (
    ClientError,
    ConnectError,
    ConnectionLost,
    NBDClient,
    RequestError,
    parse_uri,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DEFAULT_REGION = 64 << 20
#: at most this many blocks per request
MAX_BLOCKS_PER_OP = 8
#: how long requests may take to finish once the run is over
GRACE = 30.0
#: operation mix (weights), for the operations the export supports
MIX = {"read": 45, "write": 30, "zero": 9, "trim": 9, "flush": 7}
#: history lines printed per violation
HISTORY_LINES = 40
#: violations printed in full
MAX_VIOLATIONS = 3

_TAG = struct.Struct(">QQ")
_WORD = struct.Struct(">Q")
_GARBAGE = -1


class UsageError(Exception):
    """A bad command line or an unusable export: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    return parse


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pynbd check", description="Check that an NBD export shared by several "
                "connections behaves as one consistent disk (the multi-conn promise). "
                "It OVERWRITES the region it checks.")
    p.add_argument("uris", nargs="+", metavar="URI", help="NBD URI(s) of the same export")
    p.add_argument("--write", action="store_true",
                   help="required: allow the check to overwrite the region")
    p.add_argument("--connections", type=_positive(int), default=4, metavar="N",
                   help="connections to open, round-robin over the URIs (default 4)")
    p.add_argument("--seconds", type=_positive(float), default=10.0, metavar="S",
                   help="how long to run (default 10)")
    p.add_argument("--seed", type=int, default=None, metavar="K",
                   help="random seed (default: random, printed)")
    p.add_argument("--region", type=_size, default=None, metavar="BYTES",
                   help="bytes from offset 0 to check (default 64M or the export size)")
    p.add_argument("--block", type=_size, default=4096, metavar="BYTES",
                   help="block size, a multiple of 512 (default 4096)")
    p.add_argument("--inflight", type=_positive(int), default=8, metavar="N",
                   help="requests in flight per connection (default 8)")
    p.add_argument("--force", action="store_true",
                   help="check an export that does not advertise multi-conn anyway")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="TLS certificates for nbds URIs without tls-certificates=")
    return p


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
    seen: list[int] = dataclasses.field(default_factory=list)

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
    if value == 0:
        return "zeroes"
    if value == _GARBAGE:
        return "unknown data"
    return f"write #{value}"


@dataclasses.dataclass(slots=True)
class Violation:
    block: int
    offset: int
    read: Op
    seen: int
    expected: list[int]
    head: bytes
    history: list[Op]
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"block": self.block, "offset": self.offset, "read": self.read.as_dict(),
                "seen": describe(self.seen), "first_bytes": self.head.hex(),
                "reason": self.reason,
                "expected": [describe(v) for v in self.expected],
                "history": [{**op.as_dict(), "label": op.label(), "saw": _saw(op, self.block)}
                            for op in self.history]}


def _saw(op: Op, block: int) -> str | None:
    index = block - op.first
    if op.kind != "read" or index >= len(op.seen):
        return None
    return describe(op.seen[index])


class Model:
    """Every block's history and the acceptance rule for reads."""

    def __init__(self, blocks: int, block_size: int, seed: int) -> None:
        self.block_size = block_size
        self.clock = 0
        self.zero = bytes(block_size)
        self._salt = seed & 0xFFFF_FFFF_FFFF_FFFF
        #: every operation touching each block (reads included), for reports
        self.history: list[list[Op]] = [[] for _ in range(blocks)]
        #: write-type operations that may still matter for a read (pruned)
        self.live: list[list[Op]] = [[] for _ in range(blocks)]
        self.reads_in_flight: dict[int, int] = {}
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
        if data == self.zero:
            return 0
        write_id, number = _TAG.unpack_from(data)
        if number != block or not 0 < write_id < self.next_write:
            return _GARBAGE
        return write_id if data == self.content(write_id, block) else _GARBAGE

    # -- recording ----------------------------------------------------------------------

    def add_write_type(self, op: Op) -> None:
        for block in range(op.first, op.first + op.count):
            self.history[block].append(op)
            live = self.live[block]
            live.append(op)
            if len(live) > 24:
                self._prune(block)

    def _prune(self, block: int) -> None:
        horizon = min(self.reads_in_flight.values(), default=self.clock)
        latest = 0
        for op in self.live[block]:
            if op.kind != "trim" and op.done is not None and op.done < horizon:
                latest = max(latest, op.send)
        self.live[block] = [op for op in self.live[block]
                            if op.done is None or op.done >= latest]

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
        violations = []
        size = self.block_size
        for i in range(read.count):
            block = read.first + i
            chunk = data[i * size:(i + 1) * size]
            seen = self.decode(block, chunk)
            read.seen.append(seen)
            self.history[block].append(read)
            self.verified += 1
            writes, zeroes = self.candidates(block, read)
            if (seen == 0 and zeroes) or seen in writes:
                continue
            if seen == _GARBAGE and self._torn(block, chunk, writes, zeroes):
                self.torn += 1
                continue
            expected = sorted(writes) + ([0] if zeroes else [])
            history = sorted(self.history[block], key=lambda op: op.send)
            violations.append(Violation(block, block * size, read, seen, expected,
                                        chunk[:16], history,
                                        self._explain(history, read, seen)))
        return violations

    @staticmethod
    def _explain(history: list[Op], read: Op, seen: int) -> str:
        """Why ``seen`` is not allowed, in one sentence."""
        if seen == _GARBAGE:
            return ("the block holds neither zeroes nor a block the checker wrote (nor a mix "
                    "of the contents allowed)")
        makers = [op for op in history if op.kind != "read" and op.done is not None
                  and (op.tag == seen if seen else op.kind in ("zero", "trim"))]
        maker = max(makers, key=lambda op: op.done or 0, default=None)
        if maker is not None and maker.send > (read.done or 0):
            return f"{describe(seen)} was sent only after this read completed"
        since = maker.done if maker is not None and maker.done is not None else 0
        for op in history:
            if (op.kind in ("write", "zero") and op.send > since and op.done is not None
                    and op.done < read.send):
                return (f"{describe(seen)} had been replaced by {op.label()} on connection "
                        f"{op.conn} (sent t={op.send}, done t={op.done}), which completed "
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


@dataclasses.dataclass
class Settings:
    uris: list[str]
    connections: int
    seconds: float
    seed: int
    region: int | None
    block: int
    inflight: int
    force: bool
    json: bool
    tls_certificates: str | None


@dataclasses.dataclass
class Outcome:
    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("read", "write", "write_fua", "zero", "trim",
                                               "flush"), 0))
    violations: list[Violation] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0


class Checker:
    """Runs the workload over open connections and feeds the model."""

    def __init__(self, settings: Settings, clients: list[NBDClient], region: int) -> None:
        self.settings = settings
        self.clients = clients
        self.blocks = region // settings.block
        self.model = Model(self.blocks, settings.block, settings.seed)
        self.outcome = Outcome()
        self._next_op = 0
        self._stop = False
        self.kinds = ["read", "write"]
        if all(c.can_zero for c in clients):
            self.kinds.append("zero")
        if all(c.can_trim for c in clients):
            self.kinds.append("trim")
        if all(c.can_flush for c in clients):
            self.kinds.append("flush")
        self.weights = [MIX[k] for k in self.kinds]
        self.fua = all(c.can_fua for c in clients)
        payload = min(c.max_payload for c in clients)
        self.max_blocks = max(1, min(MAX_BLOCKS_PER_OP, self.blocks, payload // settings.block))

    async def prepare(self) -> None:
        """Zero the region on the first connection (and flush), before the clock starts."""
        client = self.clients[0]
        region = self.blocks * self.settings.block
        step = min(client.max_payload, 4 << 20) // self.settings.block * self.settings.block
        jobs = []
        for offset in range(0, region, step):
            length = min(step, region - offset)
            if client.can_zero:
                jobs.append(client.zero(offset, length))
            else:
                jobs.append(client.pwrite(bytes(length), offset))
            if len(jobs) >= 16:
                await asyncio.gather(*jobs)
                jobs = []
        await asyncio.gather(*jobs)
        if client.can_flush:
            await client.flush()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.settings.seconds
        workers = [self._worker(index, slot, deadline)
                   for slot in range(self.settings.inflight)
                   for index in range(len(self.clients))]
        try:
            await asyncio.wait_for(asyncio.gather(*workers), self.settings.seconds + GRACE)
        except TimeoutError:
            self.outcome.errors.append(f"requests did not complete within {GRACE:.0f} s "
                                       "after the end of the run")
        self.outcome.elapsed = loop.time() - start

    def _new_op(self, kind: str, conn: int, first: int = 0, count: int = 0) -> Op:
        self._next_op += 1
        return Op(self._next_op, kind, conn, first, count, send=0)

    async def _worker(self, index: int, slot: int, deadline: float) -> None:
        rng = random.Random(f"{self.settings.seed}/{index}/{slot}")
        client = self.clients[index]
        loop = asyncio.get_running_loop()
        while not self._stop and loop.time() < deadline:
            kind = rng.choices(self.kinds, self.weights)[0]
            count = rng.randint(1, self.max_blocks)
            first = rng.randrange(self.blocks - count + 1)
            op = self._new_op(kind, index, first, count)
            try:
                await self._perform(client, op, rng)
            except RequestError as err:
                self._fail(f"{op.label()} of blocks {first}-{first + count - 1} on "
                           f"connection {index} failed: {err}")
            except (ConnectionLost, ClientError) as err:
                self._fail(f"connection {index}: {err}")

    async def _perform(self, client: NBDClient, op: Op, rng: random.Random) -> None:
        model, size = self.model, self.settings.block
        offset, length = op.first * size, op.count * size
        counts = self.outcome.counts
        if op.kind == "read":
            op.send = model.tick()
            model.reads_in_flight[op.id] = op.send
            try:
                data = await client.pread(offset, length)
            finally:
                op.done = model.tick()
                del model.reads_in_flight[op.id]
            counts["read"] += 1
            found = model.check_read(op, data)
            if found:
                self.outcome.violations += found
                self._stop = True
            return
        if op.kind == "flush":
            op.send = model.tick()
            await client.flush()
            op.done = model.tick()
            counts["flush"] += 1
            return
        op.fua = self.fua and rng.random() < 0.25
        if op.kind == "write":
            op.tag = model.next_write
            model.next_write += 1
            data = b"".join(model.content(op.tag, b) for b in range(op.first, op.first + op.count))
            op.send = model.tick()
            model.add_write_type(op)
            await client.pwrite(data, offset, fua=op.fua)
            counts["write_fua" if op.fua else "write"] += 1
        elif op.kind == "zero":
            op.no_hole = rng.random() < 0.5
            op.send = model.tick()
            model.add_write_type(op)
            await client.zero(offset, length, no_hole=op.no_hole, fua=op.fua)
            counts["zero"] += 1
        else:
            op.send = model.tick()
            model.add_write_type(op)
            await client.trim(offset, length, fua=op.fua)
            counts["trim"] += 1
        op.done = model.tick()

    def _fail(self, message: str) -> None:
        self._stop = True
        if len(self.outcome.errors) < 10:
            self.outcome.errors.append(message)


# -- the command ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Settings:
    ns = build_parser().parse_args(argv)
    if not ns.write:
        raise UsageError("refusing to run without --write: the check overwrites the region "
                         "it checks (64M or the whole export by default)")
    if ns.block % 512:
        raise UsageError(f"--block {ns.block}: must be a multiple of 512")
    for uri in ns.uris:
        try:
            parse_uri(uri, tls_certificates=ns.tls_certificates)
        except ValueError as err:
            raise UsageError(str(err)) from None
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(1 << 32)
    return Settings(uris=list(ns.uris), connections=ns.connections, seconds=ns.seconds,
                    seed=seed, region=ns.region, block=ns.block, inflight=ns.inflight,
                    force=ns.force, json=ns.json, tls_certificates=ns.tls_certificates)


async def _connect(settings: Settings, uri: str) -> NBDClient:
    try:
        return await NBDClient.connect(uri, tls_certificates=settings.tls_certificates)
    except ValueError as err:
        raise UsageError(str(err)) from None
    except ConnectError as err:
        raise UsageError(str(err)) from None


def _qualify(settings: Settings, clients: list[NBDClient]) -> int:
    """Check the export can be checked; return the region size."""
    size = clients[0].size
    for client in clients:
        uri = client.target.uri
        if client.size != size:
            raise UsageError(f"{uri} has {client.size} bytes, {clients[0].target.uri} has "
                             f"{size}: the URIs must name the same export")
        if client.read_only:
            raise UsageError(f"{uri}: the export is read-only")
        if not client.can_multi_conn and not settings.force:
            raise UsageError(f"{uri} does not advertise multi-conn (NBD_FLAG_CAN_MULTI_CONN), "
                             "so its connections need not agree; use --force to check "
                             "it anyway")
        sizes = client.block_sizes
        if sizes is not None and settings.block % sizes.minimum:
            raise UsageError(f"{uri}: --block {settings.block} is not a multiple of the "
                             f"server's minimum block size {sizes.minimum}")
        if settings.block > client.max_payload:
            raise UsageError(f"{uri}: --block {settings.block} is larger than the server's "
                             f"maximum request {client.max_payload}")
    region = settings.region
    if region is None:
        region = min(DEFAULT_REGION, size)
    elif region > size:
        raise UsageError(f"--region {region} is larger than the {size}-byte export")
    region -= region % settings.block
    if region < settings.block:
        raise UsageError(f"the region holds no whole {settings.block}-byte block")
    return region


async def run_check(settings: Settings) -> tuple[Checker, dict[str, Any]]:
    """Connect, qualify, zero, run; raises ``UsageError`` for exit status 2."""
    clients: list[NBDClient] = []
    try:
        # one connection per URI first: a refusal (no multi-conn) comes before the others
        count = min(settings.connections, len(settings.uris))
        clients += await asyncio.gather(*(_connect(settings, settings.uris[i])
                                          for i in range(count)))
        _qualify(settings, clients)
        rest = [settings.uris[i % len(settings.uris)]
                for i in range(count, settings.connections)]
        results = await asyncio.gather(*(_connect(settings, uri) for uri in rest),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, NBDClient):
                clients.append(result)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        region = _qualify(settings, clients)
        checker = Checker(settings, clients, region)
        try:
            await checker.prepare()
        except ClientError as err:  # the server failed before the clock started
            checker.outcome.errors.append(f"zeroing the region failed: {err}")
        else:
            await checker.run()
        return checker, summary(settings, checker, region, checker.outcome)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def summary(settings: Settings, checker: Checker, region: int,
            outcome: Outcome) -> dict[str, Any]:
    ops = sum(outcome.counts.values())
    passed = not outcome.violations and not outcome.errors
    return {
        "result": "pass" if passed else "fail",
        "uris": settings.uris, "connections": settings.connections,
        "inflight": settings.inflight, "seed": settings.seed, "region": region,
        "block": settings.block, "seconds": round(outcome.elapsed, 3), "ops": ops,
        "ops_per_second": round(ops / outcome.elapsed, 1) if outcome.elapsed else 0.0,
        "counts": dict(outcome.counts), "blocks_verified": checker.model.verified,
        "torn_reads": checker.model.torn,
        "violations": [v.as_dict() for v in outcome.violations[:MAX_VIOLATIONS]],
        "violation_count": len(outcome.violations), "errors": outcome.errors,
    }


def _history_lines(violation: Violation) -> list[str]:
    history = violation.history
    lines = [f"  history of block {violation.block} (logical clock; done '-' = no reply):",
             f"  {'op':>8} {'conn':>4} {'sent':>7} {'done':>7}  {'operation':<24} read"]
    if len(history) > HISTORY_LINES:
        lines.append(f"  ... {len(history) - HISTORY_LINES} earlier operations not shown")
        history = history[-HISTORY_LINES:]
    for op in history:
        done = "-" if op.done is None else str(op.done)
        saw = _saw(op, violation.block) or ""
        mark = "   <== violation" if op is violation.read else ""
        lines.append(f"  {'#' + str(op.id):>8} {op.conn:>4} {op.send:>7} {done:>7}  "
                     f"{op.label():<24} {saw}{mark}".rstrip())
    return lines


def report(result: dict[str, Any], checker: Checker) -> str:
    lines = []
    for violation in checker.outcome.violations[:MAX_VIOLATIONS]:
        read = violation.read
        allowed = ", ".join(describe(v) for v in violation.expected) or "nothing"
        lines.append(f"VIOLATION at block {violation.block} (offset {violation.offset}): "
                     f"READ #{read.id} on connection {read.conn} (sent t={read.send}, "
                     f"done t={read.done}) saw {describe(violation.seen)} "
                     f"(first bytes {violation.head.hex()})")
        lines.append(f"  {violation.reason}")
        lines.append(f"  allowed: {allowed}")
        lines += _history_lines(violation)
    lines += [f"ERROR: {error}" for error in result["errors"]]
    counts = result["counts"]
    verdict = "PASS" if result["result"] == "pass" else (
        f"FAIL: {result['violation_count']} violation(s), {len(result['errors'])} error(s)")
    lines += [
        f"pynbd check: {verdict}",
        f"  {result['connections']} connections over {len(result['uris'])} URI(s), "
        f"{result['inflight']} requests in flight each, seed {result['seed']}",
        f"  region {result['region']} bytes in {result['region'] // result['block']} "
        f"blocks of {result['block']}",
        f"  {result['ops']} operations in {result['seconds']:.2f} s: "
        f"{result['ops_per_second']:.0f} ops/s",
        f"  read {counts['read']}, write {counts['write']}, write FUA {counts['write_fua']}, "
        f"write-zeroes {counts['zero']}, trim {counts['trim']}, flush {counts['flush']}",
        f"  blocks verified {result['blocks_verified']} (torn reads accepted "
        f"{result['torn_reads']})",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pynbd check``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_args(args)
        started = time.monotonic()
        checker, result = asyncio.run(run_check(settings))
    except UsageError as err:
        print(f"pynbd check: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    result["wall_seconds"] = round(time.monotonic() - started, 3)
    if settings.json:
        print(json.dumps(result))
    else:
        print(report(result, checker))
    return EXIT_PASS if result["result"] == "pass" else EXIT_FAIL
