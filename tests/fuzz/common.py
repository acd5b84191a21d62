"""What every fuzz target shares: the input cursor, the hang bound, the exports,
and real handshakes run in memory to give the transmission targets a valid start.

Plain Python (no atheris): a crashing input can be replayed with
``python -m tests.fuzz.run --target T --replay FILE`` on any machine.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Protocol, TypeVar

from tests.support.fakes import FakeCatalog, FakeExport

from pynbd.proto.client import ClientHandshake, HandshakeComplete, HandshakeFailed
from pynbd.proto.constants import BASE_ALLOCATION, TransmissionFlag
from pynbd.proto.events import NEED_DATA, HandshakeDone, StartTLS
from pynbd.proto.handshake import ServerHandshake, TlsMode

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from pynbd.proto.negotiated import Negotiated

#: the most events one ``next_event`` loop may yield before it must say NEED_DATA;
#: no input of at most 64 KiB can hold this many messages (each is >= 16 bytes)
MAX_EVENTS = 10_000

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Hang(Exception):
    """A core kept producing events without consuming input: an endless loop."""


class Input:
    """A cursor over the fuzzer's bytes; reading past the end gives zeroes, never raises."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(self.remaining)

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "big")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.u8() % len(options)]


class EventSource(Protocol[T_co]):
    def next_event(self) -> T_co: ...


def drain(core: EventSource[T]) -> Iterator[T]:
    """Every event up to NEED_DATA; raises ``Hang`` past ``MAX_EVENTS``.

    ``ProtocolError`` passes through to the caller: it ends the connection.
    """
    for _ in range(MAX_EVENTS):
        event = core.next_event()
        if event is NEED_DATA:
            return
        yield event
    raise Hang(f"{type(core).__name__}.next_event gave {MAX_EVENTS} events without NEED_DATA")


def pieces(stream: bytes, size: int) -> Iterator[bytes]:
    """``stream`` cut into pieces of ``size`` bytes (the last may be shorter)."""
    for pos in range(0, len(stream), size):
        yield stream[pos:pos + size]


# -- exports --------------------------------------------------------------------------------

EXPORTS = (
    FakeExport(""),
    FakeExport("disk", 1 << 30, "a disk"),
    FakeExport("ro", 4096, read_only=True),
    FakeExport("\u20ac" * 1365, 512, "\u00e9" * 2000),
    # a server that advertises nothing but HAS_FLAGS, one without FUA and FAST_ZERO,
    # and one that sends no flags at all
    FakeExport("bare", 1 << 20, fixed=TransmissionFlag.HAS_FLAGS),
    FakeExport("nofast", 1 << 20, fixed=TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
               | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES),
    FakeExport("noflags", 1 << 40, fixed=TransmissionFlag(0)),
    FakeExport("empty", 0),
)
#: what the extended-header targets choose from: the same, and an export over 4 GiB
#: (its own tuple, so the other targets' inputs keep naming the same exports)
EXTENDED_EXPORTS = (*EXPORTS, FakeExport("big", 3 << 32, "over 4 GiB"))
CATALOG = FakeCatalog(*EXTENDED_EXPORTS)


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A whole handshake between the two real cores, and what each side ended with."""

    client_bytes: bytes
    server_bytes: bytes
    server_done: HandshakeDone
    client_done: HandshakeComplete

    @property
    def negotiated(self) -> Negotiated:
        return self.server_done.negotiated


@functools.cache
def converse(export: int, *, structured: bool, meta: bool, tls: bool = False,
             extended: bool = False) -> Conversation:
    """Run ClientHandshake against ServerHandshake in memory (cached: it is deterministic).

    With ``tls`` the client starts with STARTTLS and both sides carry on as if
    the TLS handshake had succeeded (the bytes stay plain).  With ``extended``
    the client asks for extended headers (which imply structured replies), and
    ``export`` indexes ``EXTENDED_EXPORTS``.
    """
    exports = EXTENDED_EXPORTS if extended else EXPORTS
    name = exports[export % len(exports)].name
    server = ServerHandshake(CATALOG, tls=TlsMode.ON if tls else TlsMode.OFF)
    client = ClientHandshake(name, structured=structured or extended, extended=extended,
                             meta_contexts=[BASE_ALLOCATION] if meta else [], tls=tls)
    c2s, s2c = bytearray(), bytearray()
    client_done: HandshakeComplete | None = None
    server_done: HandshakeDone | None = None
    for _ in range(16):
        out = server.data_to_send()
        s2c += out
        client.receive_data(out)
        for cev in drain(client):
            assert not isinstance(cev, HandshakeFailed), cev
            if isinstance(cev, StartTLS):
                client.tls_started()
            elif isinstance(cev, HandshakeComplete):
                client_done = cev
                break
        if client_done is not None and server_done is not None:
            return Conversation(bytes(c2s), bytes(s2c), server_done, client_done)
        out = client.data_to_send()
        c2s += out
        server.receive_data(out)
        if server_done is None:
            for sev in drain(server):
                if isinstance(sev, StartTLS):
                    server.tls_started()
                    continue
                assert isinstance(sev, HandshakeDone), sev
                server_done = sev
                break
    raise AssertionError(f"the in-memory handshake for export {name!r} did not finish")
