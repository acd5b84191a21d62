"""The qcow2 image header: parsing and validating it, bytes in, dataclasses out.

Owns the on-disk layout of the header and its extensions (qemu's
docs/interop/qcow2.rst, "Header" and "Header extensions"), the feature bits,
and every check an image must pass before a node is built over it.  Every
problem is a ``Qcow2Error`` with one line naming it; malformed input never
crashes or hangs a parser here (the extension walk is bounded by the first
cluster).  ``header_with_bitmaps`` is the one rewrite of the extension area
(for ``pynbd.block.qcow2.bitmaps``): the bitmaps extension set or dropped,
everything else kept.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..node import Node

MAGIC = b"QFI\xfb"
#: version 2 header: magic .. snapshots_offset
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
#: version 3 additions: incompatible, compatible, autoclear, refcount_order, header_length
_V3 = struct.Struct(">QQQII")
V2_LENGTH = _V2.size
V3_LENGTH = V2_LENGTH + _V3.size
#: byte offsets of fields rewritten in place
OFFSET_INCOMPATIBLE = 72
OFFSET_AUTOCLEAR = 88
OFFSET_REFCOUNT_TABLE = 48  # refcount_table_offset (8 bytes) then _clusters (4 bytes)

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: qemu's limits: 32 MiB of L1 table, 8 MiB of refcount table
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
#: the node interface's limit on a size
MAX_SIZE = (1 << 63) - 1
_FEATURE_ENTRY = 48
#: qemu's limits on the bitmaps extension (QCOW2_MAX_BITMAPS, ..._DIRECTORY_SIZE)
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS
BITMAPS_EXTENSION_LENGTH = 24
_FEATURE_KINDS = ("incompatible", "compatible", "autoclear")


class Qcow2Error(ValueError):
    """A bad or unsupported qcow2 image; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What opening needs to know before the node exists."""

    version: int
    size: int
    cluster_size: int
    backing_file: str | None
    backing_format: str | None


@dataclasses.dataclass(frozen=True)
class Bitmaps:
    """The bitmaps extension: where the bitmap directory is (``qcow2.bitmaps`` reads it)."""

    count: int
    directory_size: int
    directory_offset: int


@dataclasses.dataclass(frozen=True)
class Header:
    """Every field of a validated header and its extensions."""

    version: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int
    compatible: int
    autoclear: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None
    #: (kind, bit) -> name, from the feature name table
    feature_names: dict[tuple[int, int], str]
    #: the bitmaps extension, if present and consistent (autoclear bit 0 set)
    bitmaps: Bitmaps | None
    #: unknown extensions, kept: (type, data)
    unknown_extensions: tuple[tuple[int, bytes], ...]
    #: a bitmaps extension is present but not consistent (autoclear bit 0 clear, or a
    #: version 2 image): ignored, as qemu does, and dropped on the first change
    stale_bitmaps: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    def info(self) -> ImageInfo:
        return ImageInfo(self.version, self.size, self.cluster_size, self.backing_file,
                         self.backing_format)


def is_qcow2(first_bytes: bytes) -> bool:
    """Whether ``first_bytes`` start with the qcow2 magic (probing)."""
    return bytes(first_bytes[:4]) == MAGIC


def l1_entries_needed(size: int, cluster_bits: int, l2_entries: int) -> int:
    """L1 entries that a virtual ``size`` needs."""
    span = (1 << cluster_bits) * l2_entries
    return -(-size // span)


def parse_header(data: bytes, file_size: int) -> Header:
    """Parse and validate the header in ``data`` (the image's first cluster, or as
    much of it as the file holds) of an image file of ``file_size`` bytes."""
    if len(data) < V2_LENGTH:
        raise Qcow2Error(f"image too short for a qcow2 header ({len(data)} bytes)")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size,
     l1_offset, reftable_offset, reftable_clusters, nb_snapshots,
     snapshots_offset) = _V2.unpack_from(data)
    if magic != MAGIC:
        raise Qcow2Error("not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise Qcow2Error(f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"unsupported cluster_bits {cluster_bits} (must be 9..21)")
    cluster_size = 1 << cluster_bits
    incompatible = compatible = autoclear = 0
    refcount_order, header_length, compression = 4, V2_LENGTH, COMPRESSION_DEFLATE
    if version == 3:
        if len(data) < V3_LENGTH:
            raise Qcow2Error("image too short for a version 3 qcow2 header")
        incompatible, compatible, autoclear, refcount_order, header_length = \
            _V3.unpack_from(data, V2_LENGTH)
        if header_length < V3_LENGTH or header_length % 8 or header_length > cluster_size:
            raise Qcow2Error(f"invalid header_length {header_length}")
        if header_length > len(data):
            raise Qcow2Error("image too short for its header_length")
        if header_length > V3_LENGTH:
            compression = data[V3_LENGTH]
    if crypt != 0:
        raise Qcow2Error("encrypted qcow2 images are not supported")
    ext_end = cluster_size if backing_offset == 0 else min(backing_offset, cluster_size)
    extensions = _parse_extensions(data, header_length, min(ext_end, len(data)))
    names = _feature_names(extensions)
    _check_features(incompatible, compression, cluster_bits, names)
    if refcount_order > 6:
        raise Qcow2Error(f"invalid refcount_order {refcount_order} (must be 0..6)")
    bitmaps, stale = _bitmaps(extensions, autoclear, cluster_size, file_size)
    header = Header(
        version=version, cluster_bits=cluster_bits, size=size, crypt_method=crypt,
        l1_size=l1_size, l1_table_offset=l1_offset, refcount_table_offset=reftable_offset,
        refcount_table_clusters=reftable_clusters, nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset, incompatible=incompatible,
        compatible=compatible, autoclear=autoclear, refcount_order=refcount_order,
        header_length=header_length, compression_type=compression,
        backing_file=_backing_name(data, backing_offset, backing_size, file_size),
        backing_format=_string_extension(extensions, EXT_BACKING_FORMAT, "backing format"),
        feature_names=names, bitmaps=bitmaps, stale_bitmaps=stale,
        unknown_extensions=tuple(
            (kind, body) for kind, body in extensions
            if kind not in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS,
                            EXT_CRYPTO, EXT_DATA_FILE)))
    _check_tables(header, file_size)
    return header


def _check_features(incompatible: int, compression: int, cluster_bits: int,
                    names: dict[tuple[int, int], str]) -> None:
    unknown = incompatible & ~INCOMPAT_KNOWN
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        name = names.get((0, bit))
        what = f"'{name}'" if name else f"bit {bit}"
        raise Qcow2Error(f"unsupported incompatible qcow2 feature {what}")
    if incompatible & INCOMPAT_DATA_FILE:
        raise Qcow2Error("qcow2 images with an external data file are not supported")
    if incompatible & INCOMPAT_COMPRESSION:
        if compression == COMPRESSION_DEFLATE:
            raise Qcow2Error("compression type bit set but compression_type is 0")
    elif compression != COMPRESSION_DEFLATE:
        raise Qcow2Error(f"compression_type {compression} without the compression type bit")
    if compression not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
        raise Qcow2Error(f"unknown compression_type {compression}")
    if incompatible & INCOMPAT_EXTL2 and cluster_bits < 14:
        raise Qcow2Error("extended L2 entries need clusters of at least 16 KiB")


def _check_tables(header: Header, file_size: int) -> None:
    """Sizes and offsets: aligned, inside the file, not absurd."""
    cluster_size = header.cluster_size
    if header.size > MAX_SIZE:
        raise Qcow2Error(f"virtual size {header.size} is too large")
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2Error(f"L1 table too large ({header.l1_size} entries)")
    needed = l1_entries_needed(header.size, header.cluster_bits, header.l2_entries)
    if header.l1_size < needed:
        raise Qcow2Error(f"L1 table too small for the virtual size "
                         f"({header.l1_size} entries, {needed} needed)")
    _check_area("L1 table", header.l1_table_offset, header.l1_size * 8, cluster_size,
                file_size, allow_empty=True)
    if header.refcount_table_clusters == 0:
        raise Qcow2Error("image has no refcount table")
    reftable_bytes = header.refcount_table_clusters * cluster_size
    if reftable_bytes > MAX_REFTABLE_BYTES:
        raise Qcow2Error(f"refcount table too large ({header.refcount_table_clusters} "
                         f"clusters)")
    _check_area("refcount table", header.refcount_table_offset, reftable_bytes,
                cluster_size, file_size, allow_empty=False)
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise Qcow2Error(f"too many snapshots ({header.nb_snapshots})")
    if header.nb_snapshots:
        _check_area("snapshot table", header.snapshots_offset, 40 * header.nb_snapshots,
                    cluster_size, file_size, allow_empty=False)


def _check_area(what: str, offset: int, length: int, cluster_size: int, file_size: int,
                *, allow_empty: bool) -> None:
    if length == 0 and allow_empty:
        return
    if offset == 0 or offset % cluster_size:
        raise Qcow2Error(f"{what} offset {offset:#x} is invalid or unaligned")
    if offset + length > file_size:
        raise Qcow2Error(f"{what} at {offset:#x} ({length} bytes) lies past the end "
                         f"of the file")


def _parse_extensions(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """The header extensions between ``start`` and ``end``: (type, data) pairs."""
    extensions: list[tuple[int, bytes]] = []
    pos = start
    while pos + 8 <= end:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == EXT_END:
            return extensions
        pos += 8
        if pos + length > end:
            raise Qcow2Error(f"header extension {kind:#x} runs past the header area")
        extensions.append((kind, bytes(data[pos:pos + length])))
        pos += (length + 7) & ~7
    if pos < end:
        raise Qcow2Error("header extension area is truncated")
    return extensions


def _feature_names(extensions: list[tuple[int, bytes]]) -> dict[tuple[int, int], str]:
    names: dict[tuple[int, int], str] = {}
    for kind, body in extensions:
        if kind != EXT_FEATURE_TABLE:
            continue
        for pos in range(0, len(body) - _FEATURE_ENTRY + 1, _FEATURE_ENTRY):
            feature, bit = body[pos], body[pos + 1]
            if feature < len(_FEATURE_KINDS) and bit < 64:
                raw = body[pos + 2:pos + _FEATURE_ENTRY].split(b"\0", 1)[0]
                names[feature, bit] = raw.decode("utf-8", "replace")
    return names


def _string_extension(extensions: list[tuple[int, bytes]], kind: int,
                      what: str) -> str | None:
    for found, body in extensions:
        if found == kind:
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError:
                raise Qcow2Error(f"{what} name is not valid UTF-8") from None
    return None


def _bitmaps(extensions: list[tuple[int, bytes]], autoclear: int, cluster_size: int,
             file_size: int) -> tuple[Bitmaps | None, bool]:
    """The bitmaps extension, checked as qemu checks it, and whether one is present but
    stale (autoclear bit 0 clear: qemu ignores it, the bitmaps are lost)."""
    for kind, body in extensions:
        if kind != EXT_BITMAPS:
            continue
        if len(body) != BITMAPS_EXTENSION_LENGTH:
            raise Qcow2Error(f"bitmaps extension has a bad length ({len(body)} bytes, "
                             f"not {BITMAPS_EXTENSION_LENGTH})")
        if not autoclear & AUTOCLEAR_BITMAPS:
            return None, True
        count, reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", body)
        if reserved:
            raise Qcow2Error("bitmaps extension: reserved field is not zero")
        if count == 0:
            raise Qcow2Error("bitmaps extension with no bitmaps")
        if count > MAX_BITMAPS:
            raise Qcow2Error(f"bitmaps extension: {count} bitmaps, more than qemu's "
                             f"{MAX_BITMAPS}")
        if dir_size == 0 or dir_size > MAX_BITMAP_DIRECTORY:
            raise Qcow2Error(f"bitmaps extension: bad bitmap directory size {dir_size}")
        _check_area("bitmap directory", dir_offset, dir_size, cluster_size, file_size,
                    allow_empty=False)
        return Bitmaps(count, dir_size, dir_offset), False
    return None, False


def header_with_bitmaps(data: bytes, bitmaps: Bitmaps | None, autoclear: int) -> bytes:
    """The start of the image (``data``: its first cluster, or the whole file if shorter)
    with the bitmaps extension set to ``bitmaps`` (replaced where it is, added last, or
    dropped for None) and the autoclear field set to ``autoclear`` (version 3), up to
    the end of the backing file name, which follows the extensions (qemu's layout).
    Every other extension is kept byte for byte.  ``Qcow2Error`` if it does not fit."""
    version, cluster_bits = struct.unpack_from(">I", data, 4)[0], data[23]
    cluster_size = 1 << cluster_bits
    backing_offset, backing_size = struct.unpack_from(">QI", data, 8)
    header_length = struct.unpack_from(">I", data, 100)[0] if version >= 3 else V2_LENGTH
    end = min(len(data), cluster_size if backing_offset == 0 else backing_offset)
    ext = b"" if bitmaps is None else struct.pack(
        ">IIIIQQ", EXT_BITMAPS, BITMAPS_EXTENSION_LENGTH, bitmaps.count, 0,
        bitmaps.directory_size, bitmaps.directory_offset)
    out = bytearray(data[:header_length])
    pos = header_length
    while pos + 8 <= end:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == EXT_END:
            break
        size = 8 + ((length + 7) & ~7)
        if pos + size > end:
            raise Qcow2Error(f"header extension {kind:#x} runs past the header area")
        out += ext if kind == EXT_BITMAPS else data[pos:pos + size]
        if kind == EXT_BITMAPS:
            ext = b""
        pos += size
    out += ext + bytes(8)  # the end of the extensions
    used = pos + 8
    if backing_offset:
        name = data[backing_offset:backing_offset + backing_size]
        struct.pack_into(">Q", out, 8, len(out))
        out += name
        used = max(used, backing_offset + backing_size)
    out += bytes(max(0, min(used, len(data)) - len(out)))  # no stale bytes left after it
    if len(out) > cluster_size:
        raise Qcow2Error("the header extensions do not fit in the first cluster")
    if version >= 3:
        struct.pack_into(">Q", out, OFFSET_AUTOCLEAR, autoclear)
    return bytes(out)


def _backing_name(data: bytes, offset: int, length: int, file_size: int) -> str | None:
    if offset == 0:
        return None
    if length > MAX_BACKING_NAME:
        raise Qcow2Error(f"backing file name too long ({length} bytes)")
    if offset + length > min(len(data), file_size):
        raise Qcow2Error("backing file name lies outside the first cluster")
    try:
        return bytes(data[offset:offset + length]).decode("utf-8")
    except UnicodeDecodeError:
        raise Qcow2Error("backing file name is not valid UTF-8") from None


async def read_header(file: Node) -> Header:
    """Read and validate the header of the image in ``file``."""
    if file.size < V2_LENGTH:
        raise Qcow2Error(f"image too short for a qcow2 header ({file.size} bytes)")
    first = bytearray(min(file.size, V3_LENGTH))
    await file.pread(memoryview(first), 0)
    if not is_qcow2(bytes(first)):
        raise Qcow2Error("not a qcow2 image (bad magic)")
    cluster_bits = struct.unpack_from(">I", first, 20)[0]
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"unsupported cluster_bits {cluster_bits} (must be 9..21)")
    data = bytearray(min(file.size, 1 << cluster_bits))
    await file.pread(memoryview(data), 0)
    return parse_header(bytes(data), file.size)


async def read_info(file: Node) -> ImageInfo:
    """Parse and validate the header of the image in ``file`` (``Qcow2Error``)."""
    return (await read_header(file)).info()
