"""Malformed and hostile input over a real socket.

A raw-socket client breaks the protocol in one way per test; the test checks
the server's exact answer (error reply or disconnect, as the protocol's
decision table says) and then that a well-behaved libnbd client, connected
before the bad one, still reads and writes correctly and the server lives on.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nbd
import pytest

from pynbd.proto import wire
from pynbd.proto.constants import (
    IHAVEOPT,
    MAX_PAYLOAD,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.interop

#: every socket operation of the raw client gives up after this long
TIMEOUT = 5.0
KiB = 1024
MiB = 1024 * KiB
EXPORT_SIZE = 16 * MiB
GOOD_FLAGS = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES
COOKIE = 0xDEADBEEF_0BADF00D
#: no test writes here: reads as zeroes
UNTOUCHED = 12 * MiB


class Closed(Exception):
    """The server closed the connection while the raw client expected more."""


# -- the raw client ----------------------------------------------------------------------

class RawClient:
    """A hand-driven NBD client on a plain blocking socket with timeouts."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()

    # -- bytes --

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def read_until_eof(self, limit: int = 1 * MiB) -> bytes:
        """Everything the server sends until it closes; fails if it does not close in time."""
        data = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while len(data) <= limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(64 * KiB)
            except ConnectionResetError:
                return bytes(data)
            except TimeoutError:
                break
            if not chunk:
                return bytes(data)
            data += chunk
        pytest.fail(f"server did not close the connection within {TIMEOUT} s "
                    f"(got {len(data)} bytes)")

    # -- handshake --

    def greeting(self) -> None:
        magic, opt_magic, flags = wire.GREETING.unpack(self.recv_exact(wire.GREETING.size))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        assert flags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES

    def client_flags(self, flags: int = GOOD_FLAGS) -> None:
        self.send(wire.CLIENT_FLAGS.pack(flags))

    def send_option(self, option: int, data: bytes = b"", *, length: int | None = None,
                    magic: int = IHAVEOPT) -> None:
        size = len(data) if length is None else length
        self.send(wire.OPTION_HEADER.pack(magic, option, size) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        """One option reply: (option, reply type, payload)."""
        magic, option, rep, length = wire.OPTION_REPLY_HEADER.unpack(
            self.recv_exact(wire.OPTION_REPLY_HEADER.size))
        assert magic == REPLY_MAGIC
        assert length <= 64 * KiB
        return option, rep, self.recv_exact(length)

    def structured_reply(self) -> None:
        self.send_option(Opt.STRUCTURED_REPLY)
        assert self.option_reply() == (Opt.STRUCTURED_REPLY, Rep.ACK, b"")

    def go(self, name: str = "") -> tuple[int, int]:
        """NBD_OPT_GO; returns (size, transmission flags) from NBD_INFO_EXPORT."""
        raw = name.encode()
        self.send_option(Opt.GO, wire.U32.pack(len(raw)) + raw + wire.U16.pack(0))
        export: tuple[int, int] | None = None
        for _ in range(16):
            option, rep, payload = self.option_reply()
            assert option == Opt.GO
            if rep == Rep.ACK:
                assert export is not None, "GO acknowledged without NBD_INFO_EXPORT"
                return export
            assert rep == Rep.INFO, f"GO answered with {rep:#x}: {payload!r}"
            if wire.INFO_TYPE.unpack_from(payload)[0] == Info.EXPORT:
                _, size, flags = wire.INFO_EXPORT.unpack(payload)
                export = (size, flags)
        pytest.fail("GO got more than 16 replies")

    # -- transmission --

    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                cookie: int = COOKIE, payload: bytes = b"",
                magic: int = REQUEST_MAGIC) -> None:
        self.send(wire.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload)

    def simple_reply(self) -> tuple[int, int]:
        """(error, cookie) of a simple reply header."""
        magic, error, cookie = wire.SIMPLE_REPLY.unpack(self.recv_exact(wire.SIMPLE_REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC
        return error, cookie

    def chunk(self) -> tuple[int, int, int, bytes]:
        """One structured chunk: (flags, type, cookie, payload)."""
        magic, flags, kind, cookie, length = wire.STRUCTURED_CHUNK.unpack(
            self.recv_exact(wire.STRUCTURED_CHUNK.size))
        assert magic == STRUCTURED_REPLY_MAGIC
        assert length <= 33 * MiB
        return flags, kind, cookie, self.recv_exact(length)

    def simple_read(self, offset: int, length: int, cookie: int = 7) -> bytes:
        """A READ that must succeed (simple replies)."""
        self.request(Cmd.READ, offset, length, cookie=cookie)
        assert self.simple_reply() == (0, cookie)
        return self.recv_exact(length)


def error_chunk(payload: bytes) -> tuple[int, str]:
    """(errno, message) of an NBD_REPLY_TYPE_ERROR payload."""
    errno, msg_len = wire.ERROR_CHUNK.unpack_from(payload)
    assert len(payload) == wire.ERROR_CHUNK.size + msg_len
    return errno, payload[wire.ERROR_CHUNK.size:].decode()


# -- the environment: a server and a well-behaved bystander ---------------------------------

@dataclass
class Env:
    """A pynbd server, a libnbd client connected before any bad client, and checks."""

    srv: Any
    good: Any
    known: dict[int, bytes] = field(default_factory=dict)
    read_only: bool = False
    raw: list[RawClient] = field(default_factory=list)
    checks: int = 0

    def client(self, *, flags: int | None = GOOD_FLAGS) -> RawClient:
        """A raw client past the greeting (and past the client flags unless ``flags`` is None)."""
        raw = RawClient(self.srv.socket)
        self.raw.append(raw)
        raw.greeting()
        if flags is not None:
            raw.client_flags(flags)
        return raw

    def transmission(self, *, structured: bool = False) -> RawClient:
        raw = self.client()
        if structured:
            raw.structured_reply()
        size, flags = raw.go()
        assert size == EXPORT_SIZE
        assert bool(flags & TransmissionFlag.READ_ONLY) == self.read_only
        return raw

    def check(self) -> None:
        """The bystander still works and sees consistent data; the server is alive."""
        assert self.srv.proc.poll() is None, "the server process died"
        for offset, data in self.known.items():
            assert self.good.pread(len(data), offset) == data
        if not self.read_only:
            offset = (self.checks % 64) * 64 * KiB + 512
            data = os.urandom(4 * KiB)
            self.good.pwrite(data, offset)
            assert self.good.pread(len(data), offset) == data
            self.known[offset] = data
        self.checks += 1

    def fresh_client_works(self) -> None:
        """A new raw connection negotiates and reads what the bystander wrote."""
        raw = self.transmission()
        for offset, data in self.known.items():
            assert raw.simple_read(offset, len(data)) == data
        raw.request(Cmd.DISC)
        assert raw.read_until_eof() == b""


@pytest.fixture
def make_env(pynbd_server: Callable[..., Any]) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []

    def make(*args: str, image: str = f"memory:{EXPORT_SIZE}",
             known: dict[int, bytes] | None = None) -> Env:
        srv = pynbd_server("-e", "0", *args, image)
        good = nbd.NBD()
        good.connect_uri(srv.uri)
        env = Env(srv, good, dict(known or {}), read_only="-r" in args)
        envs.append(env)
        env.check()
        return env

    yield make
    for env in envs:
        for raw in env.raw:
            raw.close()
        env.check()
        env.good.shutdown()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


# -- handshake ---------------------------------------------------------------------------

def test_unknown_client_flag_bits_close(env: Env) -> None:
    for bits in (1 << 2, 1 << 31):
        raw = env.client(flags=GOOD_FLAGS | bits)
        assert raw.read_until_eof() == b""
        env.check()
    env.fresh_client_works()


def test_bad_option_magic_closes(env: Env) -> None:
    raw = env.client()
    raw.send_option(Opt.GO, b"\0" * 6, magic=IHAVEOPT ^ 1)
    assert raw.read_until_eof() == b""
    env.check()
    env.fresh_client_works()


def test_unknown_option_is_unsupported_then_go_works(env: Env) -> None:
    raw = env.client()
    for option in (0x1234, 0x7FFFFFFF, Opt.PEEK_EXPORT):
        raw.send_option(option, b"some option data")
        got, rep, message = raw.option_reply()
        assert (got, rep) == (option, Rep.ERR_UNSUP)
        assert message  # a human-readable reason
        env.check()
    size, flags = raw.go()
    assert size == EXPORT_SIZE
    assert flags & TransmissionFlag.HAS_FLAGS
    assert raw.simple_read(UNTOUCHED, 512) == bytes(512)
    env.check()


def test_huge_option_length_is_refused_without_reading_it(env: Env) -> None:
    raw = env.client()
    # header and the first 4 KiB; the server may hang up before it has them all
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        raw.send_option(Opt.GO, b"\0" * (4 * KiB), length=100 * MiB)
    rest = raw.read_until_eof()  # bounded: fails unless the close comes within TIMEOUT
    # at most one ERR_TOO_BIG reply before the close: the 100 MiB are never awaited
    if rest:
        magic, option, rep, length = wire.OPTION_REPLY_HEADER.unpack_from(rest)
        assert (magic, option, rep) == (REPLY_MAGIC, Opt.GO, Rep.ERR_TOO_BIG)
        assert len(rest) == wire.OPTION_REPLY_HEADER.size + length
    env.check()
    env.fresh_client_works()


def test_one_mib_option_is_too_big_and_negotiation_goes_on(env: Env) -> None:
    raw = env.client()
    raw.send_option(Opt.LIST_META_CONTEXT, b"\xa5" * MiB)
    option, rep, message = raw.option_reply()
    assert (option, rep) == (Opt.LIST_META_CONTEXT, Rep.ERR_TOO_BIG)
    assert message
    env.check()
    # the same connection is still in step: a full structured negotiation works
    raw.structured_reply()
    size, _ = raw.go()
    assert size == EXPORT_SIZE
    raw.request(Cmd.READ, UNTOUCHED, 512, cookie=11)
    flags, kind, cookie, payload = raw.chunk()
    assert (flags, kind, cookie) == (ReplyFlag.DONE, ReplyType.OFFSET_DATA, 11)
    assert payload == wire.OFFSET_DATA.pack(UNTOUCHED) + bytes(512)
    env.check()


def test_truncated_option_then_close(env: Env) -> None:
    raw = env.client()
    raw.send_option(Opt.GO, b"\0\0\0\x05ab", length=100)
    raw.close()
    env.check()
    half_header = env.client()
    half_header.send(wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, 6)[:9])
    half_header.close()
    env.check()
    env.fresh_client_works()


def test_info_with_inconsistent_name_length(env: Env) -> None:
    raw = env.client()
    # name length 100, but only 5 name bytes and an empty info-request list follow
    raw.send_option(Opt.INFO, wire.U32.pack(100) + b"hello" + wire.U16.pack(0))
    option, rep, message = raw.option_reply()
    assert (option, rep) == (Opt.INFO, Rep.ERR_INVALID)
    assert message
    env.check()
    # trailing bytes after the info requests are just as invalid
    raw.send_option(Opt.GO, wire.U32.pack(0) + wire.U16.pack(0) + b"junk")
    assert raw.option_reply()[:2] == (Opt.GO, Rep.ERR_INVALID)
    env.check()
    size, _ = raw.go()
    assert size == EXPORT_SIZE
    assert raw.simple_read(UNTOUCHED, 4096) == bytes(4096)
    env.check()


def info_request(name: bytes, *requests: int) -> bytes:
    return wire.U32.pack(len(name)) + name + wire.U16.pack(len(requests)) + b"".join(
        wire.U16.pack(r) for r in requests)


def test_options_with_invalid_data(env: Env) -> None:
    raw = env.client()
    cases = (
        (Opt.STRUCTURED_REPLY, b"x"),
        (Opt.LIST, b"\0\0\0\0"),
        (Opt.STARTTLS, b"tls"),
        (Opt.INFO, info_request(b"nul\0name")),
        (Opt.INFO, info_request(b"\xff\xfe not utf-8")),
        (Opt.GO, info_request(b"n" * 5000)),
        (Opt.GO, wire.U32.pack(0xFFFFFFFF) + wire.U16.pack(0)),
        (Opt.GO, wire.U32.pack(0) + wire.U16.pack(3) + wire.U16.pack(Info.NAME)),
        (Opt.INFO, b"\0\0"),
        # SET_META_CONTEXT needs structured replies first
        (Opt.SET_META_CONTEXT, wire.U32.pack(0) + wire.U32.pack(1) + wire.U32.pack(15)
         + b"base:allocation"),
    )
    for option, data in cases:
        raw.send_option(option, data)
        got, rep, message = raw.option_reply()
        assert (got, rep) == (option, Rep.ERR_INVALID), (option, data[:16], message)
        assert message
    env.check()
    raw.structured_reply()
    # a second STRUCTURED_REPLY is a repeat the server may refuse; it must answer either way
    raw.send_option(Opt.STRUCTURED_REPLY)
    assert raw.option_reply()[:2] in ((Opt.STRUCTURED_REPLY, Rep.ACK),
                                      (Opt.STRUCTURED_REPLY, Rep.ERR_INVALID))
    size, flags = raw.go()
    assert size == EXPORT_SIZE
    assert flags & TransmissionFlag.SEND_DF
    env.check()


def test_abort_with_data_is_acknowledged_then_closed(env: Env) -> None:
    raw = env.client()
    raw.send_option(Opt.ABORT, b"ignored data")
    rest = raw.read_until_eof()
    # the ACK is optional for the server to deliver, but if sent it must be well formed
    if rest:
        assert rest == wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.ABORT, Rep.ACK, 0)
    env.check()


def test_non_fixed_newstyle_client_sending_go_is_dropped(env: Env) -> None:
    raw = env.client(flags=0)
    raw.send_option(Opt.GO, info_request(b""))
    assert raw.read_until_eof() == b""
    env.check()
    env.fresh_client_works()


def test_half_sent_messages_do_not_block_others(env: Env) -> None:
    """Clients stalled mid-option and mid-payload hold no lock the bystander needs."""
    option = env.client()
    option.send_option(Opt.LIST_META_CONTEXT, b"\0" * (512 * KiB), length=MiB)
    payload = env.transmission()
    payload.request(Cmd.WRITE, 8 * MiB, MiB, cookie=5, payload=b"\x77" * (300 * KiB))
    header = env.transmission()
    header.send(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 6, 0, 512)[:13])
    for _ in range(3):
        env.check()
    env.fresh_client_works()
    # the stalled clients can still finish what they started
    option.send(b"\0" * (512 * KiB))
    assert option.option_reply()[:2] == (Opt.LIST_META_CONTEXT, Rep.ERR_TOO_BIG)
    payload.send(b"\x77" * (MiB - 300 * KiB))
    assert payload.simple_reply() == (0, 5)
    header.send(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 6, 8 * MiB, 512)[13:])
    assert header.simple_reply() == (0, 6)
    assert header.recv_exact(512) == b"\x77" * 512
    assert env.good.pread(MiB, 8 * MiB) == b"\x77" * MiB
    env.check()


def test_unknown_info_requests_are_ignored(env: Env) -> None:
    raw = env.client()
    raw.send_option(Opt.GO, info_request(b"", 0x7FFF, Info.NAME, 0xFFFF, Info.BLOCK_SIZE))
    infos: dict[int, bytes] = {}
    for _ in range(16):
        option, rep, payload = raw.option_reply()
        assert option == Opt.GO
        if rep == Rep.ACK:
            break
        assert rep == Rep.INFO
        (kind,) = wire.INFO_TYPE.unpack_from(payload)
        assert kind not in infos
        infos[kind] = payload
    else:
        pytest.fail("GO got more than 16 replies")
    assert set(infos) <= {Info.EXPORT, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE}
    assert wire.INFO_EXPORT.unpack(infos[Info.EXPORT])[1] == EXPORT_SIZE
    assert infos[Info.NAME] == wire.INFO_TYPE.pack(Info.NAME)  # the name is ""
    _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(infos[Info.BLOCK_SIZE])
    assert minimum <= preferred <= maximum
    assert maximum >= MAX_PAYLOAD
    assert raw.simple_read(UNTOUCHED, 512) == bytes(512)
    env.check()


def test_go_unknown_export(env: Env) -> None:
    raw = env.client()
    name = b"no-such-export"
    raw.send_option(Opt.GO, wire.U32.pack(len(name)) + name + wire.U16.pack(0))
    option, rep, message = raw.option_reply()
    assert (option, rep) == (Opt.GO, Rep.ERR_UNKNOWN)
    assert b"no-such-export" in message
    env.check()
    size, _ = raw.go("")
    assert size == EXPORT_SIZE
    env.check()


def test_export_name_unknown_closes(env: Env) -> None:
    raw = env.client()
    raw.send_option(Opt.EXPORT_NAME, b"no-such-export")
    assert raw.read_until_eof() == b""
    env.check()
    # a name too long to buffer cannot be refused with a reply either: close
    raw = env.client()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        raw.send_option(Opt.EXPORT_NAME, b"n" * (128 * KiB))
    assert raw.read_until_eof() == b""
    env.check()
    env.fresh_client_works()


def test_export_name_without_no_zeroes_pads_reply(env: Env) -> None:
    """The well-formed baseline of the case above: oldstyle-compatible padding."""
    raw = env.client(flags=ClientFlag.C_FIXED_NEWSTYLE)
    raw.send_option(Opt.EXPORT_NAME, b"")
    size, flags = wire.EXPORT_NAME_REPLY.unpack(raw.recv_exact(wire.EXPORT_NAME_REPLY.size))
    assert size == EXPORT_SIZE
    assert flags & TransmissionFlag.HAS_FLAGS
    assert raw.recv_exact(124) == bytes(124)
    assert raw.simple_read(UNTOUCHED, 16) == bytes(16)
    env.check()


# -- transmission -------------------------------------------------------------------------

def test_command_specific_invalid_requests(env: Env) -> None:
    raw = env.transmission()
    cases = (
        (Cmd.FLUSH, 1, 0, 0, Errno.EINVAL),  # FLUSH must have zero offset and length
        (Cmd.FLUSH, 0, 512, 0, Errno.EINVAL),
        (Cmd.TRIM, 0, 512, 1 << 2, Errno.EINVAL),  # DF is for READ only
        (Cmd.WRITE_ZEROES, 0, 512, 1 << 3, Errno.EINVAL),  # REQ_ONE is for BLOCK_STATUS
        (Cmd.CACHE, EXPORT_SIZE - 1, 2, 0, Errno.EINVAL),
        (Cmd.TRIM, EXPORT_SIZE, 1, 0, Errno.EINVAL),
        (Cmd.BLOCK_STATUS, 0, 512, 0, Errno.EINVAL),  # no meta context negotiated
    )
    for cookie, (cmd, offset, length, flags, errno) in enumerate(cases, start=300):
        raw.request(cmd, offset, length, flags=flags, cookie=cookie)
        assert raw.simple_reply() == (errno, cookie), cmd
    env.check()
    # the same commands, well formed, succeed on the same connection
    for cookie, (cmd, offset, length) in enumerate(
            ((Cmd.FLUSH, 0, 0), (Cmd.CACHE, 0, 4096), (Cmd.TRIM, UNTOUCHED, 4096),
             (Cmd.WRITE_ZEROES, UNTOUCHED, 4096)), start=400):
        raw.request(cmd, offset, length, cookie=cookie)
        assert raw.simple_reply() == (0, cookie), cmd
    assert raw.simple_read(UNTOUCHED, 4096) == bytes(4096)
    env.check()


def test_pipelined_bad_and_good_requests_then_disc(env: Env) -> None:
    """Errors in a pipeline do not disturb the requests around them; DISC waits for them."""
    raw = env.transmission()
    offset, data = next(iter(env.known.items()))
    batch = b"".join((
        wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 1, offset, len(data)),
        wire.REQUEST.pack(REQUEST_MAGIC, 0, 99, 2, 0, 1 << 20),  # no payload is assumed
        wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 3, EXPORT_SIZE, 4) + b"abcd",
        wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 4, UNTOUCHED, 4) + b"abcd",
        wire.REQUEST.pack(REQUEST_MAGIC, 1 << 12, Cmd.READ, 5, 0, 512),
        wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 6, offset, len(data)),
        wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 7, 0, 0),
    ))
    raw.send(batch)
    replies: dict[int, tuple[int, bytes]] = {}
    for _ in range(6):
        error, cookie = raw.simple_reply()
        body = raw.recv_exact(len(data)) if cookie in (1, 6) and error == 0 else b""
        assert cookie not in replies
        replies[cookie] = (error, body)
    assert replies == {1: (0, data), 2: (Errno.EINVAL, b""), 3: (Errno.ENOSPC, b""),
                       4: (0, b""), 5: (Errno.EINVAL, b""), 6: (0, data)}
    assert raw.read_until_eof() == b""  # DISC gets no reply
    assert env.good.pread(4, UNTOUCHED) == b"abcd"
    env.good.pwrite(bytes(4), UNTOUCHED)
    env.check()


def test_bad_request_magic_closes(env: Env) -> None:
    raw = env.transmission()
    raw.request(Cmd.READ, 0, 512, magic=REQUEST_MAGIC ^ 0x10)
    assert raw.read_until_eof() == b""
    env.check()
    env.fresh_client_works()


def test_unknown_command_is_einval(env: Env) -> None:
    raw = env.transmission()
    raw.request(99, 0, 512, cookie=COOKIE)
    assert raw.simple_reply() == (Errno.EINVAL, COOKIE)
    env.check()
    raw.request(Cmd.RESIZE, 0, 0, cookie=COOKIE + 1)  # known to the spec, not offered
    assert raw.simple_reply() == (Errno.EINVAL, COOKIE + 1)
    offset, data = next(iter(env.known.items()))
    assert raw.simple_read(offset, len(data), cookie=COOKIE + 2) == data
    env.check()


def test_unknown_flag_bits_on_read_are_einval(env: Env) -> None:
    raw = env.transmission()
    for cookie, bad in enumerate((1 << 15, 1 << 8, 1 << 6), start=100):
        raw.request(Cmd.READ, 0, 512, flags=bad, cookie=cookie)
        assert raw.simple_reply() == (Errno.EINVAL, cookie)
        env.check()
    # DF without structured replies is also invalid
    raw.request(Cmd.READ, 0, 512, flags=1 << 2, cookie=200)
    assert raw.simple_reply() == (Errno.EINVAL, 200)
    assert raw.simple_read(UNTOUCHED, 512, cookie=201) == bytes(512)
    env.check()


def test_write_to_read_only_export_is_eperm_and_payload_consumed(
        make_env: Callable[..., Env], raw_image: Callable[..., Path]) -> None:
    image = raw_image(EXPORT_SIZE)
    known = {MiB: os.urandom(8 * KiB)}
    with open(image, "r+b") as fh:
        fh.seek(MiB)
        fh.write(known[MiB])
    env = make_env("-r", image=str(image), known=known)
    raw = env.transmission()
    # a payload that would parse as a READ request if the server did not consume it
    trap = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 666, 0, 16)
    payload = (trap * (4 * KiB // len(trap) + 1))[:4 * KiB]
    raw.request(Cmd.WRITE, 0, len(payload), cookie=31, payload=payload)
    assert raw.simple_reply() == (Errno.EPERM, 31)
    env.check()
    for cookie, cmd in ((32, Cmd.TRIM), (33, Cmd.WRITE_ZEROES)):
        raw.request(cmd, 0, 4096, cookie=cookie)
        assert raw.simple_reply() == (Errno.EPERM, cookie)
    assert raw.simple_read(MiB, 8 * KiB, cookie=34) == known[MiB]
    env.check()
    assert image.read_bytes()[:4 * KiB] == bytes(4 * KiB)


def test_read_past_end_is_einval(env: Env) -> None:
    raw = env.transmission()
    cases = ((EXPORT_SIZE - 511, 512), (EXPORT_SIZE, 1), (2**64 - 512, 512))
    for cookie, (offset, length) in enumerate(cases, start=40):
        raw.request(Cmd.READ, offset, length, cookie=cookie)
        assert raw.simple_reply() == (Errno.EINVAL, cookie)
        env.check()
    assert raw.simple_read(EXPORT_SIZE - 512, 512, cookie=49) == bytes(512)


def test_write_past_end_is_enospc_and_payload_consumed(env: Env) -> None:
    raw = env.transmission()
    trap = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 777, 0, 0)
    payload = (trap * 300)[:4 * KiB]
    raw.request(Cmd.WRITE, EXPORT_SIZE - 1024, len(payload), cookie=50, payload=payload)
    assert raw.simple_reply() == (Errno.ENOSPC, 50)
    env.check()
    raw.request(Cmd.WRITE_ZEROES, EXPORT_SIZE, 4096, cookie=51)
    assert raw.simple_reply() == (Errno.ENOSPC, 51)
    raw.request(Cmd.TRIM, EXPORT_SIZE - 4096, 8192, cookie=52)
    assert raw.simple_reply() == (Errno.EINVAL, 52)
    # nothing was written at the end of the export
    assert raw.simple_read(EXPORT_SIZE - 4096, 4096, cookie=53) == bytes(4096)
    env.check()


def test_max_payload_write_past_end_is_consumed(env: Env) -> None:
    """A 32 MiB WRITE is legal in size: it is read in full, then refused for its range."""
    raw = env.transmission()
    trap = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0)
    payload = trap * (MAX_PAYLOAD // len(trap)) + trap[:MAX_PAYLOAD % len(trap)]
    assert len(payload) == MAX_PAYLOAD
    raw.request(Cmd.WRITE, 0, MAX_PAYLOAD, cookie=80, payload=payload)
    assert raw.simple_reply() == (Errno.ENOSPC, 80)
    assert raw.simple_read(UNTOUCHED, 4096, cookie=81) == bytes(4096)
    env.check()


def test_oversized_write_gets_einval_then_close_without_payload(env: Env) -> None:
    raw = env.transmission()
    raw.request(Cmd.WRITE, 0, 33 * MiB, cookie=COOKIE)  # header only, no payload
    # both bounded by TIMEOUT: the server must not wait for the 33 MiB payload
    assert raw.simple_reply() == (Errno.EINVAL, COOKIE)
    assert raw.read_until_eof() == b""
    env.check()
    env.fresh_client_works()


def test_truncated_request_then_close(env: Env) -> None:
    raw = env.transmission()
    raw.send(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 512)[:20])
    raw.close()
    env.check()
    # a WRITE whose payload is cut short
    raw = env.transmission()
    raw.request(Cmd.WRITE, 8 * MiB, 64 * KiB, cookie=2, payload=b"\xee" * 1000)
    raw.close()
    env.check()
    env.fresh_client_works()
    # the incomplete WRITE was not applied, not even in part
    assert env.good.pread(64 * KiB, 8 * MiB) == bytes(64 * KiB)


def test_structured_errors_are_error_chunks(env: Env) -> None:
    raw = env.transmission(structured=True)
    cases = ((99, 0, 512, 0, Errno.EINVAL),
             (Cmd.READ, EXPORT_SIZE, 512, 0, Errno.EINVAL),
             (Cmd.READ, 0, 512, 1 << 15, Errno.EINVAL),
             (Cmd.WRITE_ZEROES, EXPORT_SIZE - 1, 2, 0, Errno.ENOSPC),
             (Cmd.BLOCK_STATUS, 0, 512, 0, Errno.EINVAL))  # no meta context was set
    for cookie, (cmd, offset, length, flags, errno) in enumerate(cases, start=60):
        raw.request(cmd, offset, length, flags=flags, cookie=cookie)
        chunk_flags, kind, got_cookie, payload = raw.chunk()
        assert (chunk_flags, kind, got_cookie) == (ReplyFlag.DONE, ReplyType.ERROR, cookie)
        got_errno, message = error_chunk(payload)
        assert got_errno == errno
        assert message, f"no message for {cmd}"
        env.check()
    raw.request(Cmd.WRITE, EXPORT_SIZE - 10, 20, cookie=70, payload=b"x" * 20)
    chunk_flags, kind, cookie, payload = raw.chunk()
    assert (chunk_flags, kind, cookie) == (ReplyFlag.DONE, ReplyType.ERROR, 70)
    assert error_chunk(payload)[0] == Errno.ENOSPC
    # and a good request after the errors gets a proper data chunk
    offset, data = next(iter(env.known.items()))
    raw.request(Cmd.READ, offset, len(data), cookie=71)
    chunk_flags, kind, cookie, payload = raw.chunk()
    assert (chunk_flags, kind, cookie) == (ReplyFlag.DONE, ReplyType.OFFSET_DATA, 71)
    assert payload == wire.OFFSET_DATA.pack(offset) + data
    env.check()


def test_structured_block_status_errors(env: Env) -> None:
    raw = env.client()
    raw.structured_reply()
    query = b"base:allocation"
    raw.send_option(Opt.SET_META_CONTEXT, wire.U32.pack(0) + wire.U32.pack(1)
                    + wire.U32.pack(len(query)) + query)
    option, rep, payload = raw.option_reply()
    assert (option, rep) == (Opt.SET_META_CONTEXT, Rep.META_CONTEXT)
    (context_id,) = wire.U32.unpack_from(payload)
    assert payload[4:] == query
    assert raw.option_reply() == (Opt.SET_META_CONTEXT, Rep.ACK, b"")
    raw.go()
    for cookie, (offset, length) in enumerate(
            ((0, 0), (EXPORT_SIZE - 512, 1024), (EXPORT_SIZE, 1)), start=90):
        raw.request(Cmd.BLOCK_STATUS, offset, length, cookie=cookie)
        flags, kind, got, body = raw.chunk()
        assert (flags, kind, got) == (ReplyFlag.DONE, ReplyType.ERROR, cookie)
        assert error_chunk(body)[0] == Errno.EINVAL
        env.check()
    raw.request(Cmd.BLOCK_STATUS, UNTOUCHED, MiB, cookie=99)
    flags, kind, got, body = raw.chunk()
    assert (flags, kind, got) == (ReplyFlag.DONE, ReplyType.BLOCK_STATUS, 99)
    assert wire.U32.unpack_from(body)[0] == context_id
    length, status = wire.EXTENT.unpack_from(body, 4)
    assert 0 < length <= MiB
    assert status == 3  # hole, reads as zeroes


def test_many_bad_clients_in_a_row(env: Env) -> None:
    """A burst of clients that each misbehave differently leaves the server serving."""
    rng = random.Random(1234)
    for i in range(20):
        raw = env.client(flags=None)
        if i % 4 == 0:
            raw.close()  # port probe: greeting only
        elif i % 4 == 1:
            raw.client_flags(0xFFFFFFFF)
            assert raw.read_until_eof() == b""
        elif i % 4 == 2:
            raw.client_flags()
            raw.send(rng.randbytes(64))
            raw.close()
        else:
            raw.client_flags()
            raw.go()
            raw.send(rng.randbytes(100))
            raw.close()
    env.check()
    env.fresh_client_works()
