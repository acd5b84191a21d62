"""pynbd against the real NBD client tools: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh.

Every tool runs as a subprocess with a timeout; what each test asserts is what
the tool itself reports (exit status, its output, the bytes it copied).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from tests.support.interop import require_tool as tool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

pytestmark = pytest.mark.interop

#: every tool invocation is killed after this long
TOOL_TIMEOUT = 60.0
KiB = 1024
MiB = 1024 * KiB

#: the sparse layout the map tests write: (offset, length) of each data range
SPARSE_DATA = ((1 * MiB, 64 * KiB), (8 * MiB, 1 * MiB))


def run(args: Sequence[str], *, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool, bounded by ``TOOL_TIMEOUT``; with ``check``, require exit status 0."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                          env=env, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{args[0]} exited {proc.returncode}\nstdout: {proc.stdout[-2000:]}\n"
                    f"stderr: {proc.stderr[-2000:]}")
    return proc


def nbdsh_env() -> dict[str, str]:
    """Environment in which ``nbdsh`` (a ``python3`` script) finds libnbd's module.

    nbdsh runs ``python3`` from PATH; the test interpreter is known to import
    ``nbd``, so its directory goes first.
    """
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@contextlib.contextmanager
def libnbd(uri: str, *, structured: bool = True, meta: bool = False,
           opt_mode: bool = False) -> Iterator[Any]:
    """A libnbd handle connected to ``uri``; disconnected cleanly afterwards.

    If the body fails, a failing disconnect does not hide the body's error.
    """
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_opt_mode(opt_mode)
    h.connect_uri(uri)
    try:
        yield h
    except BaseException:
        with contextlib.suppress(nbd.Error):
            _disconnect(h)
        raise
    _disconnect(h)


def _disconnect(h: Any) -> None:
    if h.aio_is_negotiating():
        h.opt_abort()
    elif h.aio_is_ready():
        h.shutdown()


def pattern_data(size: int, seed: int) -> bytes:
    """Reproducible non-repeating bytes (every 64 KiB block differs)."""
    rng = random.Random(seed)
    return rng.randbytes(size)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def map_extents(uri: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map --json``: (offset, length, type), adjacent equal types merged."""
    out = json.loads(run([tool("nbdinfo"), "--map", "--json", uri]).stdout)
    merged: list[tuple[int, int, int]] = []
    for ext in out:
        offset, length, kind = int(ext["offset"]), int(ext["length"]), int(ext["type"])
        if merged and merged[-1][2] == kind and merged[-1][0] + merged[-1][1] == offset:
            prev = merged.pop()
            merged.append((prev[0], prev[1] + length, kind))
        else:
            merged.append((offset, length, kind))
    return merged


def expected_sparse_map(size: int, data: Sequence[tuple[int, int]],
                        ) -> list[tuple[int, int, int]]:
    """The merged map of an image whose only data is ``data``: holes read as zero (3)."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    for offset, length in sorted(data):
        if offset > pos:
            out.append((pos, offset - pos, 3))
        out.append((offset, length, 0))
        pos = offset + length
    if pos < size:
        out.append((pos, size - pos, 3))
    return out


def export_info(uri: str) -> dict[str, Any]:
    out = json.loads(run([tool("nbdinfo"), "--json", uri]).stdout)
    exports = out["exports"]
    assert len(exports) == 1
    info: dict[str, Any] = exports[0]
    return info


def fill_sparse(uri: str) -> None:
    """Write ``SPARSE_DATA`` through libnbd, leaving everything else untouched."""
    with libnbd(uri) as h:
        for i, (offset, length) in enumerate(SPARSE_DATA):
            h.pwrite(bytes([0x11 * (i + 1)]) * length, offset)
        h.flush()


# -- qemu-io -------------------------------------------------------------------------

QEMU_IO_SCRIPT = ("write -P 0xab 0 64k", "read -P 0xab 0 64k", "discard 64k 64k",
                  "write -z 128k 64k", "read -P 0 128k 64k", "flush")


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = [tool("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    return run(args, check=check)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_qemu_io_pattern_script(pynbd_server: Callable[..., Any],
                                raw_image: Callable[..., Path], tcp: bool,
                                kind: str) -> None:
    image = raw_image(4 * MiB)
    if kind == "file":
        # fill the discard range so that punching a hole is observable afterwards
        with open(image, "r+b") as fh:
            fh.seek(64 * KiB)
            fh.write(b"\x5a" * (64 * KiB))
            fh.flush()
            os.fsync(fh.fileno())
        srv = pynbd_server("-e", "0", "--discard", "unmap", str(image), tcp=tcp)
    else:
        srv = pynbd_server("-e", "0", "memory:4M", tcp=tcp)
    assert srv.uri.startswith("nbd://127.0.0.1:" if tcp else "nbd+unix://")

    proc = qemu_io(srv.uri, *QEMU_IO_SCRIPT)
    assert "Pattern verification failed" not in proc.stdout + proc.stderr
    assert "wrote 65536/65536 bytes at offset 0" in proc.stdout
    assert "read 65536/65536 bytes at offset 131072" in proc.stdout
    assert "discard 65536/65536 bytes at offset 65536" in proc.stdout

    # the data persists for the next client, and a wrong pattern is caught
    good = qemu_io(srv.uri, "read -P 0xab 0 64k", "read -P 0 128k 64k")
    assert "Pattern verification failed" not in good.stdout + good.stderr
    bad = qemu_io(srv.uri, "read -P 0xcd 0 64k", check=False)
    assert bad.returncode != 0
    assert "Pattern verification failed at offset 0" in bad.stdout + bad.stderr

    if kind == "file":
        srv.stop()
        content = image.read_bytes()
        assert content[:64 * KiB] == b"\xab" * (64 * KiB)
        assert content[64 * KiB:192 * KiB] == bytes(128 * KiB)
        with open(image, "rb") as fh:
            # --discard unmap really punched the discarded range out of the file
            assert os.lseek(fh.fileno(), 64 * KiB, os.SEEK_DATA) >= 128 * KiB


# -- qemu-img ------------------------------------------------------------------------

def test_qemu_img_convert_both_ways_and_compare(pynbd_server: Callable[..., Any],
                                                tmp_path: Path) -> None:
    size = 8 * MiB
    source = tmp_path / "in.img"
    data = pattern_data(size, 1)
    write_file(source, data)
    srv = pynbd_server("-e", "0", f"memory:{size}")
    qemu_img = tool("qemu-img")

    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source), srv.uri])
    out = tmp_path / "out.img"
    run([qemu_img, "convert", "-f", "raw", "-O", "raw", srv.uri, str(out)])
    assert out.read_bytes() == data

    same = run([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri, str(source)])
    assert same.returncode == 0
    assert "Images are identical" in same.stdout

    changed = bytearray(data)
    changed[5 * MiB + 7] ^= 0xFF
    other = tmp_path / "other.img"
    write_file(other, bytes(changed))
    diff = run([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri, str(other)],
               check=False)
    assert diff.returncode == 1, diff.stderr
    assert "Content mismatch at offset 5242880" in diff.stdout


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_qemu_img_map_and_info(pynbd_server: Callable[..., Any],
                               raw_image: Callable[..., Path], kind: str) -> None:
    size = 16 * MiB
    image = str(raw_image(size)) if kind == "file" else f"memory:{size}"
    srv = pynbd_server("-e", "0", image)
    fill_sparse(srv.uri)
    qemu_img = tool("qemu-img")

    info = json.loads(run([qemu_img, "info", "--output=json", "-f", "raw", srv.uri]).stdout)
    assert info["virtual-size"] == size
    text = run([qemu_img, "info", "-f", "raw", srv.uri]).stdout
    assert "virtual size: 16 MiB (16777216 bytes)" in text

    extents = json.loads(run([qemu_img, "map", "--output=json", "-f", "raw", srv.uri]).stdout)
    assert extents[0]["start"] == 0
    assert sum(e["length"] for e in extents) == size
    data_ranges: list[tuple[int, int]] = []
    for ext in extents:
        if ext["data"]:
            assert not ext["zero"]
            if data_ranges and sum(data_ranges[-1]) == ext["start"]:
                start, length = data_ranges.pop()
                data_ranges.append((start, length + ext["length"]))
            else:
                data_ranges.append((ext["start"], ext["length"]))
        else:
            assert ext["zero"], ext
    assert data_ranges == list(SPARSE_DATA)


# -- nbdinfo -------------------------------------------------------------------------

WRITABLE_FLAGS = {"is_read_only": False, "can_multi_conn": True, "can_flush": True,
                  "can_fua": True, "can_trim": True, "can_zero": True,
                  "can_fast_zero": True, "can_cache": True, "can_df": True}


def test_nbdinfo_json_flags_writable(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:64M")
    info = export_info(srv.uri)
    assert {k: info[k] for k in WRITABLE_FLAGS} == WRITABLE_FLAGS
    assert info["export-size"] == 64 * MiB
    assert "base:allocation" in info["contexts"]


def test_nbdinfo_json_flags_read_only(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-r", "-e", "0", "memory:64M")
    info = export_info(srv.uri)
    assert info["is_read_only"] is True
    assert info["can_multi_conn"] is True
    assert info["can_trim"] is False
    assert info["can_zero"] is False
    assert info["can_fast_zero"] is False
    assert info["can_cache"] is True


def test_nbdinfo_json_single_client_has_no_multi_conn(
        pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("memory:1M")
    info = export_info(srv.uri)
    assert info["can_multi_conn"] is False
    assert info["is_read_only"] is False


def test_nbdinfo_list_name_description_and_size(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "-x", "disk-one", "-D", "the first disk", "memory:3M")
    assert srv.uri.endswith(f"/disk-one?socket={srv.socket}")
    nbdinfo = tool("nbdinfo")
    listing = json.loads(run([nbdinfo, "--list", "--json", srv.uri]).stdout)
    assert [(e["export-name"], e["description"]) for e in listing["exports"]] == [
        ("disk-one", "the first disk")]
    text = run([nbdinfo, "--list", srv.uri]).stdout
    assert 'export="disk-one":' in text
    assert "description: the first disk" in text
    assert run([nbdinfo, "--size", srv.uri]).stdout.strip() == str(3 * MiB)


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_nbdinfo_map_sparse(pynbd_server: Callable[..., Any],
                            raw_image: Callable[..., Path], kind: str) -> None:
    size = 16 * MiB
    image = str(raw_image(size)) if kind == "file" else f"memory:{size}"
    srv = pynbd_server("-e", "0", image)
    assert map_extents(srv.uri) == [(0, size, 3)]
    fill_sparse(srv.uri)
    assert map_extents(srv.uri) == expected_sparse_map(size, SPARSE_DATA)
    text = run([tool("nbdinfo"), "--map", srv.uri]).stdout.splitlines()
    kinds = [line.split(None, 3)[3].strip() for line in text]
    assert kinds[:3] == ["hole,zero", "data", "hole,zero"]


# -- nbdcopy -------------------------------------------------------------------------

COPY_SIZE = 64 * MiB


def make_copy_source(path: Path) -> bytes:
    """64 MiB of random data written in 1 MiB pieces."""
    pieces = [os.urandom(MiB) for _ in range(COPY_SIZE // MiB)]
    data = b"".join(pieces)
    write_file(path, data)
    return data


def nbdcopy_connections(stderr: str) -> int:
    """The connection count ``nbdcopy -v`` reports it chose."""
    for line in stderr.splitlines():
        if line.startswith("nbdcopy: connections="):
            return int(line.split()[1].split("=")[1])
    pytest.fail("nbdcopy -v did not report its connection count")


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdcopy_multi_conn_round_trip(pynbd_server: Callable[..., Any], tmp_path: Path,
                                       tcp: bool) -> None:
    source = tmp_path / "in.img"
    data = make_copy_source(source)
    srv = pynbd_server("-e", "0", f"memory:{COPY_SIZE}", tcp=tcp)
    nbdcopy = tool("nbdcopy")
    # enough threads that nbdcopy's default of 4 connections is not cut down
    up = run([nbdcopy, "-v", "--threads=4", str(source), srv.uri])
    assert nbdcopy_connections(up.stderr) == 4
    out = tmp_path / "out.img"
    down = run([nbdcopy, "-v", "--threads=4", srv.uri, str(out)])
    assert nbdcopy_connections(down.stderr) == 4
    assert out.read_bytes() == data


def test_nbdcopy_single_connection_export(pynbd_server: Callable[..., Any],
                                          tmp_path: Path) -> None:
    source = tmp_path / "in.img"
    data = make_copy_source(source)
    srv = pynbd_server(f"memory:{COPY_SIZE}")  # -e 1: no CAN_MULTI_CONN
    nbdcopy = tool("nbdcopy")
    up = run([nbdcopy, "-v", "--threads=4", "--flush", str(source), srv.uri])
    assert nbdcopy_connections(up.stderr) == 1
    out = tmp_path / "out.img"
    down = run([nbdcopy, "-v", "--threads=4", srv.uri, str(out)])
    assert nbdcopy_connections(down.stderr) == 1
    assert out.read_bytes() == data


def test_nbdcopy_export_to_export_with_flush(pynbd_server: Callable[..., Any],
                                             raw_image: Callable[..., Path],
                                             tmp_path: Path) -> None:
    source = tmp_path / "in.img"
    data = make_copy_source(source)
    first = pynbd_server("-e", "0", f"memory:{COPY_SIZE}")
    target = raw_image(COPY_SIZE, "target.img")
    second = pynbd_server("-e", "0", str(target), tcp=True)
    nbdcopy = tool("nbdcopy")
    run([nbdcopy, str(source), first.uri])
    run([nbdcopy, "--flush", first.uri, second.uri])
    # the flush made the data durable in the file behind the second server
    assert target.read_bytes() == data
    out = tmp_path / "out.img"
    run([nbdcopy, second.uri, str(out)])
    assert out.read_bytes() == data


# -- nbdsh and libnbd's Python API -------------------------------------------------------

NBDSH_READS = """
import nbd
h.pwrite(b"\\x42" * 65536, 4 << 20)
chunks = []
def chunk(subbuf, offset, status, error):
    chunks.append((offset, len(subbuf), status))
    return 0
assert h.can_df()
h.pread_structured(1 << 20, 8 << 20, chunk)
assert chunks and all(c[2] == nbd.READ_HOLE for c in chunks), chunks
assert sum(c[1] for c in chunks) == 1 << 20
chunks.clear()
buf = h.pread_structured(65536, 4 << 20, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(4 << 20, 65536, nbd.READ_DATA)], chunks
assert buf == b"\\x42" * 65536
print("nbdsh-reads-ok")
"""

NBDSH_BLOCK_STATUS = """
import nbd
assert h.can_meta_context("base:allocation")
h.pwrite(b"\\x01" * 131072, 1 << 20)
seen = []
def extent(metacontext, offset, entries, error):
    seen.append((metacontext, offset, list(entries)))
    return 0
h.block_status(4 << 20, 0, extent)
assert len(seen) == 1, seen
ctx, offset, entries = seen[0]
assert ctx == "base:allocation" and offset == 0
pairs = list(zip(entries[0::2], entries[1::2]))
assert pairs[0] == (1 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO), pairs
assert pairs[1] == (131072, 0), pairs
assert pairs[2][1] == nbd.STATE_HOLE | nbd.STATE_ZERO, pairs
print("nbdsh-block-status-ok")
"""


def test_nbdsh_structured_reads(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:16M")
    proc = run([tool("nbdsh"), "-u", srv.uri, "-c", NBDSH_READS], env=nbdsh_env())
    assert proc.stdout.strip() == "nbdsh-reads-ok"


def test_nbdsh_base_allocation(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:16M")
    proc = run([tool("nbdsh"), "--base-allocation", "-u", srv.uri, "-c", NBDSH_BLOCK_STATUS],
               env=nbdsh_env())
    assert proc.stdout.strip() == "nbdsh-block-status-ok"


def test_nbdsh_opt_mode_listing(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "-x", "named", "-D", "described", "memory:2M")
    script = """
names = []
h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
print(names)
h.opt_go()
print(h.get_size(), h.is_read_only())
"""
    proc = run([tool("nbdsh"), "--opt-mode", "-u", srv.uri, "-c", script], env=nbdsh_env())
    assert proc.stdout.splitlines() == ["[('named', 'described')]", f"{2 * MiB} False"]


def test_nbdsh_failure_is_reported(pynbd_server: Callable[..., Any]) -> None:
    """The nbdsh checks above can fail: a false assertion makes nbdsh exit non-zero."""
    srv = pynbd_server("-e", "0", "memory:1M")
    proc = run([tool("nbdsh"), "-u", srv.uri, "-c", "assert h.is_read_only()"],
               env=nbdsh_env(), check=False)
    assert proc.returncode != 0
    assert "AssertionError" in proc.stderr


class Chunks:
    """Collects the chunks libnbd reports for one structured read."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def __call__(self, subbuf: Any, offset: int, status: int, error: Any) -> int:
        self.seen.append((offset, len(subbuf), status))
        return 0


def test_libnbd_structured_reads(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:16M")
    with libnbd(srv.uri) as h:
        assert h.get_structured_replies_negotiated()
        assert h.can_df()
        payload = os.urandom(256 * KiB)
        h.pwrite(payload, 2 * MiB)

        hole = Chunks()
        assert h.pread_structured(MiB, 8 * MiB, hole) == bytes(MiB)
        assert hole.seen
        assert {status for _, _, status in hole.seen} == {nbd.READ_HOLE}
        assert sum(length for _, length, _ in hole.seen) == MiB

        data = Chunks()
        assert h.pread_structured(256 * KiB, 2 * MiB, data) == payload
        assert {status for _, _, status in data.seen} == {nbd.READ_DATA}

        # a read straddling data and hole yields both kinds, in one reply
        mixed = Chunks()
        buf = h.pread_structured(MiB, 2 * MiB - 512 * KiB, mixed)
        assert buf == bytes(512 * KiB) + payload + bytes(256 * KiB)
        assert {status for _, _, status in mixed.seen} == {nbd.READ_DATA, nbd.READ_HOLE}
        assert sum(length for _, length, _ in mixed.seen) == MiB

        # DF: exactly one chunk even where the export is sparse
        whole = Chunks()
        buf = h.pread_structured(MiB, 2 * MiB - 512 * KiB, whole, nbd.CMD_FLAG_DF)
        assert buf == bytes(512 * KiB) + payload + bytes(256 * KiB)
        assert whole.seen == [(2 * MiB - 512 * KiB, MiB, nbd.READ_DATA)]


def test_libnbd_block_status(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:16M")
    with libnbd(srv.uri, meta=True) as h:
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.pwrite(b"\x07" * (128 * KiB), 3 * MiB)
        seen: list[tuple[str, int, list[int]]] = []

        def extent(metacontext: str, offset: int, entries: list[int], error: Any) -> int:
            seen.append((metacontext, offset, list(entries)))
            return 0

        h.block_status(8 * MiB, 0, extent)
        assert len(seen) == 1
        ctx, offset, entries = seen[0]
        assert (ctx, offset) == (nbd.CONTEXT_BASE_ALLOCATION, 0)
        pairs = list(zip(entries[0::2], entries[1::2], strict=True))
        hole = nbd.STATE_HOLE | nbd.STATE_ZERO
        assert pairs == [(3 * MiB, hole), (128 * KiB, 0), (8 * MiB - 3 * MiB - 128 * KiB, hole)]

        seen.clear()
        h.block_status(8 * MiB, 0, extent, nbd.CMD_FLAG_REQ_ONE)
        assert seen[0][2] == [3 * MiB, hole]


def test_libnbd_without_structured_replies(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "memory:4M")
    with libnbd(srv.uri, structured=False, meta=True) as h:
        assert not h.get_structured_replies_negotiated()
        assert not h.can_df()
        assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        payload = os.urandom(MiB)
        h.pwrite(payload, MiB)
        assert h.pread(2 * MiB, 0) == bytes(MiB) + payload
        with pytest.raises(nbd.Error) as err:
            h.pread(4096, 4 * MiB)  # past the end: a simple error reply
        assert err.value.errno == "EINVAL"
        assert h.pread(4096, MiB) == payload[:4096]


def test_libnbd_opt_mode(pynbd_server: Callable[..., Any]) -> None:
    srv = pynbd_server("-e", "0", "-x", "opt", "-D", "option mode", "memory:5M")
    with libnbd(srv.uri, meta=True, opt_mode=True) as h:
        assert h.aio_is_negotiating()
        contexts: list[str] = []

        def on_context(name: str) -> int:
            contexts.append(name)
            return 0

        assert h.opt_list_meta_context(on_context) == 1
        assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
        # an empty query list asks for every context the server has
        h.clear_meta_contexts()
        contexts.clear()
        assert h.opt_list_meta_context(on_context) == 1
        assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
        # a context the server does not have is not listed
        h.add_meta_context("qemu:dirty-bitmap:nope")
        contexts.clear()
        assert h.opt_list_meta_context(on_context) == 0
        assert contexts == []
        h.clear_meta_contexts()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

        exports: list[tuple[str, str]] = []

        def on_export(name: str, description: str) -> int:
            exports.append((name, description))
            return 0

        assert h.opt_list(on_export) == 1
        assert exports == [("opt", "option mode")]

        h.set_export_name("no-such-export")
        with pytest.raises(nbd.Error):
            h.opt_info()
        h.set_export_name("opt")
        h.opt_info()
        assert h.get_size() == 5 * MiB
        assert h.can_multi_conn()

        h.opt_go()
        assert h.aio_is_ready()
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.pwrite(b"\x99" * 512, 0)
        assert h.pread(512, 0) == b"\x99" * 512


# -- cross-check against qemu-nbd ---------------------------------------------------------

def wait_for_unix_socket(path: str, proc: subprocess.Popen[bytes], limit: float = 20.0) -> None:
    """Wait (bounded) until something accepts connections on ``path``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"qemu-nbd exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(path)
                # qemu-nbd -t with a quiet probe: take the greeting, then leave
                probe.recv(18)
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"qemu-nbd did not listen on {path} within {limit} s")


def test_cross_check_with_qemu_nbd(pynbd_server: Callable[..., Any],
                                   raw_image: Callable[..., Path], tmp_path: Path) -> None:
    size = 16 * MiB
    image = raw_image(size)
    fd = os.open(image, os.O_RDWR)
    try:
        for offset, length in SPARSE_DATA:
            os.pwrite(fd, b"\x3c" * length, offset)
        os.fsync(fd)
    finally:
        os.close(fd)

    qsock = str(tmp_path / "qemu.sock")
    qemu = subprocess.Popen([tool("qemu-nbd"), "-r", "-e", "0", "-t", "-f", "raw", "-k", qsock,
                             str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_unix_socket(qsock, qemu)
        quri = f"nbd+unix:///?socket={qsock}"
        srv = pynbd_server("-r", "-e", "0", str(image))

        ours, theirs = map_extents(srv.uri), map_extents(quri)
        assert ours == theirs
        assert ours == expected_sparse_map(size, SPARSE_DATA)

        keys = ("is_read_only", "can_multi_conn", "can_trim", "can_zero", "export-size")
        our_info, their_info = export_info(srv.uri), export_info(quri)
        assert {k: our_info[k] for k in keys} == {k: their_info[k] for k in keys}
        assert our_info["is_read_only"] is True
        assert our_info["can_multi_conn"] is True

        out_ours, out_theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
        run([tool("nbdcopy"), srv.uri, str(out_ours)])
        run([tool("nbdcopy"), quri, str(out_theirs)])
        assert out_ours.read_bytes() == out_theirs.read_bytes() == image.read_bytes()
    finally:
        qemu.kill()
        qemu.wait(10)
        if qemu.stderr is not None:
            qemu.stderr.close()
