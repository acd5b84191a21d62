"""The transmission core's fast path agrees with its full validation.

Both read one table (``transmission.COMMANDS``): ``_validate`` walks it, and
``_build_fast_rules`` compiles it into the per-connection tuples that
``ServerTransmission.next_event`` checks to skip ``_validate``.  So what is
checked here is that compilation: every request the fast rules accept is one
``_validate`` accepts too, over every negotiated state that changes the rules,
for arbitrary commands, flags and ranges; and no command that can be valid on
a connection is left to the slow path.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.block import MemoryNode
from pynbd.proto.constants import MAX_PAYLOAD, REQUEST_MAGIC, Cmd
from pynbd.proto.events import InvalidRequest, Request
from pynbd.proto.negotiated import Negotiated
from pynbd.proto.transmission import COMMANDS, ServerTransmission
from pynbd.proto.wire import REQUEST
from pynbd.server.export import Export

SIZE = 1 << 20

STATES = [(ro, structured, meta, multi) for ro in (False, True) for structured in (False, True)
          for meta in (False, True) for multi in (False, True) if structured or not meta]


def core(read_only: bool, structured: bool, meta: bool, multi: bool) -> ServerTransmission:
    export = Export("", MemoryNode(SIZE), read_only=read_only, multi_conn=multi)
    negotiated = Negotiated(export=export,
                            flags=export.transmission_flags(structured=structured),
                            structured=structured,
                            meta_contexts={0: "base:allocation"} if meta else {})
    return ServerTransmission(negotiated)


lengths = st.one_of(st.integers(0, 2 * SIZE), st.sampled_from(
    [0, 1, 512, SIZE, SIZE + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xFFFFFFFF]))


@pytest.mark.parametrize("state", STATES, ids=[
    f"ro={s[0]}-sr={s[1]}-meta={s[2]}-multi={s[3]}" for s in STATES])
@settings(max_examples=400, deadline=None)
@given(cmd=st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF)),
       flags=st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 2, 4, 8, 16, 32])),
       offset=st.one_of(st.integers(0, 2 * SIZE), st.sampled_from([0, SIZE, 2**63])),
       length=lengths)
def test_fast_path_accepts_only_valid_requests(state: tuple[bool, bool, bool, bool],
                                               cmd: int, flags: int, offset: int,
                                               length: int) -> None:
    if cmd in (Cmd.WRITE, Cmd.DISC):
        return  # WRITE carries a payload and DISC ends parsing: covered elsewhere
    server = core(*state)
    server.receive_data(REQUEST.pack(REQUEST_MAGIC, flags, cmd, 7, offset, length))
    event = server.next_event()
    verdict = server._validate(cmd, flags, offset, length)
    if verdict is None:
        assert isinstance(event, Request)
    else:
        assert isinstance(event, InvalidRequest)
        assert (event.errno, event.message) == verdict


@pytest.mark.parametrize("state", STATES)
def test_common_requests_take_the_fast_path(state: tuple[bool, bool, bool, bool]) -> None:
    """The rules are not empty by accident: plain reads always qualify."""
    server = core(*state)
    rule = server._fast_rules[Cmd.READ]
    assert rule[0] & 1 == 0  # FUA allowed
    assert rule[1] == MAX_PAYLOAD


@pytest.mark.parametrize("state", STATES)
def test_every_command_that_can_be_valid_has_a_fast_rule(
        state: tuple[bool, bool, bool, bool]) -> None:
    """A command ``_validate`` accepts in its plainest form is not left to the slow path."""
    server = core(*state)
    for cmd, rule in COMMANDS.items():
        if cmd == Cmd.DISC:
            assert cmd not in server._fast_rules  # ends parsing before validation
            continue
        plain = (0, 0, 0) if rule.empty else (0, 0, 1)
        assert (server._validate(cmd, *plain) is None) == (cmd in server._fast_rules), cmd.name
