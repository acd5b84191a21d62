"""The sans-IO QMP session: greeting, framing, negotiation, replies and events.

Everything here feeds bytes into ``QMPSession`` and reads the bytes it wants
to send; no sockets, no event loop.  The "engine" is a tiny stand-in that
answers every well-formed command with ``{"return": {}}`` (or an error when a
test asks for one), which is what the daemon's shell does with real results.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.qmp.protocol import MAX_LINE, Execute, QMPError, QMPSession

VERSION: dict[str, Any] = {"qemu": {"major": 7, "minor": 2, "micro": 0},
                           "package": "pynbd test"}
NEGOTIATE = b'{"execute": "qmp_capabilities"}'
NOT_NEGOTIATED = {"class": "CommandNotFound",
                  "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
#: bound for the loops that drain a session in these tests
MAX_COMMANDS = 10_000


# -- helpers -----------------------------------------------------------------------


def strict_json(line: bytes) -> Any:
    """``line`` as JSON, refusing what Python accepts beyond the standard (NaN, Infinity)."""
    def refuse(name: str) -> None:
        raise AssertionError(f"not JSON: {name} in {line[:200]!r}")
    return json.loads(line, parse_constant=refuse)


def messages(data: bytes) -> list[dict[str, Any]]:
    """Parse what a session sent: CRLF-terminated standard JSON objects, one per line."""
    assert data == b"" or data.endswith(b"\r\n"), data[-80:]
    out = []
    for line in data.split(b"\r\n")[:-1]:
        value = strict_json(line)
        assert isinstance(value, dict)
        out.append(value)
    return out


def run(session: QMPSession, data: bytes = b"",
        fail: dict[str, QMPError] | None = None) -> tuple[list[Execute], list[dict[str, Any]]]:
    """Feed ``data``, answer every command, return (commands, messages sent)."""
    if data:
        session.receive_data(data)
    commands: list[Execute] = []
    for _ in range(MAX_COMMANDS):
        command = session.next_command()
        if command is None:
            break
        commands.append(command)
        if fail and command.command in fail:
            session.send_error(command, fail[command.command])
        else:
            session.send_return(command, {})
    else:
        raise AssertionError("session kept producing commands")
    return commands, messages(session.data_to_send())


def fresh() -> QMPSession:
    session = QMPSession(VERSION)
    greeting = messages(session.data_to_send())
    assert len(greeting) == 1
    assert session.negotiated is False
    return session


def negotiated() -> QMPSession:
    session = fresh()
    commands, sent = run(session, NEGOTIATE + b"\n")
    assert [c.command for c in commands] == ["qmp_capabilities"]
    assert sent == [{"return": {}}]
    assert session.negotiated
    return session


def generic(desc_start: str, reply: dict[str, Any]) -> None:
    """``reply`` is a GenericError whose text starts with ``desc_start``."""
    assert set(reply) == {"error"}, reply
    assert reply["error"]["class"] == "GenericError", reply
    assert reply["error"]["desc"].startswith(desc_start), reply


# -- greeting and negotiation ------------------------------------------------------


def test_greeting_format() -> None:
    session = QMPSession(VERSION)
    data = session.data_to_send()
    assert data.endswith(b"\r\n")
    assert data.count(b"\r\n") == 1
    assert json.loads(data) == {"QMP": {"version": VERSION, "capabilities": []}}
    # sent once only
    assert session.data_to_send() == b""
    assert session.negotiated is False


def test_negotiation_then_commands() -> None:
    session = fresh()
    commands, sent = run(session, NEGOTIATE + b'\n{"execute": "query-version"}\n')
    assert [c.command for c in commands] == ["qmp_capabilities", "query-version"]
    assert sent == [{"return": {}}, {"return": {}}]
    assert session.negotiated is True
    assert commands[1].arguments == {}
    assert commands[1].has_id is False


def test_failed_negotiation_does_not_negotiate() -> None:
    session = fresh()
    err = QMPError("GenericError", "This monitor does not support out-of-band execution")
    _, sent = run(session, b'{"execute": "qmp_capabilities", "arguments": '
                  b'{"enable": ["oob"]}}\n', fail={"qmp_capabilities": err})
    assert sent == [{"error": {"class": "GenericError", "desc": err.desc}}]
    assert session.negotiated is False
    _, sent = run(session, b'{"execute": "query-version"}\n')
    assert sent == [{"error": NOT_NEGOTIATED}]


@pytest.mark.parametrize("command", ["query-version", "quit", "no-such-command",
                                     "block-export-add"])
def test_commands_before_negotiation_are_refused(command: str) -> None:
    session = fresh()
    data = json.dumps({"execute": command, "id": 7}).encode() + b"\n"
    commands, sent = run(session, data)
    assert commands == []
    assert sent == [{"error": NOT_NEGOTIATED, "id": 7}]
    # the session goes on: negotiation still works afterwards
    commands, sent = run(session, NEGOTIATE)
    assert [c.command for c in commands] == ["qmp_capabilities"]
    assert sent == [{"return": {}}]


def test_qmp_capabilities_twice() -> None:
    session = negotiated()
    commands, sent = run(session, b'{"execute": "qmp_capabilities", "id": "again"}\n')
    assert commands == []
    assert sent == [{"error": {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"},
        "id": "again"}]
    assert session.negotiated is True
    commands, sent = run(session, b'{"execute": "query-version"}')
    assert [c.command for c in commands] == ["query-version"]


@pytest.mark.parametrize("msg_id", [0, 42, -1, 1.5, "abc", "", None, True, [1, "x"],
                                    {"nested": {"a": [1, 2]}}])
def test_id_is_echoed(msg_id: Any) -> None:
    session = negotiated()
    data = json.dumps({"execute": "query-version", "id": msg_id}).encode()
    commands, sent = run(session, data)
    assert commands[0].has_id is True
    assert commands[0].id == msg_id
    assert sent == [{"return": {}, "id": msg_id}]
    # error replies echo it too
    _, sent = run(session, data, fail={"query-version": QMPError("GenericError", "no")})
    assert sent == [{"error": {"class": "GenericError", "desc": "no"}, "id": msg_id}]


def test_id_is_echoed_on_malformed_commands_and_before_negotiation() -> None:
    session = fresh()
    _, sent = run(session, b'{"arguments": {}, "id": {"k": 1}}\n')
    assert sent[0]["id"] == {"k": 1}
    generic("QMP input lacks member 'execute'", {"error": sent[0]["error"]})
    _, sent = run(session, b'{"execute": "x", "id": "n"}\n')
    assert sent == [{"error": NOT_NEGOTIATED, "id": "n"}]


def test_no_id_means_no_id_in_reply() -> None:
    session = negotiated()
    _, sent = run(session, b'{"execute": "query-version"}')
    assert sent == [{"return": {}}]


# -- framing --------------------------------------------------------------------------


def test_message_without_trailing_newline() -> None:
    session = negotiated()
    commands, sent = run(session, b'{"execute": "query-version", "id": 1}')
    assert [c.id for c in commands] == [1]
    assert sent == [{"return": {}, "id": 1}]


def test_several_messages_in_one_chunk() -> None:
    session = fresh()
    data = (NEGOTIATE + b'{"execute":"a","id":1}\n  \r\n\t{"execute":"b","id":2}'
            b'{"execute":"c","id":3}   ')
    commands, sent = run(session, data)
    assert [c.command for c in commands] == ["qmp_capabilities", "a", "b", "c"]
    assert sent == [{"return": {}}, {"return": {}, "id": 1}, {"return": {}, "id": 2},
                    {"return": {}, "id": 3}]


TRICKY = json.dumps({
    "execute": "block-export-add",
    "arguments": {"description": 'a {b} [c] "quoted" back\\slash \\" }}]] {{[[ \\\\',
                  "name": "\\", "id": "\u00e9\u4e2d", "nested": {"list": [{}, [], "]"]}},
    "id": "x}\"]\\",
}).encode()


def test_tricky_strings_in_one_piece() -> None:
    session = negotiated()
    commands, sent = run(session, TRICKY)
    assert len(commands) == 1
    assert commands[0].arguments == json.loads(TRICKY)["arguments"]
    assert sent == [{"return": {}, "id": "x}\"]\\"}]


@pytest.mark.parametrize("message", [
    b'{"execute": "query-version", "id": 1}',
    TRICKY,
    b'{"execute":"x","arguments":{"s":"\\\\\\\\\\"{"},"id":[1,{"a":"]"}]}',
])
def test_one_message_split_at_every_position(message: bytes) -> None:
    expected = json.loads(message)
    for cut in range(1, len(message)):
        session = negotiated()
        first, sent = run(session, message[:cut])
        assert first == [], cut
        assert sent == [], cut
        second, sent = run(session, message[cut:])
        assert len(second) == 1, cut
        assert second[0].arguments == expected.get("arguments", {}), cut
        assert sent == [{"return": {}, "id": expected["id"]}], cut


def test_message_fed_in_three_pieces_at_every_pair_of_positions() -> None:
    message = b'{"execute":"x","arguments":{"a":"\\"}{[","b":[1,{"c":"\\\\"}]},"id":"\\\\"}'
    expected = json.loads(message)
    for i in range(1, len(message) - 1):
        for j in range(i + 1, len(message)):
            session = negotiated()
            commands: list[Execute] = []
            sent: list[dict[str, Any]] = []
            for piece in (message[:i], message[i:j], message[j:]):
                got, out = run(session, piece)
                commands += got
                sent += out
            assert len(commands) == 1, (i, j)
            assert commands[0].arguments == expected["arguments"], (i, j)
            assert sent == [{"return": {}, "id": "\\"}], (i, j)


def test_byte_at_a_time_stream_of_several_messages() -> None:
    session = fresh()
    stream = NEGOTIATE + b"\n" + TRICKY + b"\r\n" + b'{"execute":"q","id":2}'
    commands: list[Execute] = []
    sent: list[dict[str, Any]] = []
    for i in range(len(stream)):
        got, out = run(session, stream[i:i + 1])
        commands += got
        sent += out
    assert [c.command for c in commands] == ["qmp_capabilities", "block-export-add", "q"]
    assert sent[-1] == {"return": {}, "id": 2}


# -- malformed input ------------------------------------------------------------------


@pytest.mark.parametrize(("garbage", "desc"), [
    (b"garbage\n", "JSON parse error"),
    (b'{"execute": }\n', "JSON parse error"),
    (b"[1,2]\n", "QMP input must be a JSON object"),
    (b'"str"\n', "QMP input must be a JSON object"),
    (b"123\n", "QMP input must be a JSON object"),
    (b"null\n", "QMP input must be a JSON object"),
    (b"}\n", "JSON parse error"),
    (b"{]\n", "JSON parse error"),
    (b'{"execute": "x", "bogus": 1}\n', "QMP input member 'bogus' is unexpected"),
    (b'{"execute": 5}\n', "QMP input member 'execute' must be a string"),
    (b'{"execute": "x", "arguments": [1]}\n',
     "QMP input member 'arguments' must be an object"),
    (b'{"arguments": {}}\n', "QMP input lacks member 'execute'"),
    (b'{"exec-oob": "x"}\n', "QMP input member 'exec-oob' is unexpected"),
    (b'{"execute": "\xff\xfe"}\n', "JSON parse error"),
    (b"[" * 5000 + b"]" * 5000 + b"\n", "JSON parse error"),
    (b'{"execute": "x", "id": NaN}\n', "JSON parse error"),
    (b'{"execute": "x", "arguments": {"a": -Infinity}}\n', "JSON parse error"),
    (b'{"execute": "x", "id": 1e99999}\n', "JSON parse error, number out of range"),
    (b'{"execute": "x", "id": -1E400}\n', "JSON parse error, number out of range"),
    (b'{"execute": "x", "arguments": {"rate": 1.5e309}}\n',
     "JSON parse error, number out of range"),
    (b'{"execute": "x", "id": 1' + b"0" * 5000 + b'}\n', "JSON parse error"),
])
@pytest.mark.parametrize("negotiate", [False, True])
def test_garbage_gets_one_error_and_the_session_goes_on(
        garbage: bytes, desc: str, negotiate: bool) -> None:
    session = negotiated() if negotiate else fresh()
    commands, sent = run(session, garbage)
    assert commands == []
    assert len(sent) == 1, sent
    generic(desc, sent[0])
    follow = b'{"execute": "query-version", "id": "after"}\n'
    commands, sent = run(session, follow if negotiate else NEGOTIATE)
    assert len(commands) == 1
    assert sent == ([{"return": {}, "id": "after"}] if negotiate else [{"return": {}}])


def test_top_level_values_without_newline_end_at_the_next_value() -> None:
    session = negotiated()
    commands, sent = run(session, b'123{"execute":"a"}"str"[1]{"execute":"b"}')
    assert [c.command for c in commands] == ["a", "b"]
    assert len(sent) == 5
    assert sent[1] == {"return": {}}
    assert sent[4] == {"return": {}}
    for reply in (sent[0], sent[2], sent[3]):
        generic("QMP input must be a JSON object", reply)


@pytest.mark.parametrize("broken", [
    b'"a{b"\n',
    b'"[[[ unterminated\n',
    b'{"execute": "query-version", "id": "unterminated\n',
    b'{"execute": "x", "arguments": {"a": "{{{\\\n',
])
def test_a_broken_string_does_not_swallow_what_follows(broken: bytes) -> None:
    """A raw newline cannot be inside a JSON string: the scanner resyncs there."""
    session = negotiated()
    commands, sent = run(session, broken + b'{"execute": "query-version", "id": 1}\n')
    assert [c.command for c in commands] == ["query-version"]
    assert len(sent) >= 2
    for reply in sent[:-1]:
        assert reply["error"]["class"] == "GenericError"
    assert sent[-1] == {"return": {}, "id": 1}


def test_oversized_message_is_skipped_not_buffered() -> None:
    session = negotiated()
    piece = 64 * 1024
    head = b'{"execute": "block-export-add", "arguments": {"description": "'
    body = b"a{[" * ((2 * MAX_LINE) // 3)
    tail = b'"}, "id": 1}\n'
    data = head + body + tail
    assert len(data) > 2 * MAX_LINE
    sent: list[dict[str, Any]] = []
    most = 0
    for pos in range(0, len(data), piece):
        commands, out = run(session, data[pos:pos + piece])
        assert commands == []
        sent += out
        most = max(most, len(session._buf))
    assert most <= MAX_LINE + piece
    assert len(sent) == 1, sent
    generic(f"QMP input is longer than {MAX_LINE} bytes", sent[0])
    commands, sent = run(session, b'{"execute": "query-version", "id": 2}')
    assert [c.command for c in commands] == ["query-version"]
    assert sent == [{"return": {}, "id": 2}]


def test_oversized_top_level_token_is_dropped_and_bounded() -> None:
    session = negotiated()
    piece = 64 * 1024
    sent: list[dict[str, Any]] = []
    for _ in range((MAX_LINE * 2) // piece):
        commands, out = run(session, b"x" * piece)
        assert commands == []
        sent += out
        assert len(session._buf) <= MAX_LINE + piece
    _, out = run(session, b"\n")
    sent += out
    assert sent, "no error for the oversized token"
    for reply in sent:
        assert reply["error"]["class"] == "GenericError"
    commands, sent = run(session, b'{"execute": "query-version", "id": 3}')
    assert sent == [{"return": {}, "id": 3}]


def test_message_just_under_the_limit_is_accepted() -> None:
    session = negotiated()
    head = b'{"execute": "x", "arguments": {"d": "'
    tail = b'"}}'
    data = head + b"z" * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(data) == MAX_LINE
    commands, sent = run(session, data)
    assert len(commands) == 1
    assert len(commands[0].arguments["d"]) == MAX_LINE - len(head) - len(tail)
    assert sent == [{"return": {}}]


# -- always valid JSON out ----------------------------------------------------------------


@pytest.mark.parametrize("negotiate", [False, True])
def test_an_infinite_id_is_a_parse_error_whose_reply_parses(negotiate: bool) -> None:
    """qemu reads 1e99999 as a double infinity and echoes ``"id": inf`` (not JSON):
    pynbd refuses the number, answering without an id, as for any parse error."""
    session = negotiated() if negotiate else fresh()
    commands, sent = run(session, b'{"execute": "query-version", "id": 1e99999}')
    assert commands == []
    assert sent == [{"error": {"class": "GenericError",
                               "desc": "JSON parse error, number out of range"}}]
    commands, sent = run(session, b'{"execute": "query-version", "id": 1e308}' if negotiate
                         else NEGOTIATE)
    assert len(commands) == 1
    assert sent == ([{"return": {}, "id": 1e308}] if negotiate else [{"return": {}}])


def test_finite_numbers_in_ids_are_echoed() -> None:
    session = negotiated()
    big = 10 ** 300
    _, sent = run(session, b'{"execute": "a", "id": -0.5e3}{"execute": "b", "id": 1e-99999}'
                  + b'{"execute": "c", "id": ' + str(big).encode() + b"}")
    assert [reply["id"] for reply in sent] == [-500.0, 0.0, big]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"),
                                   {"x": [1, float("nan")]}, {1, 2}, object()])
def test_a_reply_that_is_not_json_becomes_an_error_reply(value: Any) -> None:
    session = negotiated()
    session.receive_data(b'{"execute": "query-x", "id": "q"}')
    command = session.next_command()
    assert command is not None
    session.send_return(command, value)
    [reply] = messages(session.data_to_send())
    assert reply["id"] == "q"
    generic_reply = {k: v for k, v in reply.items() if k != "id"}
    generic("The reply cannot be sent as JSON: ", generic_reply)
    # the session goes on
    _, sent = run(session, b'{"execute": "query-version", "id": 2}')
    assert sent == [{"return": {}, "id": 2}]


def test_an_error_reply_with_an_id_that_is_not_json_goes_without_the_id() -> None:
    session = negotiated()
    command = Execute("x", {}, float("nan"), has_id=True)
    session.send_error(command, QMPError("GenericError", "failed"))
    session.send_return(command, {})
    failed, unsendable = messages(session.data_to_send())
    assert failed == {"error": {"class": "GenericError", "desc": "failed"}}
    generic("The reply cannot be sent as JSON: ", unsendable)


def test_an_event_that_is_not_json_is_dropped() -> None:
    session = negotiated()
    session.send_event("E", {"x": float("inf")}, 1, 2)
    session.send_event("F", {}, 1, 2)
    assert messages(session.data_to_send()) == [
        {"event": "F", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}]


# -- events -----------------------------------------------------------------------------


def test_events_only_after_negotiation() -> None:
    session = fresh()
    session.send_event("BLOCK_EXPORT_DELETED", {"id": "e0"}, 1, 2)
    assert session.data_to_send() == b""
    run(session, NEGOTIATE)
    session.send_event("BLOCK_EXPORT_DELETED", {"id": "e0"}, 1700000000, 123456)
    assert messages(session.data_to_send()) == [{
        "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"},
        "timestamp": {"seconds": 1700000000, "microseconds": 123456}}]


def test_event_between_replies_keeps_order() -> None:
    session = negotiated()
    session.receive_data(b'{"execute": "a", "id": 1}{"execute": "b", "id": 2}')
    first = session.next_command()
    assert first is not None
    session.send_return(first, {"x": 1})
    session.send_event("E", {}, 5, 6)
    second = session.next_command()
    assert second is not None
    session.send_return(second, [])
    assert messages(session.data_to_send()) == [
        {"return": {"x": 1}, "id": 1},
        {"event": "E", "data": {}, "timestamp": {"seconds": 5, "microseconds": 6}},
        {"return": [], "id": 2}]


def test_qmp_error_text() -> None:
    err = QMPError("CommandNotFound", "The command x has not been found")
    assert str(err) == "CommandNotFound: The command x has not been found"


# -- property: no input makes the session raise ------------------------------------------

_PIECES = [b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b" ", b"\n", b"\r", b"\t",
           b'"execute"', b'"qmp_capabilities"', b'"query-version"', b'"id"',
           b'"arguments"', b'"exec-oob"', b"1", b"-0.5e3", b"null", b"true", b"NaN",
           b"\xff", b"\x00", b"\\u00e9", b'\\"', b"x"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=8)),
                       max_size=60),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_random_input_never_raises(tokens: list[bytes], cuts: list[int]) -> None:
    session = fresh()
    data = b"".join(tokens)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for start, end in itertools.pairwise(bounds):
        _, sent = run(session, data[start:end])
        for reply in sent:
            assert ("return" in reply) != ("error" in reply), reply
            if "error" in reply:
                assert set(reply["error"]) == {"class", "desc"}
                assert isinstance(reply["error"]["desc"], str)
    # whatever came before, a newline then a command is always understood
    _, sent = run(session, b'\n"\n}]}]}]}]\n' + NEGOTIATE + b"\n")
    assert sent, "no reply to the final command"
    assert sent[-1] in ({"return": {}}, {"error": {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"}})
