"""A socket-level fuzzer against a live server while a clean client does verified I/O.

Seeded random clients connect and send garbage at every stage: random bytes,
mutated greetings replies and options, and, after a real GO, mutated
requests (valid magic, random commands, flags, ranges and lengths).  A
well-behaved libnbd client keeps writing and reading back its own data the
whole time, in the first half of the disk (fuzzed writes go to the second
half: NBD lets any client overwrite any data).  The server must stay up,
the clean client must never see a wrong byte or an error, and a fresh
client must work at the end.

``PYNBD_SOCKET_FUZZ_CASES`` raises the number of fuzz connections for a
longer run (default 300 in the test suite).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import nbd
import pytest

from pynbd.proto import wire
from pynbd.proto.constants import IHAVEOPT, REQUEST_MAGIC, ClientFlag, Opt, Rep

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.interop

CASES = int(os.environ.get("PYNBD_SOCKET_FUZZ_CASES", "300"))
SIZE = 8 * 1024 * 1024


def _recv_some(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    try:
        return sock.recv(limit)
    except (TimeoutError, OSError):
        return b""


def _negotiate(sock: socket.socket, structured: bool) -> bool:
    """A real handshake (GO on the default export); False if the server said no."""
    sock.recv(wire.GREETING.size, socket.MSG_WAITALL)
    sock.sendall(wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))
    if structured:
        sock.sendall(wire.OPTION_HEADER.pack(IHAVEOPT, Opt.STRUCTURED_REPLY, 0))
        head = sock.recv(wire.OPTION_REPLY_HEADER.size, socket.MSG_WAITALL)
        if len(head) < wire.OPTION_REPLY_HEADER.size:
            return False
    data = struct.pack(">IH", 0, 0)
    sock.sendall(wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, len(data)) + data)
    while True:
        head = sock.recv(wire.OPTION_REPLY_HEADER.size, socket.MSG_WAITALL)
        if len(head) < wire.OPTION_REPLY_HEADER.size:
            return False
        _, _, rep, length = wire.OPTION_REPLY_HEADER.unpack(head)
        if length:
            sock.recv(length, socket.MSG_WAITALL)
        if rep == Rep.ACK:
            return True
        if rep != Rep.INFO:
            return False


def _random_option(rng: random.Random) -> bytes:
    option = rng.choice([*range(13), 0x7FFFFFFF, rng.getrandbits(32)])
    length = rng.choice([0, 1, 4, 6, 8, 20, rng.randrange(0, 300)])
    magic = IHAVEOPT if rng.random() < 0.9 else rng.getrandbits(64)
    return wire.OPTION_HEADER.pack(magic, option, length) + rng.randbytes(length)


def _random_request(rng: random.Random) -> bytes:
    cmd = rng.choice([*range(10), rng.getrandbits(16)])
    flags = rng.choice([0, 1, 2, 4, 8, 16, 32, rng.getrandbits(16)])
    offset = rng.choice([0, rng.randrange(SIZE), SIZE - 1, SIZE, rng.getrandbits(64)])
    if cmd in (1, 4, 6):  # writes, trims and zeroes stay out of the clean client's half
        offset = rng.choice([SIZE // 2 + rng.randrange(SIZE // 2), SIZE, rng.getrandbits(64)])
    length = rng.choice([0, 1, 512, 4096, rng.randrange(1 << 20), rng.getrandbits(32)])
    magic = REQUEST_MAGIC if rng.random() < 0.97 else rng.getrandbits(32)
    header = wire.REQUEST.pack(magic, flags, cmd, rng.getrandbits(64), offset, length)
    if cmd == 1 and length <= 1 << 20:  # a WRITE carries its payload, maybe cut short
        payload = rng.randbytes(length if rng.random() < 0.8 else rng.randrange(length + 1))
        return header + payload
    return header


def fuzz_one(path: str, rng: random.Random) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(path)
        stage = rng.random()
        if stage < 0.15:  # garbage straight after connecting
            sock.sendall(rng.randbytes(rng.randrange(1, 200)))
        elif stage < 0.45:  # garbage options
            sock.recv(wire.GREETING.size, socket.MSG_WAITALL)
            sock.sendall(wire.CLIENT_FLAGS.pack(rng.choice([1, 3, rng.getrandbits(32)])))
            for _ in range(rng.randrange(1, 8)):
                sock.sendall(_random_option(rng))
        else:  # a real GO, then garbage requests
            if not _negotiate(sock, structured=rng.random() < 0.5):
                return
            for _ in range(rng.randrange(1, 20)):
                sock.sendall(_random_request(rng))
        _recv_some(sock)
    except OSError:
        pass  # the server may close on us at any point: that is allowed
    finally:
        sock.close()


def test_fuzzed_clients_never_hurt_a_clean_client(
        pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", f"memory:{SIZE}")
    assert srv.socket is not None
    path = srv.socket
    failures: list[str] = []
    stop = threading.Event()
    verified = [0]

    def clean_client() -> None:
        rng = random.Random(1)
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        model: dict[int, bytes] = {}
        try:
            while not stop.is_set():
                block = rng.randrange(64)
                data = rng.randbytes(4096)
                h.pwrite(data, block * 4096)
                model[block] = data
                check = rng.choice(list(model))
                if h.pread(4096, check * 4096) != model[check]:
                    failures.append(f"block {check} read back wrong")
                verified[0] += 1
        except nbd.Error as err:
            failures.append(f"clean client failed: {err}")
        finally:
            h.shutdown()

    worker = threading.Thread(target=clean_client, daemon=True)
    worker.start()
    rng = random.Random(20261127)
    deadline = time.monotonic() + 120
    for _ in range(CASES):
        if time.monotonic() > deadline or failures:
            break
        fuzz_one(path, random.Random(rng.getrandbits(64)))
    stop.set()
    worker.join(30)
    assert not failures, failures
    assert verified[0] > 0
    assert srv.proc.poll() is None, "the server died"
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    assert h.pread(512, 0) is not None
    h.shutdown()
