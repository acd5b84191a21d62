"""Bugs the coverage-guided fuzzer (tests/fuzz) found, each pinned by a direct test.

The fuzzer's own inputs are kept in tests/fuzz/regressions and replayed
through their harness by tests/fuzz/test_fuzz_run.py; these tests say what
each one was about without the harness.
"""

from __future__ import annotations

import pytest

from pynbd.proto import wire
from pynbd.proto.client import ClientTransmission, Completion
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    Errno,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from pynbd.proto.errors import ProtocolError

FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF


def block_status_client() -> tuple[ClientTransmission, int]:
    core = ClientTransmission(size=1 << 20, flags=FLAGS, structured=True,
                              meta_contexts={0: BASE_ALLOCATION})
    cookie = core.block_status(0, 4096)
    core.data_to_send()
    return core, cookie


def test_simple_success_reply_to_block_status_is_a_protocol_error() -> None:
    # a successful BLOCK_STATUS needs one status chunk per context (spec 6.4); a simple
    # reply with error 0 used to complete it with extents=None, which broke the caller
    core, cookie = block_status_client()
    core.receive_data(wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
    with pytest.raises(ProtocolError, match="BLOCK_STATUS"):
        core.next_event()


def test_simple_error_reply_to_block_status_still_completes() -> None:
    core, cookie = block_status_client()
    core.receive_data(wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, Errno.EINVAL, cookie))
    completion = core.next_event()
    assert isinstance(completion, Completion)
    assert (completion.cookie, completion.cmd, completion.error) == (
        cookie, Cmd.BLOCK_STATUS, Errno.EINVAL)
    assert completion.extents is None


# -- found by the extended-header targets --------------------------------------------------


def test_extended_raw_read_of_a_64_bit_length_allocates_nothing() -> None:
    """client-extended-transmission: a raw READ whose length was read as 64 bits made the
    client allocate its reply buffer at once (2**63: OverflowError; GiBs: MemoryError).
    A READ over the payload limit now gets no buffer: it is sent as asked (the raw
    API checks nothing), the server's refusal completes it, and data for it is a
    protocol error rather than an allocation."""
    core = ClientTransmission(size=1 << 20, flags=FLAGS, structured=True, extended=True,
                              meta_contexts={0: BASE_ALLOCATION})
    cookie = core.request(Cmd.READ, offset=0, length=1 << 63)
    assert len(core.data_to_send()) == wire.EXTENDED_REQUEST.size
    message = b"too large"
    error = wire.ERROR_CHUNK.pack(Errno.EINVAL, len(message)) + message
    core.receive_data(wire.EXTENDED_CHUNK.pack(EXTENDED_REPLY_MAGIC, ReplyFlag.DONE,
                                               ReplyType.ERROR, cookie, 0, len(error)) + error)
    completion = core.next_event()
    assert isinstance(completion, Completion)
    assert completion.error == Errno.EINVAL
    late = core.request(Cmd.READ, offset=0, length=1 << 40)
    data = wire.OFFSET_DATA.pack(0) + b"x" * 16
    core.receive_data(wire.EXTENDED_CHUNK.pack(EXTENDED_REPLY_MAGIC, 0, ReplyType.OFFSET_DATA,
                                               late, 0, len(data)) + data)
    with pytest.raises(ProtocolError, match="over the largest payload"):
        core.next_event()
