"""Server side of the transmission phase after NBD_OPT_EXTENDED_HEADERS, sans I/O.

``ExtendedTransmission`` is ``ServerTransmission`` (``proto.transmission``)
with the extension's wire forms; a connection uses one or the other from its
first request on, so the compact parser's per-request path stays as it was.

Rules of this module (beyond those of ``proto.transmission``):
- Requests are 32 bytes (``NBD_EXTENDED_REQUEST_MAGIC``) with a 64-bit
  length; a request in any other form (a compact one included) loses the
  framing: ``ProtocolError``, a hard disconnect.
- ``NBD_CMD_FLAG_PAYLOAD_LEN`` makes the length a payload length: a payload
  above the maximum payload ends the connection (after an error reply); any
  other is read whole.  BLOCK_STATUS has a payload form when a context was
  negotiated (``NBD_FLAG_BLOCK_STATUS_PAYLOAD``): a 64-bit effect length and
  the ids of the contexts to report, each negotiated and named once (the
  request's ``contexts``); any other command with a payload, or a bad
  payload, is ``NBD_EINVAL``.
  Without the flag the length is an effect length of up to 64 bits and no
  payload follows, except on WRITE: a WRITE's length is its
  payload's, flag or not.  The client MUST set the flag on WRITE, but qemu's
  client (10.0) does not, and qemu's server reads the payload anyway (it
  only traces the lapse); so do we, or the stream would lose its framing.
- Every reply is extended chunks (``NBD_EXTENDED_REPLY_MAGIC``) whose offset
  field is the request's offset: the parser notes it per cookie and the
  reply's last chunk (DONE) takes it back.  No simple replies.
- Block status is answered with ``NBD_REPLY_TYPE_BLOCK_STATUS_EXT`` (64-bit
  extent lengths and status, a descriptor count that matches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import wire
from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_EXTENTS,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from .errors import ProtocolError
from .events import NEED_DATA, Disconnect, InvalidRequest, Request, TransmissionEvent
from .transmission import DIRECT_PAYLOAD_MIN, RECV_BUFFER_MIN, ServerTransmission

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .negotiated import Negotiated
    from .wire import Buffer

# plain ints for the per-request path
_WRITE, _DISC, _BLOCK_STATUS = int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.BLOCK_STATUS)
_STATUS_PAYLOAD = int(TransmissionFlag.BLOCK_STATUS_PAYLOAD)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_NOT_PAYLOAD_LEN = 0xFFFF ^ _PAYLOAD_LEN
_DONE = int(ReplyFlag.DONE)
_HEADER = wire.EXTENDED_REQUEST
_CHUNK = wire.EXTENDED_CHUNK
#: the receive buffer of a connection with nothing pending (shared, never written)
_NO_BUFFER = bytearray()


def _bad_magic(magic: int) -> ProtocolError:
    if magic == REQUEST_MAGIC:
        return ProtocolError("compact request after extended headers were negotiated")
    return ProtocolError(f"bad request magic {magic:#x}")


def _command_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"


class ExtendedTransmission(ServerTransmission):
    """Parses extended requests and builds extended replies for one connection."""

    HEADER_SIZE = _HEADER.size
    MAX_LENGTH = (1 << 64) - 1

    def __init__(self, negotiated: Negotiated, *, max_payload: int | None = None) -> None:
        super().__init__(negotiated, max_payload=max_payload)
        #: the offset of each request (by cookie) until its reply's last chunk is built
        self._offsets: dict[int, int] = {}
        #: the command whose payload is being received straight into ``_payload``
        self._payload_cmd = _WRITE

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the message being received (at least 1)."""
        if self._payload is not None:
            return max(1, len(self._payload) - self._filled)
        avail = self._end - self._pos
        if avail < _HEADER.size:
            return _HEADER.size - avail
        _, flags, cmd, _, _, length = _HEADER.unpack_from(self._buf, self._pos)
        if (flags & _PAYLOAD_LEN or cmd == _WRITE) and length <= self._max_payload:
            return max(1, _HEADER.size + int(length) - avail)
        return 1

    def next_event(self) -> TransmissionEvent:
        """The next request, or ``NEED_DATA``."""
        if self._disconnected:
            return NEED_DATA
        payload: Buffer | None = None
        if self._payload is not None:
            if self._filled < len(self._payload):
                return NEED_DATA
            payload, self._payload = self._payload, None
            self._header_first = True
            flags, cookie, offset = self._write_header
            cmd, length = self._payload_cmd, len(payload)
        else:
            pos = self._pos
            if self._end - pos < _HEADER.size:
                return self._need_header()
            magic, flags, cmd, cookie, offset, length = _HEADER.unpack_from(self._buf, pos)
            if magic != EXTENDED_REQUEST_MAGIC:
                raise _bad_magic(magic)
            self._header_first = False
            start = pos + _HEADER.size
            if flags & _PAYLOAD_LEN or cmd == _WRITE:
                if length > self._max_payload:
                    self._offsets[cookie] = offset
                    raise ProtocolError(
                        f"payload of {length} bytes is over the {self._max_payload}-byte "
                        "limit", cookie=cookie, errno=Errno.EINVAL)
                if self._end - start < length:
                    return self._await_payload(start, flags, cmd, cookie, offset, length)
                payload = self._buf[start:start + length]  # the one copy
                self._pos = start + length
            else:
                self._pos = start
            if cmd == _DISC:
                self._disconnected = True
                return Disconnect()
        self._offsets[cookie] = offset
        contexts: tuple[int, ...] | None = None
        if cmd == _WRITE:
            flags &= _NOT_PAYLOAD_LEN
        elif payload is not None:
            status = self._status_payload(cmd, payload)
            self.recycle(payload)
            payload = None
            if status is None:
                return InvalidRequest(cookie, cmd, Errno.EINVAL,
                                      f"{_command_name(cmd)} does not take this payload "
                                      "(NBD_CMD_FLAG_PAYLOAD_LEN)", offset)
            flags &= _NOT_PAYLOAD_LEN
            length, contexts = status
        rule = self._fast_rules.get(cmd)
        if (rule is None or flags & rule[0] or length > rule[1] or length < rule[2]
                or (rule[3] and offset + length > self._size)
                or (rule[4] and (offset or length))):
            problem = self._validate(cmd, flags, offset, length)
            if problem is not None:
                errno, message = problem
                return InvalidRequest(cookie, cmd, errno, message, offset)
        return Request(cmd, flags, cookie, offset, length, payload, contexts)

    def _status_payload(self, cmd: int, payload: Buffer) -> tuple[int, tuple[int, ...]] | None:
        """The effect length and the context ids of a BLOCK_STATUS in its payload
        form, if the form was offered and the payload is valid: the length, then
        the ids to report (negotiated ones, each once).  ``None``: any other
        payload."""
        if (cmd != _BLOCK_STATUS or not self._flags & _STATUS_PAYLOAD
                or len(payload) < 12 or len(payload) % 4):
            return None
        (effect,) = wire.U64.unpack_from(payload)
        ids = tuple(int(i) for (i,) in wire.U32.iter_unpack(memoryview(payload)[8:]))
        if len(set(ids)) != len(ids) or not self.negotiated.meta_contexts.keys() >= set(ids):
            return None
        return int(effect), ids

    def _need_header(self) -> TransmissionEvent:
        """No whole header yet: a wrong magic is an error at once (a compact
        request is 4 bytes shorter and would otherwise wait for more)."""
        if self._end - self._pos >= wire.U32.size:
            (magic,) = wire.U32.unpack_from(self._buf, self._pos)
            if magic != EXTENDED_REQUEST_MAGIC:
                raise _bad_magic(magic)
        elif self._end == self._pos and len(self._buf) == RECV_BUFFER_MIN:
            # all consumed: an idle connection holds no receive buffer
            self._buf = _NO_BUFFER
            self._pos = self._end = 0
        return NEED_DATA

    def _await_payload(self, start: int, flags: int, cmd: int, cookie: int, offset: int,
                       length: int) -> TransmissionEvent:
        """A payload that has not all arrived: a large one is received straight
        into its own buffer from here on; a small one waits in the receive buffer."""
        if length >= DIRECT_PAYLOAD_MIN:
            have = self._end - start
            direct = self._payload = self._payload_buffer(length)
            direct[:have] = memoryview(self._buf)[start:self._end]
            self._filled = have
            self._write_header = (flags, cookie, offset)
            self._payload_cmd = cmd
            self._pos = self._end = 0
        return NEED_DATA

    # -- replies: extended chunks only ------------------------------------------------

    def reply_ok(self, cookie: int) -> list[Buffer]:
        """Success for a command that returns no data (a NONE chunk: no simple replies)."""
        return [_CHUNK.pack(EXTENDED_REPLY_MAGIC, _DONE, ReplyType.NONE, cookie,
                            self._offsets.pop(cookie, 0), 0)]

    def reply_block_status(self, cookie: int,
                           contexts: Sequence[tuple[int, Sequence[tuple[int, int]]]],
                           ) -> list[Buffer]:
        """One BLOCK_STATUS_EXT chunk per context: ``(context id, [(length, flags)])``."""
        out: list[Buffer] = []
        last = len(contexts) - 1
        for i, (context_id, extents) in enumerate(contexts):
            extents = extents[:MAX_EXTENTS]
            body = bytearray(wire.BLOCK_STATUS_EXT.pack(context_id, len(extents)))
            for length, status in extents:
                body += wire.EXTENT_EXT.pack(length, status)
            flags = ReplyFlag.DONE if i == last else ReplyFlag(0)
            out.append(self._chunk(flags, ReplyType.BLOCK_STATUS_EXT, cookie, len(body)))
            out.append(body)
        return out

    def _chunk(self, flags: ReplyFlag, kind: ReplyType, cookie: int,  # type: ignore[override]
               length: int) -> bytes:
        """An extended chunk header; the reply's last chunk forgets the request's offset."""
        offsets = self._offsets
        offset = offsets.pop(cookie, 0) if flags & _DONE else offsets.get(cookie, 0)
        return _CHUNK.pack(EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset, length)
