"""What a client reads from a server during option haggling: option replies and the
NBD_INFO items inside them, for both client handshakes (``client`` and
``client_list``).

Rules of this module: pure functions over the receive buffer; a server that
breaks the protocol raises ``ProtocolError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import wire
from .constants import MAX_OPTION_DATA, REPLY_MAGIC, Info
from .errors import ProtocolError
from .negotiated import BlockSizes

if TYPE_CHECKING:
    from .constants import Opt

#: an option reply type with this bit set is an error (NBD_REP_ERR_*)
ERROR_BIT = 1 << 31


def take_option_reply(buf: bytearray, option: Opt) -> tuple[int, bytes] | None:
    """The next option reply to ``option`` as ``(rep, payload)``, taken off the front
    of ``buf``; None until all of it has arrived."""
    head = wire.OPTION_REPLY_HEADER
    if len(buf) < head.size:
        return None
    magic, replied, rep, length = head.unpack_from(buf)
    if magic != REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    if replied != option:
        raise ProtocolError(f"reply for option {replied} while waiting for {option.name}")
    if length > MAX_OPTION_DATA:
        raise ProtocolError(f"option reply of {length} bytes")
    if len(buf) < head.size + length:
        return None
    payload = bytes(buf[head.size:head.size + length])
    del buf[:head.size + length]
    return rep, payload


#: what an NBD_INFO reply says: ``(size, flags)`` for NBD_INFO_EXPORT, the block
#: sizes, or the name or description; None for an info type we do not know
InfoItem = tuple[int, int] | BlockSizes | str | None


def parse_info(payload: bytes) -> tuple[int, InfoItem]:
    """An NBD_REP_INFO payload as ``(info type, what it says)``."""
    if len(payload) < 2:
        raise ProtocolError(f"INFO reply of {len(payload)} bytes")
    (kind,) = wire.INFO_TYPE.unpack_from(payload)
    if kind == Info.EXPORT:
        if len(payload) != wire.INFO_EXPORT.size:
            raise ProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes")
        _, size, flags = wire.INFO_EXPORT.unpack(payload)
        return kind, (size, flags)
    if kind == Info.BLOCK_SIZE:
        if len(payload) != wire.INFO_BLOCK_SIZE.size:
            raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
        _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(payload)
        if not 0 < minimum <= maximum or preferred == 0:
            raise ProtocolError(f"nonsense block sizes {minimum}/{preferred}/{maximum}")
        return kind, BlockSizes(minimum, preferred, maximum)
    if kind in (Info.NAME, Info.DESCRIPTION):
        return kind, payload[2:].decode("utf-8", "replace")
    return kind, None  # unknown info types are ignored (spec 2.8)
