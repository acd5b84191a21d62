"""Server side of the transmission phase, sans I/O.

Rules of this module:
- It never imports asyncio, socket, ssl, os, time or logging.
- ``next_event`` validates every request against the negotiated state; what
  reaches the shell as ``Request`` is safe to hand to a backend.  Requests the
  spec answers with an error come out as ``InvalidRequest``.
- ``next_event`` raises only ``ProtocolError`` (bad magic, or a WRITE payload
  too large to read, which is never buffered).
- Received bytes go into a buffer the core owns (``get_buffer``/
  ``buffer_updated``, or ``receive_data``); a large WRITE payload is received
  straight into the buffer its ``Request`` carries.
- Reply builders return a list of buffers that make up exactly one whole
  reply; the shell writes each list in one go, so replies never interleave.
  Payloads are passed through, never copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from . import wire
from .constants import (
    MAX_EXTENTS,
    MAX_STRING,
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

#: every bit of the 16-bit command flags field
_ALL_FLAGS = 0xFFFF
#: the largest 32-bit request length
_MAX_LENGTH = 0xFFFFFFFF


class CommandRule(NamedTuple):
    """What the spec asks of one command's requests.

    ``COMMANDS`` is the one table request validation reads: ``_validate``
    walks it for the full checks (and their error messages), and the fast
    path's per-connection tuples are derived from it (``_build_fast_rules``).
    """

    #: the command flags it takes (FUA is accepted on every command, as the spec says)
    flags: CmdFlag
    #: the export flag that must have been advertised for it (none if 0)
    needs: TransmissionFlag = TransmissionFlag(0)
    #: it changes the export: EPERM on a read-only one
    writes: bool = False
    #: offset and length name a range, which must end inside the export ...
    ranged: bool = False
    #: ... else this error
    past_end: Errno = Errno.EINVAL
    #: offset and length must both be zero
    empty: bool = False
    #: the length is at most the connection's payload limit (the reply carries the data)
    payload: bool = False
    #: a metadata context must have been negotiated
    contexts: bool = False
    #: the length must not be zero
    nonempty: bool = False


_FUA, _DF = CmdFlag.FUA, CmdFlag.DF
#: every command the server knows; commands not listed are refused
COMMANDS: dict[Cmd, CommandRule] = {
    Cmd.READ: CommandRule(_FUA | _DF, ranged=True, payload=True),
    Cmd.WRITE: CommandRule(_FUA, writes=True, ranged=True, past_end=Errno.ENOSPC),
    Cmd.DISC: CommandRule(CmdFlag(_ALL_FLAGS)),
    Cmd.FLUSH: CommandRule(_FUA, needs=TransmissionFlag.SEND_FLUSH, empty=True),
    Cmd.TRIM: CommandRule(_FUA, needs=TransmissionFlag.SEND_TRIM, writes=True, ranged=True),
    Cmd.CACHE: CommandRule(_FUA, ranged=True),
    Cmd.WRITE_ZEROES: CommandRule(_FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
                                  needs=TransmissionFlag.SEND_WRITE_ZEROES, writes=True,
                                  ranged=True, past_end=Errno.ENOSPC),
    Cmd.BLOCK_STATUS: CommandRule(_FUA | CmdFlag.REQ_ONE, ranged=True, contexts=True,
                                  nonempty=True),
}
#: per command on one connection, what a request must satisfy to skip ``_validate``:
#: (forbidden flag bits, max length, min length, check the range end, offset and
#: length must be zero)
FastRule = tuple[int, int, int, bool, bool]

# plain ints for the per-request path
_WRITE, _DISC = int(Cmd.WRITE), int(Cmd.DISC)

#: the receive buffer starts this small, so an idle connection costs little ...
RECV_BUFFER_MIN = 4 * 1024
#: ... and grows up to this while receives keep filling it (pipelined requests)
RECV_BUFFER_MAX = 256 * 1024
#: the receive buffer of a connection with nothing pending (shared, never written)
_NO_BUFFER = bytearray()
#: WRITE payloads at least this large that did not arrive whole with their
#: header are received straight into their own buffer (no copy)
DIRECT_PAYLOAD_MIN = 64 * 1024
#: at most this many payload buffers, and bytes, are kept for reuse (``recycle``)
SPARE_PAYLOADS = 4
SPARE_PAYLOAD_BYTES = 4 * 1024 * 1024


class ServerTransmission:
    """Parses requests and builds replies for one connection (compact
    headers; ``proto.extended.ExtendedTransmission`` is the one for a
    connection that negotiated extended headers)."""

    #: bytes in a request header
    HEADER_SIZE = wire.REQUEST.size
    #: the largest length a request without a payload may name
    MAX_LENGTH = _MAX_LENGTH

    def __init__(self, negotiated: Negotiated, *, max_payload: int | None = None) -> None:
        self.negotiated = negotiated
        self._size = negotiated.export.size
        self._flags = int(negotiated.flags)
        self._structured = negotiated.structured
        #: the largest READ/WRITE payload: the maximum block size the handshake
        #: advertised, unless a test asks for another
        self._max_payload = (negotiated.block_sizes.maximum if max_payload is None
                             else max_payload)
        #: received bytes not yet parsed are ``_buf[_pos:_end]``
        self._buf = bytearray(RECV_BUFFER_MIN)
        self._pos = 0
        self._end = 0
        #: the last receive filled ``_buf`` to the end: offer a larger one next time
        self._grow = False
        #: the last request was a large WRITE: receive just the next header first,
        #: so that if it is another large WRITE its payload is not copied
        self._header_first = False
        #: a large WRITE's payload, received straight into place (``_filled`` bytes so far)
        self._payload: bytearray | None = None
        self._filled = 0
        #: that WRITE's flags, cookie and offset
        self._write_header = (0, 0, 0)
        #: payload buffers given back by ``recycle``, reused for the next large WRITEs
        self._spare: list[bytearray] = []
        self._disconnected = False
        #: a metadata context was negotiated (BLOCK_STATUS needs one)
        self._has_contexts = bool(negotiated.meta_contexts)
        #: command flags this connection cannot take, with the reason
        self._unusable_flags = self._build_unusable_flags()
        #: per command, what a request must satisfy to skip ``_validate``
        self._fast_rules = self._build_fast_rules()

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the client (copied in).

        The copying twin of ``get_buffer``/``buffer_updated``, for callers
        that already hold the bytes.
        """
        view = memoryview(data).cast("B")
        payload = self._payload
        if payload is not None and self._filled < len(payload):
            take = min(len(view), len(payload) - self._filled)
            payload[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
        if view:
            if len(self._buf) - self._end < len(view):
                self._make_room(len(view))
            self._buf[self._end:self._end + len(view)] = view
            self._end += len(view)

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should go (never empty); then call
        ``buffer_updated`` with how many landed there.

        A large WRITE payload is received straight into the buffer the
        request will carry, and only up to its end, so it is never copied;
        everything else lands in a receive buffer that starts small (an idle
        connection costs little) and grows while receives keep filling it.
        """
        payload = self._payload
        if payload is not None and self._filled < len(payload):
            return memoryview(payload)[self._filled:]
        if not self._buf:
            self._buf = bytearray(RECV_BUFFER_MIN)
        if self._pos == self._end:
            self._pos = self._end = 0
            if self._header_first:
                return memoryview(self._buf)[:self.HEADER_SIZE]
        size = len(self._buf)
        free = size - self._end
        if self._grow or free * 4 < size or free < self.bytes_wanted:
            self._make_room(self.bytes_wanted)
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer`` view."""
        payload = self._payload
        if payload is not None and self._filled < len(payload):
            self._filled += nbytes
            return
        self._end += nbytes
        if self._end == len(self._buf) and self._end < RECV_BUFFER_MAX:
            self._grow = True

    def recycle(self, payload: Buffer | None) -> None:
        """Give back a WRITE payload the backend is completely done with.

        A large payload's buffer is then reused for a later WRITE of the same
        size instead of allocating (and zero-filling) a new one.  Only call
        this once nothing can read ``payload`` any more.
        """
        if (type(payload) is bytearray and len(payload) >= DIRECT_PAYLOAD_MIN
                and len(self._spare) < SPARE_PAYLOADS
                and len(payload) * (len(self._spare) + 1) <= SPARE_PAYLOAD_BYTES):
            self._spare.append(payload)

    def _payload_buffer(self, length: int) -> bytearray:
        spare = self._spare
        for i in range(len(spare) - 1, -1, -1):
            if len(spare[i]) == length:
                return spare.pop(i)
        if spare:
            spare.pop(0)  # sizes changed: let the oldest go
        return bytearray(length)

    def _make_room(self, wanted: int) -> None:
        """At least ``wanted`` free bytes after ``_end``: compact, or a new larger buffer.

        The buffer is replaced rather than resized, because views of it may
        still be alive (asyncio holds the last ``get_buffer`` view).
        """
        pending = self._end - self._pos
        size = len(self._buf)
        if self._grow:
            self._grow = False
            size = min(size * 4, RECV_BUFFER_MAX)
        if pending + wanted > size:
            size = max(pending + wanted, 2 * size)
        if size == len(self._buf):
            if self._pos:
                self._buf[:pending] = self._buf[self._pos:self._end]
        else:
            buf = bytearray(size)
            buf[:pending] = self._buf[self._pos:self._end]
            self._buf = buf
        self._pos, self._end = 0, pending

    @property
    def pending_bytes(self) -> int:
        """Bytes received that no event has accounted for yet."""
        pending = self._end - self._pos
        if self._payload is not None:
            pending += self.HEADER_SIZE + self._filled
        return pending

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the message being received (at least 1)."""
        if self._payload is not None:
            return max(1, len(self._payload) - self._filled)
        avail = self._end - self._pos
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
        payload: Buffer | None
        if self._payload is not None:
            if self._filled < len(self._payload):
                return NEED_DATA
            payload, self._payload = self._payload, None
            self._header_first = True
            flags, cookie, offset = self._write_header
            cmd, length = _WRITE, len(payload)
        else:
            pos = self._pos
            avail = self._end - pos
            if avail < wire.REQUEST.size:
                if not avail and len(self._buf) == RECV_BUFFER_MIN:
                    # all consumed: an idle connection holds no receive buffer
                    # (``get_buffer`` makes a new one when bytes arrive)
                    self._buf = _NO_BUFFER
                    self._pos = self._end = 0
                return NEED_DATA
            magic, flags, cmd, cookie, offset, length = wire.REQUEST.unpack_from(
                self._buf, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            payload = None
            self._header_first = False
            if cmd == _WRITE:
                if length > self._max_payload:
                    raise ProtocolError(
                        f"WRITE of {length} bytes is over the {self._max_payload}-byte limit",
                        cookie=cookie, errno=Errno.EINVAL)
                start = pos + wire.REQUEST.size
                have = self._end - start
                if have >= length:
                    payload = self._buf[start:start + length]  # the one copy
                    self._pos = start + length
                elif length >= DIRECT_PAYLOAD_MIN:
                    # the rest of the payload is received straight into its buffer
                    direct = self._payload = self._payload_buffer(length)
                    direct[:have] = memoryview(self._buf)[start:self._end]
                    self._filled = have
                    self._write_header = (flags, cookie, offset)
                    self._pos = self._end = 0
                    return NEED_DATA
                else:
                    return NEED_DATA
            else:
                self._pos = pos + wire.REQUEST.size
            if cmd == _DISC:
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

    # -- validation: both paths read COMMANDS ----------------------------------

    def _build_unusable_flags(self) -> tuple[tuple[int, str], ...]:
        """Command flags that need something this connection did not negotiate, and why."""
        unusable: list[tuple[int, str]] = []
        if not self._flags & TransmissionFlag.SEND_FAST_ZERO:
            unusable.append((int(CmdFlag.FAST_ZERO), "FAST_ZERO was not advertised"))
        if not self._structured:
            unusable.append((int(CmdFlag.DF), "DF needs structured replies"))
        return tuple(unusable)

    def _refusal(self, command: Cmd, rule: CommandRule) -> tuple[Errno, str] | None:
        """Why this connection refuses ``command`` before looking at its range, if it does."""
        if rule.writes and self.negotiated.read_only:
            return Errno.EPERM, "export is read-only"
        if rule.needs and not self._flags & rule.needs:
            return Errno.EINVAL, f"{command.name} was not advertised"
        return None

    def _build_fast_rules(self) -> dict[int, FastRule]:
        """``COMMANDS`` compiled for this connection's fast path, check by check.

        A command this connection refuses whatever its arguments has no rule,
        so it always takes the slow path (as does DISC, which ends parsing
        before validation); flags it does not take, or that this connection
        cannot, are forbidden bits; the range checks are the tuple's fields.
        """
        unusable = 0
        for bit, _ in self._unusable_flags:
            unusable |= bit
        rules: dict[int, FastRule] = {}
        for command, rule in COMMANDS.items():
            if (command == Cmd.DISC or self._refusal(command, rule) is not None
                    or (rule.contexts and not self._has_contexts)):
                continue
            rules[int(command)] = (_ALL_FLAGS & ~(int(rule.flags) & ~unusable),
                                   self._max_payload if rule.payload else self.MAX_LENGTH,
                                   1 if rule.nonempty else 0, rule.ranged, rule.empty)
        return rules

    def _validate(self, cmd: int, flags: int, offset: int,
                  length: int) -> tuple[Errno, str] | None:
        """The full checks of one request, in order: ``None``, or the error to reply."""
        try:
            command = Cmd(cmd)
        except ValueError:
            return Errno.EINVAL, f"unknown command {cmd}"
        rule = COMMANDS.get(command)
        if rule is None:
            return Errno.EINVAL, f"command {command.name} is not supported"
        # int(): ~ on an IntFlag only complements its known members, not unknown bits
        if flags & ~int(rule.flags):
            return Errno.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        refusal = self._refusal(command, rule)
        if refusal is not None:
            return refusal
        for bit, message in self._unusable_flags:
            if flags & bit:
                return Errno.EINVAL, message
        if rule.empty and (offset or length):
            return Errno.EINVAL, f"{command.name} must have zero offset and length"
        if rule.ranged and offset + length > self._size:
            return rule.past_end, f"request past the end of the {self._size}-byte export"
        if rule.payload and length > self._max_payload:
            if flags & CmdFlag.DF:
                return Errno.EOVERFLOW, "read too large to send in one chunk"
            return Errno.EINVAL, f"{command.name} of {length} bytes is over the limit"
        if rule.contexts and not self._has_contexts:
            return Errno.EINVAL, "no metadata context was negotiated"
        if rule.nonempty and not length:
            return Errno.EINVAL, f"{command.name} of zero length"
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
        # at most MAX_STRING bytes, without leaving half a character behind
        text = message.encode("utf-8")[:MAX_STRING].decode("utf-8", "ignore").encode()
        if offset is None:
            body = wire.ERROR_CHUNK.pack(errno, len(text)) + text
            kind = ReplyType.ERROR
        else:
            body = wire.ERROR_CHUNK.pack(errno, len(text)) + text + wire.U64.pack(offset)
            kind = ReplyType.ERROR_OFFSET
        return [self._chunk(ReplyFlag.DONE, kind, cookie, len(body)), body]

    def reply_read(self, cookie: int, offset: int, data: Buffer) -> list[Buffer]:
        """A successful READ whose whole range is ``data``."""
        if not data and self._structured:
            return [self._chunk(ReplyFlag.DONE, ReplyType.NONE, cookie, 0)]
        return [*self.reply_read_head(cookie, offset, len(data)), data]

    def reply_read_head(self, cookie: int, offset: int, length: int) -> list[Buffer]:
        """What precedes the ``length`` (> 0) data bytes of a successful READ,
        for a shell that sends the data itself (e.g. straight from a file)."""
        if not self._structured:
            return [wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)]
        return [self._chunk(ReplyFlag.DONE, ReplyType.OFFSET_DATA, cookie, 8 + length),
                wire.OFFSET_DATA.pack(offset)]

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
