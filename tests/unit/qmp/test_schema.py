"""The QMP argument schema: checks with qemu's wording, command-line coercion, keyval.

The schemas under test are the daemon's real ones (``blockdev-add``,
``nbd-server-start``, ``block-export-add``, ...) plus a few small ones built
here for the corner cases.
"""

from __future__ import annotations

from typing import Any

import pytest

from pynbd.qmp import schema as s
from pynbd.qmp.commands.block import BLOCKDEV_ADD
from pynbd.qmp.commands.nbd import BLOCK_EXPORT_ADD, BLOCK_EXPORT_DEL, NBD_SERVER_START
from pynbd.qmp.engine import Engine
from pynbd.qmp.protocol import QMPError

#: the daemon's command table
COMMANDS = Engine().commands

UNIX = {"type": "unix", "data": {"path": "/tmp/x.sock"}}
EXPORT = {"type": "nbd", "id": "e0", "node-name": "n0"}


def error_of(schema: s.Struct | s.Union_, value: Any) -> str:
    """The GenericError text ``check`` raises for ``value``."""
    with pytest.raises(QMPError) as info:
        s.check(schema, value)
    assert info.value.error_class == "GenericError"
    return info.value.desc


# -- check: accepted values ------------------------------------------------------------


def test_check_returns_a_new_dict_without_absent_optionals() -> None:
    args = {"addr": UNIX, "max-connections": 0}
    checked = s.check(NBD_SERVER_START, args)
    assert checked == {"addr": {"type": "unix", "data": {"path": "/tmp/x.sock"}},
                       "max-connections": 0}
    assert checked is not args
    assert "tls-creds" not in checked
    assert args == {"addr": UNIX, "max-connections": 0}


def test_check_union_keeps_the_discriminator() -> None:
    checked = s.check(BLOCKDEV_ADD, {"driver": "memory", "node-name": "m", "size": 4096,
                                     "read-only": True})
    assert checked == {"driver": "memory", "node-name": "m", "size": 4096,
                       "read-only": True}
    inet = s.check(NBD_SERVER_START, {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": "10809", "ipv4": True}}})
    assert inet["addr"] == {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809",
                                                     "ipv4": True}}


def test_check_raw_node_accepts_a_reference_or_a_nested_node() -> None:
    ref = s.check(BLOCKDEV_ADD, {"driver": "raw", "node-name": "n", "file": "f"})
    assert ref["file"] == "f"
    nested = {"driver": "file", "node-name": "f", "filename": "/x"}
    assert s.check(BLOCKDEV_ADD, {"driver": "raw", "node-name": "n", "file": nested,
                                  "offset": 512, "size": 1024})["file"] == nested


def test_every_command_has_a_schema_and_empty_arguments_fit_no_arg_commands() -> None:
    assert {"qmp_capabilities", "query-version", "query-commands", "quit", "blockdev-add",
            "blockdev-del", "query-named-block-nodes", "nbd-server-start",
            "nbd-server-stop", "block-export-add", "block-export-del",
            "query-block-exports", "x-query-nbd-clients"} <= set(COMMANDS)
    for name in ("query-version", "query-commands", "quit", "nbd-server-stop",
                 "query-block-exports", "x-query-nbd-clients"):
        assert s.check(COMMANDS[name].schema, {}) == {}
        assert error_of(COMMANDS[name].schema, {"x": 1}) == "Parameter 'x' is unexpected"


# -- check: errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "value", "desc"), [
    # missing
    (BLOCK_EXPORT_ADD, {"type": "nbd", "id": "e0"}, "Parameter 'node-name' is missing"),
    (BLOCK_EXPORT_DEL, {}, "Parameter 'id' is missing"),
    (NBD_SERVER_START, {}, "Parameter 'addr' is missing"),
    (NBD_SERVER_START, {"addr": {"type": "unix", "data": {}}},
     "Parameter 'addr.data.path' is missing"),
    (NBD_SERVER_START, {"addr": {"type": "unix"}}, "Parameter 'addr.data' is missing"),
    (NBD_SERVER_START, {"addr": {"type": "inet", "data": {"host": "h"}}},
     "Parameter 'addr.data.port' is missing"),
    (BLOCKDEV_ADD, {"driver": "file", "node-name": "f"}, "Parameter 'filename' is missing"),
    (BLOCKDEV_ADD, {"node-name": "f"}, "Parameter 'driver' is missing"),
    # unexpected
    (BLOCK_EXPORT_ADD, {**EXPORT, "bogus": 1}, "Parameter 'bogus' is unexpected"),
    (NBD_SERVER_START, {"addr": {"type": "unix", "data": {"path": "p", "x": 1}}},
     "Parameter 'addr.data.x' is unexpected"),
    (NBD_SERVER_START, {"addr": {**UNIX, "extra": True}},
     "Parameter 'addr.extra' is unexpected"),
    (BLOCKDEV_ADD, {"driver": "memory", "node-name": "m", "size": 1, "filename": "f"},
     "Parameter 'filename' is unexpected"),
    # qemu reports the schema's members before leftovers: a typo reads as "missing"
    (BLOCK_EXPORT_ADD, {"type": "nbd", "id": "e0", "node_name": "n0"},
     "Parameter 'node-name' is missing"),
    # wrong type
    (BLOCK_EXPORT_ADD, {**EXPORT, "writable": 1},
     "Invalid parameter type for 'writable', expected: boolean"),
    (BLOCK_EXPORT_ADD, {**EXPORT, "writable": "on"},
     "Invalid parameter type for 'writable', expected: boolean"),
    (NBD_SERVER_START, {"addr": UNIX, "max-connections": True},
     "Invalid parameter type for 'max-connections', expected: integer"),
    (NBD_SERVER_START, {"addr": UNIX, "max-connections": 1.0},
     "Invalid parameter type for 'max-connections', expected: integer"),
    (NBD_SERVER_START, {"addr": UNIX, "max-connections": "1"},
     "Invalid parameter type for 'max-connections', expected: integer"),
    (BLOCK_EXPORT_ADD, {**EXPORT, "id": 5}, "Invalid parameter type for 'id', expected: string"),
    (BLOCK_EXPORT_ADD, {**EXPORT, "id": None},
     "Invalid parameter type for 'id', expected: string"),
    (NBD_SERVER_START, {"addr": {"type": "unix", "data": {"path": ["p"]}}},
     "Invalid parameter type for 'addr.data.path', expected: string"),
    (NBD_SERVER_START, {"addr": {"type": "unix", "data": "p"}},
     "Invalid parameter type for 'addr.data', expected: object"),
    (NBD_SERVER_START, {"addr": "unix:/p"}, "Invalid parameter type for 'addr', expected: object"),
    (NBD_SERVER_START, {"addr": {"type": "inet", "data": {"host": "h", "port": 10809}}},
     "Invalid parameter type for 'addr.data.port', expected: string"),
    (BLOCKDEV_ADD, {"driver": "memory", "node-name": "m", "size": 1, "read-only": 0},
     "Invalid parameter type for 'read-only', expected: boolean"),
    # enums and unions
    (BLOCK_EXPORT_ADD, {**EXPORT, "type": "fuse"},
     "Parameter 'type' does not accept value 'fuse'"),
    (BLOCK_EXPORT_DEL, {"id": "e0", "mode": "soft"},
     "Parameter 'mode' does not accept value 'soft'"),
    (NBD_SERVER_START, {"addr": {"type": "vsock", "data": {"cid": "2"}}},
     "Parameter 'addr.type' does not accept value 'vsock'"),
    (NBD_SERVER_START, {"addr": {"type": 1, "data": {}}},
     "Invalid parameter type for 'addr.type', expected: string"),
    (NBD_SERVER_START, {"addr": {"data": {"path": "p"}}}, "Parameter 'addr.type' is missing"),
    (BLOCKDEV_ADD, {"driver": "vmdk", "node-name": "q"},
     "Parameter 'driver' does not accept value 'vmdk'"),
    (BLOCKDEV_ADD, {"driver": "file", "node-name": "f", "filename": "x", "aio": "posix"},
     "Parameter 'aio' does not accept value 'posix'"),
    (BLOCKDEV_ADD, {"driver": "file", "node-name": "f", "filename": "x",
                    "cache": {"direct": "yes"}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
])
def test_check_errors(schema: s.Struct | s.Union_, value: Any, desc: str) -> None:
    assert error_of(schema, value) == desc


def test_check_arguments_that_are_not_an_object() -> None:
    assert error_of(BLOCK_EXPORT_DEL, [1]) == (
        "Invalid parameter type for 'arguments', expected: object")
    assert error_of(BLOCKDEV_ADD, "x") == "Invalid parameter type for '', expected: object"


def test_check_lists() -> None:
    caps = COMMANDS["qmp_capabilities"].schema
    assert s.check(caps, {"enable": []}) == {"enable": []}
    assert s.check(caps, {"enable": ["oob"]}) == {"enable": ["oob"]}
    assert error_of(caps, {"enable": "oob"}) == (
        "Invalid parameter type for 'enable', expected: array")
    assert error_of(caps, {"enable": ["oob", "x"]}) == (
        "Parameter 'enable[1]' does not accept value 'x'")


def test_check_nested_union_inside_struct_inside_union() -> None:
    inner = s.Union_("kind", {"a": s.Struct({"n": int}), "b": s.Struct({})})
    outer = s.Union_("t", {"x": s.Struct({"child": s.Struct({"u": inner})})})
    good = {"t": "x", "child": {"u": {"kind": "a", "n": 3}}}
    assert s.check(outer, good) == good
    assert error_of(outer, {"t": "x", "child": {"u": {"kind": "c"}}}) == (
        "Parameter 'child.u.kind' does not accept value 'c'")
    assert error_of(outer, {"t": "x", "child": {"u": {"kind": "a", "n": False}}}) == (
        "Invalid parameter type for 'child.u.n', expected: integer")
    assert error_of(outer, {"t": "x", "child": {"u": {"kind": "b", "n": 1}}}) == (
        "Parameter 'child.u.n' is unexpected")


# -- coerce ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("on", True), ("yes", True), ("true", True), ("y", True), ("ON", True), ("True", True),
    ("off", False), ("no", False), ("false", False), ("n", False), ("OFF", False),
])
def test_coerce_booleans(text: str, value: bool) -> None:
    assert s.coerce(BLOCK_EXPORT_ADD, {**EXPORT, "writable": text}) == {
        **EXPORT, "writable": value}


def test_coerce_bad_boolean() -> None:
    with pytest.raises(QMPError) as info:
        s.coerce(BLOCK_EXPORT_ADD, {**EXPORT, "writable": "maybe"})
    assert info.value.desc == "Parameter 'writable' expects 'on' or 'off'"


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("0x10", 16), ("0o17", 15), ("64M", 64 << 20),
    ("1GiB", 1 << 30), ("512k", 512 << 10), ("-1", -1),
])
def test_coerce_integers(text: str, value: int) -> None:
    coerced = s.coerce(BLOCKDEV_ADD, {"driver": "memory", "node-name": "m", "size": text})
    assert coerced["size"] == value
    assert type(coerced["size"]) is int


@pytest.mark.parametrize("text", ["abc", "1.5", "", "12Q", "0x"])
def test_coerce_bad_integer(text: str) -> None:
    with pytest.raises(QMPError) as info:
        s.coerce(BLOCKDEV_ADD, {"driver": "memory", "node-name": "m", "size": text})
    assert info.value.desc == "Parameter 'size' expects an integer"


def test_coerce_nested_union_members_and_paths() -> None:
    raw = {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809",
                                             "ipv4": "on", "ipv6": "off"}},
           "max-connections": "1", "handshake-max-seconds": "0x5"}
    coerced = s.coerce(NBD_SERVER_START, raw)
    assert coerced == {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": "10809", "ipv4": True, "ipv6": False}},
        "max-connections": 1, "handshake-max-seconds": 5}
    # strings the schema wants as strings stay strings, and the result checks clean
    assert s.check(NBD_SERVER_START, coerced) == coerced
    with pytest.raises(QMPError) as info:
        s.coerce(NBD_SERVER_START, {"addr": {"type": "inet", "data": {
            "host": "h", "port": "1", "ipv6": "perhaps"}}})
    assert info.value.desc == "Parameter 'addr.data.ipv6' expects 'on' or 'off'"


def test_coerce_leaves_unknown_and_already_typed_values_alone() -> None:
    value = {**EXPORT, "writable": True, "bogus": "on", "description": "on"}
    assert s.coerce(BLOCK_EXPORT_ADD, value) == value
    # an unknown union branch is left for check() to report
    weird = {"addr": {"type": "vsock", "data": {"cid": "3"}}, "max-connections": "2"}
    coerced = s.coerce(NBD_SERVER_START, weird)
    assert coerced["addr"] == weird["addr"]
    assert coerced["max-connections"] == 2
    assert s.coerce(BLOCKDEV_ADD, {"driver": "nope", "size": "1"}) == {
        "driver": "nope", "size": "1"}


# -- parse_keyval ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("driver=file,node-name=n0,filename=disk.img",
     {"driver": "file", "node-name": "n0", "filename": "disk.img"}),
    ("filename=a,,b.img,node-name=n", {"filename": "a,b.img", "node-name": "n"}),
    ("description=x,,,,y", {"description": "x,,y"}),
    ("description=,,", {"description": ","}),
    ("a=b=c", {"a": "b=c"}),
    ("a=", {"a": ""}),
    ("a=1,", {"a": "1"}),
    ("addr.type=unix,addr.path=/tmp/n.sock,max-connections=0",
     {"addr": {"type": "unix", "path": "/tmp/n.sock"}, "max-connections": "0"}),
    ("file.driver=file,file.cache.direct=on,driver=raw",
     {"file": {"driver": "file", "cache": {"direct": "on"}}, "driver": "raw"}),
    ("", {}),
    ("type=nbd,bitmaps.0=a,bitmaps.1=b", {"type": "nbd", "bitmaps": ["a", "b"]}),
    ("bitmaps.1.node=n,bitmaps.1.name=y,bitmaps.0=x",
     {"bitmaps": ["x", {"node": "n", "name": "y"}]}),
])
def test_parse_keyval(text: str, value: dict[str, Any]) -> None:
    assert s.parse_keyval(text) == value


@pytest.mark.parametrize(("text", "desc"), [
    ("driver", "Expected '=' after parameter 'driver'"),
    ("driver=file,node-name", "Expected '=' after parameter 'node-name'"),
    ("=x", "Expected '=' after parameter '=x'"),
    ("a=1,a=2", "Parameter 'a' appears more than once"),
    ("addr.path=/x,addr.path=/y", "Parameter 'addr.path' appears more than once"),
    ("a=1,a.b=2", "Parameter 'a.b' conflicts with 'a'"),
    ("bitmaps.0=a,bitmaps.2=c", "Parameter 'bitmaps.1' missing"),
])
def test_parse_keyval_errors(text: str, desc: str) -> None:
    with pytest.raises(QMPError) as info:
        s.parse_keyval(text)
    assert info.value.error_class == "GenericError"
    assert info.value.desc == desc


def test_keyval_then_coerce_then_check_like_the_command_line() -> None:
    opts = s.coerce(BLOCK_EXPORT_ADD, s.parse_keyval(
        "type=nbd,id=e0,node-name=n0,name=disk,writable=on,description=a,,b"))
    assert s.check(BLOCK_EXPORT_ADD, opts) == {
        "type": "nbd", "id": "e0", "node-name": "n0", "name": "disk", "writable": True,
        "description": "a,b"}
