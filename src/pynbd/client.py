"""A small asyncio NBD client on top of the sans-IO client core.

::

    async with await NBDClient.connect("nbd+unix:///?socket=/tmp/s") as c:
        await c.pwrite(b"x" * 4096, 0)
        data = await c.pread(0, 4096)

Rules of this module:
- URIs are read as libnbd writes them: ``nbd://host[:port]/name``,
  ``nbd+unix:///name?socket=PATH``, and ``nbds://``/``nbds+unix://`` for TLS
  (STARTTLS, the server verified against a CA; ``tls-certificates=DIR`` holds
  ``ca-cert.pem`` and optionally ``client-cert.pem``/``client-key.pem``).  A bad
  URI raises ``ValueError`` saying what is wrong.
- Any number of requests may be in flight: each call awaits its own reply,
  and one reader task routes replies by cookie.
- Failing to connect or negotiate raises ``ConnectError``; a request the
  server fails raises ``RequestError`` (with the NBD errno and message); once
  the connection is gone every pending and later call raises ``ConnectionLost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
import urllib.parse
from typing import TYPE_CHECKING

from .proto.client import (
    ClientHandshake,
    ClientTransmission,
    Completion,
    HandshakeComplete,
    HandshakeFailed,
    OptionRefused,
    errno_name,
)
from .proto.constants import BASE_ALLOCATION, MAX_STRING, Cmd, Rep, TransmissionFlag
from .proto.errors import ProtocolError
from .proto.events import NEED_DATA, StartTLS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from .proto.negotiated import BlockSizes

DEFAULT_PORT = 10809
#: how long connecting and negotiating may take
CONNECT_TIMEOUT = 30.0
#: how long ``close`` waits for requests in flight and for the server to hang up
CLOSE_TIMEOUT = 10.0
_READ_SIZE = 256 * 1024
_SCHEMES = {"nbd": (False, False), "nbds": (True, False),
            "nbd+unix": (False, True), "nbds+unix": (True, True)}
_TLS_PARAMS = ("tls-certificates", "tls-hostname", "tls-verify-peer", "tls-type")


class ClientError(Exception):
    """Root of the client's exceptions."""


class ConnectError(ClientError):
    """Connecting or negotiating failed; the message says why, in one line."""


class ConnectionLost(ClientError):
    """The connection is gone; the request's outcome is unknown."""


def _refused(uri: str, reason: str) -> ConnectError:
    return ConnectError(f"cannot connect to {uri}: {reason}")


class RequestError(ClientError):
    """The server answered a request with an error."""

    def __init__(self, cmd: Cmd, errno: int, message: str) -> None:
        self.cmd = cmd
        self.errno = errno
        self.message = message
        text = f"{cmd.name} failed: {errno_name(errno)}"
        super().__init__(f"{text}: {message}" if message else text)


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where an NBD URI points."""

    uri: str
    export: str
    tls: bool
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls_certificates: str | None = None
    tls_hostname: str | None = None
    tls_verify_peer: bool = True

    @property
    def where(self) -> str:
        return self.socket if self.socket is not None else f"{self.host}:{self.port}"


def _query(uri: str, query: str, tls: bool) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key in params:
            raise ValueError(f"bad NBD URI {uri!r}: parameter {key!r} given twice")
        if key != "socket" and key not in _TLS_PARAMS:
            raise ValueError(f"bad NBD URI {uri!r}: unknown parameter {key!r}")
        if key in _TLS_PARAMS and not tls:
            raise ValueError(f"bad NBD URI {uri!r}: {key} needs an nbds:// or nbds+unix:// "
                             "URI")
        params[key] = value
    if params.get("tls-type", "x509") != "x509":
        raise ValueError(f"bad NBD URI {uri!r}: only tls-type=x509 is supported")
    if params.get("tls-verify-peer", "1").lower() not in ("0", "1", "false", "true", "no",
                                                          "yes"):
        raise ValueError(f"bad NBD URI {uri!r}: tls-verify-peer must be 0 or 1")
    return params


def _authority(uri: str, parts: urllib.parse.SplitResult, unix: bool,
               sock: str | None) -> tuple[str | None, int]:
    if unix:
        if parts.netloc:
            raise ValueError(f"bad NBD URI {uri!r}: a Unix socket URI has no host "
                             "(write nbd+unix:///NAME?socket=PATH)")
        if not sock:
            raise ValueError(f"bad NBD URI {uri!r}: the socket=PATH parameter is missing")
        return None, DEFAULT_PORT
    if sock is not None:
        raise ValueError(f"bad NBD URI {uri!r}: socket= only goes with nbd+unix://")
    if parts.username is not None:
        raise ValueError(f"bad NBD URI {uri!r}: user names are not supported")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad NBD URI {uri!r}: invalid port") from None
    if not parts.hostname:
        raise ValueError(f"bad NBD URI {uri!r}: the host is missing")
    return parts.hostname, DEFAULT_PORT if port is None else port


def parse_uri(uri: str, *, tls_certificates: str | None = None) -> Target:
    """Read an NBD URI; ``ValueError`` with a clear message if it is not one we can use.

    ``tls_certificates`` is used when the URI has no ``tls-certificates=``.
    """
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as err:
        raise ValueError(f"bad NBD URI {uri!r}: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"bad NBD URI {uri!r}: the scheme must be nbd, nbds, nbd+unix or "
                         "nbds+unix")
    tls, unix = _SCHEMES[scheme]
    if parts.fragment:
        raise ValueError(f"bad NBD URI {uri!r}: fragments (#...) are not allowed")
    path = urllib.parse.unquote(parts.path)
    export = path[1:] if path.startswith("/") else path
    if "\0" in export or len(export.encode("utf-8")) > MAX_STRING:
        raise ValueError(f"bad NBD URI {uri!r}: the export name must be at most "
                         f"{MAX_STRING} bytes without NUL")
    params = _query(uri, parts.query, tls)
    sock = params.get("socket")
    host, port = _authority(uri, parts, unix, sock)
    return Target(uri=uri, export=export, tls=tls, host=host, port=port, socket=sock,
                  tls_certificates=params.get("tls-certificates") or tls_certificates,
                  tls_hostname=params.get("tls-hostname") or None,
                  tls_verify_peer=params.get("tls-verify-peer", "1").lower()
                  in ("1", "true", "yes"))


def tls_context(target: Target) -> ssl.SSLContext:
    """The client ``SSLContext`` for a TLS target; ``ConnectError`` if files are unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    directory = target.tls_certificates
    try:
        if directory is not None:
            ca = os.path.join(directory, "ca-cert.pem")
            if target.tls_verify_peer:
                ctx.load_verify_locations(cafile=ca)
            cert = os.path.join(directory, "client-cert.pem")
            key = os.path.join(directory, "client-key.pem")
            if os.path.exists(cert) and os.path.exists(key):
                ctx.load_cert_chain(cert, key)
        elif target.tls_verify_peer:
            ctx.load_default_certs()
    except FileNotFoundError as err:
        raise _refused(target.uri, f"missing {err.filename}") from None
    except (ssl.SSLError, OSError) as err:
        raise _refused(target.uri, f"cannot load TLS certificates from {directory}: "
                                   f"{err}") from None
    if not target.tls_verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     target: Target, meta_contexts: Sequence[str],
                     extended: bool) -> HandshakeComplete:
    core = ClientHandshake(target.export, structured=True, extended=extended,
                           meta_contexts=meta_contexts, tls=target.tls)
    while True:
        event = core.next_event()
        out = core.data_to_send()
        if out:
            writer.write(out)
        if event is NEED_DATA:
            await writer.drain()
            data = await reader.read(_READ_SIZE)
            if not data:
                raise _refused(target.uri, "the server closed the connection during the "
                               "handshake")
            core.receive_data(data)
        elif isinstance(event, StartTLS):
            await writer.drain()
            hostname = target.tls_hostname or (target.host if target.socket is None
                                               else "localhost")
            await writer.start_tls(tls_context(target), server_hostname=hostname)
            core.tls_started()
        elif isinstance(event, HandshakeFailed):
            hint = ""
            if event.rep == Rep.ERR_TLS_REQD:
                hint = " (the server requires TLS: use an nbds:// or nbds+unix:// URI)"
            elif event.option.name == "STARTTLS" and event.rep == Rep.ERR_POLICY:
                hint = " (the server does not offer TLS)"
            raise _refused(target.uri, f"{event}{hint}")
        elif isinstance(event, HandshakeComplete):
            return event
        elif not isinstance(event, OptionRefused):  # refusals of optional options are fine
            raise _refused(target.uri, f"unexpected handshake event {event!r}")


class NBDClient:
    """One connection to one export; use ``await NBDClient.connect(uri)``."""

    def __init__(self, target: Target, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, done: HandshakeComplete) -> None:
        self.target = target
        self._reader = reader
        self._writer = writer
        self._info = done
        self._core = ClientTransmission.from_handshake(done)
        self._waiters: dict[int, asyncio.Future[Completion]] = {}
        self._lost: str | None = None
        self._closing = False
        self._send_scheduled = False
        self._reader_task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, uri: str, *, tls_certificates: str | None = None,
                      meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
                      connect_timeout: float = CONNECT_TIMEOUT,
                      extended_headers: bool = True) -> NBDClient:
        """Connect and negotiate; ``ValueError`` for a bad URI, else ``ConnectError``.

        Extended headers are asked for unless ``extended_headers`` is false;
        a server that refuses them is spoken to with structured replies.
        """
        target = parse_uri(uri, tls_certificates=tls_certificates)
        if target.tls:
            tls_context(target)  # unusable certificate files fail before connecting
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                if target.socket is not None:
                    reader, writer = await asyncio.open_unix_connection(target.socket)
                else:
                    reader, writer = await asyncio.open_connection(target.host, target.port)
                done = await _negotiate(reader, writer, target, meta_contexts,
                                        extended_headers)
        except BaseException as err:
            if writer is not None:
                writer.transport.abort()
            if isinstance(err, TimeoutError):
                raise _refused(uri, f"no answer within {connect_timeout} s") from None
            if isinstance(err, ProtocolError):
                raise _refused(uri, f"protocol error in the handshake: {err}") from None
            if isinstance(err, ssl.SSLError):
                raise _refused(uri, f"TLS failed: {err.reason or err}") from None
            if isinstance(err, OSError):
                reason = os.strerror(err.errno) if err.errno else str(err)
                raise _refused(target.uri, reason) from None
            raise
        return cls(target, reader, writer, done)

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- what was negotiated ------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._info.size

    @property
    def flags(self) -> TransmissionFlag:
        return self._info.flags

    @property
    def export_name(self) -> str:
        return self.target.export

    @property
    def structured(self) -> bool:
        return self._info.structured

    @property
    def extended(self) -> bool:
        """Extended headers were negotiated (32-byte headers, 64-bit lengths)."""
        return self._info.extended

    @property
    def block_sizes(self) -> BlockSizes | None:
        return self._info.block_sizes

    @property
    def meta_contexts(self) -> dict[str, int]:
        return dict(self._info.meta_contexts)

    @property
    def max_payload(self) -> int:
        return self._core.max_payload

    def _has(self, flag: TransmissionFlag) -> bool:
        return bool(self._info.flags & flag)

    @property
    def read_only(self) -> bool:
        return self._has(TransmissionFlag.READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return self._has(TransmissionFlag.CAN_MULTI_CONN)

    @property
    def can_flush(self) -> bool:
        return self._has(TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._has(TransmissionFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._has(TransmissionFlag.SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return self._has(TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return self._has(TransmissionFlag.SEND_FAST_ZERO)

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    @property
    def closed(self) -> bool:
        return self._lost is not None

    # -- requests -----------------------------------------------------------------------

    async def pread(self, offset: int, length: int) -> bytes:
        completion = await self._run(lambda core: core.read(offset, length))
        assert completion.data is not None
        return completion.data

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        await self._run(lambda core: core.write(data, offset, fua=fua))

    async def flush(self) -> None:
        await self._run(lambda core: core.flush())

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._run(lambda core: core.trim(offset, length, fua=fua))

    async def zero(self, offset: int, length: int, *, no_hole: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        await self._run(lambda core: core.write_zeroes(offset, length, no_hole=no_hole,
                                                       fast_zero=fast, fua=fua))

    async def block_status(self, offset: int, length: int, *,
                           context: str = BASE_ALLOCATION) -> list[tuple[int, int]]:
        """``[(length, status flags)]`` of ``context`` from ``offset``."""
        completion = await self._run(lambda core: core.block_status(offset, length))
        assert completion.extents is not None
        return completion.extents[context]

    async def _run(self, make: Callable[[ClientTransmission], int]) -> Completion:
        if self._lost is not None:
            raise ConnectionLost(self._lost)
        cookie = make(self._core)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Completion] = loop.create_future()
        self._waiters[cookie] = waiter
        if not self._send_scheduled:
            # requests made in one turn of the event loop leave in one write
            self._send_scheduled = True
            loop.call_soon(self._send)
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()  # a broken pipe shows up as ConnectionLost below
        completion = await waiter
        if not completion.ok:
            raise RequestError(completion.cmd, completion.error, completion.message)
        return completion

    def _send(self) -> None:
        self._send_scheduled = False
        data = self._core.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _read_loop(self) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                self._core.receive_data(data)
                while True:
                    event = self._core.next_event()
                    if event is NEED_DATA:
                        break
                    waiter = self._waiters.pop(event.cookie, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(event)
        except ProtocolError as err:
            reason = f"the server broke the protocol: {err}"
            self._writer.transport.abort()
        except (OSError, ssl.SSLError) as err:
            reason = f"connection error: {err}"
        except asyncio.CancelledError:
            reason = "the client closed the connection"
            raise
        finally:
            if self._closing:
                reason = "the client closed the connection"
            self._lost = f"{self.target.uri}: {reason}"
            waiters, self._waiters = self._waiters, {}
            for waiter in waiters.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionLost(
                        f"{self._lost} ({len(waiters)} requests were in flight)"))

    async def close(self) -> None:
        """Wait (bounded) for requests in flight, send NBD_CMD_DISC and hang up."""
        if self._closing:
            return
        pending = list(self._waiters.values())
        if pending and self._lost is None:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
        self._closing = True
        if self._lost is None:
            with contextlib.suppress(Exception):
                self._core.disconnect()
                self._send()
                await asyncio.wait_for(self._writer.drain(), CLOSE_TIMEOUT)
        with contextlib.suppress(Exception):
            self._writer.close()
        task = self._reader_task
        try:
            await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writer.transport.abort()
