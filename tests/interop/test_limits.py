"""Limits against floods: bounded memory for pipelined writes, no leaks over
many connection cycles, handshake limits.  Real pynbd processes, raw sockets.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from pynbd.proto import wire
from pynbd.proto.constants import (
    IHAVEOPT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    Opt,
    Rep,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.interop

MIB = 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def go(path: str) -> socket.socket:
    """Connect and negotiate the default export with GO (simple replies)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    recv_exact(sock, wire.GREETING.size)
    sock.sendall(wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))
    data = struct.pack(">IH", 0, 0)
    sock.sendall(wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, len(data)) + data)
    while True:
        _, _, rep, length = wire.OPTION_REPLY_HEADER.unpack(
            recv_exact(sock, wire.OPTION_REPLY_HEADER.size))
        recv_exact(sock, length)
        if rep == Rep.ACK:
            return sock
        assert rep == Rep.INFO, f"GO failed: {rep:#x}"


def test_pipelined_32mib_writes_keep_memory_bounded(
        pynbd_server: Callable[..., Any],
        raw_image: Callable[[int], Path]) -> None:
    """48 WRITEs of 32 MiB sent without reading any reply, to a disk that takes
    0.1 s per write: the server stops reading instead of buffering them, its
    peak memory grows by at most 128 MiB, and every write then succeeds."""
    image = raw_image(64 * MIB)
    srv = pynbd_server("-e", "0", "--fault", "cmd=write,delay=0.1", str(image))
    assert srv.socket is not None
    pid = srv.proc.pid
    sock = go(srv.socket)
    baseline = status_kib(pid, "VmRSS")
    payload = bytes(range(256)) * (32 * MIB // 256)
    count = 48
    sent: list[int] = []

    def flood() -> None:
        for i in range(count):
            header = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, i, (i % 2) * 32 * MIB,
                                       32 * MIB)
            sock.sendall(header)
            sock.sendall(payload)
            sent.append(i)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    # let the flood push as far as the server lets it without reading replies
    time.sleep(1.0)
    peak_during = status_kib(pid, "VmHWM")
    assert len(sent) < count, "the server took every write in without holding back"
    # now drain the replies: every write succeeds
    for _ in range(count):
        magic, error, cookie = wire.SIMPLE_REPLY.unpack(recv_exact(sock, wire.SIMPLE_REPLY.size))
        assert (magic, error) == (SIMPLE_REPLY_MAGIC, 0), (cookie, error)
    sender.join(60)
    assert len(sent) == count
    peak = status_kib(pid, "VmHWM")
    growth_mib = (max(peak, peak_during) - baseline) / 1024
    assert growth_mib <= 128, f"server memory grew by {growth_mib:.0f} MiB"
    sock.close()
    with open(image, "rb") as fh:
        assert fh.read(4096) == payload[:4096]


def test_connection_cycles_leave_no_fds_or_memory_behind(
        pynbd_server: Callable[..., Any]) -> None:
    """Connect, negotiate, read, disconnect, many times: fds and memory settle."""
    srv = pynbd_server("-e", "0", "memory:16M")
    assert srv.socket is not None
    pid = srv.proc.pid
    path = srv.socket

    def cycle(n: int) -> None:
        for i in range(n):
            sock = go(path)
            sock.sendall(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, i, 0, 4096))
            magic, error, _ = wire.SIMPLE_REPLY.unpack(recv_exact(sock, 16))
            assert (magic, error) == (SIMPLE_REPLY_MAGIC, 0)
            recv_exact(sock, 4096)
            sock.sendall(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
            sock.close()

    cycle(300)  # warm up caches and allocator pools
    time.sleep(0.5)
    fds, rss = open_fds(pid), status_kib(pid, "VmRSS")
    cycle(2000)
    time.sleep(0.5)
    assert open_fds(pid) == fds
    grown = status_kib(pid, "VmRSS") - rss
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 2000 cycles"
    assert srv.proc.poll() is None


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError("no Pss in smaps_rollup")


def test_a_thousand_idle_clients_cost_little_memory(
        pynbd_server: Callable[..., Any]) -> None:
    """1,000 clients that finished the handshake and sit idle add at most 32 MiB
    (proportional set size), and a busy client's I/O stays correct meanwhile."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2200:
        pytest.fail(f"the hard fd limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2200), hard))
    srv = pynbd_server("-e", "0", "memory:16M")
    assert srv.socket is not None
    pid = srv.proc.pid
    busy = go(srv.socket)
    busy.sendall(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 4096) + b"\x42" * 4096)
    assert wire.SIMPLE_REPLY.unpack(recv_exact(busy, 16))[1] == 0
    time.sleep(0.3)
    baseline = pss_kib(pid)
    idle = []
    try:
        for _ in range(1000):
            idle.append(go(srv.socket))
        time.sleep(0.5)
        grown_mib = (pss_kib(pid) - baseline) / 1024
        for i in range(200):
            busy.sendall(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, i, 0, 4096))
            magic, error, cookie = wire.SIMPLE_REPLY.unpack(recv_exact(busy, 16))
            assert (magic, error, cookie) == (SIMPLE_REPLY_MAGIC, 0, i)
            assert recv_exact(busy, 4096) == b"\x42" * 4096
        assert grown_mib <= 32, f"1000 idle clients cost {grown_mib:.1f} MiB"
    finally:
        for sock in idle:
            sock.close()
        busy.close()
    assert srv.proc.poll() is None
