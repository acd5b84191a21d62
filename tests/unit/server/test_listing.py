"""``pynbd -L``'s protocol core (``proto.client_list.ClientLister``) against the
server's own handshake core, byte for byte with no I/O, and its output layout."""

from __future__ import annotations

import json

import pytest
from tests.support.fakes import FakeCatalog, FakeExport

from pynbd.commands.listing import format_json, format_listing, wants_listing
from pynbd.proto import wire
from pynbd.proto.client_events import HandshakeFailed
from pynbd.proto.client_list import ClientLister, ExportList
from pynbd.proto.constants import MAX_PAYLOAD, REPLY_MAGIC, Opt, Rep
from pynbd.proto.errors import ProtocolError
from pynbd.proto.events import NEED_DATA, HandshakeClosed
from pynbd.proto.handshake import ServerHandshake

DISK = FakeExport("disk", size=64 << 20, description="the main disk")
RO = FakeExport("ro", size=12345, read_only=True, multi_conn=True)
PLAIN = FakeExport("", size=1 << 20)


def pump(lister: ClientLister, server: ServerHandshake) -> tuple[object, object]:
    """Shuttle bytes until the lister has its outcome; that and the server's last event."""
    for _ in range(200):
        event = lister.next_event()
        server.receive_data(lister.data_to_send())
        server_event = server.next_event()
        if event is not NEED_DATA:
            return event, server_event
        lister.receive_data(server.data_to_send())
    raise AssertionError("the listing did not finish")


@pytest.mark.parametrize("extended", [True, False])
def test_lists_every_export_with_its_details(extended: bool) -> None:
    server = ServerHandshake(FakeCatalog(DISK, RO, PLAIN))
    lister = ClientLister(extended=extended)
    lister.receive_data(server.data_to_send())
    event, server_event = pump(lister, server)
    assert isinstance(event, ExportList)
    assert isinstance(server_event, HandshakeClosed)  # NBD_OPT_ABORT was sent
    names = [e.name for e in event.exports]
    assert sorted(names) == ["", "disk", "ro"]
    by_name = {e.name: e for e in event.exports}
    disk = by_name["disk"]
    assert disk.description == "the main disk"
    assert disk.size == 64 << 20
    assert disk.block_sizes is not None
    assert disk.block_sizes.maximum == MAX_PAYLOAD
    assert disk.meta_contexts == ("base:allocation",)
    assert disk.extended is extended
    assert by_name["ro"].flags & 2  # read-only


def test_layout_is_qemu_nbds() -> None:
    server = ServerHandshake(FakeCatalog(RO))
    lister = ClientLister()
    lister.receive_data(server.data_to_send())
    event, _ = pump(lister, server)
    assert isinstance(event, ExportList)
    text = format_listing(event)
    lines = text.splitlines()
    assert lines[0] == "exports available: 1"
    assert lines[1] == " export: 'ro'"
    assert lines[2] == "  size:  12345"
    assert lines[3].startswith("  flags: 0x")
    assert "readonly" in lines[3]
    assert lines[3].endswith(" )")
    assert lines[4:7] == ["  min block: 1", "  opt block: 4096",
                          f"  max block: {MAX_PAYLOAD}"]
    assert lines[7] == "  transaction size: 64-bit"
    assert lines[8:] == ["  available meta contexts: 1", "   base:allocation"]
    assert json.loads(format_json(event))["exports"][0]["name"] == "ro"


def test_refused_list_is_a_failure() -> None:
    lister = ClientLister(extended=False)
    greeting = ServerHandshake(FakeCatalog(DISK)).data_to_send()
    lister.receive_data(greeting)
    assert lister.next_event() is NEED_DATA
    lister.data_to_send()
    # STRUCTURED_REPLY acknowledged, then LIST refused
    lister.receive_data(wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.STRUCTURED_REPLY,
                                                      Rep.ACK, 0))
    assert lister.next_event() is NEED_DATA
    message = b"no listing here"
    lister.receive_data(wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.LIST, Rep.ERR_POLICY,
                                                      len(message)) + message)
    event = lister.next_event()
    assert isinstance(event, HandshakeFailed)
    assert event.option is Opt.LIST
    assert "no listing here" in str(event)


def test_not_an_nbd_server() -> None:
    lister = ClientLister()
    lister.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ProtocolError):
        lister.next_event()


@pytest.mark.parametrize(("argv", "wanted"), [
    (["-L", "-k", "s"], True), (["--list"], True), (["-x", "a", "img"], False),
    (["--", "-L"], False),
])
def test_wants_listing(argv: list[str], wanted: bool) -> None:
    assert wants_listing(argv) is wanted
