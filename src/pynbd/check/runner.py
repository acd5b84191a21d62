"""The checker's runner: connections, workers and the operations they perform.

This module owns everything of ``pynbd check`` that talks to servers: opening
the connections and deciding whether the export qualifies (``run_check``), and
``Checker``, which zeroes the region and then runs the seeded random workload
on every connection, several requests in flight each, feeding every request
and reply to the model (``pynbd.check.model``) and collecting the ``Outcome``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

from ..client import ClientError, ConnectError, ConnectionLost, NBDClient, RequestError
from ..cmdline import UsageError
from .model import Model, Op, Violation

DEFAULT_REGION = 64 << 20
#: at most this many blocks per request
MAX_BLOCKS_PER_OP = 8
#: how long requests may take to finish once the run is over
GRACE = 30.0
#: operation mix (weights), for the operations the export supports
MIX = {"read": 45, "write": 30, "zero": 9, "trim": 9, "flush": 7}


@dataclasses.dataclass
class Settings:
    """What the command line asked for."""

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
    """What a run did and found."""

    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("read", "write", "write_fua", "zero", "trim",
                                               "flush"), 0))
    violations: list[Violation] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    #: CPU time the checker's process used during the run
    cpu: float = 0.0


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
        start, cpu = loop.time(), time.process_time()
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
        self.outcome.cpu = time.process_time() - cpu

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
            model.start_read(op)
            try:
                data = await client.pread(offset, length)
            finally:
                model.end_read(op)
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


# -- connecting ------------------------------------------------------------------------------


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


async def run_check(settings: Settings) -> tuple[Checker, int]:
    """Connect, qualify, zero, run; return the checker and the region's size.

    Raises ``UsageError`` (exit status 2) before the run starts.
    """
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
        return checker, region
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
