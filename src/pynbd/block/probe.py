"""Format probing: which image format the first bytes of an image say it is.

Rules of this module: as qemu probes, by magic number only; what no format
claims is raw.  It reads at most ``PROBE_BYTES`` (qemu's BLOCK_PROBE_BUF_SIZE),
and a raw image that was probed has its first ``PROBE_BYTES`` guarded against
becoming something a later probe would take for another format
(``pynbd.block.raw``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import Node

#: how much of an image probing looks at (qemu's BLOCK_PROBE_BUF_SIZE)
PROBE_BYTES = 512
#: a qcow2 header starts with "QFI\xfb" (qcow2.rst)
QCOW2_MAGIC = b"QFI\xfb"


def probe_bytes(head: bytes | bytearray | memoryview) -> str:
    """The format the image starting with ``head`` is: ``qcow2`` or ``raw``."""
    return "qcow2" if bytes(head[:len(QCOW2_MAGIC)]) == QCOW2_MAGIC else "raw"


async def probe_format(node: Node) -> str:
    """The format of the image ``node`` holds (reads its first bytes)."""
    head = bytearray(min(node.size, PROBE_BYTES))
    if head:
        await node.pread(memoryview(head), 0)
    return probe_bytes(head)
