"""Header parsing and validation: real images, every refusal, and fuzzed headers."""

from __future__ import annotations

import contextlib
import functools
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.block.qcow2.images import create, in_new_loop, needs_qemu, qemu_img
from tests.unit.block.support import read, run

from pynbd.block.memory import MemoryNode
from pynbd.block.qcow2 import ImageInfo, Qcow2Error, Qcow2Node, is_qcow2, read_info
from pynbd.block.qcow2.header import parse_header

if TYPE_CHECKING:
    import pathlib

pytestmark = needs_qemu
MIB = 1024 * 1024


@functools.cache
def template(*options: str) -> bytes:
    """The bytes of a fresh 4 MiB image made with ``options`` (made once)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = create(Path(tmp) / "t.qcow2", 4 * MIB, *options)
        return path.read_bytes()


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def open_bytes(data: bytes, *, read_only: bool = False) -> Qcow2Node:
    node = MemoryNode(len(data))
    in_new_loop(lambda: node.pwrite(data, 0))
    return in_new_loop(lambda: Qcow2Node.open(node, read_only=read_only))


@pytest.mark.parametrize(("options", "version", "cluster", "order", "extl2"), [
    ((), 3, 65536, 4, False),
    (("compat=0.10",), 2, 65536, 4, False),
    (("cluster_size=512", "refcount_bits=1"), 3, 512, 0, False),
    (("cluster_size=2M", "refcount_bits=64"), 3, 2 * MIB, 6, False),
    (("extended_l2=on",), 3, 65536, 4, True),
])
def test_real_headers(options: tuple[str, ...], version: int, cluster: int, order: int,
                      extl2: bool) -> None:
    data = template(*options)
    header = parse_header(data[:cluster], len(data))
    assert (header.version, header.cluster_size, header.refcount_order,
            header.extended_l2) == (version, cluster, order, extl2)
    assert header.size == 4 * MIB
    if version == 3 and cluster > 512:  # qemu writes a feature name table if it fits
        assert header.feature_names[0, 0] == "dirty bit"
    assert header.info() == ImageInfo(version, 4 * MIB, cluster, None, None)


def test_read_info_backing_and_lazy(tmp_path: pathlib.Path) -> None:
    create(tmp_path / "base.qcow2", MIB)
    top = create(tmp_path / "top.qcow2", 2 * MIB, "backing_file=base.qcow2",
                 "backing_fmt=qcow2", "lazy_refcounts=on")
    file = MemoryNode(top.stat().st_size)
    in_new_loop(lambda: file.pwrite(top.read_bytes(), 0))
    info = in_new_loop(lambda: read_info(file))
    assert info == ImageInfo(3, 2 * MIB, 65536, "base.qcow2", "qcow2")
    header = parse_header(top.read_bytes()[:65536], top.stat().st_size)
    assert header.compatible & 1


def test_is_qcow2() -> None:
    assert is_qcow2(template()[:512])
    assert not is_qcow2(b"QFI")
    assert not is_qcow2(bytes(512))


#: (name, offset, struct format, value, message)
BAD = [
    ("magic", 0, ">I", 0x51464900, "bad magic"),
    ("version", 4, ">I", 4, "version 4"),
    ("cluster-bits-small", 20, ">I", 8, "cluster_bits 8"),
    ("cluster-bits-large", 20, ">I", 22, "cluster_bits 22"),
    ("encrypted", 32, ">I", 2, "encrypted"),
    ("l1-too-small", 36, ">I", 0, "L1 table too small"),
    ("l1-unaligned", 40, ">Q", 0x30008, "unaligned"),
    ("l1-absurd", 36, ">I", 1 << 30, "L1 table too large"),
    ("reftable-past-end", 48, ">Q", 1 << 40, "past the end"),
    ("reftable-none", 56, ">I", 0, "no refcount table"),
    ("unknown-incompatible", 72, ">Q", 1 << 9, "bit 9"),
    ("data-file", 72, ">Q", 4, "external data file"),
    ("compression-bit-without-type", 72, ">Q", 8, "compression_type is 0"),
    ("extl2-small-clusters", 72, ">Q", 16, "16 KiB"),
    ("refcount-order", 96, ">I", 7, "refcount_order 7"),
    ("header-length", 100, ">I", 100, "header_length"),
    ("size-absurd", 24, ">Q", 1 << 63, "too large"),
]


@pytest.mark.parametrize(("offset", "fmt", "value", "message"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_headers_are_refused(offset: int, fmt: str, value: int, message: str) -> None:
    data = template("cluster_size=4k")
    if offset == 72 and value == 16:
        data = template("cluster_size=4k")
    bad = patched(data, offset, fmt, value)
    with pytest.raises(Qcow2Error, match=message):
        parse_header(bad[:4096], len(bad))
    with pytest.raises(Qcow2Error, match=message):
        open_bytes(bad)


def test_unknown_feature_is_named_from_the_table() -> None:
    data = bytearray(template())
    header = parse_header(bytes(data[:65536]), len(data))
    assert (0, 0) in header.feature_names
    # rename feature "dirty bit" in the table to bit 7, then set bit 7
    at = bytes(data).index(b"dirty bit")
    data[at - 1] = 7
    bad = patched(bytes(data), 72, ">Q", 1 << 7)
    with pytest.raises(Qcow2Error, match="'dirty bit'"):
        parse_header(bad[:65536], len(bad))


def test_corrupt_images_open_read_only_only() -> None:
    bad = patched(template(), 72, ">Q", 2)
    with pytest.raises(Qcow2Error, match="corrupt"):
        open_bytes(bad)
    node = open_bytes(bad, read_only=True)
    assert not node.capabilities.can_write
    assert run(read(node, 0, 4096)) == bytes(4096)


def test_dirty_images_with_snapshots_are_repaired_read_write(tmp_path: pathlib.Path) -> None:
    """(tests/unit/block/qcow2/test_rebuild.py repairs images qemu left dirty.)"""
    image = create(tmp_path / "s.qcow2", MIB)
    qemu_img("snapshot", "-c", "s1", str(image))
    dirty = patched(image.read_bytes(), 72, ">Q", 1)
    assert open_bytes(dirty, read_only=True).header.incompatible == 1
    assert open_bytes(dirty).header.incompatible == 0


def test_unknown_autoclear_bits_cleared_on_first_write(tmp_path: pathlib.Path) -> None:
    data = patched(template(), 88, ">Q", 1 << 5 | 1 << 1)
    node = open_bytes(data)
    assert struct.unpack_from(">Q", run(read(node.file, 88, 8)))[0] == 1 << 5 | 1 << 1
    run(node.pwrite(b"x", 0))
    assert struct.unpack_from(">Q", run(read(node.file, 88, 8)))[0] == 1 << 1


def _extensions_end(data: bytes | bytearray) -> int:
    """Where the end-of-extensions marker lies."""
    pos = struct.unpack_from(">I", data, 100)[0]  # header_length
    while struct.unpack_from(">I", data, pos)[0] != 0:
        pos += 8 + (struct.unpack_from(">I", data, pos + 4)[0] + 7) // 8 * 8
    return int(pos)


def test_unknown_extensions_are_kept() -> None:
    data = bytearray(template())
    header = parse_header(bytes(data[:65536]), len(data))
    assert header.unknown_extensions == ()
    struct.pack_into(">II4s4x", data, _extensions_end(data), 0x12345678, 4, b"abcd")
    header = parse_header(bytes(data[:65536]), len(data))
    assert header.unknown_extensions == ((0x12345678, b"abcd"),)
    assert header.feature_names  # the extensions before it still count


def test_extension_running_past_the_header_area() -> None:
    data = bytearray(template("cluster_size=512"))
    struct.pack_into(">II", data, _extensions_end(data), 0x12345678, 1000)
    with pytest.raises(Qcow2Error, match="runs past"):
        parse_header(bytes(data[:512]), len(data))


@functools.cache
def _fuzz_bases() -> list[bytes]:
    return [template("cluster_size=512")[:512], template("compat=0.10", "cluster_size=512")[:512],
            template("extended_l2=on", "cluster_size=16k")[:1024]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_headers_never_crash(data: bytes) -> None:
    for candidate in (data, b"QFI\xfb" + data):
        with contextlib.suppress(Qcow2Error):
            parse_header(candidate, len(candidate) + 4096)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.integers(0, 2), mutations=st.lists(
    st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=8),
    file_size=st.integers(0, 1 << 22))
def test_mutated_headers_never_crash(base: int, mutations: list[tuple[int, int]],
                                     file_size: int) -> None:
    data = bytearray(_fuzz_bases()[base])
    for pos, value in mutations:
        if pos < len(data):
            data[pos] = value
    with contextlib.suppress(Qcow2Error):
        parse_header(bytes(data), file_size)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)),
                          min_size=1, max_size=6))
def test_mutated_images_open_or_refuse(mutations: list[tuple[int, int]]) -> None:
    """Mutations of the header, L1 and refcount table: open refuses with Qcow2Error,
    or the node reads (an EIO for an entry pointing nowhere) and never hangs."""
    data = bytearray(template("cluster_size=512"))
    for pos, value in mutations:
        data[pos % len(data)] = value
    try:
        node = open_bytes(bytes(data), read_only=True)
    except Qcow2Error:
        return
    try:
        run(read(node, 0, min(node.size, 64 * 1024)))
        run(node.block_status(0, min(node.size, 1 << 30)))
    except OSError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)),
                          min_size=1, max_size=4),
       writes=st.lists(st.tuples(st.integers(0, 4 * MIB - 1), st.integers(1, 5000)),
                       min_size=1, max_size=4))
def test_writes_to_mutated_images_fail_cleanly(mutations: list[tuple[int, int]],
                                               writes: list[tuple[int, int]]) -> None:
    """Writes over damaged metadata either work or raise OSError; nothing else."""
    data = bytearray(template("cluster_size=512"))
    for pos, value in mutations:
        data[pos % len(data)] = value
    try:
        node = open_bytes(bytes(data))
    except Qcow2Error:
        return

    async def body() -> None:
        for offset, length in writes:
            if offset < node.size:
                length = min(length, node.size - offset)
                await node.pwrite(b"w" * length, offset)
                await node.write_zeroes(offset, length, may_trim=True)
                await node.trim(offset, length)

    with contextlib.suppress(OSError):
        run(body())
