"""Zero detection on writes (qemu's ``detect-zeroes``, ``--detect-zeroes on|unmap``).

Rules of this module:
- ``DetectZeroesFilter`` turns a write whose payload is all zeroes into a
  ``write_zeroes`` of the same range, with the same FUA; with ``unmap`` one
  that may punch a hole (``may_trim``), as qemu adds ``BDRV_REQ_MAY_UNMAP``.
  Every other request, and every write with a non-zero byte, goes down as it
  came.
- The check costs one ``memcmp`` against a shared buffer of zeroes
  (``bytes.startswith``), which stops at the first non-zero byte: no Python
  loop over bytes.
- The filter is in the graph only when the option is on, so with it off the
  request path is unchanged.  With it on, reads keep every fast path of the
  node below; the write fast paths (``pwrite_nowait``, ``start_write``) are
  kept adapted: a zero payload declines them (the server then calls
  ``pwrite``, which zeroes), anything else takes them as before.
- The filter is implicit (qemu's detect-zeroes is a flag of the node, not a
  node of its own): queries show the node under it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, cast

from .fileio import ZEROES, as_bytes
from .filter import FilterNode

if TYPE_CHECKING:
    from .node import Data, FastPaths, Node, WriteDone

#: the zeroes every payload is compared with (fileio's shared buffer)
_ZERO = cast("bytes", ZEROES.obj)
_STEP = len(_ZERO)


def is_zero(data: Data) -> bool:
    """Whether every byte of ``data`` is zero (an empty buffer is)."""
    if len(data) <= _STEP:
        return _ZERO.startswith(data)
    view = as_bytes(data)
    return all(_ZERO.startswith(view[pos:pos + _STEP]) for pos in range(0, len(view), _STEP))


def _nbytes(data: Data) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class DetectZeroesFilter(FilterNode):
    """Writes of zeroes become ``write_zeroes`` on ``child``; ``unmap``: ones that may
    punch holes."""

    driver = "detect-zeroes"

    def __init__(self, child: Node, *, unmap: bool = False) -> None:
        super().__init__(child)
        self.unmap = unmap
        self.implicit = True

    def __repr__(self) -> str:
        return f"DetectZeroesFilter({self.child!r}, unmap={self.unmap})"

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        length = _nbytes(data)
        if length and is_zero(data):
            await self.child.write_zeroes(offset, length, may_trim=self.unmap, fua=fua)
        else:
            await self.child.pwrite(data, offset, fua=fua)

    def fast_paths(self) -> FastPaths:
        paths = super().fast_paths()  # the child's reads; its writes dropped
        below = self.child.resolve().fast_paths()
        nowait, start = below.pwrite_nowait, below.start_write
        if nowait is not None:
            def pwrite_nowait(data: Data, offset: int) -> bool:
                return not is_zero(data) and nowait(data, offset)

            paths = dataclasses.replace(paths, pwrite_nowait=pwrite_nowait)
        if start is not None:
            def start_write(data: Data, offset: int, fua: bool, done: WriteDone) -> bool:
                return not is_zero(data) and start(data, offset, fua, done)

            paths = dataclasses.replace(paths, start_write=start_write)
        return paths
