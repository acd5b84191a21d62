"""Server side of the transmission phase, sans I/O.

Rules of this module:
- It never imports asyncio, socket, ssl, os, time or logging.
- ``next_event`` validates every request against the negotiated state; what
  reaches the shell as ``Request`` is safe to hand to a backend.  Requests the
  spec answers with an error come out as ``InvalidRequest``.
- ``next_event`` raises only ``ProtocolError`` (bad magic, or a WRITE payload
  too large to read, which is never buffered).
- Reply builders return a list of buffers that make up exactly one whole
  reply; the shell writes each list in one go, so replies never interleave.
  Payloads are passed through, never copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import wire
from .constants import (
    MAX_EXTENTS,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from .errors import ProtocolError
from .events import NEED_DATA, Disconnect, InvalidRequest, Request, TransmissionEvent

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .negotiated import Negotiated
    from .wire import Buffer



#: flags each command accepts (FUA is accepted on every command, as the spec says)
_ALLOWED_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag(0xFFFF),
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}

#: the transmission flag a command needs (commands not listed need none)
_NEEDS_FLAG: dict[Cmd, TransmissionFlag] = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}

_WRITE_TYPE = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
#: past the end, these get ENOSPC; other ranged commands get EINVAL
_ENOSPC_PAST_END = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES})
#: commands whose offset and length name a range of the export
_RANGED = frozenset({Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
                     Cmd.BLOCK_STATUS})


class ServerTransmission:
    """Parses requests and builds replies for one connection."""

    def __init__(self, negotiated: Negotiated, *, max_payload: int = MAX_PAYLOAD) -> None:
        self.negotiated = negotiated
        self._size = negotiated.export.size
        self._flags = int(negotiated.flags)
        self._structured = negotiated.structured
        self._max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0
        self._disconnected = False
        self._fast_rules = self._build_fast_rules()

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the client."""
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def pending_bytes(self) -> int:
        return len(self._buf) - self._pos

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the message being received (at least 1)."""
        avail = len(self._buf) - self._pos
        if avail < wire.REQUEST.size:
            return wire.REQUEST.size - avail
        _, _, cmd, _, _, length = wire.REQUEST.unpack_from(self._buf, self._pos)
        if cmd == Cmd.WRITE and length <= self._max_payload:
            return max(1, wire.REQUEST.size + int(length) - avail)
        return 1

    def next_event(self) -> TransmissionEvent:
        """The next request, or ``NEED_DATA``."""
        if self._disconnected:
            return NEED_DATA
        avail = len(self._buf) - self._pos
        if avail < wire.REQUEST.size:
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = wire.REQUEST.unpack_from(
            self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        payload: bytes | None = None
        if cmd == Cmd.WRITE:
            if length > self._max_payload:
                raise ProtocolError(
                    f"WRITE of {length} bytes is over the {self._max_payload}-byte limit",
                    cookie=cookie, errno=Errno.EINVAL)
            if avail < wire.REQUEST.size + length:
                return NEED_DATA
            start = self._pos + wire.REQUEST.size
            with memoryview(self._buf) as view:  # one copy, released before any resize
                payload = bytes(view[start:start + length])
            self._pos = start + length
        else:
            self._pos += wire.REQUEST.size
        if cmd == Cmd.DISC:
            self._disconnected = True
            return Disconnect()
        rule = self._fast_rules.get(cmd)
        if (rule is None or flags & rule[0] or length > rule[1] or length < rule[2]
                or (rule[3] and offset + length > self._size)
                or (rule[4] and (offset or length))):
            problem = self._validate(cmd, flags, offset, length)
            if problem is not None:
                errno, message = problem
                return InvalidRequest(cookie, cmd, errno, message, offset)
        return Request(cmd, flags, cookie, offset, length, payload)

    def _build_fast_rules(self) -> dict[int, tuple[int, int, int, bool, bool]]:
        """Per command, what a request must satisfy to skip ``_validate``.

        ``(forbidden flag bits, max length, min length, check the range end,
        offset and length must be zero)``.  Commands that ``_validate`` would
        refuse whatever their arguments are left out, so they always take the
        slow path; everything the fast path lets through, ``_validate`` would
        let through too (a test checks the two agree).
        """
        rules: dict[int, tuple[int, int, int, bool, bool]] = {}
        for cmd, allowed in _ALLOWED_FLAGS.items():
            if cmd == Cmd.DISC:
                continue
            if cmd in _WRITE_TYPE and self.negotiated.read_only:
                continue
            needed = _NEEDS_FLAG.get(cmd)
            if needed is not None and not self._flags & needed:
                continue
            if cmd == Cmd.BLOCK_STATUS and not self.negotiated.meta_contexts:
                continue
            ok = int(allowed)
            if not self._flags & TransmissionFlag.SEND_FAST_ZERO:
                ok &= ~int(CmdFlag.FAST_ZERO)
            if not self._structured:
                ok &= ~int(CmdFlag.DF)
            max_length = self._max_payload if cmd == Cmd.READ else 0xFFFFFFFF
            min_length = 1 if cmd == Cmd.BLOCK_STATUS else 0
            rules[int(cmd)] = (0xFFFF & ~ok, max_length, min_length, cmd in _RANGED,
                               cmd == Cmd.FLUSH)
        return rules

    def _validate(self, cmd: int, flags: int, offset: int,
                  length: int) -> tuple[Errno, str] | None:
        try:
            command = Cmd(cmd)
        except ValueError:
            return Errno.EINVAL, f"unknown command {cmd}"
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return Errno.EINVAL, f"command {command.name} is not supported"
        # int(): ~ on an IntFlag only complements its known members, not unknown bits
        if flags & ~int(allowed):
            return Errno.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        if command in _WRITE_TYPE and self.negotiated.read_only:
            return Errno.EPERM, "export is read-only"
        needed = _NEEDS_FLAG.get(command)
        if needed is not None and not self._flags & needed:
            return Errno.EINVAL, f"{command.name} was not advertised"
        if flags & CmdFlag.FAST_ZERO and not self._flags & TransmissionFlag.SEND_FAST_ZERO:
            return Errno.EINVAL, "FAST_ZERO was not advertised"
        if flags & CmdFlag.DF and not self._structured:
            return Errno.EINVAL, "DF needs structured replies"
        if command == Cmd.FLUSH and (offset or length):
            return Errno.EINVAL, "FLUSH must have zero offset and length"
        if command in _RANGED and offset + length > self._size:
            errno = Errno.ENOSPC if command in _ENOSPC_PAST_END else Errno.EINVAL
            return errno, f"request past the end of the {self._size}-byte export"
        if command == Cmd.READ and length > self._max_payload:
            if flags & CmdFlag.DF:
                return Errno.EOVERFLOW, "read too large to send in one chunk"
            return Errno.EINVAL, f"READ of {length} bytes is over the limit"
        if command == Cmd.BLOCK_STATUS:
            if not self.negotiated.meta_contexts:
                return Errno.EINVAL, "no metadata context was negotiated"
            if length == 0:
                return Errno.EINVAL, "BLOCK_STATUS of zero length"
        return None

    # -- replies ----------------------------------------------------------------

    def reply_ok(self, cookie: int) -> list[Buffer]:
        """Success for a command that returns no data."""
        return [wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)]

    def reply_error(self, cookie: int, errno: Errno, message: str = "",
                    *, offset: int | None = None) -> list[Buffer]:
        """Failure of any command, with a human message when the client can see it."""
        if not self._structured:
            return [wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, errno, cookie)]
        # at most 4096 bytes, without leaving half a character behind
        text = message.encode("utf-8")[:4096].decode("utf-8", "ignore").encode()
        if offset is None:
            body = wire.ERROR_CHUNK.pack(errno, len(text)) + text
            kind = ReplyType.ERROR
        else:
            body = wire.ERROR_CHUNK.pack(errno, len(text)) + text + wire.U64.pack(offset)
            kind = ReplyType.ERROR_OFFSET
        return [self._chunk(ReplyFlag.DONE, kind, cookie, len(body)), body]

    def reply_read(self, cookie: int, offset: int, data: Buffer) -> list[Buffer]:
        """A successful READ whose whole range is ``data``."""
        if not self._structured:
            return [wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]
        if not data:
            return [self._chunk(ReplyFlag.DONE, ReplyType.NONE, cookie, 0)]
        return [self._chunk(ReplyFlag.DONE, ReplyType.OFFSET_DATA, cookie, 8 + len(data)),
                wire.OFFSET_DATA.pack(offset), data]

    def reply_read_sparse(self, cookie: int,
                          pieces: Sequence[tuple[int, int, Buffer | None]]) -> list[Buffer]:
        """A successful structured READ as data and hole chunks.

        ``pieces`` are ``(offset, length, data-or-None)`` covering the request
        in order; ``None`` marks a hole.  Only valid with structured replies.
        """
        out: list[Buffer] = []
        last = len(pieces) - 1
        for i, (offset, length, data) in enumerate(pieces):
            flags = ReplyFlag.DONE if i == last else ReplyFlag(0)
            if data is None:
                out.append(self._chunk(flags, ReplyType.OFFSET_HOLE, cookie, 12))
                out.append(wire.OFFSET_HOLE.pack(offset, length))
            else:
                out.append(self._chunk(flags, ReplyType.OFFSET_DATA, cookie, 8 + length))
                out.append(wire.OFFSET_DATA.pack(offset))
                out.append(data)
        return out

    def reply_block_status(self, cookie: int,
                           contexts: Sequence[tuple[int, Sequence[tuple[int, int]]]],
                           ) -> list[Buffer]:
        """One BLOCK_STATUS chunk per context: ``(context id, [(length, flags)])``."""
        out: list[Buffer] = []
        last = len(contexts) - 1
        for i, (context_id, extents) in enumerate(contexts):
            body = bytearray(wire.U32.pack(context_id))
            for length, status in extents[:MAX_EXTENTS]:
                body += wire.EXTENT.pack(length, status)
            flags = ReplyFlag.DONE if i == last else ReplyFlag(0)
            out.append(self._chunk(flags, ReplyType.BLOCK_STATUS, cookie, len(body)))
            out.append(body)
        return out

    @staticmethod
    def _chunk(flags: ReplyFlag, kind: ReplyType, cookie: int, length: int) -> bytes:
        return wire.STRUCTURED_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)
