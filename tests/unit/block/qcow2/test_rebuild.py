"""Dirty images with internal snapshots and persistent bitmaps: qemu with lazy
refcounts dies after writing, and opening the image read-write repairs it.

qemu-img is the oracle: after the repair and further writes, ``qemu-img check``
finds the image clean, the active layer matches a raw mirror, every snapshot
still reads as it was taken, and the bitmaps are still listed."""

from __future__ import annotations

import json
import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.unit.block.qcow2.images import (
    assert_clean,
    check,
    close_node,
    create,
    needs_qemu,
    open_file,
    qemu_img,
    same_as_raw,
)
from tests.unit.block.support import pattern, run

from pynbd.block.qcow2 import Qcow2Error

if TYPE_CHECKING:
    import pathlib

pytestmark = needs_qemu

MIB = 1 << 20
KIB = 1 << 10


def crash_after(image: pathlib.Path, *commands: str) -> None:
    """qemu-io runs ``commands`` on the image and aborts (no clean close)."""
    args = " ".join(f"-c '{command}'" for command in commands)
    done = subprocess.run(["sh", "-c", f"ulimit -c 0; exec qemu-io {args} -c abort {image}"],
                          capture_output=True, check=False)
    assert done.returncode != 0
    assert check(image)["corruptions"] > 0  # refcounts missing: the image needs repair


def snapshot_bytes(image: pathlib.Path, name: str, out: pathlib.Path) -> bytes:
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.name={name}",
             str(image), str(out))
    return out.read_bytes()


@pytest.mark.parametrize(("options", "with_snapshot", "with_bitmap"), [
    (("cluster_size=4k",), True, False),
    (("cluster_size=4k",), True, True),
    (("cluster_size=64k",), True, False),
    (("cluster_size=64k",), True, True),
    (("cluster_size=32k", "extended_l2=on"), True, False),
    (("cluster_size=32k", "extended_l2=on"), True, True),
    # refcounts of one bit cannot count a snapshot's second reference: a bitmap only
    (("cluster_size=512", "refcount_bits=1"), False, True),
], ids=["c4k", "c4k-bitmap", "c64k", "c64k-bitmap", "extl2", "extl2-bitmap",
        "c512-ref1-bitmap"])
def test_dirty_image_with_snapshots_is_repaired(tmp_path: pathlib.Path,
                                                options: tuple[str, ...],
                                                with_snapshot: bool, with_bitmap: bool) -> None:
    image = create(tmp_path / "d.qcow2", 4 * MIB, "lazy_refcounts=on", *options)
    subprocess.run(["qemu-io", "-c", "write -P 1 0 1m", str(image)], check=True,
                   capture_output=True)
    if with_snapshot:
        qemu_img("snapshot", "-c", "s1", str(image))
    if with_bitmap:
        qemu_img("bitmap", "--add", str(image), "b0")
    crash_after(image, "write -P 2 512k 1m", "write -P 3 3m 100k")

    node = open_file(image)
    assert not node.header.incompatible & 1
    # into clusters the snapshot shares: copied, never written in place
    run(node.pwrite(pattern(4, 5000), 100 * KIB))
    run(node.pwrite(pattern(5, 70000), 2 * MIB))
    run(close_node(node))
    assert_clean(image)

    want = bytearray(4 * MIB)
    want[0:MIB] = b"\1" * MIB
    want[512 * KIB:1536 * KIB] = b"\2" * MIB
    want[3 * MIB:3 * MIB + 100 * KIB] = b"\3" * (100 * KIB)
    want[100 * KIB:100 * KIB + 5000] = pattern(4, 5000)
    want[2 * MIB:2 * MIB + 70000] = pattern(5, 70000)
    raw = tmp_path / "want.raw"
    raw.write_bytes(want)
    assert same_as_raw(image, raw)
    if with_snapshot:
        taken = snapshot_bytes(image, "s1", tmp_path / "s1.raw")
        assert taken == b"\1" * MIB + bytes(3 * MIB)
    if with_bitmap:
        info = json.loads(qemu_img("info", "--output=json", str(image)))
        names = [bitmap["name"] for bitmap in
                 info["format-specific"]["data"].get("bitmaps", [])]
        assert names == ["b0"]


def test_dirty_image_sharing_an_l1_table_is_refused(tmp_path: pathlib.Path) -> None:
    """A snapshot whose L1 table is the active one: a cluster only one table may use,
    used twice.  Refused with the repair hint, read-only still opens."""
    image = create(tmp_path / "x.qcow2", MIB, "lazy_refcounts=on")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", str(image)], check=True,
                   capture_output=True)
    qemu_img("snapshot", "-c", "s1", str(image))
    data = bytearray(image.read_bytes())
    l1_offset = int.from_bytes(data[40:48], "big")
    snapshots_offset = int.from_bytes(data[64:72], "big")
    data[snapshots_offset:snapshots_offset + 8] = l1_offset.to_bytes(8, "big")
    data[72:80] = (1).to_bytes(8, "big")  # dirty
    image.write_bytes(data)
    with pytest.raises(Qcow2Error, match=r"clusters used twice: repair it with 'qemu-img "
                                         r"check -r all'"):
        open_file(image)
    node = open_file(image, read_only=True)
    run(close_node(node))
