"""Export flags: the one policy function, and what pynbd.server.export.Export advertises.

qemu >= 7.1 decides CAN_MULTI_CONN by "does the server allow more than one
client", for read-only and writable exports alike (commit 58a6fdcc); the
expected hex values below are the ones qemu's iotests print (0xded, 0x48f ...).
"""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest

from pynbd.block import MemoryNode, RawNode
from pynbd.block.faults import FaultFilter
from pynbd.proto import wire
from pynbd.proto.constants import IHAVEOPT, ClientFlag, Opt, TransmissionFlag
from pynbd.proto.events import HandshakeDone
from pynbd.proto.handshake import ServerHandshake
from pynbd.proto.negotiated import transmission_flags
from pynbd.server.export import Export, ExportTable

F = TransmissionFlag


def test_flag_bit_values_match_the_spec() -> None:
    # qemu 3.0 once gave SEND_CACHE the value of bit 8, which is CAN_MULTI_CONN
    assert int(F.CAN_MULTI_CONN) == 0x100
    assert int(F.SEND_CACHE) == 0x400
    assert {flag.name: int(flag) for flag in F} == {
        "HAS_FLAGS": 0x1, "READ_ONLY": 0x2, "SEND_FLUSH": 0x4, "SEND_FUA": 0x8,
        "ROTATIONAL": 0x10, "SEND_TRIM": 0x20, "SEND_WRITE_ZEROES": 0x40, "SEND_DF": 0x80,
        "CAN_MULTI_CONN": 0x100, "SEND_RESIZE": 0x200, "SEND_CACHE": 0x400,
        "SEND_FAST_ZERO": 0x800, "BLOCK_STATUS_PAYLOAD": 0x1000,
    }


# read_only, can_flush, can_fua, can_fast_zero, multi_conn, structured -> flags
TABLE = [
    (False, True, True, True, True, True, 0xDED),     # qemu 7.1 writable, multi, df
    (False, True, True, True, False, True, 0xCED),    # qemu writable without multi
    (False, True, True, True, True, False, 0xD6D),
    (False, True, True, True, False, False, 0xC6D),
    (True, True, True, True, False, True, 0x48F),     # qemu nbd-qemu-allocation (-r)
    (True, True, True, True, True, True, 0x58F),
    (True, True, True, True, False, False, 0x40F),
    (True, True, True, True, True, False, 0x50F),
    (True, True, True, False, False, False, 0x40F),   # FAST_ZERO never when read-only
    (False, True, True, False, False, False, 0x46D),  # no fast zero
    (False, False, False, True, False, False, 0xC61),  # no flush, no fua
    (False, True, False, True, True, False, 0xD65),
    (False, False, True, True, True, False, 0xD69),
    (True, False, False, False, False, False, 0x403),
    (True, False, False, False, True, True, 0x583),
]


@pytest.mark.parametrize(("read_only", "can_flush", "can_fua", "can_fast_zero",
                          "multi_conn", "structured", "expected"), TABLE)
def test_transmission_flags_table(read_only: bool, can_flush: bool, can_fua: bool,
                                  can_fast_zero: bool, multi_conn: bool, structured: bool,
                                  expected: int) -> None:
    flags = transmission_flags(read_only=read_only, can_flush=can_flush, can_fua=can_fua,
                               can_fast_zero=can_fast_zero, multi_conn=multi_conn,
                               structured=structured)
    assert isinstance(flags, TransmissionFlag)
    assert int(flags) == expected, f"{int(flags):#x} != {expected:#x}"


@pytest.mark.parametrize("combo", list(itertools.product([False, True], repeat=6)),
                         ids=lambda c: "".join("1" if b else "0" for b in c))
def test_transmission_flags_rules(combo: tuple[bool, ...]) -> None:
    read_only, can_flush, can_fua, can_fast_zero, multi_conn, structured = combo
    flags = transmission_flags(read_only=read_only, can_flush=can_flush, can_fua=can_fua,
                               can_fast_zero=can_fast_zero, multi_conn=multi_conn,
                               structured=structured)
    assert flags & F.HAS_FLAGS
    assert flags & F.SEND_CACHE
    assert bool(flags & F.READ_ONLY) is read_only
    assert bool(flags & F.SEND_FLUSH) is can_flush
    assert bool(flags & F.SEND_FUA) is can_fua
    assert bool(flags & F.SEND_TRIM) is not read_only
    assert bool(flags & F.SEND_WRITE_ZEROES) is not read_only
    assert bool(flags & F.SEND_FAST_ZERO) is (can_fast_zero and not read_only)
    assert bool(flags & F.CAN_MULTI_CONN) is multi_conn
    assert bool(flags & F.SEND_DF) is structured
    assert not flags & (F.ROTATIONAL | F.SEND_RESIZE | F.BLOCK_STATUS_PAYLOAD)
    assert int(flags) < 1 << 16


# -- pynbd.server.export.Export -------------------------------------------------------------


def _backend(**caps: bool) -> MemoryNode:
    backend = MemoryNode(1 << 20)
    backend.capabilities = dataclasses.replace(backend.capabilities, **caps)
    return backend


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("structured", [False, True])
def test_export_multi_conn_advertised_for_read_only_and_writable(
        read_only: bool, structured: bool) -> None:
    export = Export("disk", MemoryNode(1 << 20), read_only=read_only, multi_conn=True)
    flags = export.transmission_flags(structured=structured)
    assert flags & F.CAN_MULTI_CONN
    assert bool(flags & F.READ_ONLY) is read_only
    assert bool(flags & F.SEND_DF) is structured
    expected = (0x58F if structured else 0x50F) if read_only else (
        0xDED if structured else 0xD6D)
    assert int(flags) == expected


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("structured", [False, True])
def test_export_without_multi_conn_never_advertises_it(read_only: bool,
                                                       structured: bool) -> None:
    export = Export("disk", MemoryNode(1 << 20), read_only=read_only, multi_conn=False)
    flags = export.transmission_flags(structured=structured)
    assert not flags & F.CAN_MULTI_CONN
    assert flags & F.HAS_FLAGS


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("multi_conn", [False, True])
def test_inconsistent_backend_never_gets_multi_conn(read_only: bool, multi_conn: bool) -> None:
    export = Export("disk", _backend(can_multi_conn=False), read_only=read_only,
                    multi_conn=multi_conn)
    for structured in (False, True):
        assert not export.transmission_flags(structured=structured) & F.CAN_MULTI_CONN


@pytest.mark.parametrize("window", [False, True])
def test_a_private_node_anywhere_under_the_export_denies_multi_conn(window: bool) -> None:
    """The flag is computed from the whole graph: a node deep under the export that
    keeps data private to a caller denies it, whatever the nodes above it say."""
    private = _backend(can_multi_conn=False)
    raw = RawNode(private, offset=4096 if window else 0)
    stack = FaultFilter(raw)
    # even a top node that claims one store does not hide the private one under it
    stack.capabilities = dataclasses.replace(stack.capabilities, can_multi_conn=True)
    export = Export("disk", stack, multi_conn=True)
    assert not export.transmission_flags(structured=True) & F.CAN_MULTI_CONN
    shared = Export("disk", FaultFilter(RawNode(MemoryNode(1 << 20))), multi_conn=True)
    assert shared.transmission_flags(structured=True) & F.CAN_MULTI_CONN


def test_backend_that_cannot_write_makes_a_read_only_export() -> None:
    export = Export("disk", _backend(can_write=False), multi_conn=True)
    flags = export.transmission_flags(structured=False)
    assert flags & F.READ_ONLY
    assert not flags & (F.SEND_TRIM | F.SEND_WRITE_ZEROES | F.SEND_FAST_ZERO)
    assert flags & F.CAN_MULTI_CONN


def test_backend_capabilities_reach_the_flags() -> None:
    export = Export("disk", _backend(can_flush=False, can_fua=False, can_fast_zero=False))
    assert int(export.transmission_flags(structured=False)) == 0x461


@pytest.mark.parametrize("multi_conn", [False, True])
def test_export_flags_seen_through_a_real_handshake(multi_conn: bool) -> None:
    table = ExportTable()
    table.add(Export("rw", MemoryNode(1 << 20), multi_conn=multi_conn))
    table.add(Export("ro", MemoryNode(1 << 20), read_only=True, multi_conn=multi_conn))
    for name, flag_ro in ((b"rw", False), (b"ro", True)):
        core = ServerHandshake(table)
        core.receive_data(
            wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
            + wire.OPTION_HEADER.pack(IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
            + wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, 4 + len(name) + 2)
            + struct.pack(">I", len(name)) + name + b"\x00\x00")
        done = core.next_event()
        assert isinstance(done, HandshakeDone)
        flags = done.negotiated.flags
        assert bool(flags & F.CAN_MULTI_CONN) is multi_conn
        assert bool(flags & F.READ_ONLY) is flag_ro
        assert flags & F.SEND_DF
        assert done.negotiated.export.size == 1 << 20
