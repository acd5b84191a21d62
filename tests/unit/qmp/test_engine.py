"""The QMP engine: its command table, node names and export ids as qemu checks them.

Commands run through ``Engine.execute`` on memory nodes, with no QMP socket;
the daemon's own QMP session is covered by ``tests/interop/test_daemon.py``.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import pynbd.qmp.commands
from pynbd.qmp.commands import Command, basic, block, id_wellformed, nbd
from pynbd.qmp.engine import COMMAND_SETS, Engine
from pynbd.qmp.protocol import QMPError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

COMMANDS_DIR = Path(pynbd.qmp.commands.__file__).parent


def run(body: Callable[[Engine], Awaitable[None]],
        events: list[tuple[str, dict[str, Any]]] | None = None) -> None:
    """Run ``body`` on a new engine, closed afterwards."""
    async def main() -> None:
        engine = Engine(emit=None if events is None
                        else lambda name, data: events.append((name, data)))
        try:
            await body(engine)
        finally:
            await engine.close()
    asyncio.run(main())


async def fails(engine: Engine, command: str, args: dict[str, Any],
                error_class: str = "GenericError") -> str:
    with pytest.raises(QMPError) as info:
        await engine.execute(command, args)
    assert info.value.error_class == error_class
    return info.value.desc


def memory(name: str, size: int = 1 << 20) -> dict[str, Any]:
    return {"driver": "memory", "node-name": name, "size": size}


async def node_names(engine: Engine) -> list[str]:
    nodes = await engine.execute("query-named-block-nodes", {})
    return [n["node-name"] for n in nodes]


# -- the command table ----------------------------------------------------------------


def test_the_table_is_built_per_engine_from_the_listed_sets() -> None:
    engine = Engine()
    names = {c.name for commands in COMMAND_SETS for c in commands}
    assert set(engine.commands) == names
    assert {"qmp_capabilities", "blockdev-add", "block-export-add", "object-add",
            "x-fault-add"} <= names
    for name, command in engine.commands.items():
        assert isinstance(command, Command)
        assert command.name == name

    async def body(engine: Engine) -> None:
        listed = await engine.execute("query-commands", {})
        assert listed == [{"name": name} for name in sorted(engine.commands)]
    run(body)


def test_an_engine_runs_only_the_commands_it_was_given() -> None:
    async def main() -> None:
        small = Engine(command_sets=[basic.COMMANDS])
        assert await small.execute("query-commands", {}) == [
            {"name": n} for n in ("qmp_capabilities", "query-commands", "query-version",
                                  "quit")]
        assert await fails(small, "blockdev-add", memory("n"), "CommandNotFound") == (
            "The command blockdev-add has not been found")
        # another engine is not affected: there is no global table
        full = Engine()
        await full.execute("blockdev-add", memory("n"))
        await full.close()
        await small.close()
    asyncio.run(main())


def test_a_command_defined_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'quit' is defined twice"):
        Engine(command_sets=[basic.COMMANDS, basic.COMMANDS[-1:]])


def test_every_command_module_lists_its_commands_as_data() -> None:
    listed = {id(commands) for commands in COMMAND_SETS}
    for path in sorted(COMMANDS_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = getattr(pynbd.qmp.commands, path.stem)
        assert isinstance(module.COMMANDS, tuple), path.name
        assert all(isinstance(c, Command) for c in module.COMMANDS), path.name
        assert id(module.COMMANDS) in listed, f"{path.name} is not in COMMAND_SETS"


def test_handlers_use_only_the_engines_public_names() -> None:
    """No command module reaches into the engine: no ``engine._anything``."""
    for path in sorted(COMMANDS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        private = [f"{path.name}:{node.lineno}: engine.{node.attr}"
                   for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and node.attr.startswith("_")
                   and isinstance(node.value, ast.Name) and node.value.id == "engine"]
        assert private == []


# -- node names (qemu's bdrv_assign_node_name) ----------------------------------------


@pytest.mark.parametrize("name", [
    "a", "A", "n0", "disk.img", "my-node_1", "Z.-_9", "a" * 31])
def test_well_formed_node_names_are_accepted(name: str) -> None:
    async def body(engine: Engine) -> None:
        assert await engine.execute("blockdev-add", memory(name)) == {}
        assert await node_names(engine) == [name]
        assert await engine.execute("blockdev-del", {"node-name": name}) == {}
    run(body)


@pytest.mark.parametrize("name", [
    "", "0", "1abc", "-a", "_a", ".a", "#block001", "a b", "a/b", "a:b", "a,b", "a\n",
    " a", "\u00e9", "a\u00e9", "a\u0661", "\uff41", "a\x00", "1" + "a" * 5000])
def test_malformed_node_names_are_refused(name: str) -> None:
    async def body(engine: Engine) -> None:
        assert await fails(engine, "blockdev-add", memory(name)) == (
            f"Invalid node-name: '{name}'")
        assert await node_names(engine) == []
    run(body)


@pytest.mark.parametrize("length", [32, 33, 5000])
def test_node_names_of_32_characters_or_more_are_too_long(length: int) -> None:
    async def body(engine: Engine) -> None:
        assert await fails(engine, "blockdev-add", memory("n" * length)) == (
            "Node name too long")
        assert await node_names(engine) == []
    run(body)


def test_node_name_checks_come_in_qemus_order() -> None:
    async def body(engine: Engine) -> None:
        await engine.execute("blockdev-add", memory("m"))
        # malformed before duplicate, duplicate before too long
        assert await fails(engine, "blockdev-add", memory("m m")) == (
            "Invalid node-name: 'm m'")
        assert await fails(engine, "blockdev-add", memory("m")) == (
            "Duplicate nodes with node-name='m'")
        assert await fails(engine, "blockdev-add", memory("-" + "m" * 40)) == (
            "Invalid node-name: '-" + "m" * 40 + "'")
    run(body)


def test_inline_children_are_checked_too_and_leave_nothing_behind() -> None:
    async def body(engine: Engine) -> None:
        for child, desc in [("c d", "Invalid node-name: 'c d'"),
                            ("c" * 32, "Node name too long")]:
            assert await fails(engine, "blockdev-add", {
                "driver": "raw", "node-name": "p", "file": memory(child)}) == desc
            assert await node_names(engine) == []
        # a malformed parent is refused before its child is made
        assert await fails(engine, "blockdev-add", {
            "driver": "raw", "node-name": "9p", "file": memory("c")}) == (
            "Invalid node-name: '9p'")
        assert await node_names(engine) == []
    run(body)


def test_names_the_daemon_makes_for_inline_children_are_exempt() -> None:
    async def body(engine: Engine) -> None:
        for parent in ("p", "q"):
            await engine.execute("blockdev-add", {
                "driver": "raw", "node-name": parent,
                "file": {"driver": "memory", "size": 1 << 20}})
        assert await node_names(engine) == ["#block001", "p", "#block002", "q"]
        # a user cannot take such a name, nor refer to one as a new node's name
        assert await fails(engine, "blockdev-add", memory("#block003")) == (
            "Invalid node-name: '#block003'")
        assert await engine.execute("blockdev-del", {"node-name": "p"}) == {}
        assert await node_names(engine) == ["#block002", "q"]
    run(body)


def test_id_wellformed_is_qemus_rule() -> None:
    """``id_wellformed`` is qemu's rule: ASCII letter first, then [A-Za-z0-9._-]."""
    assert id_wellformed("a-._9")
    for bad in ("", "9", "a!", "\u00e9", "a\u00e9", "a\n"):
        assert not id_wellformed(bad)


# -- export ids (qemu's blk_exp_add) ----------------------------------------------------


def test_export_ids_are_checked_as_qemu_does(tmp_path: Path) -> None:
    async def body(engine: Engine) -> None:
        await engine.execute("blockdev-add", memory("n"))
        await engine.execute("nbd-server-start", {"addr": {
            "type": "unix", "data": {"path": str(tmp_path / "s.sock")}}})
        for bad in ("", "#e", "1e", "e 0", "e/0", "\u00e9"):
            assert await fails(engine, "block-export-add", {
                "type": "nbd", "id": bad, "node-name": "n"}) == "Invalid block export id"
        # malformed before in use; no length limit (qemu has none for export ids)
        long_id = "e" * 200
        assert await engine.execute("block-export-add", {
            "type": "nbd", "id": long_id, "node-name": "n"}) == {}
        assert await fails(engine, "block-export-add", {
            "type": "nbd", "id": long_id, "node-name": "n", "name": "x"}) == (
            f"Block export id '{long_id}' is already in use")
        assert [e["id"] for e in await engine.execute("query-block-exports", {})] == [
            long_id]
    run(body)


# -- the engine's public API, as the handlers use it ---------------------------------------


def test_export_del_finishes_in_the_background_and_close_waits(tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    async def body(engine: Engine) -> None:
        await engine.execute("blockdev-add", memory("n"))
        await engine.execute("nbd-server-start", {"addr": {
            "type": "unix", "data": {"path": str(tmp_path / "s.sock")}}})
        await engine.execute("block-export-add", {"type": "nbd", "id": "e0",
                                                  "node-name": "n"})
        assert await engine.execute("block-export-del", {"id": "e0"}) == {}
        assert engine.table.lookup("n") is None
        assert await fails(engine, "blockdev-del", {"node-name": "n"}) == (
            "Node 'n' is busy: in use by block export 'e0'")
        assert engine.users(engine.node("n")) == ["block export 'e0'"]
    run(body, events)
    assert events == [("BLOCK_EXPORT_DELETED", {"id": "e0"})]


def test_nbd_server_stop_forgets_every_export(tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    sock = tmp_path / "s.sock"

    async def body(engine: Engine) -> None:
        await engine.execute("blockdev-add", memory("n"))
        await engine.execute("nbd-server-start", {"addr": {
            "type": "unix", "data": {"path": str(sock)}}})
        for export_id in ("e0", "e1"):
            await engine.execute("block-export-add", {
                "type": "nbd", "id": export_id, "node-name": "n", "name": export_id})
        assert await engine.execute("nbd-server-stop", {}) == {}
        assert engine.nbd is None
        assert not sock.exists()
        assert engine.exports == {}
        assert await fails(engine, "nbd-server-stop", {}) == "NBD server not running"
        assert await engine.execute("blockdev-del", {"node-name": "n"}) == {}
    run(body, events)
    assert events == [("BLOCK_EXPORT_DELETED", {"id": "e0"}),
                      ("BLOCK_EXPORT_DELETED", {"id": "e1"})]


def test_nbd_constants_stay_where_the_daemon_finds_them() -> None:
    from pynbd.qmp.engine import BLOCK_EXPORT_ADD, BLOCKDEV_ADD, OBJECT_ADD

    assert BLOCKDEV_ADD is block.BLOCKDEV_ADD
    assert BLOCK_EXPORT_ADD is nbd.BLOCK_EXPORT_ADD
    assert OBJECT_ADD is pynbd.qmp.commands.objects.OBJECT_ADD
