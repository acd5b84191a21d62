"""Creating a new, empty qcow2 image (version 3) on a node: ``create_image``.

Owns the layout of a fresh image, after qemu's docs/interop/qcow2.rst:
cluster 0 holds the 104-byte version 3 header, the header extensions (the
backing format name, if any, then the end-of-extensions marker) and the
backing file name, if any; the refcount table follows from cluster 1, then
the refcount blocks that count every metadata cluster (refcount 1 each,
16-bit entries: refcount_order 4), then the L1 table, all zeroes (every
guest cluster unallocated).  No snapshots, no feature bits set.

Rules of this module:
- The node must be empty and ``Growable``: it is grown to its final size
  (new bytes read as zeroes, so the L1 table and the rest of each table need
  no writing), the refcounts and the table written, the header last, and the
  whole flushed; only then is it a qcow2 image.
- Sizes qemu could not open are refused with ``Qcow2Error`` (an L1 table over
  qemu's 32 MiB limit, a backing file name that does not fit in cluster 0).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

from ..node import Growable
from .header import (
    EXT_BACKING_FORMAT,
    EXT_END,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_SIZE,
    MIN_CLUSTER_BITS,
    V3_LENGTH,
    Qcow2Error,
    l1_entries_needed,
)

if TYPE_CHECKING:
    from ..node import Node

DEFAULT_CLUSTER_SIZE = 1 << 16
#: 16-bit refcounts, qemu's default
REFCOUNT_ORDER = 4
#: magic .. header_length: the version 3 header without additional fields
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
_EXTENSION = struct.Struct(">II")
assert _HEADER.size == V3_LENGTH


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the metadata of a new image goes (offsets in bytes)."""

    cluster_bits: int
    l1_size: int
    #: 0 when the L1 table is empty (a disk of size 0)
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    refcount_block_offsets: tuple[int, ...]
    #: clusters of metadata, all counted: the image's initial length in clusters
    clusters: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def file_size(self) -> int:
        return self.clusters << self.cluster_bits


def plan(size: int, cluster_size: int = DEFAULT_CLUSTER_SIZE) -> Layout:
    """The layout of a new image of virtual ``size`` bytes."""
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not (
            MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS):
        raise ValueError(f"cluster size {cluster_size} is not a power of two from 512 "
                         "to 2M")
    if not 0 <= size <= MAX_SIZE:
        raise Qcow2Error(f"invalid virtual size {size}")
    l1_size = l1_entries_needed(size, cluster_bits, cluster_size // 8)
    if l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2Error("The image size is too large for file format 'qcow2' (try using "
                         "a larger cluster size)")
    l1_clusters = -(-l1_size * 8 // cluster_size)
    per_block = cluster_size * 8 >> REFCOUNT_ORDER
    table_clusters = blocks = 1
    while True:  # the counts cover the blocks and the table themselves
        clusters = 1 + table_clusters + blocks + l1_clusters
        need_blocks = -(-clusters // per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if need_blocks <= blocks and need_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    first_block = 1 + table_clusters
    l1_cluster = first_block + blocks
    return Layout(
        cluster_bits=cluster_bits, l1_size=l1_size,
        l1_table_offset=l1_cluster << cluster_bits if l1_size else 0,
        refcount_table_offset=1 << cluster_bits, refcount_table_clusters=table_clusters,
        refcount_block_offsets=tuple((first_block + n) << cluster_bits
                                     for n in range(blocks)),
        clusters=clusters)


def header_bytes(layout: Layout, size: int, backing_file: str | None = None,
                 backing_format: str | None = None) -> bytes:
    """Cluster 0 up to its last byte in use: header, extensions, backing file name."""
    if backing_format is not None and backing_file is None:
        raise Qcow2Error("Backing format cannot be used without backing file")
    extensions = b""
    if backing_format is not None:
        name = backing_format.encode("utf-8")
        extensions += _EXTENSION.pack(EXT_BACKING_FORMAT, len(name)) + name
        extensions += bytes(-len(extensions) % 8)
    extensions += _EXTENSION.pack(EXT_END, 0)
    backing = b"" if backing_file is None else backing_file.encode("utf-8")
    if len(backing) > MAX_BACKING_NAME:
        raise Qcow2Error(f"backing file name too long ({len(backing)} bytes, at most "
                         f"{MAX_BACKING_NAME})")
    backing_offset = V3_LENGTH + len(extensions) if backing_file is not None else 0
    if V3_LENGTH + len(extensions) + len(backing) > layout.cluster_size:
        raise Qcow2Error("backing file name and format do not fit in the first cluster")
    header = _HEADER.pack(
        MAGIC, 3, backing_offset, len(backing), layout.cluster_bits, size,
        0,  # crypt_method: none
        layout.l1_size, layout.l1_table_offset,
        layout.refcount_table_offset, layout.refcount_table_clusters,
        0, 0,  # nb_snapshots, snapshots_offset
        0, 0, 0,  # incompatible, compatible, autoclear features
        REFCOUNT_ORDER, V3_LENGTH)
    return header + extensions + backing


def refcount_block(layout: Layout, number: int) -> bytes:
    """The part of refcount block ``number`` that is not zero: a 1 for each
    metadata cluster it covers."""
    per_block = layout.cluster_size * 8 >> REFCOUNT_ORDER
    counted = min(per_block, layout.clusters - number * per_block)
    return struct.pack(f">{counted}H", *([1] * counted))


async def create_image(file: Node, size: int, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                       backing_file: str | None = None,
                       backing_format: str | None = None) -> Layout:
    """Make ``file`` (empty, growable, writable) a new qcow2 image of virtual ``size``
    bytes, naming ``backing_file`` (in ``backing_format``) if given; its layout.

    Raises:
        Qcow2Error: a size or name qemu could not open.
        ValueError: ``file`` is not empty or cannot grow, or a bad cluster size.
    """
    layout = plan(size, cluster_size)
    first = header_bytes(layout, size, backing_file, backing_format)
    if file.size:
        raise ValueError(f"a new qcow2 image needs an empty node ({file.size} bytes)")
    if not isinstance(file, Growable):
        raise ValueError("a new qcow2 image needs a node that can grow")
    await file.grow(layout.file_size)
    for number, offset in enumerate(layout.refcount_block_offsets):
        await file.pwrite(refcount_block(layout, number), offset)
    table = struct.pack(f">{len(layout.refcount_block_offsets)}Q",
                        *layout.refcount_block_offsets)
    await file.pwrite(table, layout.refcount_table_offset)
    await file.flush()  # the tables are durable before the header makes them an image
    await file.pwrite(first, 0)
    await file.flush()
    return layout
