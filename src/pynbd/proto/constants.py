"""Every NBD wire constant, named as the protocol document names it.

Rules of this module: values only, no logic.  Member names keep the spec's
suffix (``Opt.GO`` is ``NBD_OPT_GO``) so that grepping the spec works.
"""

from __future__ import annotations

import enum

#: "NBDMAGIC": first 8 bytes the server sends on every connection
NBDMAGIC = 0x4E42444D41474943
#: "IHAVEOPT": newstyle greeting and the start of every option request
IHAVEOPT = 0x49484156454F5054
#: magic of every fixed-newstyle option reply
REPLY_MAGIC = 0x0003E889045565A9
#: compact request header
REQUEST_MAGIC = 0x25609513
#: extended request header (after NBD_OPT_EXTENDED_HEADERS)
EXTENDED_REQUEST_MAGIC = 0x21E41C71
#: simple reply header
SIMPLE_REPLY_MAGIC = 0x67446698
#: structured reply chunk header
STRUCTURED_REPLY_MAGIC = 0x668E33EF
#: extended reply chunk header
EXTENDED_REPLY_MAGIC = 0x6E8A278C

#: NBD strings (names, descriptions, messages) MUST be at most this long
MAX_STRING = 4096
#: zero bytes after the NBD_OPT_EXPORT_NAME reply, left out when both sides set
#: NO_ZEROES (the spec gives the padding no name)
EXPORT_NAME_ZEROES = 124
#: the largest READ/WRITE payload we accept and advertise (qemu's NBD_MAX_BUFFER_SIZE)
MAX_PAYLOAD = 32 * 1024 * 1024
#: the most ``pynbd --max-payload`` may raise it to
MAX_PAYLOAD_LIMIT = 256 * 1024 * 1024
#: cap on the data of one option; longer options end the connection unread
MAX_OPTION_DATA = 64 * 1024
#: preferred block size we advertise
PREFERRED_BLOCK = 4096
#: most extents we put in one block status chunk (qemu caps at 1 MiB of descriptors)
MAX_EXTENTS = 1 << 17
#: most meta-context queries we look at in one option
MAX_META_QUERIES = 1024


class HandshakeFlag(enum.IntFlag):
    """16-bit flags in the server greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """32-bit flags the client sends after the greeting."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    """Option codes (NBD_OPT_*)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types (NBD_REP_*); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR | 1
    ERR_POLICY = _ERR | 2
    ERR_INVALID = _ERR | 3
    ERR_PLATFORM = _ERR | 4
    ERR_TLS_REQD = _ERR | 5
    ERR_UNKNOWN = _ERR | 6
    ERR_SHUTDOWN = _ERR | 7
    ERR_BLOCK_SIZE_REQD = _ERR | 8
    ERR_TOO_BIG = _ERR | 9
    ERR_EXT_HEADER_REQD = _ERR | 10


class Info(enum.IntEnum):
    """Information types inside NBD_REP_INFO (NBD_INFO_*)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    """16-bit export flags (NBD_FLAG_*)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Cmd(enum.IntEnum):
    """Command types (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    """16-bit command flags (NBD_CMD_FLAG_*)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    """16-bit structured reply chunk flags."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types (NBD_REPLY_TYPE_*)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


class Errno(enum.IntEnum):
    """Error values in replies (NBD_E*); they equal Linux errno numbers."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: base:allocation state bits
STATE_HOLE = 1
STATE_ZERO = 2

#: the only metadata context the spec defines
BASE_ALLOCATION = "base:allocation"
#: qemu's: the depth in the backing chain of the layer holding each extent
#: (0: unallocated in every layer, 1: the top layer, ...)
ALLOCATION_DEPTH = "qemu:allocation-depth"
#: qemu's: one exported dirty bitmap (bit 0: dirty)
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
