"""Reading what the protocol core writes, for unit tests.

Import as ``from tests.support.wire import OptionReply, option_replies``.
"""

from __future__ import annotations

from pynbd.proto import wire
from pynbd.proto.constants import REPLY_MAGIC

#: (option, reply type, data) of one option reply
OptionReply = tuple[int, int, bytes]


def option_replies(out: bytes) -> list[OptionReply]:
    """Split option replies; every byte must belong to a well-formed reply."""
    result: list[OptionReply] = []
    pos = 0
    size = wire.OPTION_REPLY_HEADER.size
    while pos < len(out):
        assert len(out) - pos >= size, f"truncated reply header at {pos}"
        magic, opt, rep, length = wire.OPTION_REPLY_HEADER.unpack_from(out, pos)
        assert magic == REPLY_MAGIC
        pos += size
        assert len(out) - pos >= length, "reply data runs past the output"
        result.append((opt, rep, out[pos:pos + length]))
        pos += length
    return result
