"""L1 and L2 entries: decoding and encoding them, and decompressing compressed clusters.

Owns the bit layouts of qemu's docs/interop/qcow2.rst "Cluster mapping" and
"Extended L2 Entries".  Standard and extended entries are seen the same way:
a cluster is split in ``subclusters`` parts (32 with extended L2, else 1), and
an entry says, per part, whether it is allocated (data at the host offset),
reads as zeroes, or is unallocated (the backing node's bytes, or zeroes).
"""

from __future__ import annotations

import dataclasses
import importlib
import zlib
from typing import Any

from .header import COMPRESSION_ZSTD, Qcow2Error

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
#: bits 9..55: a host cluster offset (L1 and standard L2 entries)
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
ALL_SUB = 0xFFFF_FFFF

_zstd: Any
try:  # optional: zstd-compressed images need it
    _zstd = importlib.import_module("zstandard")
except ImportError:  # pragma: no cover - depends on the environment
    _zstd = None


def have_zstd() -> bool:
    return _zstd is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Mapping:
    """One L2 entry, decoded.

    ``alloc`` and ``zero`` have one bit per subcluster (bit 0 only without
    extended L2).  For a compressed cluster ``host`` is the byte offset of the
    data, ``csize`` its length in the file, and both masks are 0.
    """

    host: int
    copied: bool
    compressed: bool
    alloc: int
    zero: int
    csize: int = 0


def decode(word: int, bitmap: int, *, extended: bool, cluster_bits: int) -> Mapping:
    """Decode an L2 entry (``bitmap`` is the extended entry's second word, else 0)."""
    if word & COMPRESSED:
        x = 62 - (cluster_bits - 8)
        host = word & ((1 << x) - 1)
        sectors = (word & ((1 << 62) - 1)) >> x
        # the data runs to the end of the last of ``sectors`` further 512-byte sectors
        csize = (sectors + 1) * 512 - (host & 511)
        return Mapping(host, False, True, 0, 0, csize)
    host = word & OFFSET_MASK
    copied = bool(word & COPIED)
    if extended:
        return Mapping(host, copied, False, bitmap & ALL_SUB, bitmap >> 32)
    if word & ZERO_FLAG:
        return Mapping(host, copied, False, 0, 1)
    return Mapping(host, copied, False, 1 if host else 0, 0)


def encode(host: int, copied: bool, alloc: int, zero: int, *,
           extended: bool) -> tuple[int, int]:
    """An L2 entry for a standard cluster: ``(word, bitmap)``.

    Without extended L2, ``alloc`` and ``zero`` are 0 or 1; a zero cluster
    keeps ``host`` (preallocated) when it is given.
    """
    word = host | (COPIED if copied and host else 0)
    if extended:
        return word, (zero << 32) | alloc
    if zero:
        word |= ZERO_FLAG
    return word, 0


def compressed_host_clusters(mapping: Mapping, cluster_bits: int) -> range:
    """The host cluster indices a compressed cluster's data touches."""
    first = mapping.host >> cluster_bits
    last = (mapping.host + mapping.csize - 1) >> cluster_bits
    return range(first, last + 1)


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """A compressed cluster's data, inflated to ``cluster_size`` bytes."""
    if compression_type == COMPRESSION_ZSTD:
        return _unzstd(data, cluster_size)
    inflater = zlib.decompressobj(-15)  # raw deflate, any window up to 32 KiB
    try:
        out = inflater.decompress(data, cluster_size)
    except zlib.error as err:
        raise OSError(5, f"corrupt compressed cluster: {err}") from None
    if len(out) != cluster_size:
        raise OSError(5, "corrupt compressed cluster: short data")
    return out


def _unzstd(data: bytes, cluster_size: int) -> bytes:
    if _zstd is None:  # pragma: no cover - refused at open
        raise Qcow2Error("zstd-compressed image, and the zstandard module is missing")
    try:
        reader = _zstd.ZstdDecompressor().decompressobj()
        out = reader.decompress(data)
    except _zstd.ZstdError as err:
        raise OSError(5, f"corrupt compressed cluster: {err}") from None
    if len(out) < cluster_size:
        raise OSError(5, "corrupt compressed cluster: short data")
    return bytes(out[:cluster_size])
