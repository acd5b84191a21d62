"""Client side of the transmission phase, sans I/O: requests out, completions in.

Rules of this module:
- It never imports asyncio, socket, ssl, os, time or logging.
- Requests accumulate and leave through ``data_to_send``; replies come in
  through ``receive_data``; ``next_event`` hands out one ``Completion`` per
  request, whatever order the replies and their chunks arrive in.
- ``next_event`` raises only ``ProtocolError`` (the server broke the protocol;
  the connection cannot go on, and every later call raises it again).  Misuse
  by the caller raises ``LocalProtocolError``.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING

from . import wire
from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_OPTION_DATA,
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
from .errors import LocalProtocolError, ProtocolError
from .events import NEED_DATA, _Sentinel

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .client_events import HandshakeComplete
    from .wire import Buffer



#: the most data an error-type chunk may carry
_MAX_ERROR_CHUNK = MAX_OPTION_DATA
#: at most 2^20 descriptors per BLOCK_STATUS chunk (spec section 6.4)
_MAX_STATUS_CHUNK = 4 + 8 * (1 << 20)
_MAX_STATUS_EXT_CHUNK = 8 + 16 * (1 << 20)
_MAX_LENGTH32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_RANGED_ERROR_CMDS = frozenset({Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
                                Cmd.BLOCK_STATUS})


def errno_name(error: int) -> str:
    """``EINVAL`` for a known NBD error value, else its number."""
    try:
        return Errno(error).name
    except ValueError:
        return f"error {error}"


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """The whole reply to one request."""

    cookie: int
    cmd: Cmd
    #: 0 on success, else the NBD error value (``Errno`` if it is a known one)
    error: int = 0
    message: str = ""
    #: READ: the assembled data (holes filled with zeroes)
    data: bytes | None = None
    #: BLOCK_STATUS: context name -> [(length, status flags)]
    extents: dict[str, list[tuple[int, int]]] | None = None
    #: the offset of an ERROR_OFFSET chunk
    error_offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.error == 0


ClientTransmissionEvent = Completion | _Sentinel


@dataclasses.dataclass(slots=True)
class _Pending:
    cmd: Cmd
    offset: int
    length: int
    flags: int
    buf: bytearray | None = None
    #: sorted, non-overlapping (start, end) ranges a READ reply has covered
    covered: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    covered_bytes: int = 0
    chunks: int = 0
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    extents: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)


def _require_buffer(p: _Pending) -> bytearray:
    """The READ's buffer; a protocol error for a READ over the payload limit, which
    the server had to refuse (no such buffer is ever allocated)."""
    if p.buf is None:
        raise ProtocolError(f"data for a READ of {p.length} bytes, over the largest "
                            "payload: the server should have refused it")
    return p.buf


class ClientTransmission:
    """Builds requests and parses replies for one connection.

    Args:
        size, flags, structured, extended: what the handshake negotiated
            (with ``extended``, requests and replies have 32-byte headers).
        meta_contexts: the selected contexts, id -> name.
        max_payload: the largest READ/WRITE the client will send.
    """

    def __init__(self, *, size: int, flags: TransmissionFlag, structured: bool,
                 meta_contexts: Mapping[int, str] | None = None,
                 max_payload: int = MAX_PAYLOAD, extended: bool = False) -> None:
        self.size = size
        self.flags = flags
        self.structured = structured or extended
        self.extended = extended
        self.meta_contexts = dict(meta_contexts or {})
        self.max_payload = max_payload
        self._out: list[Buffer] = []
        self._buf = bytearray()
        self._pos = 0
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._disconnected = False
        self._broken: str | None = None

    @classmethod
    def from_handshake(cls, done: HandshakeComplete) -> ClientTransmission:
        core = cls(size=done.size, flags=done.flags, structured=done.structured,
                   meta_contexts={cid: name for name, cid in done.meta_contexts.items()},
                   max_payload=min(MAX_PAYLOAD, done.block_sizes.maximum)
                   if done.block_sizes else MAX_PAYLOAD, extended=done.extended)
        core.receive_data(done.trailing)
        return core

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet completed."""
        return len(self._pending)

    # -- requests -------------------------------------------------------------------

    def request(self, cmd: Cmd, *, offset: int = 0, length: int = 0,
                flags: int = 0, payload: Buffer | None = None) -> int:
        """Queue any request as given (no checks against the export); return its cookie."""
        if self._disconnected:
            raise LocalProtocolError("no requests after NBD_CMD_DISC")
        if (payload is not None) != (cmd == Cmd.WRITE):
            raise LocalProtocolError("WRITE, and only WRITE, carries a payload")
        if payload is not None:
            length = len(payload)
        cookie = self._next_cookie
        while cookie in self._pending:
            cookie = (cookie + 1) & _MASK64
        self._next_cookie = (cookie + 1) & _MASK64
        if self.extended:
            if payload is not None:
                flags |= CmdFlag.PAYLOAD_LEN
            self._out.append(wire.EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd,
                                                        cookie, offset, length))
        elif length > _MAX_LENGTH32:
            raise LocalProtocolError(f"a length of {length} needs extended headers")
        else:
            self._out.append(wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset,
                                               length))
        if payload is not None:
            self._out.append(payload)
        if cmd == Cmd.DISC:
            self._disconnected = True
        else:
            # a READ over the payload limit gets no buffer: the server must refuse
            # it, and data for it is a protocol error (never a huge allocation)
            self._pending[cookie] = _Pending(
                cmd, offset, length, int(flags),
                bytearray(length) if cmd == Cmd.READ and length <= self.max_payload else None)
        return cookie

    def _check(self, offset: int, length: int, *, needs: TransmissionFlag | None = None,
               write: bool = False, fua: bool = False) -> CmdFlag:
        if needs is not None and not self.flags & needs:
            raise LocalProtocolError(f"the server did not advertise {needs.name}")
        if write and self.flags & TransmissionFlag.READ_ONLY:
            raise LocalProtocolError("the export is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise LocalProtocolError(f"range {offset}+{length} is outside the "
                                     f"{self.size}-byte export")
        if fua and not self.flags & TransmissionFlag.SEND_FUA:
            raise LocalProtocolError("the server did not advertise FUA")
        return CmdFlag.FUA if fua else CmdFlag(0)

    def read(self, offset: int, length: int) -> int:
        self._check(offset, length)
        if not 0 < length <= self.max_payload:
            raise LocalProtocolError(f"read of {length} bytes (1 to {self.max_payload})")
        return self.request(Cmd.READ, offset=offset, length=length)

    def write(self, data: Buffer, offset: int, *, fua: bool = False) -> int:
        flags = self._check(offset, len(data), write=True, fua=fua)
        if not 0 < len(data) <= self.max_payload:
            raise LocalProtocolError(f"write of {len(data)} bytes (1 to {self.max_payload})")
        return self.request(Cmd.WRITE, offset=offset, flags=flags, payload=data)

    def flush(self) -> int:
        self._check(0, 0, needs=TransmissionFlag.SEND_FLUSH)
        return self.request(Cmd.FLUSH)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> int:
        flags = self._check(offset, length, needs=TransmissionFlag.SEND_TRIM, write=True,
                            fua=fua)
        return self.request(Cmd.TRIM, offset=offset, length=length, flags=flags)

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False,
                     fast_zero: bool = False, fua: bool = False) -> int:
        flags = self._check(offset, length, needs=TransmissionFlag.SEND_WRITE_ZEROES,
                            write=True, fua=fua)
        if no_hole:
            flags |= CmdFlag.NO_HOLE
        if fast_zero:
            if not self.flags & TransmissionFlag.SEND_FAST_ZERO:
                raise LocalProtocolError("the server did not advertise FAST_ZERO")
            flags |= CmdFlag.FAST_ZERO
        return self.request(Cmd.WRITE_ZEROES, offset=offset, length=length, flags=flags)

    def block_status(self, offset: int, length: int, *, req_one: bool = False) -> int:
        self._check(offset, length)
        if not self.structured or not self.meta_contexts:
            raise LocalProtocolError("BLOCK_STATUS needs a negotiated metadata context")
        if length == 0:
            raise LocalProtocolError("BLOCK_STATUS of zero length")
        flags = CmdFlag.REQ_ONE if req_one else CmdFlag(0)
        return self.request(Cmd.BLOCK_STATUS, offset=offset, length=length, flags=flags)

    def disconnect(self) -> None:
        """Queue NBD_CMD_DISC; requests in flight still get their replies."""
        self.request(Cmd.DISC)

    def data_to_send(self) -> bytes:
        """Every request queued since the last call, in order."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    # -- replies --------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the server."""
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> ClientTransmissionEvent:
        """The next completed request, or ``NEED_DATA``."""
        if self._broken is not None:
            raise ProtocolError(self._broken)
        try:
            while True:
                avail = len(self._buf) - self._pos
                if avail < 4:
                    return NEED_DATA
                (magic,) = wire.U32.unpack_from(self._buf, self._pos)
                if self.extended:
                    if magic != EXTENDED_REPLY_MAGIC:
                        raise ProtocolError(f"bad reply magic {magic:#x} (extended headers "
                                            "are on)")
                    event = self._parse_chunk(avail)
                elif magic == SIMPLE_REPLY_MAGIC:
                    event = self._parse_simple(avail)
                elif magic == STRUCTURED_REPLY_MAGIC:
                    if not self.structured:
                        raise ProtocolError("structured reply without STRUCTURED_REPLY")
                    event = self._parse_chunk(avail)
                else:
                    raise ProtocolError(f"bad reply magic {magic:#x}")
                if event is not None:
                    return event
        except ProtocolError as err:
            self._broken = err.message
            raise

    def _lookup(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolError(f"reply for unknown cookie {cookie:#x}")
        return pending

    def _parse_simple(self, avail: int) -> ClientTransmissionEvent | None:
        if avail < wire.SIMPLE_REPLY.size:
            return NEED_DATA
        _, error, cookie = wire.SIMPLE_REPLY.unpack_from(self._buf, self._pos)
        p = self._lookup(cookie)
        if p.chunks:
            raise ProtocolError(f"simple reply to cookie {cookie:#x} after structured chunks")
        if p.cmd == Cmd.READ and self.structured:
            raise ProtocolError("simple reply to READ after STRUCTURED_REPLY")
        if p.cmd == Cmd.BLOCK_STATUS and error == 0:
            # success means one status chunk per selected context (spec 6.4)
            raise ProtocolError("simple success reply to BLOCK_STATUS, which needs status "
                                "chunks")
        start = self._pos + wire.SIMPLE_REPLY.size
        data: bytes | None = None
        if p.cmd == Cmd.READ and error == 0:
            _require_buffer(p)
            if avail < wire.SIMPLE_REPLY.size + p.length:
                return NEED_DATA
            data = bytes(self._buf[start:start + p.length])
            start += p.length
        self._pos = start
        del self._pending[cookie]
        return Completion(cookie, p.cmd, error=error, data=data)

    def _chunk_limit(self, p: _Pending, kind: int) -> int:
        """The largest payload a chunk of this type may have for ``p``; 0 = exactly 0."""
        if kind == ReplyType.NONE:
            return 0
        if kind in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE):
            if p.cmd != Cmd.READ:
                raise ProtocolError(f"{ReplyType(kind).name} chunk for {p.cmd.name}")
            return 8 + p.length if kind == ReplyType.OFFSET_DATA else wire.OFFSET_HOLE.size
        # BLOCK_STATUS_EXT is a type only extended headers know (and then the only one)
        if kind == ReplyType.BLOCK_STATUS or (kind == ReplyType.BLOCK_STATUS_EXT
                                              and self.extended):
            if p.cmd != Cmd.BLOCK_STATUS:
                raise ProtocolError(f"{ReplyType(kind).name} chunk for {p.cmd.name}")
            if kind == ReplyType.BLOCK_STATUS and self.extended:
                raise ProtocolError("BLOCK_STATUS chunk with extended headers on "
                                    "(BLOCK_STATUS_EXT is the one)")
            return _MAX_STATUS_EXT_CHUNK if self.extended else _MAX_STATUS_CHUNK
        if kind == ReplyType.ERROR_OFFSET and p.cmd not in _RANGED_ERROR_CMDS:
            raise ProtocolError(f"ERROR_OFFSET chunk for {p.cmd.name}")
        if kind & 0x8000:
            return _MAX_ERROR_CHUNK
        raise ProtocolError(f"unknown structured chunk type {kind:#x}")

    def _parse_chunk(self, avail: int) -> ClientTransmissionEvent | None:
        head = wire.EXTENDED_CHUNK if self.extended else wire.STRUCTURED_CHUNK
        if avail < head.size:
            return NEED_DATA
        if self.extended:
            _, flags, kind, cookie, offset, length = head.unpack_from(self._buf, self._pos)
            p = self._lookup(cookie)
            if offset != p.offset:
                raise ProtocolError(f"reply to cookie {cookie:#x} names offset {offset}, "
                                    f"not the request's {p.offset}")
        else:
            _, flags, kind, cookie, length = head.unpack_from(self._buf, self._pos)
            p = self._lookup(cookie)
        if length > self._chunk_limit(p, kind):
            raise ProtocolError(f"chunk type {kind:#x} with {length} bytes of payload")
        if avail < head.size + length:
            return NEED_DATA
        start = self._pos + head.size
        # a copy: no view may pin the receive buffer (an error traceback would keep it)
        payload = bytes(self._buf[start:start + length])
        self._apply_chunk(p, kind, payload, bool(flags & ReplyFlag.DONE))
        self._pos = start + length
        p.chunks += 1
        if not flags & ReplyFlag.DONE:
            return None
        return self._finish(cookie, p)

    def _apply_chunk(self, p: _Pending, kind: int, payload: bytes, done: bool) -> None:
        if kind == ReplyType.NONE:
            if not done:
                raise ProtocolError("NONE chunk without the DONE flag")
        elif kind == ReplyType.OFFSET_DATA:
            if len(payload) < 9:
                raise ProtocolError(f"OFFSET_DATA chunk of {len(payload)} bytes")
            (offset,) = wire.OFFSET_DATA.unpack_from(payload)
            data = payload[8:]
            self._cover(p, offset, len(data))
            buf = _require_buffer(p)
            buf[offset - p.offset:offset - p.offset + len(data)] = data
        elif kind == ReplyType.OFFSET_HOLE:
            if len(payload) != wire.OFFSET_HOLE.size:
                raise ProtocolError(f"OFFSET_HOLE chunk of {len(payload)} bytes")
            offset, hole = wire.OFFSET_HOLE.unpack(payload)
            if hole == 0:
                raise ProtocolError("OFFSET_HOLE of zero length")
            self._cover(p, offset, hole)
        elif kind == ReplyType.BLOCK_STATUS:
            self._apply_status(p, payload)
        elif kind == ReplyType.BLOCK_STATUS_EXT:
            if len(payload) < 24 or (len(payload) - 8) % 16:
                raise ProtocolError(f"BLOCK_STATUS_EXT chunk of {len(payload)} bytes")
            context_id, count = wire.BLOCK_STATUS_EXT.unpack_from(payload)
            if count != (len(payload) - 8) // 16:
                raise ProtocolError(f"BLOCK_STATUS_EXT counts {count} descriptors in "
                                    f"{len(payload)} bytes")
            self._apply_extents(p, context_id, [
                (int(length), int(status))
                for length, status in wire.EXTENT_EXT.iter_unpack(payload[8:])])
        else:
            self._apply_error(p, kind, payload)

    @staticmethod
    def _cover(p: _Pending, offset: int, length: int) -> None:
        end = offset + length
        if offset < p.offset or end > p.offset + p.length:
            raise ProtocolError(f"read chunk {offset}+{length} is outside the request "
                                f"{p.offset}+{p.length}")
        i = bisect.bisect_left(p.covered, (offset, end))
        if (i > 0 and p.covered[i - 1][1] > offset) or (i < len(p.covered)
                                                        and p.covered[i][0] < end):
            raise ProtocolError(f"read chunk {offset}+{length} overlaps an earlier chunk")
        p.covered.insert(i, (offset, end))
        p.covered_bytes += length

    def _apply_status(self, p: _Pending, payload: bytes) -> None:
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise ProtocolError(f"BLOCK_STATUS chunk of {len(payload)} bytes")
        (context_id,) = wire.U32.unpack_from(payload)
        self._apply_extents(p, context_id, [
            (int(length), int(status)) for length, status in wire.EXTENT.iter_unpack(
                payload[4:])])

    def _apply_extents(self, p: _Pending, context_id: int,
                       extents: list[tuple[int, int]]) -> None:
        name = self.meta_contexts.get(context_id)
        if name is None:
            raise ProtocolError(f"BLOCK_STATUS for unknown context id {context_id}")
        if name in p.extents:
            raise ProtocolError(f"two BLOCK_STATUS chunks for context {name!r}")
        if any(length == 0 for length, _ in extents):
            raise ProtocolError("BLOCK_STATUS extent of zero length")
        if p.flags & CmdFlag.REQ_ONE and (len(extents) != 1 or extents[0][0] > p.length):
            raise ProtocolError("REQ_ONE BLOCK_STATUS must have one extent within the request")
        if sum(length for length, _ in extents[:-1]) >= p.length:
            raise ProtocolError("BLOCK_STATUS extents run past the requested length")
        p.extents[name] = extents

    @staticmethod
    def _apply_error(p: _Pending, kind: int, payload: bytes) -> None:
        if kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            if len(payload) < wire.ERROR_CHUNK.size:
                raise ProtocolError(f"error chunk of {len(payload)} bytes")
            error, msglen = wire.ERROR_CHUNK.unpack_from(payload)
            tail = 8 if kind == ReplyType.ERROR_OFFSET else 0
            if error == 0:
                raise ProtocolError("error chunk with error value 0")
            if wire.ERROR_CHUNK.size + msglen + tail > len(payload):
                raise ProtocolError(f"error message of {msglen} bytes overruns its chunk")
            end = wire.ERROR_CHUNK.size + msglen
            message = payload[wire.ERROR_CHUNK.size:end].decode("utf-8", "replace")
            offset: int | None = None
            if tail:
                (offset,) = wire.U64.unpack_from(payload, end)
                if not p.offset <= offset < p.offset + p.length:
                    raise ProtocolError(f"ERROR_OFFSET {offset} is outside the request "
                                        f"{p.offset}+{p.length}")
        else:  # an unknown error type: the request failed, the connection goes on
            error = 0
            if len(payload) >= 4:
                (error,) = wire.U32.unpack_from(payload)
            error = error or Errno.EIO
            message, offset = f"unknown error chunk type {kind:#x}", None
        if not p.error:
            p.error, p.message, p.error_offset = error, message, offset

    def _finish(self, cookie: int, p: _Pending) -> Completion:
        del self._pending[cookie]
        if p.error:
            return Completion(cookie, p.cmd, error=p.error, message=p.message,
                              error_offset=p.error_offset)
        if p.cmd == Cmd.READ:
            if p.covered_bytes != p.length:
                raise ProtocolError(f"READ reply covered {p.covered_bytes} of {p.length} "
                                    "bytes")
            return Completion(cookie, p.cmd, data=bytes(_require_buffer(p)))
        if p.cmd == Cmd.BLOCK_STATUS:
            missing = set(self.meta_contexts.values()) - set(p.extents)
            if missing:
                raise ProtocolError(f"BLOCK_STATUS reply without context {sorted(missing)}")
            return Completion(cookie, p.cmd, extents=p.extents)
        return Completion(cookie, p.cmd)
