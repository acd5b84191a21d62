"""``pynbd -L``/``--list``: list the exports of any NBD server, as ``qemu-nbd -L``.

The server is named as qemu-nbd names it (``-k PATH``, or ``-b HOST`` and
``-p PORT``; default localhost:10809) or by an NBD URI (``nbd://``,
``nbd+unix://``, ``nbds://...``; its export name is ignored).  The output is
qemu-nbd's layout line for line (qemu 10's, with its ``transaction size``
line), or with ``--json`` one JSON object.

Rules of this module: the protocol is ``proto.client_list.ClientLister``;
this module only connects, drives it and prints.  A bad command line is a
``UsageError`` (exit 2); a server that cannot be reached or refuses to list
prints one line ``pynbd: ...`` and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from typing import TYPE_CHECKING, Any

from ..client import (
    CONNECT_TIMEOUT,
    DEFAULT_PORT,
    ConnectError,
    Target,
    parse_uri,
    tls_context,
)
from ..cmdline import Parser, UsageError
from ..proto.client_events import HandshakeFailed
from ..proto.client_list import ClientLister, ExportDetails, ExportList
from ..proto.constants import Rep, TransmissionFlag
from ..proto.errors import ProtocolError
from ..proto.events import NEED_DATA, StartTLS

if TYPE_CHECKING:
    from collections.abc import Sequence

_READ_SIZE = 64 * 1024
#: qemu-nbd's names of the transmission flags, by bit (HAS_FLAGS has none)
FLAG_NAMES = (
    (TransmissionFlag.READ_ONLY, "readonly"), (TransmissionFlag.SEND_FLUSH, "flush"),
    (TransmissionFlag.SEND_FUA, "fua"), (TransmissionFlag.ROTATIONAL, "rotational"),
    (TransmissionFlag.SEND_TRIM, "trim"), (TransmissionFlag.SEND_WRITE_ZEROES, "zeroes"),
    (TransmissionFlag.SEND_DF, "df"), (TransmissionFlag.CAN_MULTI_CONN, "multi"),
    (TransmissionFlag.SEND_RESIZE, "resize"), (TransmissionFlag.SEND_CACHE, "cache"),
    (TransmissionFlag.SEND_FAST_ZERO, "fast-zero"),
    (TransmissionFlag.BLOCK_STATUS_PAYLOAD, "block-status-payload"),
)


def wants_listing(argv: Sequence[str]) -> bool:
    """Whether a ``pynbd`` command line asks for ``-L``/``--list``."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in ("-L", "--list"):
            return True
    return False


def build_parser() -> Parser:
    p = Parser(prog="pynbd", description="List the exports of an NBD server "
               "(as qemu-nbd -L).")
    p.add_argument("-L", "--list", action="store_true", required=True,
                   help="list the server's exports")
    p.add_argument("uri", nargs="?", metavar="URI",
                   help="the server as an NBD URI (instead of -k or -b/-p)")
    p.add_argument("-k", "--socket", dest="socket_path", metavar="PATH",
                   help="the server's Unix socket")
    p.add_argument("-b", "--bind", metavar="HOST", help="the server's host (default localhost)")
    p.add_argument("-p", "--port", type=int, metavar="PORT",
                   help=f"the server's TCP port (default {DEFAULT_PORT})")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="use TLS: a directory with ca-cert.pem (and client-cert.pem, "
                   "client-key.pem)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def target_of(argv: Sequence[str]) -> tuple[Target, bool]:
    """The server to list and whether ``--json`` was asked for."""
    ns = build_parser().parse_args(argv)
    if ns.uri is not None:
        if ns.socket_path is not None or ns.bind is not None or ns.port is not None:
            raise UsageError("give the server as a URI or with -k/-b/-p, not both")
        try:
            target = parse_uri(ns.uri, tls_certificates=ns.tls_creds)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if ns.tls_creds is not None and not target.tls:
            raise UsageError("--tls-creds needs an nbds:// or nbds+unix:// URI")
        return target, ns.json
    if ns.socket_path is not None:
        if ns.bind is not None or ns.port is not None:
            raise UsageError("-k and -b/-p name different servers: give one")
        where = f"unix:{ns.socket_path}"
        return Target(uri=where, export="", tls=ns.tls_creds is not None,
                      socket=ns.socket_path, tls_certificates=ns.tls_creds), ns.json
    host = ns.bind or "localhost"
    port = DEFAULT_PORT if ns.port is None else ns.port
    if not 0 < port <= 65535:
        raise UsageError(f"port {port} is out of range 1-65535")
    return Target(uri=f"{host}:{port}", export="", tls=ns.tls_creds is not None, host=host,
                  port=port, tls_certificates=ns.tls_creds), ns.json


async def list_exports(target: Target, *, connect_timeout: float = CONNECT_TIMEOUT) -> ExportList:
    """Connect to ``target`` and list its exports; ``ConnectError`` says why not."""
    ctx = tls_context(target) if target.tls else None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(connect_timeout):
            if target.socket is not None:
                reader, writer = await asyncio.open_unix_connection(target.socket)
            else:
                reader, writer = await asyncio.open_connection(target.host, target.port)
            return await _drive(ClientLister(tls=target.tls), reader, writer, target, ctx)
    except TimeoutError:
        raise ConnectError(f"cannot list {target.uri}: no answer within {connect_timeout} "
                           "s") from None
    except ProtocolError as err:
        raise ConnectError(f"cannot list {target.uri}: protocol error: {err}") from None
    except ssl.SSLError as err:
        raise ConnectError(f"cannot list {target.uri}: TLS failed: {err.reason or err}") \
            from None
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ConnectError(f"cannot list {target.uri}: {reason}") from None
    finally:
        if writer is not None:
            writer.transport.abort()


async def _drive(core: ClientLister, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, target: Target,
                 ctx: ssl.SSLContext | None) -> ExportList:
    while True:
        event = core.next_event()
        out = core.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        if event is NEED_DATA:
            data = await reader.read(_READ_SIZE)
            if not data:
                raise ConnectError(f"cannot list {target.uri}: the server closed the "
                                   "connection")
            core.receive_data(data)
        elif isinstance(event, StartTLS):
            assert ctx is not None
            hostname = target.tls_hostname or target.host or "localhost"
            await writer.start_tls(ctx, server_hostname=hostname)
            core.tls_started()
        elif isinstance(event, HandshakeFailed):
            hint = (" (the server requires TLS: give --tls-creds DIR or an nbds:// URI)"
                    if event.rep == Rep.ERR_TLS_REQD else "")
            raise ConnectError(f"cannot list {target.uri}: {event}{hint}")
        else:
            assert isinstance(event, ExportList)
            return event


def flag_names(flags: int) -> list[str]:
    return [name for flag, name in FLAG_NAMES if flags & flag]


def format_listing(listing: ExportList) -> str:
    """The listing as ``qemu-nbd -L`` prints it."""
    lines = [f"exports available: {len(listing.exports)}"]
    for export in listing.exports:
        lines.append(f" export: '{export.name}'")
        if export.description:
            lines.append(f"  description: {export.description}")
        if export.flags & TransmissionFlag.HAS_FLAGS:
            lines.append(f"  size:  {export.size}")
            names = "".join(f" {name}" for name in flag_names(export.flags))
            lines.append(f"  flags: {int(export.flags):#x} ({names} )")
        if export.block_sizes is not None:
            lines.append(f"  min block: {export.block_sizes.minimum}")
            lines.append(f"  opt block: {export.block_sizes.preferred}")
            lines.append(f"  max block: {export.block_sizes.maximum}")
        lines.append(f"  transaction size: {'64-bit' if export.extended else '32-bit'}")
        if export.meta_contexts:
            lines.append(f"  available meta contexts: {len(export.meta_contexts)}")
            lines.extend(f"   {context}" for context in export.meta_contexts)
    return "\n".join(lines) + "\n"


def _export_json(export: ExportDetails) -> dict[str, Any]:
    sizes = export.block_sizes
    return {
        "name": export.name,
        "description": export.description,
        "size": export.size,
        "flags": {"value": int(export.flags), "names": flag_names(export.flags)},
        "block-sizes": None if sizes is None else {
            "minimum": sizes.minimum, "preferred": sizes.preferred, "maximum": sizes.maximum},
        "meta-contexts": list(export.meta_contexts),
        "transaction-size": 64 if export.extended else 32,
    }


def format_json(listing: ExportList) -> str:
    """The listing as one JSON object: ``{"tls": ..., "exports": [...]}``."""
    return json.dumps({"tls": listing.tls,
                       "exports": [_export_json(e) for e in listing.exports]}, indent=2) + "\n"


def main(argv: Sequence[str]) -> int:
    """``pynbd -L ...``: list, print, and return the exit status."""
    try:
        target, as_json = target_of(argv)
        listing = asyncio.run(list_exports(target))
    except UsageError as err:
        print(f"pynbd: {err}", file=sys.stderr)
        return 2
    except ConnectError as err:
        print(f"pynbd: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(format_json(listing) if as_json else format_listing(listing))
    return 0
