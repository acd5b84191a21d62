"""The fuzz targets by name, the roles that group them, and seed inputs for each.

Seeds are made by the real cores talking to each other in memory, so a run
starts from valid sessions and mutates them, rather than from nothing; the
``qcow2-open`` target's seeds are images made by qemu-img (see
``tests.fuzz.qcow2_targets``).  The
two ``selftest-*`` targets are broken on purpose (a crash, a hang on the first
FLUSH request, which the seeds hold): they prove the runner reports what it
should.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pynbd.proto import wire
from pynbd.proto.client import ClientTransmission
from pynbd.proto.constants import IHAVEOPT, REQUEST_MAGIC, Cmd, Opt
from pynbd.proto.errors import ProtocolError
from pynbd.proto.events import Request
from pynbd.proto.transmission import ServerTransmission

from .client_targets import (
    client_extended_handshake,
    client_extended_transmission,
    client_handshake,
    client_transmission,
)
from .common import EXTENDED_EXPORTS, Conversation, Input, converse, drain
from .qcow2_targets import qcow2_open
from .qcow2_targets import seeds as qcow2_seeds
from .server_extended_targets import (
    CMDS,
    option,
    server_extended_handshake,
    server_extended_transmission,
)
from .server_targets import server_handshake, server_transmission

Target = Callable[[bytes], None]

#: (export index, structured, meta, TLS) of the sessions the seeds come from
_SESSIONS = ((1, True, True, False), (0, False, False, False), (2, True, False, False),
             (4, True, True, False), (5, False, False, False), (6, True, True, False),
             (1, True, True, True))
#: piece sizes that end the first piece right after STARTTLS (client flags + option)
#: and right after the server's ACK to it (greeting + option reply)
_AFTER_STARTTLS = wire.CLIENT_FLAGS.size + wire.OPTION_HEADER.size
_AFTER_STARTTLS_ACK = wire.GREETING.size + wire.OPTION_REPLY_HEADER.size

def _selftest(data: bytes, *, hang: bool) -> None:
    inp = Input(data)
    core = ServerTransmission(converse(inp.u8(), structured=True, meta=True).negotiated)
    core.receive_data(data[5:])
    try:
        for event in drain(core):
            if isinstance(event, Request) and event.cmd == Cmd.FLUSH:
                while hang:
                    pass
                raise RuntimeError("selftest: a FLUSH request (this target is broken on "
                                   "purpose)")
    except ProtocolError:
        return


def selftest_crash(data: bytes) -> None:
    """Broken on purpose: raises on the first FLUSH request."""
    _selftest(data, hang=False)


def selftest_hang(data: bytes) -> None:
    """Broken on purpose: loops forever on the first FLUSH request."""
    _selftest(data, hang=True)


TARGETS: dict[str, Target] = {
    "server-handshake": server_handshake,
    "server-transmission": server_transmission,
    "client-handshake": client_handshake,
    "client-transmission": client_transmission,
    "server-extended-handshake": server_extended_handshake,
    "server-extended-transmission": server_extended_transmission,
    "client-extended-handshake": client_extended_handshake,
    "client-extended-transmission": client_extended_transmission,
    "qcow2-open": qcow2_open,
    "selftest-crash": selftest_crash,
    "selftest-hang": selftest_hang,
}
ROLES: dict[str, list[str]] = {
    "server": ["server-handshake", "server-transmission", "server-extended-handshake",
               "server-extended-transmission"],
    "client": ["client-handshake", "client-transmission", "client-extended-handshake",
               "client-extended-transmission"],
    "format": ["qcow2-open"],
}
ROLES["all"] = ROLES["server"] + ROLES["client"] + ROLES["format"]


def _requests(conversation: Conversation) -> bytes:
    """What a client sends first in transmission: a few requests, then NBD_CMD_DISC."""
    core = ClientTransmission.from_handshake(conversation.client_done)
    for cmd, length in ((Cmd.READ, 512), (Cmd.WRITE, 8), (Cmd.FLUSH, 0), (Cmd.TRIM, 4096),
                        (Cmd.WRITE_ZEROES, 512), (Cmd.BLOCK_STATUS, 4096), (Cmd.CACHE, 1)):
        core.request(cmd, length=length, payload=bytes(length) if cmd == Cmd.WRITE else None)
    core.disconnect()
    return core.data_to_send()


def _script_read(export: int, cfg: int) -> bytes:
    """A client-transmission script: READ 512 at 0, then a simple and a chunked reply."""
    read = bytes([0, 0]) + struct.pack(">IIH", 0, 0, 512)
    simple = bytes([10, 0, 7, 5])  # reply to the first cookie in flight: simple, success
    chunk = bytes([10, 0, 1, 1, 0]) + struct.pack(">II", 0, 512)  # OFFSET_DATA 0+512, DONE
    return bytes([export, cfg]) + read + simple + read + chunk


def seeds(name: str) -> list[bytes]:
    """Valid starting inputs for target ``name``."""
    if name == "qcow2-open":
        return qcow2_seeds()
    if "-extended-" in name:
        return _extended_seeds(name)
    out: list[bytes] = []
    for export, structured, meta, tls in _SESSIONS:
        conversation = converse(export, structured=structured, meta=meta, tls=tls)
        cfg = int(structured) | int(meta) << 1
        requests = _requests(conversation)
        if name == "server-handshake":
            # cfg: TLS mode ON when the client starts with STARTTLS, else OFF
            size = struct.pack(">H", _AFTER_STARTTLS if tls else 0)
            out.append(bytes([int(tls)]) + size + b"\0" + conversation.client_bytes + requests)
        elif name == "client-handshake":
            size = struct.pack(">H", _AFTER_STARTTLS_ACK if tls else 0)
            out.append(bytes([cfg | int(tls) << 2, export]) + size + conversation.server_bytes)
        elif tls:
            continue  # the transmission targets start from plaintext sessions only
        elif name == "server-transmission" or name.startswith("selftest-"):
            out.append(bytes([export, cfg, 0, 0, 0]) + requests)
        elif name == "client-transmission":
            out.append(_script_read(export, cfg))
    if name == "server-handshake":
        # an option whose data runs past MAX_OPTION_DATA, in the 128 KiB of zeroes that
        # follow the input (cfg 0x40), without and with TLS required
        big = wire.CLIENT_FLAGS.pack(3) + wire.OPTION_HEADER.pack(IHAVEOPT, Opt.LIST, 100_000)
        out += [bytes([0x40 | mode, 0, 0, 0, 0x80, 0]) + big for mode in (0, 2)]
    elif name == "server-transmission":
        # a 96 KiB WRITE, its payload in the zeroes that follow the input (cfg 0x40)
        write = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 96 << 10)
        out.append(bytes([1, 0x40, 0, 0, 0, 0x18, 0]) + write)
    return out


# -- extended headers -------------------------------------------------------------------------

#: (command, length) of the first requests on an extended connection: 64-bit lengths too
_EXT_REQUESTS = ((Cmd.READ, 512), (Cmd.WRITE, 8), (Cmd.FLUSH, 0), (Cmd.TRIM, 5 << 30),
                 (Cmd.CACHE, 1), (Cmd.WRITE_ZEROES, 512), (Cmd.BLOCK_STATUS, 6 << 30))


def _ext_requests(export: int) -> bytes:
    """What a client sends first on an extended connection to ``export``."""
    core = ClientTransmission.from_handshake(
        converse(export, structured=True, meta=True, extended=True).client_done)
    for cmd, length in _EXT_REQUESTS:
        core.request(cmd, length=length, payload=bytes(length) if cmd == Cmd.WRITE else None)
    core.disconnect()
    return core.data_to_send()


def _ext_script() -> bytes:
    """A server-extended-transmission script of the same requests (no faults)."""
    body = b""
    for cmd, length in (*_EXT_REQUESTS, (Cmd.DISC, 0)):
        # op (0: no fault), command, range: how, then offset and length (none for FLUSH)
        body += bytes([0, CMDS.index(cmd), 0])
        if cmd != Cmd.FLUSH:
            body += bytes(8) + length.to_bytes(2 if cmd in (Cmd.READ, Cmd.WRITE) else 8, "big")
        body += b"\0"  # the cookie's top byte
    return body


def _ext_client_script() -> bytes:
    """A client-extended-transmission script: READ 512 at 0 and its OFFSET_DATA chunk,
    TRIM 5 GiB and its NONE chunk, BLOCK_STATUS 6 GiB and a BLOCK_STATUS_EXT chunk
    of two descriptors (one over 4 GiB)."""
    u64 = struct.Struct(">Q").pack
    read = bytes([0, 0]) + u64(0) + u64(0) + struct.pack(">H", 512)  # the range's length unused
    data = bytes([10, 0, 1, 1, 0, 0]) + u64(0) + u64(512)  # pick, type, DONE, offset, range
    trim = bytes([3, 0]) + u64(0) + u64(5 << 30) + b"\0"
    none = bytes([10, 0, 0, 1, 0])
    status = bytes([5, 0]) + u64(0) + u64(6 << 30) + b"\0"
    # pick, type, DONE, offset, an unknown id, context 0, 2 descriptors
    ext = bytes([10, 0, 3, 1, 0]) + bytes(4) + bytes([0, 2])
    for length, flags in ((4096, 3), (5 << 30, 0)):
        ext += b"\0" + u64(0) + u64(length) + bytes([0, flags])
    return read + data + trim + none + status + ext + b"\0"


def _extended_seeds(name: str) -> list[bytes]:
    out: list[bytes] = []
    if name == "server-extended-handshake":
        # the export over 4 GiB (EXTENDED_EXPORTS[8]), as the prefixes name it
        go = option(Opt.GO, wire.U32.pack(3) + b"big" + wire.U16.pack(0))
        # cfg & 7 picks the prefix of options; cfg 0x08: TLS on
        out += [bytes([cfg, 0, 0, 0]) + go + _ext_requests(8) for cfg in range(16)]
    elif name == "server-extended-transmission":
        for export in range(len(EXTENDED_EXPORTS)):
            for cfg in (0, 2, 0x80 | 2):  # raw requests, with a context, buffered
                out.append(bytes([export, cfg, 0, 0, 0]) + _ext_requests(export))
            for cfg in (0x20, 0x22, 0x26):  # scripted, with a context, 100-byte payloads
                out.append(bytes([export, cfg, 0, 0, 0]) + _ext_script())
    elif name == "client-extended-handshake":
        for export, meta, tls in ((1, True, False), (0, False, False), (8, True, False),
                                  (1, True, True)):
            conversation = converse(export, structured=True, meta=meta, tls=tls, extended=True)
            size = struct.pack(">H", _AFTER_STARTTLS_ACK if tls else 0)
            out.append(bytes([1 | int(meta) << 1 | int(tls) << 2, export]) + size
                       + conversation.server_bytes)
    else:
        out += [bytes([export, 2]) + _ext_client_script() for export in (1, 8)]
    return out
