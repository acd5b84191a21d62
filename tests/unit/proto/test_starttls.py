"""STARTTLS in the sans-IO handshake core, and the TLS credentials' DN checks.

Targets: nbd-protocol.md section 7 (FORCEDTLS = ``TlsMode.REQUIRE``, an
optional-TLS server = ``TlsMode.ON``, NOTLS = ``TlsMode.OFF``), trap 11 (nbdkit
CVE-2021-3716: plaintext injected after STARTTLS, negotiated state kept across
STARTTLS) and trap 23 (ERR_TLS_REQD in the wrong place).  The TLS handshake
itself belongs to the shell; here ``tls_started()`` stands for it.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from tests.support.wire import OptionReply as Reply
from tests.support.wire import option_replies as parse_replies

from pynbd.block import MemoryNode
from pynbd.proto import wire
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_DATA,
    REPLY_MAGIC,
    ClientFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.proto.errors import LocalProtocolError, ProtocolError
from pynbd.proto.events import NEED_DATA, HandshakeClosed, HandshakeDone, StartTLS
from pynbd.proto.handshake import ServerHandshake, TlsMode
from pynbd.server.export import Export, ExportTable
from pynbd.server.tls import TlsCredentials, normalize_dn, subject_dn

GREETING = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
CLIENT_FLAGS = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
SECRET = "secret-disk"
SECRET_DESCRIPTION = "hidden description"


def catalog() -> ExportTable:
    table = ExportTable()
    table.add(Export(SECRET, MemoryNode(1 << 20), description=SECRET_DESCRIPTION,
                     multi_conn=True))
    table.add(Export("", MemoryNode(4096)))
    return table


# -- message builders ---------------------------------------------------------------------


def option(code: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, code, len(data) if length is None else length) \
        + data


def info_data(name: str, *requests: int) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query.encode()
    return out


STARTTLS = option(Opt.STARTTLS)
STRUCTURED = option(Opt.STRUCTURED_REPLY)
LIST = option(Opt.LIST)
ABORT = option(Opt.ABORT)


def go(name: str = SECRET) -> bytes:
    return option(Opt.GO, info_data(name, Info.NAME, Info.DESCRIPTION))


def info(name: str = SECRET) -> bytes:
    return option(Opt.INFO, info_data(name, Info.NAME, Info.DESCRIPTION))


def set_meta(name: str = SECRET) -> bytes:
    return option(Opt.SET_META_CONTEXT, meta_data(name, BASE_ALLOCATION))


def list_meta(name: str = SECRET) -> bytes:
    return option(Opt.LIST_META_CONTEXT, meta_data(name, BASE_ALLOCATION))


def kinds(replies: list[Reply]) -> list[tuple[int, int]]:
    return [(opt, rep) for opt, rep, _ in replies]


# -- the driver ------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    replies: list[Reply]
    events: list[object]
    raw: bytes


class Client:
    """A fresh core that has seen the greeting and the client flags."""

    def __init__(self, mode: TlsMode) -> None:
        self.core = ServerHandshake(catalog(), tls=mode)
        assert self.core.data_to_send() == GREETING
        first = self.send(CLIENT_FLAGS)
        assert (first.replies, first.events) == ([], [])

    def send(self, data: bytes) -> Step:
        """Feed ``data`` whole; drain events until more data is needed or the end."""
        self.core.receive_data(data)
        events: list[object] = []
        for _ in range(1000):
            event = self.core.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, HandshakeDone | HandshakeClosed | StartTLS):
                break
        else:
            pytest.fail("next_event never asked for data")
        raw = self.core.data_to_send()
        return Step(parse_replies(raw), events, raw)

    def starttls(self) -> None:
        """STARTTLS, ACK, then the (pretend) TLS handshake completes."""
        step = self.send(STARTTLS)
        assert kinds(step.replies) == [(Opt.STARTTLS, Rep.ACK)]
        assert step.replies[0][2] == b""
        assert step.events == [StartTLS()]
        self.core.tls_started()
        assert self.core.tls_active


def go_flags(step: Step) -> TransmissionFlag:
    """The export flags in a GO's NBD_INFO_EXPORT reply."""
    exports = [data for opt, rep, data in step.replies
               if opt == Opt.GO and rep == Rep.INFO and data[:2] == b"\x00\x00"]
    assert len(exports) == 1, step.replies
    kind, _size, flags = wire.INFO_EXPORT.unpack(exports[0])
    assert kind == Info.EXPORT
    return TransmissionFlag(flags)


def done(step: Step) -> HandshakeDone:
    assert len(step.events) == 1, step.events
    event = step.events[0]
    assert isinstance(event, HandshakeDone), event
    return event


def assert_tls_reqd(step: Step, opt: int) -> None:
    """Exactly one reply, ERR_TLS_REQD, that names no export and describes none."""
    assert kinds(step.replies) == [(opt, Rep.ERR_TLS_REQD)], step.replies
    assert step.events == []
    assert SECRET.encode() not in step.raw
    assert SECRET_DESCRIPTION.encode() not in step.raw
    assert b"TLS" in step.replies[0][2]


# -- TLS required (FORCEDTLS) before STARTTLS -------------------------------------------------

REFUSED: list[tuple[str, bytes, int]] = [
    ("info", info(), Opt.INFO),
    ("info-unknown-export", info("no-such-export"), Opt.INFO),
    ("go", go(), Opt.GO),
    ("go-default", go(""), Opt.GO),
    ("go-unknown-export", go("no-such-export"), Opt.GO),
    ("list", LIST, Opt.LIST),
    ("list-with-data", option(Opt.LIST, b"junk"), Opt.LIST),
    ("structured-reply", STRUCTURED, Opt.STRUCTURED_REPLY),
    ("list-meta-context", list_meta(), Opt.LIST_META_CONTEXT),
    ("set-meta-context", set_meta(), Opt.SET_META_CONTEXT),
    ("peek-export", option(Opt.PEEK_EXPORT), Opt.PEEK_EXPORT),
    ("extended-headers", option(Opt.EXTENDED_HEADERS), Opt.EXTENDED_HEADERS),
    ("unknown-99", option(99, b"xyz"), 99),
    ("unknown-high", option(0x7FFFFFFF), 0x7FFFFFFF),
    ("unknown-zero", option(0), 0),
]
#: every refused option except GO, which would end the handshake once TLS is up
NOT_GO = b"".join(message for _, message, opt in REFUSED if opt != Opt.GO)


@pytest.mark.parametrize(("message", "opt"),
                         [pytest.param(m, o, id=i) for i, m, o in REFUSED])
def test_required_refuses_every_option_before_starttls(message: bytes, opt: int) -> None:
    client = Client(TlsMode.REQUIRE)
    assert_tls_reqd(client.send(message), opt)
    # the refusal changed nothing: asking again gets the same answer, and
    # STARTTLS still works afterwards
    assert_tls_reqd(client.send(message), opt)
    client.starttls()


def test_required_refuses_all_options_in_one_feed() -> None:
    """A burst of every option: one TLS_REQD each, in order, nothing else."""
    client = Client(TlsMode.REQUIRE)
    step = client.send(b"".join(message for _, message, _ in REFUSED))
    assert kinds(step.replies) == [(opt, Rep.ERR_TLS_REQD) for _, _, opt in REFUSED]
    assert step.events == []
    assert SECRET.encode() not in step.raw
    assert not any(rep == Rep.INFO for _, rep, _ in step.replies)
    assert client.core.pending_bytes == 0


def test_required_refuses_an_oversized_option_after_skipping_it() -> None:
    client = Client(TlsMode.REQUIRE)
    length = MAX_OPTION_DATA + 1
    step = client.send(option(Opt.INFO, length=length) + bytes(1000))
    assert (step.replies, step.events) == ([], [])
    chunk = 16 * 1024
    sent = 1000
    for _ in range(length // chunk + 2):
        piece = min(chunk, length - 1 - sent)
        if piece <= 0:
            break
        step = client.send(bytes(piece))
        assert (step.replies, step.events) == ([], [])
        sent += piece
    # the last byte of the data, then a LIST in the same feed
    step = client.send(b"\0" + LIST)
    assert kinds(step.replies) == [(Opt.INFO, Rep.ERR_TLS_REQD), (Opt.LIST, Rep.ERR_TLS_REQD)]
    assert SECRET.encode() not in step.raw
    client.starttls()


def test_required_export_name_closes() -> None:
    client = Client(TlsMode.REQUIRE)
    step = client.send(option(Opt.EXPORT_NAME, SECRET.encode()))
    assert step.raw == b""
    assert len(step.events) == 1
    closed = step.events[0]
    assert isinstance(closed, HandshakeClosed)
    assert not closed.graceful
    with pytest.raises(ProtocolError):
        client.core.next_event()


def test_required_export_name_unknown_closes_the_same_way() -> None:
    client = Client(TlsMode.REQUIRE)
    step = client.send(option(Opt.EXPORT_NAME, b"no-such-export"))
    assert step.raw == b""
    assert [type(e) for e in step.events] == [HandshakeClosed]


def test_required_abort_is_acknowledged() -> None:
    client = Client(TlsMode.REQUIRE)
    step = client.send(ABORT)
    assert kinds(step.replies) == [(Opt.ABORT, Rep.ACK)]
    assert len(step.events) == 1
    closed = step.events[0]
    assert isinstance(closed, HandshakeClosed)
    assert closed.graceful


def test_required_abort_after_refusals() -> None:
    client = Client(TlsMode.REQUIRE)
    step = client.send(LIST + ABORT)
    assert kinds(step.replies) == [(Opt.LIST, Rep.ERR_TLS_REQD), (Opt.ABORT, Rep.ACK)]
    assert [type(e) for e in step.events] == [HandshakeClosed]


# -- STARTTLS itself ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [TlsMode.REQUIRE, TlsMode.ON])
def test_starttls_is_acknowledged_with_an_event(mode: TlsMode) -> None:
    client = Client(mode)
    step = client.send(STARTTLS)
    assert kinds(step.replies) == [(Opt.STARTTLS, Rep.ACK)]
    assert step.raw == wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC, Opt.STARTTLS, Rep.ACK, 0)
    assert step.events == [StartTLS()]
    assert not client.core.tls_active
    # while the shell runs the TLS handshake, the core waits and says nothing
    assert client.core.next_event() is NEED_DATA
    assert client.core.data_to_send() == b""


@pytest.mark.parametrize("mode", [TlsMode.REQUIRE, TlsMode.ON])
def test_starttls_with_data_is_invalid(mode: TlsMode) -> None:
    client = Client(mode)
    step = client.send(option(Opt.STARTTLS, b"x"))
    assert kinds(step.replies) == [(Opt.STARTTLS, Rep.ERR_INVALID)]
    assert step.events == []
    assert not client.core.tls_active
    # no TLS started: in REQUIRE mode the rest is still refused; a proper
    # STARTTLS still works
    if mode is TlsMode.REQUIRE:
        assert_tls_reqd(client.send(LIST), Opt.LIST)
    client.starttls()


INJECTED = [
    pytest.param(STRUCTURED + go(), id="structured-and-go"),
    pytest.param(go(), id="go"),
    pytest.param(option(Opt.EXPORT_NAME, SECRET.encode()), id="export-name"),
    pytest.param(LIST, id="list"),
    pytest.param(b"\x49", id="one-byte"),
    pytest.param(b"\x16\x03\x01\x00\x05hello", id="early-tls-bytes"),
]


@pytest.mark.parametrize("mode", [TlsMode.REQUIRE, TlsMode.ON])
@pytest.mark.parametrize("injected", INJECTED)
def test_bytes_after_starttls_in_the_same_feed_end_the_connection(
        mode: TlsMode, injected: bytes) -> None:
    """CVE-2021-3716: plaintext right behind STARTTLS is never acted on."""
    core = ServerHandshake(catalog(), tls=mode)
    core.data_to_send()
    core.receive_data(CLIENT_FLAGS + STARTTLS + injected)
    with pytest.raises(ProtocolError, match="STARTTLS"):
        core.next_event()
    out = core.data_to_send()
    # not even the ACK: the shell must not start TLS, and nothing injected was answered
    assert out == b""
    assert not core.tls_active


@pytest.mark.parametrize("mode", [TlsMode.REQUIRE, TlsMode.ON])
def test_plaintext_options_before_starttls_in_one_feed_are_answered_first(
        mode: TlsMode) -> None:
    """Options *before* STARTTLS are fine; they get their replies, then the ACK."""
    client = Client(mode)
    step = client.send(LIST + STARTTLS)
    expected_list = (Opt.LIST, Rep.ERR_TLS_REQD) if mode is TlsMode.REQUIRE else None
    got = kinds(step.replies)
    assert got[-1] == (Opt.STARTTLS, Rep.ACK)
    if expected_list is not None:
        assert got == [expected_list, (Opt.STARTTLS, Rep.ACK)]
    else:
        assert got[:-1] == [(Opt.LIST, Rep.SERVER)] * 2 + [(Opt.LIST, Rep.ACK)]
    assert step.events == [StartTLS()]


def test_tls_started_without_starttls_is_a_local_error() -> None:
    client = Client(TlsMode.REQUIRE)
    with pytest.raises(LocalProtocolError):
        client.core.tls_started()
    assert not client.core.tls_active
    assert_tls_reqd(client.send(LIST), Opt.LIST)


def test_tls_started_twice_is_a_local_error() -> None:
    client = Client(TlsMode.REQUIRE)
    client.starttls()
    with pytest.raises(LocalProtocolError):
        client.core.tls_started()


def test_options_that_arrive_during_the_tls_handshake_are_answered_after_it() -> None:
    """Bytes the shell decrypted before it called tls_started() wait for it."""
    client = Client(TlsMode.REQUIRE)
    step = client.send(STARTTLS)
    assert step.events == [StartTLS()]
    step = client.send(LIST)
    assert (step.replies, step.events) == ([], [])
    client.core.tls_started()
    step = client.send(b"")
    assert kinds(step.replies) == [(Opt.LIST, Rep.SERVER)] * 2 + [(Opt.LIST, Rep.ACK)]


# -- after TLS --------------------------------------------------------------------------------


def list_names(step: Step) -> list[str]:
    names = []
    for opt, rep, data in step.replies:
        if rep == Rep.SERVER:
            assert opt == Opt.LIST
            (length,) = struct.unpack_from(">I", data)
            names.append(data[4:4 + length].decode())
    return names


def test_required_options_work_after_tls() -> None:
    client = Client(TlsMode.REQUIRE)
    client.starttls()
    step = client.send(LIST)
    assert sorted(list_names(step)) == ["", SECRET]
    assert kinds(step.replies)[-1] == (Opt.LIST, Rep.ACK)
    step = client.send(info())
    assert kinds(step.replies)[-1] == (Opt.INFO, Rep.ACK)
    assert (Opt.INFO, Rep.INFO) in kinds(step.replies)
    assert SECRET_DESCRIPTION.encode() in step.raw
    step = client.send(STRUCTURED + set_meta() + go())
    assert kinds(step.replies)[:3] == [
        (Opt.STRUCTURED_REPLY, Rep.ACK),
        (Opt.SET_META_CONTEXT, Rep.META_CONTEXT), (Opt.SET_META_CONTEXT, Rep.ACK)]
    event = done(step)
    assert event.negotiated.structured
    assert event.negotiated.meta_contexts == {0: BASE_ALLOCATION}
    assert go_flags(step) & TransmissionFlag.SEND_DF


def test_required_never_sends_tls_reqd_after_tls() -> None:
    client = Client(TlsMode.REQUIRE)
    client.starttls()
    step = client.send(NOT_GO)
    assert step.events == []
    assert Rep.ERR_TLS_REQD not in [rep for _, rep, _ in step.replies]
    # each option got an answer of its own kind
    assert (Opt.INFO, Rep.ACK) in kinds(step.replies)
    assert (Opt.INFO, Rep.ERR_UNKNOWN) in kinds(step.replies)
    assert (Opt.LIST, Rep.ACK) in kinds(step.replies)
    assert (Opt.LIST, Rep.ERR_INVALID) in kinds(step.replies)
    assert (99, Rep.ERR_UNSUP) in kinds(step.replies)
    # an oversized option is now too big, not "TLS required"
    step = client.send(option(Opt.INFO, length=MAX_OPTION_DATA + 1)
                       + bytes(MAX_OPTION_DATA + 1))
    assert kinds(step.replies) == [(Opt.INFO, Rep.ERR_TOO_BIG)]
    step = client.send(go("no-such-export"))
    assert kinds(step.replies) == [(Opt.GO, Rep.ERR_UNKNOWN)]


@pytest.mark.parametrize("mode", [TlsMode.REQUIRE, TlsMode.ON])
def test_second_starttls_is_invalid(mode: TlsMode) -> None:
    client = Client(mode)
    client.starttls()
    step = client.send(STARTTLS)
    assert kinds(step.replies) == [(Opt.STARTTLS, Rep.ERR_INVALID)]
    assert step.events == []
    # the session goes on over the existing TLS
    step = client.send(go())
    assert done(step).negotiated.export.name == SECRET


def test_structured_replies_from_before_starttls_are_forgotten() -> None:
    """CVE-2021-3716: a GO after TLS without STRUCTURED_REPLY gets simple replies."""
    client = Client(TlsMode.ON)
    step = client.send(STRUCTURED)
    assert kinds(step.replies) == [(Opt.STRUCTURED_REPLY, Rep.ACK)]
    client.starttls()
    step = client.send(go())
    event = done(step)
    assert not event.negotiated.structured
    assert not event.negotiated.flags & TransmissionFlag.SEND_DF
    assert not go_flags(step) & TransmissionFlag.SEND_DF
    assert go_flags(step) == event.negotiated.flags


def test_structured_reply_can_be_negotiated_again_after_tls() -> None:
    client = Client(TlsMode.ON)
    client.send(STRUCTURED)
    client.starttls()
    step = client.send(STRUCTURED + go())
    # not "already on": the plaintext negotiation no longer counts
    assert kinds(step.replies)[0] == (Opt.STRUCTURED_REPLY, Rep.ACK)
    assert done(step).negotiated.structured
    assert go_flags(step) & TransmissionFlag.SEND_DF


def test_meta_contexts_from_before_starttls_are_forgotten() -> None:
    client = Client(TlsMode.ON)
    step = client.send(STRUCTURED + set_meta())
    assert kinds(step.replies) == [
        (Opt.STRUCTURED_REPLY, Rep.ACK),
        (Opt.SET_META_CONTEXT, Rep.META_CONTEXT), (Opt.SET_META_CONTEXT, Rep.ACK)]
    client.starttls()
    step = client.send(STRUCTURED + go())
    event = done(step)
    assert event.negotiated.structured
    assert event.negotiated.meta_contexts == {}


def test_meta_context_without_renegotiated_structured_replies_is_refused_after_tls() -> None:
    client = Client(TlsMode.ON)
    client.send(STRUCTURED)
    client.starttls()
    step = client.send(set_meta())
    assert kinds(step.replies) == [(Opt.SET_META_CONTEXT, Rep.ERR_INVALID)]


# -- optional TLS and no TLS -------------------------------------------------------------------


def test_optional_mode_serves_plaintext_normally() -> None:
    client = Client(TlsMode.ON)
    step = client.send(LIST)
    assert sorted(list_names(step)) == ["", SECRET]
    step = client.send(info())
    assert kinds(step.replies)[-1] == (Opt.INFO, Rep.ACK)
    step = client.send(STRUCTURED + set_meta() + go())
    event = done(step)
    assert event.negotiated.structured
    assert event.negotiated.meta_contexts == {0: BASE_ALLOCATION}
    assert not client.core.tls_active


def test_optional_mode_never_sends_tls_reqd() -> None:
    client = Client(TlsMode.ON)
    step = client.send(NOT_GO)
    assert Rep.ERR_TLS_REQD not in [rep for _, rep, _ in step.replies]


def test_optional_mode_export_name_works_in_plaintext() -> None:
    client = Client(TlsMode.ON)
    client.core.receive_data(option(Opt.EXPORT_NAME, SECRET.encode()))
    event = client.core.next_event()
    assert isinstance(event, HandshakeDone)
    assert event.negotiated.export.name == SECRET
    assert client.core.data_to_send() == wire.EXPORT_NAME_REPLY.pack(
        1 << 20, event.negotiated.flags)


def test_optional_mode_starttls_then_go() -> None:
    client = Client(TlsMode.ON)
    client.starttls()
    step = client.send(go())
    assert done(step).negotiated.export.name == SECRET


def test_off_refuses_starttls_with_policy() -> None:
    client = Client(TlsMode.OFF)
    step = client.send(STARTTLS)
    assert kinds(step.replies) == [(Opt.STARTTLS, Rep.ERR_POLICY)]
    assert step.events == []
    assert not client.core.tls_active
    # and the session goes on in plaintext
    step = client.send(go())
    assert done(step).negotiated.export.name == SECRET


def test_default_mode_is_off() -> None:
    core = ServerHandshake(catalog())
    core.data_to_send()
    core.receive_data(CLIENT_FLAGS + STARTTLS)
    assert core.next_event() is NEED_DATA
    assert kinds(parse_replies(core.data_to_send())) == [(Opt.STARTTLS, Rep.ERR_POLICY)]


def test_off_with_bytes_after_starttls_just_answers_them() -> None:
    """Without TLS there is nothing to inject into: each option is answered."""
    client = Client(TlsMode.OFF)
    step = client.send(STARTTLS + LIST)
    assert kinds(step.replies)[0] == (Opt.STARTTLS, Rep.ERR_POLICY)
    assert kinds(step.replies)[-1] == (Opt.LIST, Rep.ACK)


# -- TlsCredentials: DN allow lists --------------------------------------------------------------

PEER = {"subject": ((("organizationName", "pynbd test"),),
                    (("commonName", "pynbd client"),))}
PEER_DN = "CN=pynbd client,O=pynbd test"


def test_subject_dn_is_rfc4514_order() -> None:
    assert subject_dn(PEER) == PEER_DN


def test_subject_dn_escapes_and_multivalued_rdns() -> None:
    cert = {"subject": ((("countryName", "GB"),),
                        (("organizationName", "a,b+c"), ("organizationalUnitName", "x=y")),
                        (("commonName", " lead#"),),
                        (("serialNumber", "trail "),))}
    assert subject_dn(cert) == r"serialNumber=trail\ ,CN=\ lead#,O=a\,b\+c+OU=x\=y,C=GB"


def test_subject_dn_of_an_empty_subject() -> None:
    assert subject_dn({}) == ""


def test_normalize_dn() -> None:
    assert normalize_dn("cn=pynbd client, o=pynbd test") == normalize_dn(PEER_DN)
    assert normalize_dn(" CN = x ,O=y,") == "CN=x,O=y"
    # escaped commas stay inside their value
    assert normalize_dn(r"CN=a\,b,O=c") == r"CN=a\,b,O=c"
    # values are compared exactly (as qemu's authz-simple does)
    assert normalize_dn("CN=Pynbd Client,O=pynbd test") != normalize_dn(PEER_DN)
    # order matters
    assert normalize_dn("O=pynbd test,CN=pynbd client") != normalize_dn(PEER_DN)


def test_authorize_without_allow_list_lets_anyone_in() -> None:
    creds = TlsCredentials("/nonexistent")
    assert creds.authorize(PEER) is None
    assert creds.authorize(None) is None
    assert TlsCredentials("/nonexistent", verify_peer=True).authorize(None) is None


def test_authorize_with_allow_list() -> None:
    creds = TlsCredentials("/nonexistent", allowed_dns=frozenset({PEER_DN}))
    assert creds.authorize(PEER) is None
    assert creds.authorize(None) == "no client certificate"
    assert creds.authorize({}) == "no client certificate"
    other = {"subject": ((("organizationName", "pynbd test"),),
                         (("commonName", "intruder"),))}
    problem = creds.authorize(other)
    assert problem is not None
    assert "CN=intruder,O=pynbd test" in problem


def test_authorize_normalizes_the_allowed_names() -> None:
    creds = TlsCredentials("/nonexistent",
                           allowed_dns=frozenset({"cn=pynbd client, o=pynbd test", "CN=x"}))
    assert creds.authorize(PEER) is None
    wrong_case = TlsCredentials("/nonexistent",
                                allowed_dns=frozenset({"CN=PYNBD CLIENT,O=pynbd test"}))
    assert wrong_case.authorize(PEER) is not None


def test_authorize_with_an_empty_allow_list_refuses_everyone() -> None:
    creds = TlsCredentials("/nonexistent", allowed_dns=frozenset())
    assert creds.authorize(PEER) is not None


@pytest.mark.parametrize("opt", [Opt.STARTTLS, Opt.ABORT])
def test_required_oversized_starttls_or_abort_is_too_big_not_tls_reqd(opt: Opt) -> None:
    """STARTTLS and ABORT are exempt from ERR_TLS_REQD, even when oversized."""
    client = Client(TlsMode.REQUIRE)
    step = client.send(option(opt, length=MAX_OPTION_DATA + 1) + bytes(MAX_OPTION_DATA + 1))
    assert kinds(step.replies) == [(opt, Rep.ERR_TOO_BIG)]
    assert step.events == []
    client.starttls()
