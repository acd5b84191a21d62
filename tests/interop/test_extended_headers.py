"""pynbd against qemu 10's qemu-img and qemu-io, which send NBD_OPT_EXTENDED_HEADERS.

The system's qemu (7.2) does not know the extension; ``scripts/test`` extracts
qemu-utils 10 from Debian's bookworm-backports into ``.qemu10/`` (beside it,
not over it).  Every tool connects through a recording proxy, so each test
also proves on the wire that extended headers were negotiated (option 11 sent
and acknowledged, 32-byte requests with 64-bit lengths after it) and what
the requests were; what the tools did is checked against the image file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pynbd.proto import wire
from pynbd.proto.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Opt,
    Rep,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
QEMU10 = ROOT / ".qemu10" / "usr" / "bin"
TOOL_TIMEOUT = 60.0
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def qemu10(name: str) -> str:
    """A qemu 10 tool; the suite fails (never skips) when ``scripts/test`` did not
    extract it."""
    path = QEMU10 / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run the README's test command (scripts/test), "
                    "which extracts qemu 10 from bookworm-backports into .qemu10/")
    return str(path)


def run(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                          check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{args[0]} exited {proc.returncode}\nstdout: {proc.stdout[-2000:]}\n"
                    f"stderr: {proc.stderr[-2000:]}")
    return proc


# -- the recording proxy --------------------------------------------------------------------


@dataclass
class Recorded:
    """Both directions of one proxied connection."""

    client: bytearray = field(default_factory=bytearray)
    server: bytearray = field(default_factory=bytearray)

    def options(self) -> list[int]:
        """The options the client sent, in order (the client flags come first)."""
        got, pos = [], wire.CLIENT_FLAGS.size
        while pos + wire.OPTION_HEADER.size <= len(self.client):
            _, option, length = wire.OPTION_HEADER.unpack_from(self.client, pos)
            got.append(option)
            pos += wire.OPTION_HEADER.size + length
            if option in (Opt.GO, Opt.EXPORT_NAME):
                break
        return got

    def transmission_start(self) -> int:
        pos = wire.CLIENT_FLAGS.size
        while True:
            _, option, length = wire.OPTION_HEADER.unpack_from(self.client, pos)
            pos += wire.OPTION_HEADER.size + int(length)
            if option in (Opt.GO, Opt.EXPORT_NAME):
                return pos

    def requests(self) -> list[tuple[int, int, int, int]]:
        """(command, flags, offset, length) of every extended request; any other
        form of request fails the test.  A WRITE carries its length in payload
        with or without PAYLOAD_LEN (qemu 10 does not set it)."""
        got, pos = [], self.transmission_start()
        while pos < len(self.client):
            magic, flags, cmd, _, offset, length = (
                int(v) for v in wire.EXTENDED_REQUEST.unpack_from(self.client, pos))
            assert magic == EXTENDED_REQUEST_MAGIC, f"request magic {magic:#x} at {pos}"
            got.append((cmd, flags, offset, length))
            payload = flags & CmdFlag.PAYLOAD_LEN or cmd == Cmd.WRITE
            pos += wire.EXTENDED_REQUEST.size + (length if payload else 0)
        assert pos == len(self.client)
        return got

    def assert_extended(self) -> None:
        """Option 11 was sent and acknowledged, and every request and reply was extended."""
        assert Opt.EXTENDED_HEADERS in self.options()
        ack = wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.EXTENDED_HEADERS, Rep.ACK, 0)
        assert ack in self.server
        assert self.requests()
        assert struct.pack(">I", EXTENDED_REPLY_MAGIC) in self.server


class Proxy:
    """A Unix-socket proxy in front of a server socket that records every connection."""

    def __init__(self, path: str, target: str) -> None:
        self.path = path
        self.target = target
        self.connections: list[Recorded] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.target)
            record = Recorded()
            self.connections.append(record)
            for src, dst, log in ((client, server, record.client),
                                  (server, client, record.server)):
                thread = threading.Thread(target=_pump, args=(src, dst, log), daemon=True)
                thread.start()
                self._threads.append(thread)

    def close(self) -> None:
        self._listener.close()
        for thread in self._threads:
            thread.join(TOOL_TIMEOUT)

    def wait(self) -> None:
        """Until every connection so far has ended."""
        for thread in self._threads:
            thread.join(TOOL_TIMEOUT)

    def only(self) -> Recorded:
        """The one connection since the last call (waits for it to end)."""
        self.wait()
        assert len(self.connections) == 1, len(self.connections)
        return self.connections.pop()


def _pump(src: socket.socket, dst: socket.socket, log: bytearray) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 20):
            log += data
            dst.sendall(data)
    # either side leaving ends the connection both ways (a half-open one could
    # keep a failing tool waiting)
    for sock in (dst, src):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def served(pynbd_server: Callable[..., Any], tmp_path: Path,
           ) -> Iterator[Callable[[int], tuple[Path, Proxy]]]:
    """Factory: a sparse raw image of ``size`` bytes served by pynbd (discards
    punch holes) behind a recording proxy."""
    proxies: list[Proxy] = []

    def make(size: int) -> tuple[Path, Proxy]:
        image = tmp_path / "disk.img"
        with open(image, "wb") as fh:
            fh.truncate(size)
        srv = pynbd_server("-e", "0", "--discard", "unmap", str(image))
        assert srv.socket is not None
        proxy = Proxy(str(tmp_path / "proxy.sock"), srv.socket)
        proxies.append(proxy)
        return image, proxy

    yield make
    for proxy in proxies:
        proxy.close()


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = [qemu10("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    return run(args, check=check)


# -- the tests --------------------------------------------------------------------------------


def test_the_tools_are_qemu_10() -> None:
    for name in ("qemu-img", "qemu-io"):
        out = run([qemu10(name), "--version"]).stdout
        assert out.split()[2].startswith("10."), out


def test_qemu_io_patterns_zeroes_and_discard(
        served: Callable[[int], tuple[Path, Proxy]]) -> None:
    image, proxy = served(64 * MiB)
    proc = qemu_io(proxy.uri, "write -P 0xab 0 1M", "write -P 0xcd 4M 64k",
                   "read -P 0xab 0 1M", "read -P 0xcd 4M 64k",
                   "write -z 512k 256k", "read -P 0 512k 256k",
                   "discard 4M 64k", "read -P 0 4M 64k",
                   "write -P 0x5a 60M 4M", "flush")
    assert "Pattern verification failed" not in proc.stdout + proc.stderr
    record = proxy.only()
    record.assert_extended()
    commands = {cmd for cmd, _, _, _ in record.requests()}
    assert {Cmd.READ, Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.FLUSH} <= commands
    data = image.read_bytes()
    assert data[:512 * KiB] == b"\xab" * (512 * KiB)
    assert data[512 * KiB:768 * KiB] == bytes(256 * KiB)
    assert data[768 * KiB:1 * MiB] == b"\xab" * (256 * KiB)
    assert data[4 * MiB:4 * MiB + 64 * KiB] == bytes(64 * KiB)
    assert data[60 * MiB:] == b"\x5a" * (4 * MiB)
    with open(image, "rb") as fh:  # the discard punched a hole in the file
        assert os.lseek(fh.fileno(), 4 * MiB, os.SEEK_DATA) >= 4 * MiB + 64 * KiB
    # and a wrong pattern is caught
    bad = qemu_io(proxy.uri, "read -P 0xcd 0 64k", check=False)
    assert bad.returncode != 0
    assert "Pattern verification failed at offset 0" in bad.stdout + bad.stderr
    proxy.only().assert_extended()


def test_ranges_over_4_gib_in_one_request(
        served: Callable[[int], tuple[Path, Proxy]]) -> None:
    image, proxy = served(12 * GiB)
    # qemu-io caps a plain write -z (and discard) at 2 GiB; -n (fast zero, no
    # slow fallback) lifts the cap, -u lets the zeroing punch holes
    qemu_io(proxy.uri, "write -P 0x11 0 64k", "write -P 0x22 10G 64k",
            "write -P 0x33 7G 64k", "write -z -n 64k 6G", "write -z -u -n 6G 4G")
    record = proxy.only()
    record.assert_extended()
    zeroes = [(flags, offset, length) for cmd, flags, offset, length in record.requests()
              if cmd == Cmd.WRITE_ZEROES]
    # one request each: 64-bit lengths on the wire
    assert [(offset, length) for _, offset, length in zeroes] == [(64 * KiB, 6 * GiB),
                                                                  (6 * GiB, 4 * GiB)]
    assert all(flags & CmdFlag.FAST_ZERO for flags, _, _ in zeroes)
    assert zeroes[0][0] & CmdFlag.NO_HOLE
    assert not zeroes[1][0] & CmdFlag.NO_HOLE
    proc = qemu_io(proxy.uri, "read -P 0x11 0 64k", "read -P 0x22 10G 64k",
                   "read -P 0 64k 64k", "read -P 0 7G 64k")
    assert "Pattern verification failed" not in proc.stdout + proc.stderr
    proxy.only().assert_extended()
    with open(image, "rb") as fh:
        fh.seek(10 * GiB)
        assert fh.read(64 * KiB) == b"\x22" * (64 * KiB)
        fh.seek(7 * GiB)
        assert fh.read(64 * KiB) == bytes(64 * KiB)
        # the unmapping zeroes punched the 7 GiB data out
        assert os.lseek(fh.fileno(), 6 * GiB, os.SEEK_DATA) == 10 * GiB


def _map(args: Sequence[str]) -> list[tuple[int, int, bool, bool]]:
    out = json.loads(run([qemu10("qemu-img"), "map", "--output=json", *args]).stdout)
    merged: list[tuple[int, int, bool, bool]] = []
    for ext in out:
        item = (int(ext["start"]), int(ext["length"]), bool(ext["data"]), bool(ext["zero"]))
        if merged and merged[-1][2:] == item[2:] and sum(merged[-1][:2]) == item[0]:
            prev = merged.pop()
            item = (prev[0], prev[1] + item[1], *item[2:])
        merged.append(item)
    return merged


def test_qemu_img_map_matches_the_file(served: Callable[[int], tuple[Path, Proxy]]) -> None:
    image, proxy = served(10 * GiB)
    with open(image, "r+b") as fh:
        for offset in (0, 1 * MiB, 5 * GiB, 10 * GiB - 64 * KiB):
            fh.seek(offset)
            fh.write(b"\x77" * (64 * KiB))
    over_nbd = _map(["-f", "raw", proxy.uri])
    record = proxy.only()
    record.assert_extended()
    statuses = [r for r in record.requests() if r[0] == Cmd.BLOCK_STATUS]
    assert statuses
    assert any(length > 4 * GiB for _, _, _, length in statuses)
    assert over_nbd == _map(["-f", "raw", str(image)])
    assert (64 * KiB, 1 * MiB - 64 * KiB, False, True) in over_nbd
    assert any(length > 4 * GiB and not data for _, length, data, _ in over_nbd)


def test_qemu_img_convert_both_ways(served: Callable[[int], tuple[Path, Proxy]],
                                    tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    content = bytearray(96 * MiB)
    for i, offset in enumerate((0, 7 * MiB, 50 * MiB, 96 * MiB - 1 * MiB)):
        content[offset:offset + 512 * KiB] = os.urandom(512 * KiB)
        content[offset + 600 * KiB] = i + 1
    source.write_bytes(content)
    image, proxy = served(96 * MiB)
    run([qemu10("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", str(source),
         proxy.uri])
    proxy.only().assert_extended()
    assert image.read_bytes() == content
    back = tmp_path / "back.img"
    run([qemu10("qemu-img"), "convert", "-f", "raw", "-O", "raw", proxy.uri, str(back)])
    proxy.only().assert_extended()
    assert back.read_bytes() == content
    compare = run([qemu10("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(source),
                   proxy.uri])
    assert "Images are identical" in compare.stdout
    proxy.only().assert_extended()


def test_pynbd_check_uses_extended_headers(
        served: Callable[[int], tuple[Path, Proxy]]) -> None:
    _, proxy = served(64 * MiB)
    proc = subprocess.run([sys.executable, "-m", "pynbd", "check", "--write", "--json",
                           "--connections", "2", "--seconds", "1", proxy.uri],
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result["result"] == "pass"
    proxy.wait()
    assert len(proxy.connections) >= 2
    for record in proxy.connections:
        record.assert_extended()
        assert Opt.STRUCTURED_REPLY not in record.options()
