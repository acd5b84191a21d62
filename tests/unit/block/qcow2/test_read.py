"""Reads and block status of images made by qemu-img/qemu-io, compared with qemu's own
conversion to raw."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from tests.unit.block.qcow2.images import (
    assert_clean,
    close_node,
    create,
    needs_qemu,
    open_file,
    qemu_img,
    qemu_io,
    same_as_raw,
    to_raw,
)
from tests.unit.block.support import check_extents, read, run

from pynbd.block.node import Extent, ExtentFlags
from pynbd.block.qcow2 import Qcow2Error, Qcow2Node, entries

if TYPE_CHECKING:
    import pathlib

pytestmark = needs_qemu
KIB, MIB = 1024, 1024 * 1024
HOLE = ExtentFlags.HOLE | ExtentFlags.ZERO

#: writes made by qemu-io in every image: patterns, zeroes, a discard
WRITES = ("write -P 0x11 0 100k", "write -P 0x22 1000k 70k", "write -P 0x33 3m 7k",
          "write -P 0x44 2m 4m", "write -z 2500k 1m", "discard 4m 512k",
          "write -P 0x55 7m 1k", "write -P 0x66 8388096 512")

OPTION_SETS = [
    ("v3-64k", ()),
    ("v2", ("compat=0.10",)),
    ("c512", ("cluster_size=512",)),
    ("c2m", ("cluster_size=2M",)),
    ("refbits1", ("refcount_bits=1",)),
    ("refbits64", ("refcount_bits=64", "cluster_size=4k")),
    ("extl2", ("extended_l2=on",)),
    ("extl2-16k", ("extended_l2=on", "cluster_size=16k")),
    ("lazy", ("lazy_refcounts=on",)),
    ("prealloc", ("preallocation=metadata",)),
]


async def _read_all(node: Qcow2Node) -> bytes:
    return await read(node, 0, node.size)


@pytest.mark.parametrize("options", [o for _, o in OPTION_SETS],
                         ids=[name for name, _ in OPTION_SETS])
def test_reads_match_qemu(tmp_path: pathlib.Path, options: tuple[str, ...]) -> None:
    image = create(tmp_path / "a.qcow2", 8 * MIB, *options)
    qemu_io(image, *WRITES)
    want = to_raw(image, tmp_path / "a.raw")
    node = open_file(image, read_only=True)

    async def body() -> None:
        assert await _read_all(node) == want
        # unaligned reads across cluster and subcluster edges
        for offset, length in ((1, 5000), (100 * KIB - 3, 7), (2500 * KIB - 1, MIB + 2),
                               (8 * MIB - 513, 513)):
            assert await read(node, offset, length) == want[offset:offset + length]
        pos = 0
        while pos < node.size:
            extents = await check_extents(node, pos, node.size - pos)
            for extent in extents:
                chunk = want[pos:pos + extent.length]
                if extent.flags & ExtentFlags.ZERO:
                    assert chunk.count(0) == len(chunk)
                pos += extent.length
        await close_node(node)

    run(body())


def test_block_status_states(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "a.qcow2", MIB)
    qemu_io(image, "write -P 1 0 64k", "write -z 128k 64k", "write -P 2 256k 64k",
            "write -z 256k 64k")
    node = open_file(image, read_only=True)
    extents = run(node.block_status(0, node.size))
    # data, unallocated, zero (no host), zero with its host cluster kept, unallocated
    assert extents == [Extent(64 * KIB, ExtentFlags.DATA), Extent(192 * KIB, HOLE),
                       Extent(64 * KIB, ExtentFlags.ZERO), Extent(704 * KIB, HOLE)]
    run(close_node(node))


def test_compressed(tmp_path: pathlib.Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"".join(bytes([i % 251]) * 3000 + bytes(range(256)) * 4
                             for i in range(1000)))
    for cluster in ("512", "64k", "2M"):
        image = tmp_path / f"c{cluster}.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"cluster_size={cluster}", str(raw), str(image))
        node = open_file(image, read_only=True)
        data = raw.read_bytes()
        assert run(read(node, 0, len(data))) == data
        assert run(read(node, 5000, 70000)) == data[5000:75000]
        run(close_node(node))


@pytest.mark.parametrize("options", [(), ("extended_l2=on",)], ids=["v3", "extl2"])
def test_zstd(tmp_path: pathlib.Path, options: tuple[str, ...]) -> None:
    """zstd-compressed clusters (python3-zstandard, a test dependency) read back,
    and writes over them copy them out (the image stays clean and right)."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * 4096 + bytes(1 << 20))
    image = tmp_path / "z.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             ",".join(("compression_type=zstd", *options)), str(raw), str(image))
    node = open_file(image)
    assert run(read(node, 0, node.size)) == raw.read_bytes()
    run(node.pwrite(b"\xab" * 1000, 70000))  # into the middle of a compressed cluster
    run(close_node(node))
    mirror = bytearray(raw.read_bytes())
    mirror[70000:71000] = b"\xab" * 1000
    raw.write_bytes(mirror)
    assert_clean(image)
    assert same_as_raw(image, raw)


def test_zstd_without_the_module_is_refused(tmp_path: pathlib.Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * 256)
    image = tmp_path / "z.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
             str(raw), str(image))
    monkeypatch.setattr(entries, "_zstd", None)
    with pytest.raises(Qcow2Error, match="zstandard"):
        open_file(image, read_only=True)


@pytest.mark.parametrize("options", [(), ("extended_l2=on",), ("compat=0.10",)],
                         ids=["v3", "extl2", "v2"])
def test_backing_chain(tmp_path: pathlib.Path, options: tuple[str, ...]) -> None:
    """Unallocated ranges come from the backing node; past its end they read zeroes."""
    base = create(tmp_path / "base.qcow2", 3 * MIB, *options)
    qemu_io(base, "write -P 0x71 0 3m")
    top = create(tmp_path / "top.qcow2", 5 * MIB, "backing_file=base.qcow2",
                 "backing_fmt=qcow2", *options)
    qemu_io(top, "write -P 0x72 10k 3k", "write -P 0x73 1m 100k", "write -z 2m 64k",
            "write -P 0x74 4m 8k")
    want = to_raw(top, tmp_path / "top.raw")
    base_node = open_file(base, read_only=True)
    node = open_file(top, backing=base_node, read_only=True)
    assert node.children == {"file": node.file, "backing": base_node}
    assert node.header.backing_file == "base.qcow2"
    assert node.header.backing_format == "qcow2"

    async def body() -> None:
        assert await _read_all(node) == want
        extents = await check_extents(node, 0, node.size)
        assert sum(e.length for e in extents) == node.size
        # the part past the backing node's end is a hole
        assert extents[-1].flags == HOLE
        await close_node(node)

    run(body())


def test_read_only_node_refuses_changes(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "r.qcow2", MIB)
    before = image.read_bytes()
    node = open_file(image, read_only=True)
    assert not node.capabilities.can_write
    for change in (node.pwrite(b"x", 0), node.write_zeroes(0, 65536),
                   node.trim(0, 65536)):
        with pytest.raises(OSError, match="read-only"):
            run(change)
    run(node.flush())
    run(close_node(node))
    assert image.read_bytes() == before
