"""Precompiled ``struct.Struct`` layouts, one per NBD message.

Rules of this module: layouts only; every integer is big-endian; no I/O.
"""

from __future__ import annotations

import struct

#: what a payload or a piece of a reply may be (never copied by the core)
Buffer = bytes | bytearray | memoryview

#: greeting: NBDMAGIC(64) IHAVEOPT(64) handshake flags(16)
GREETING = struct.Struct(">QQH")
#: client flags (32), sent once after the greeting
CLIENT_FLAGS = struct.Struct(">I")
#: option request header: IHAVEOPT(64) option(32) data length(32)
OPTION_HEADER = struct.Struct(">QII")
#: option reply header: magic(64) option(32) reply type(32) data length(32)
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: reply to NBD_OPT_EXPORT_NAME: size(64) transmission flags(16) [+EXPORT_NAME_ZEROES zeroes]
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: NBD_INFO_EXPORT payload: type(16) size(64) transmission flags(16)
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE payload: type(16) minimum(32) preferred(32) maximum(32)
INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: a 16-bit info type in front of a string
INFO_TYPE = struct.Struct(">H")
#: a 32-bit length, count or context id
U32 = struct.Struct(">I")
#: a 16-bit count or length
U16 = struct.Struct(">H")
#: a 64-bit offset
U64 = struct.Struct(">Q")

#: compact request: magic(32) flags(16) type(16) cookie(64) offset(64) length(32)
REQUEST = struct.Struct(">IHHQQI")
#: simple reply: magic(32) error(32) cookie(64)
SIMPLE_REPLY = struct.Struct(">IIQ")
#: structured chunk: magic(32) flags(16) type(16) cookie(64) payload length(32)
STRUCTURED_CHUNK = struct.Struct(">IHHQI")
#: OFFSET_DATA chunk prefix: offset(64)
OFFSET_DATA = struct.Struct(">Q")
#: OFFSET_HOLE payload: offset(64) hole size(32)
OFFSET_HOLE = struct.Struct(">QI")
#: ERROR chunk prefix: error(32) message length(16)
ERROR_CHUNK = struct.Struct(">IH")
#: one BLOCK_STATUS descriptor: length(32) status flags(32)
EXTENT = struct.Struct(">II")

# -- after NBD_OPT_EXTENDED_HEADERS --
#: extended request: magic(32) flags(16) type(16) cookie(64) offset(64) length(64)
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
#: extended chunk: magic(32) flags(16) type(16) cookie(64) offset(64) payload length(64)
EXTENDED_CHUNK = struct.Struct(">IHHQQQ")
#: BLOCK_STATUS_EXT prefix: context id(32) descriptor count(32)
BLOCK_STATUS_EXT = struct.Struct(">II")
#: one BLOCK_STATUS_EXT descriptor: length(64) status flags(64)
EXTENT_EXT = struct.Struct(">QQ")
