"""qemu's lazy-refcounts option: a lazy image is marked dirty while written to and
clean again on close; the option overrides the image's compatible bit."""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

import pytest
from tests.unit.block.qcow2.images import assert_clean, create, needs_qemu

from pynbd.block.file import FileNode
from pynbd.block.qcow2 import Qcow2Error, Qcow2Node

if TYPE_CHECKING:
    import pathlib

pytestmark = needs_qemu

DIRTY = 1  # incompatible bit 0


def incompatible(path: pathlib.Path) -> int:
    value: int = struct.unpack_from(">Q", path.read_bytes(), 72)[0]
    return value


@pytest.mark.parametrize(("options", "lazy", "dirty_while_open"), [
    (("lazy_refcounts=on",), None, True),  # the image's bit
    (("lazy_refcounts=off",), None, False),
    (("lazy_refcounts=off",), True, True),  # the option overrides it
    (("lazy_refcounts=on",), False, False),
])
def test_dirty_while_written(tmp_path: pathlib.Path, options: tuple[str, ...],
                             lazy: bool | None, dirty_while_open: bool) -> None:
    image = create(tmp_path / "lazy.qcow2", 1 << 20, *options)

    async def body() -> None:
        file = FileNode(str(image))
        node = await Qcow2Node.open(file, lazy_refcounts=lazy)
        await node.pwrite(b"x" * 4096, 0)
        assert bool(incompatible(image) & DIRTY) is dirty_while_open
        await node.close()
        await file.close()

    asyncio.run(body())
    assert not incompatible(image) & DIRTY
    assert_clean(image)


def test_v2_images_refuse_lazy_refcounts(tmp_path: pathlib.Path) -> None:
    image = create(tmp_path / "v2.qcow2", 1 << 20, "compat=0.10")

    async def body() -> None:
        file = FileNode(str(image))
        try:
            with pytest.raises(Qcow2Error, match=r"at least qemu 1\.1 compatibility"):
                await Qcow2Node.open(file, lazy_refcounts=True)
        finally:
            await file.close()

    asyncio.run(body())
