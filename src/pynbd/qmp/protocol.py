"""The QMP wire protocol, sans I/O: framing, greeting, negotiation, replies.

Rules of this module:
- It never imports asyncio, socket, os, time or logging; the shell passes in
  timestamps and moves the bytes.
- Input is a stream of JSON objects, one per line (how ``qemu.qmp`` and
  ``qmp-shell`` send them).  A line that is not valid JSON, or not a valid
  command, gets an ``error`` reply naming the problem; the session goes on.
- A line longer than ``MAX_LINE`` is never buffered whole: it is skipped up to
  its newline and answered with an error.
- Until ``qmp_capabilities`` succeeds only that command is accepted, with
  qemu's error text for anything else.
- Everything sent is valid JSON.  Input numbers must be finite (``NaN``,
  ``Infinity`` and ``1e99999`` are parse errors: qemu would echo such an id as
  ``inf``); output is encoded with ``allow_nan=False``, a reply that cannot
  be encoded is replaced by an error reply, and such an event is dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from typing import Any

#: longest command we read (qemu.qmp's own limit is 10 MiB; commands are small)
MAX_LINE = 1 << 20

#: what ends a top-level token that is not an object or array
_DELIMITER = re.compile(rb"[\s{\[]")
#: characters that matter while scanning a value outside strings
_STRUCTURAL = re.compile(rb'[\[\]{}"]')
#: the end of a string (an unescaped quote), an escape to step over, or a raw
#: newline (never valid inside a JSON string: the input is resynchronized there,
#: as qemu's lexer does on a control character)
_STRING_END = re.compile(rb'\\[^\n]|["\n]')

JSON = Any


@dataclasses.dataclass(frozen=True, slots=True)
class Execute:
    """A well-formed command to run."""

    command: str
    arguments: dict[str, JSON]
    id: JSON = None
    has_id: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class QMPError(Exception):
    """A QMP error reply: ``{"error": {"class": ..., "desc": ...}}``."""

    error_class: str
    desc: str

    def __str__(self) -> str:
        return f"{self.error_class}: {self.desc}"


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid keyword '{name}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _encode(message: dict[str, JSON]) -> bytes:
    return json.dumps(message, separators=(", ", ": "), allow_nan=False).encode() + b"\r\n"


def generic_error(desc: str) -> QMPError:
    return QMPError("GenericError", desc)


class QMPSession:
    """One management connection, from greeting to the last reply.

    Args:
        version: ``{"qemu": {"major":..,"minor":..,"micro":..}, "package": ..}``
            as sent in the greeting.
    """

    def __init__(self, version: dict[str, JSON]) -> None:
        self._buf = bytearray()
        #: JSON scanner state: bracket depth, inside a string, resume offset
        self._depth = 0
        self._in_string = False
        self._scan = 0
        #: the value being scanned is too long: its bytes are being dropped
        self._skipping = False
        self._out: list[bytes] = []
        self.negotiated = False
        self._queue({"QMP": {"version": version, "capabilities": []}})

    # -- bytes ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _queue(self, message: dict[str, JSON]) -> None:
        self._out.append(_encode(message))

    # -- commands ----------------------------------------------------------------

    def next_command(self) -> Execute | None:
        """The next command to run, or ``None`` when more bytes are needed.

        Malformed input is answered here (an error reply is queued) and
        skipped; it never reaches the caller.
        """
        while True:
            line = self._next_line()
            if line is None:
                return None
            has_id, msg_id = False, None
            try:
                message = self._decode(line)
                has_id, msg_id = "id" in message, message.get("id")
                command = self._check(message)
            except QMPError as err:
                self._send_error(err, has_id, msg_id)
                continue
            if not self.negotiated and command.command != "qmp_capabilities":
                self._send_error(QMPError(
                    "CommandNotFound",
                    "Expecting capabilities negotiation with 'qmp_capabilities'"),
                    command.has_id, command.id)
                continue
            if self.negotiated and command.command == "qmp_capabilities":
                self._send_error(QMPError(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored"),
                    command.has_id, command.id)
                continue
            return command

    def _next_line(self) -> bytes | None:
        """Cut the next complete JSON value off the input stream.

        Clients need not end messages with a newline (``qemu.qmp`` does not),
        so values are delimited the way qemu's JSON streamer does it: by
        bracket depth outside strings.  A top-level token that is not an
        object or array runs to the next whitespace (a string to its closing
        quote) and is returned as is, to be reported as an error.  A raw
        newline inside a string ends the broken value there, so one bad line
        cannot swallow the commands after it.
        """
        buf = self._buf
        while True:
            if self._depth == 0 and not self._in_string:
                stripped = len(buf) - len(buf.lstrip())
                if stripped:
                    del buf[:stripped]
                    self._scan = 0
                if not buf:
                    return None
                if buf[0] == ord('"'):
                    # a top-level string: braces inside it must not count
                    self._in_string, self._scan = True, 1
                elif buf[0] not in b"{[":
                    match = _DELIMITER.search(buf, 1)
                    if match is None:
                        self._overflow_check()
                        return None
                    token = bytes(buf[:match.start()])
                    del buf[:match.start()]
                    return token
                else:
                    self._depth, self._scan = 1, 1
            message = self._scan_value(buf)
            if message is not None:
                if self._skipping:
                    self._skipping = False
                    self._send_error(generic_error(
                        f"QMP input is longer than {MAX_LINE} bytes"), False, None)
                    continue
                return message
            self._overflow_check()
            return None

    def _scan_value(self, buf: bytearray) -> bytes | None:
        pos = self._scan
        while True:
            match = (_STRING_END if self._in_string else _STRUCTURAL).search(buf, pos)
            if match is None:
                # a trailing backslash must be looked at again with what follows it
                self._scan = max(pos, len(buf) - 1) if self._in_string else len(buf)
                return None
            pos = match.end()
            char = match.group()
            if self._in_string:
                if char == b"\n":
                    # an unterminated string: end the broken value here
                    self._depth, self._in_string = 0, False
                    return self._cut(buf, pos)
                if char == b'"':
                    self._in_string = False
                    if self._depth == 0:  # a top-level string is complete
                        return self._cut(buf, pos)
            elif char == b'"':
                self._in_string = True
            elif char in (b"{", b"["):
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._cut(buf, pos)

    def _cut(self, buf: bytearray, end: int) -> bytes:
        message = bytes(buf[:end])
        del buf[:end]
        self._scan = 0
        return message

    def _overflow_check(self) -> None:
        if len(self._buf) > MAX_LINE:
            # keep scanning state, drop the bytes: the value is skipped, never stored
            self._skipping = self._depth > 0 or self._in_string
            self._buf.clear()
            self._scan = 0
            if not self._skipping:
                self._send_error(generic_error(
                    f"QMP input is longer than {MAX_LINE} bytes"), False, None)
        return None

    @staticmethod
    def _decode(line: bytes) -> dict[str, JSON]:
        try:
            message = json.loads(line, parse_constant=_reject_constant,
                                 parse_float=_finite_float)
        except (ValueError, RecursionError) as err:
            raise generic_error(f"JSON parse error, {err}") from None
        if not isinstance(message, dict):
            raise generic_error("QMP input must be a JSON object")
        return message

    @staticmethod
    def _check(message: dict[str, JSON]) -> Execute:
        for key in message:
            if key not in ("execute", "arguments", "id", "exec-oob"):
                raise generic_error(f"QMP input member '{key}' is unexpected")
        if "exec-oob" in message:
            raise generic_error("QMP input member 'exec-oob' is unexpected: "
                                "out-of-band execution was not enabled")
        if "execute" not in message:
            raise generic_error("QMP input lacks member 'execute'")
        command = message["execute"]
        if not isinstance(command, str):
            raise generic_error("QMP input member 'execute' must be a string")
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            raise generic_error("QMP input member 'arguments' must be an object")
        return Execute(command, arguments, message.get("id"), "id" in message)

    # -- replies -------------------------------------------------------------------

    def send_return(self, command: Execute, value: JSON) -> None:
        if command.command == "qmp_capabilities":
            self.negotiated = True
        reply: dict[str, JSON] = {"return": value}
        if command.has_id:
            reply["id"] = command.id
        try:
            self._out.append(_encode(reply))
        except (ValueError, TypeError, RecursionError) as err:
            self._send_error(generic_error(f"The reply cannot be sent as JSON: {err}"),
                             command.has_id, command.id)

    def send_error(self, command: Execute, err: QMPError) -> None:
        self._send_error(err, command.has_id, command.id)

    def _send_error(self, err: QMPError, has_id: bool, msg_id: JSON) -> None:
        reply: dict[str, JSON] = {"error": {"class": err.error_class, "desc": err.desc}}
        if has_id:
            reply["id"] = msg_id
        try:
            self._out.append(_encode(reply))
        except (ValueError, TypeError, RecursionError):
            # only an id we did not parse ourselves can fail: answer without it
            reply.pop("id", None)
            self._queue(reply)

    def send_event(self, name: str, data: dict[str, JSON], seconds: int,
                   microseconds: int) -> None:
        """An asynchronous event; only sent once capabilities are negotiated."""
        if self.negotiated:
            with contextlib.suppress(ValueError, TypeError, RecursionError):
                self._queue({"event": name, "data": data,
                             "timestamp": {"seconds": seconds, "microseconds": microseconds}})
