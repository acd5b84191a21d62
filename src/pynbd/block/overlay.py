"""``-s``/``--snapshot``: a temporary qcow2 overlay over a node, so that the node is
never written.

Owns ``open_overlay``: a new qcow2 image (``qcow2.create``) of the base node's
size in a temporary file, opened as a ``Qcow2Node`` whose backing is the base
node, and added to the graph with generated names (the file, then the
overlay), so that the final flush and close handle it as any node; what
fails is an ``OverlayError`` of one line.

Rules of this module:
- The temporary file is made as qemu's ``get_tmp_filename`` makes it: in
  ``$TMPDIR``, else ``/var/tmp``, named ``vl.XXXXXXXX``, created exclusively
  with mode 0600; it is unlinked as soon as it is open, so it is gone when the
  server ends, however it ends (the open fd is the only hold on it).
- It inherits the image's ``cache.direct`` (``--cache none|directsync``), as
  qemu's temporary overlay inherits its parent's flags.
- Its flushes do nothing (qemu gives a temporary overlay ``cache.no-flush``):
  data nobody can reopen needs no durability; what connections share is the
  one fd, so multi-conn holds as for any file.
- One overlay node serves every connection: nothing here is private to one.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

from .directfile import DirectFileNode
from .file import FileNode
from .qcow2 import Qcow2Node
from .qcow2.create import create_image

if TYPE_CHECKING:
    from .graph import BlockGraph
    from .node import Node


class OverlayError(ValueError):
    """The overlay cannot be made; the message is one line (qemu's wording)."""

#: qemu's temporary file names: vl.XXXXXX
TEMP_PREFIX = "vl."
#: qemu's directory when $TMPDIR is not set (disk images do not belong in a tmpfs)
DEFAULT_TEMP_DIR = "/var/tmp"


def temp_dir() -> str:
    """Where temporary overlays go: ``$TMPDIR``, else ``/var/tmp``."""
    return os.environ.get("TMPDIR") or DEFAULT_TEMP_DIR


class TemporaryFile(FileNode):
    """The overlay's file: already unlinked, so its flush has nothing to keep."""

    async def flush(self) -> None:
        return


class DirectTemporaryFile(TemporaryFile, DirectFileNode):
    """The overlay's file with ``O_DIRECT``, when the image has ``cache.direct``."""


def _temporary_file(direct: bool) -> TemporaryFile:
    """A new, empty file in ``temp_dir()``, open (``O_DIRECT`` with ``direct``) and
    already unlinked."""
    directory = temp_dir()
    try:
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)  # mode 0600
    except OSError as err:
        raise OverlayError(f"Could not open temporary file "
                           f"'{os.path.join(directory, TEMP_PREFIX)}XXXXXX': "
                           f"{err.strerror or err}") from None
    try:
        return DirectTemporaryFile(path) if direct else TemporaryFile(path)
    except OSError as err:
        raise OverlayError(f"Could not open temporary file '{path}': "
                           f"{err.strerror or err}") from None
    finally:
        os.unlink(path)
        os.close(fd)


async def open_overlay(graph: BlockGraph, base: Node, *, direct: bool = False) -> Qcow2Node:
    """A writable temporary qcow2 overlay over ``base`` (its backing), of ``base``'s
    size, added to ``graph`` with its file; with ``direct`` (the image's
    ``cache.direct``, which qemu's overlay inherits) the file bypasses the page cache.

    Raises:
        OverlayError: the temporary file cannot be made or written, or the base
            is too large for a qcow2 image.
    """
    file = _temporary_file(direct)
    try:
        await create_image(file, base.size)
        overlay = await Qcow2Node.open(file, backing=base)
    except (OSError, ValueError) as err:  # Qcow2Error is a ValueError
        await file.close()
        message = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise OverlayError(f"Could not create temporary overlay '{file.path}': "
                           f"{message}") from None
    except BaseException:
        await file.close()
        raise
    graph.add(file, graph.generated_name())
    graph.add(overlay, graph.generated_name())
    return overlay
