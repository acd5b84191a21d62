"""Dirty bitmaps in the QMP engine: the block-dirty-bitmap-* commands, ``transaction``,
``block-export-add``'s ``bitmaps`` and ``query-named-block-nodes``'s ``dirty-bitmaps``.

Commands run through ``Engine.execute`` on memory nodes (no QMP socket); every
message and its order are qemu-storage-daemon 7.2's.  The daemon's real
clients (qemu-io, nbdinfo, qemu-img) are in ``tests/interop/test_daemon_bitmaps.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import TYPE_CHECKING, Any

import pytest
from tests.support.engine import fails
from tests.support.engine import on_engine as run

from pynbd.block.bitmap import BitmapError
from pynbd.block.faults import FaultFilter
from pynbd.block.graph import shown
from pynbd.block.tracking import TrackingFilter

if TYPE_CHECKING:
    from pathlib import Path

    from pynbd.block.bitmap import DirtyBitmap
    from pynbd.qmp.engine import Engine

MiB = 1 << 20
BUSY = "Bitmap '{}' is currently in use by another operation and cannot be used"


async def memory(engine: Engine, name: str, size: int = 4 * MiB) -> None:
    await engine.execute("blockdev-add", {"driver": "memory", "node-name": name, "size": size})


async def add(engine: Engine, node: str, name: str, **extra: Any) -> None:
    assert await engine.execute("block-dirty-bitmap-add",
                                {"node": node, "name": name, **extra}) == {}


def bitmap(engine: Engine, node: str, name: str) -> DirtyBitmap:
    real = shown(engine.node(node))
    assert real.bitmaps is not None
    found = real.bitmaps.get(name)
    assert found is not None
    return found


async def infos(engine: Engine, node: str) -> list[dict[str, Any]]:
    for entry in await engine.execute("query-named-block-nodes", {}):
        if entry["node-name"] == node:
            return list(entry.get("dirty-bitmaps", []))
    raise AssertionError(f"no node {node}")


async def names(engine: Engine, node: str) -> list[str]:
    return [info["name"] for info in await infos(engine, node)]


async def write(engine: Engine, node: str, offset: int, length: int) -> None:
    """A write as its users make it: through the node the graph holds."""
    await engine.node(node).pwrite(b"\x01" * length, offset)


def runs(b: DirtyBitmap) -> list[tuple[int, int]]:
    return b.dirty_runs(0, b.size)


async def serve(engine: Engine, tmp_path: Path) -> None:
    await engine.execute("nbd-server-start", {"addr": {
        "type": "unix", "data": {"path": str(tmp_path / "s.sock")}}})


# -- the daemon's nodes: writes reach their bitmaps ---------------------------------------


def test_every_node_is_used_through_faults_over_tracking_over_the_node() -> None:
    async def body(engine: Engine) -> None:
        await engine.execute("blockdev-add", {"driver": "raw", "node-name": "n", "file": {
            "driver": "memory", "node-name": "m", "size": MiB}})
        for name in ("n", "m"):
            wrapper = engine.node(name)
            assert isinstance(wrapper, FaultFilter)
            assert wrapper.implicit
            tracking = wrapper.child
            assert isinstance(tracking, TrackingFilter)
            assert tracking.implicit
            assert tracking.child is shown(wrapper)
            assert tracking.tracked is shown(wrapper).bitmaps
        # the raw node writes to its child through the child's filters
        await add(engine, "m", "b")
        await write(engine, "n", 0, 512)
        assert runs(bitmap(engine, "m", "b")) == [(0, 64 << 10)]
    run(body)


def test_bitmaps_belong_to_the_node_under_its_own_implicit_filters(tmp_path: Path) -> None:
    disk = tmp_path / "d"
    disk.write_bytes(bytes(MiB))

    async def body(engine: Engine) -> None:
        await engine.execute("blockdev-add", {"driver": "file", "node-name": "f",
                                              "filename": str(disk),
                                              "cache": {"no-flush": True}})
        await add(engine, "f", "b")
        real = shown(engine.node("f"))
        assert real.driver == "file"
        assert real.bitmaps is not None
        assert "b" in real.bitmaps
        await write(engine, "f", 3 << 16, 1)
        assert runs(bitmap(engine, "f", "b")) == [(3 << 16, 1 << 16)]
    run(body)


def test_a_bitmap_added_after_the_fast_paths_were_resolved_records_them(
        tmp_path: Path) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await serve(engine, tmp_path)
        await engine.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                                  "writable": True})
        export = engine.table.lookup("n")
        assert export is not None
        paths = export.fast_paths()  # as a connection resolves them, once
        assert paths.pwrite_nowait is not None
        assert paths.pwrite_nowait(b"\x02" * 4096, 0)
        await add(engine, "n", "b", granularity=4096)
        assert paths.pwrite_nowait(b"\x02" * 4096, 8192)
        await add(engine, "n", "off", disabled=True)
        assert paths.pwrite_nowait(b"\x02" * 10, MiB)
        assert runs(bitmap(engine, "n", "b")) == [(8192, 4096), (MiB, 4096)]
        assert runs(bitmap(engine, "n", "off")) == []
        # and trims and zeroes on the ordinary path
        await export.io.write_zeroes(2 * MiB, 4096)
        await export.io.trim(3 * MiB, 1)
        assert runs(bitmap(engine, "n", "b"))[2:] == [(2 * MiB, 4096), (3 * MiB, 4096)]
    run(body)


# -- block-dirty-bitmap-add ----------------------------------------------------------------


def test_add_defaults_and_options_as_query_shows_them() -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        assert await infos(engine, "n") == []
        assert "dirty-bitmaps" not in (await engine.execute("query-named-block-nodes",
                                                            {}))[0]
        await add(engine, "n", "a")
        await add(engine, "n", "d", disabled=True, granularity=512, persistent=False)
        await add(engine, "n", "big", granularity=1 << 31)
        await write(engine, "n", 100, 1000)
        assert await infos(engine, "n") == [  # newest first, as qemu lists them
            {"name": "big", "recording": True, "persistent": False, "busy": False,
             "granularity": 1 << 31, "count": 1 << 31},
            {"name": "d", "recording": False, "persistent": False, "busy": False,
             "granularity": 512, "count": 0},
            {"name": "a", "recording": True, "persistent": False, "busy": False,
             "granularity": 65536, "count": 65536}]
        bitmap(engine, "n", "d").inconsistent = True  # as a loaded image may say
        assert (await infos(engine, "n"))[1]["inconsistent"] is True
    run(body)


@pytest.mark.parametrize(("cluster", "granularity"), [
    (512, 4096), (4096, 4096), (32768, 32768), (65536, 65536), (2 * MiB, 65536)])
def test_default_granularity_is_the_cluster_size_clamped(cluster: int,
                                                          granularity: int) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        shown(engine.node("n")).cluster_size = cluster  # type: ignore[attr-defined]
        await add(engine, "n", "b")
        assert bitmap(engine, "n", "b").granularity == granularity
    run(body)


@pytest.mark.parametrize(("args", "message"), [
    ({"node": "n", "name": ""}, "Bitmap name cannot be empty"),
    ({"node": "zz", "name": ""}, "Bitmap name cannot be empty"),
    ({"node": "zz", "name": "b"}, "Cannot find device=zz nor node-name=zz"),
    ({"node": "n", "name": "b", "granularity": 1000},
     "Granularity must be power of 2 and at least 512"),
    ({"node": "n", "name": "b", "granularity": 256},
     "Granularity must be power of 2 and at least 512"),
    ({"node": "n", "name": "b", "granularity": 0},
     "Granularity must be power of 2 and at least 512"),
    ({"node": "n", "name": "b", "granularity": -1},
     "Parameter 'granularity' expects uint32_t"),
    ({"node": "n", "name": "b", "granularity": 1 << 32},
     "Parameter 'granularity' expects uint32_t"),
    ({"node": "n", "name": "b", "granularity": 1 << 64},
     "Parameter 'granularity' expects uint64"),
    ({"node": "n", "name": "b", "granularity": "x"},
     "Parameter 'granularity' expects uint64"),
    ({"node": "n", "name": "b", "granularity": 1.5},
     "Parameter 'granularity' expects uint64"),
    ({"node": "n", "name": "b", "granularity": True},
     "Parameter 'granularity' expects uint64"),
    ({"node": "n", "name": "b", "persistent": 1},
     "Invalid parameter type for 'persistent', expected: boolean"),
    ({"node": "n", "name": "b", "persistent": True},
     "Can't store persistent bitmaps to n: Operation not supported"),
    ({"node": "n", "name": "x" * 1024}, "Bitmap name too long: " + "x" * 1024),
    ({"node": "n", "name": "\u00e9" * 512}, "Bitmap name too long: " + "\u00e9" * 512),
    ({"node": "n", "name": "old"}, "Bitmap already exists: old"),
    # qemu's order: existing before too long, persistence before both
    ({"node": "n", "name": "old", "persistent": True},
     "Can't store persistent bitmaps to n: Operation not supported"),
])
def test_add_refusals(args: dict[str, Any], message: str) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await add(engine, "n", "old")
        assert await fails(engine, "block-dirty-bitmap-add", args) == message
        assert await names(engine, "n") == ["old"]
    run(body)


def test_a_name_of_1023_bytes_is_taken() -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await add(engine, "n", "x" * 1023)
        assert await names(engine, "n") == ["x" * 1023]
    run(body)


# -- remove, clear, enable, disable --------------------------------------------------------


@pytest.mark.parametrize("command", [
    "block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable"])
def test_lookup_refusals(command: str) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await add(engine, "n", "b")
        assert await fails(engine, command, {"node": "zz", "name": "b"}) == (
            "Node 'zz' not found")
        assert await fails(engine, command, {"node": "n", "name": "zz"}) == (
            "Dirty bitmap 'zz' not found")
        assert await fails(engine, command, {"node": "n"}) == "Parameter 'name' is missing"
        bitmap(engine, "n", "b").busy += 1
        assert await fails(engine, command, {"node": "n", "name": "b"}) == BUSY.format("b")
        assert await names(engine, "n") == ["b"]
    run(body)


def test_remove_clear_enable_disable() -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await add(engine, "n", "a")
        await add(engine, "n", "b", granularity=4096)
        await write(engine, "n", 0, 1)
        assert await engine.execute("block-dirty-bitmap-disable",
                                    {"node": "n", "name": "b"}) == {}
        assert await engine.execute("block-dirty-bitmap-disable",
                                    {"node": "n", "name": "b"}) == {}  # no change, no error
        await write(engine, "n", MiB, 1)
        assert runs(bitmap(engine, "n", "b")) == [(0, 4096)]
        assert await engine.execute("block-dirty-bitmap-enable",
                                    {"node": "n", "name": "b"}) == {}
        await write(engine, "n", 2 * MiB, 1)
        assert runs(bitmap(engine, "n", "b")) == [(0, 4096), (2 * MiB, 4096)]
        assert await engine.execute("block-dirty-bitmap-clear",
                                    {"node": "n", "name": "b"}) == {}
        assert runs(bitmap(engine, "n", "b")) == []
        assert runs(bitmap(engine, "n", "a")) == [(0, 65536), (MiB, 65536), (2 * MiB, 65536)]
        assert await engine.execute("block-dirty-bitmap-remove",
                                    {"node": "n", "name": "a"}) == {}
        assert await names(engine, "n") == ["b"]
        await write(engine, "n", 3 * MiB, 1)
        assert runs(bitmap(engine, "n", "b")) == [(3 * MiB, 4096)]
    run(body)


def test_inconsistent_and_readonly_bitmaps() -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await add(engine, "n", "i")
        await add(engine, "n", "ok")
        bitmap(engine, "n", "i").inconsistent = True
        refused = "Bitmap 'i' is inconsistent and cannot be used"
        for command in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                        "block-dirty-bitmap-disable"):
            assert await fails(engine, command, {"node": "n", "name": "i"}) == refused
        for args in ({"target": "i", "bitmaps": ["ok"]}, {"target": "ok", "bitmaps": ["i"]}):
            assert await fails(engine, "block-dirty-bitmap-merge",
                               {"node": "n", **args}) == refused
        # a bitmap loaded from a read-only image (qemu's readonly flag)
        bitmap(engine, "n", "ok").readonly = True
        ro = "Bitmap 'ok' is readonly and cannot be modified"
        assert await fails(engine, "block-dirty-bitmap-clear",
                           {"node": "n", "name": "ok"}) == ro
        assert await fails(engine, "block-dirty-bitmap-remove",
                           {"node": "n", "name": "ok"}) == ro
        assert await engine.execute("block-dirty-bitmap-disable",
                                    {"node": "n", "name": "ok"}) == {}
        # removing is what an inconsistent bitmap is for
        assert await engine.execute("block-dirty-bitmap-remove",
                                    {"node": "n", "name": "i"}) == {}
        assert await names(engine, "n") == ["ok"]
    run(body)


# -- merge -----------------------------------------------------------------------------------


def test_merge_across_granularities_and_nodes() -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await memory(engine, "m")
        await add(engine, "n", "fine", granularity=512)
        await add(engine, "n", "coarse", granularity=1 << 20)
        await add(engine, "m", "other", granularity=4096)
        await add(engine, "n", "t64k", disabled=True)
        await add(engine, "n", "t512", disabled=True, granularity=512)
        await write(engine, "n", 70000, 100)  # granules: 512 at 69632, 64k at 65536
        await write(engine, "m", 3 * MiB + 10, 1)
        await engine.execute("block-dirty-bitmap-merge", {
            "node": "n", "target": "t64k",
            "bitmaps": ["fine", {"node": "m", "name": "other"}]})
        assert runs(bitmap(engine, "n", "t64k")) == [(65536, 65536), (3 * MiB, 65536)]
        await engine.execute("block-dirty-bitmap-merge", {
            "node": "n", "target": "t512", "bitmaps": ["coarse"]})
        assert runs(bitmap(engine, "n", "t512")) == [(0, MiB)]
        await engine.execute("block-dirty-bitmap-merge", {
            "node": "n", "target": "t512", "bitmaps": ["t512", "fine"]})  # itself: no change
        assert runs(bitmap(engine, "n", "t512")) == [(0, MiB)]
        # the sources are untouched; an empty list changes nothing
        assert runs(bitmap(engine, "n", "fine")) == [(69632, 512)]
        await engine.execute("block-dirty-bitmap-merge",
                             {"node": "n", "target": "t64k", "bitmaps": []})
        assert runs(bitmap(engine, "n", "t64k")) == [(65536, 65536), (3 * MiB, 65536)]
    run(body)


@pytest.mark.parametrize(("args", "message"), [
    ({"node": "zz", "target": "t", "bitmaps": ["zz"]}, "Node 'zz' not found"),
    ({"node": "n", "target": "zz", "bitmaps": ["zz"]}, "Dirty bitmap 'zz' not found"),
    ({"node": "n", "target": "t", "bitmaps": ["s", "zz"]}, "Dirty bitmap 'zz' not found"),
    ({"node": "n", "target": "t", "bitmaps": ["mb"]}, "Dirty bitmap 'mb' not found"),
    ({"node": "n", "target": "t", "bitmaps": [{"node": "zz", "name": "s"}]},
     "Node 'zz' not found"),
    ({"node": "n", "target": "t", "bitmaps": [{"node": "m", "name": "s"}]},
     "Dirty bitmap 's' not found"),
    ({"node": "n", "target": "t", "bitmaps": [{"node": "big", "name": "bb"}]},
     "Bitmaps are of different sizes (destination size is 4194304, source size is "
     "8388608) and can't be merged"),
    ({"node": "n", "target": "t", "bitmaps": [3]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ({"node": "n", "target": "t", "bitmaps": [{"node": "m"}]},
     "Parameter 'bitmaps[0].name' is missing"),
    ({"node": "n", "target": "t", "bitmaps": [{"node": "m", "name": "mb", "x": 1}]},
     "Parameter 'bitmaps[0].x' is unexpected"),
    ({"node": "n", "target": "t", "bitmaps": "s"},
     "Invalid parameter type for 'bitmaps', expected: array"),
    # busy sources are refused (qemu checks them first), then a busy target
    ({"node": "n", "target": "busy", "bitmaps": ["s"]}, BUSY.format("busy")),
    ({"node": "n", "target": "t", "bitmaps": ["s", "busy"]}, BUSY.format("busy")),
    ({"node": "n", "target": "busy", "bitmaps": ["zz"]}, "Dirty bitmap 'zz' not found"),
])
def test_merge_refusals_leave_the_target_alone(args: dict[str, Any], message: str) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await memory(engine, "m")
        await memory(engine, "big", 8 * MiB)
        for name in ("t", "s", "busy"):
            await add(engine, "n", name)
        await add(engine, "m", "mb")
        await add(engine, "big", "bb")
        await write(engine, "n", 0, 1)
        await engine.execute("block-dirty-bitmap-clear", {"node": "n", "name": "t"})
        bitmap(engine, "n", "busy").busy += 1
        assert await fails(engine, "block-dirty-bitmap-merge", args) == message
        assert runs(bitmap(engine, "n", "t")) == []
    run(body)


# -- transaction ----------------------------------------------------------------------------


def action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": f"block-dirty-bitmap-{kind}", "data": {"node": "n", **data}}


def test_actions_see_the_ones_before_them() -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await add(engine, "n", "old")
        await write(engine, "n", 0, 1)
        assert await engine.execute("transaction", {"actions": [
            action("add", name="new", disabled=True),
            action("merge", target="new", bitmaps=["old"]),
            action("clear", name="old"),
            action("enable", name="new"),
            action("remove", name="old"),
        ]}) == {}
        assert await names(engine, "n") == ["new"]
        assert runs(bitmap(engine, "n", "new")) == [(0, 65536)]
        assert bitmap(engine, "n", "new").enabled
        assert await engine.execute("transaction", {"actions": []}) == {}
    run(body)


@pytest.mark.parametrize(("failing", "message"), [
    ({"type": "abort", "data": {}}, "Transaction aborted using Abort action"),
    (action("add", name="a"), "Bitmap already exists: a"),
    (action("clear", name="zz"), "Dirty bitmap 'zz' not found"),
    # a bitmap removed earlier in the transaction is busy until the end
    (action("clear", name="gone"), BUSY.format("gone")),
    (action("add", name="gone"), "Bitmap already exists: gone"),
])
def test_a_failed_action_undoes_every_action_before_it(failing: dict[str, Any],
                                                       message: str) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        for name in ("a", "d", "gone", "t"):
            await add(engine, "n", name)
        await engine.execute("block-dirty-bitmap-disable", {"node": "n", "name": "d"})
        await write(engine, "n", 0, 1)
        await engine.execute("block-dirty-bitmap-clear", {"node": "n", "name": "t"})
        before = await infos(engine, "n")
        assert await fails(engine, "transaction", {"actions": [
            action("add", name="new"),
            action("clear", name="a"),
            action("disable", name="a"),
            action("enable", name="d"),
            action("merge", target="t", bitmaps=["a"]),
            action("remove", name="gone"),
            failing,
        ]}) == message
        assert await infos(engine, "n") == before
        assert runs(bitmap(engine, "n", "a")) == [(0, 65536)]
        assert runs(bitmap(engine, "n", "t")) == []
        # and the bitmaps still record as before
        await write(engine, "n", MiB, 1)
        assert runs(bitmap(engine, "n", "a")) == [(0, 65536), (MiB, 65536)]
        assert runs(bitmap(engine, "n", "d")) == []  # still disabled
    run(body)


@pytest.mark.parametrize(("actions", "message"), [
    ({"type": "abort", "data": {}}, "Invalid parameter type for 'actions', expected: array"),
    ([5], "Invalid parameter type for 'actions[0]', expected: object"),
    ([{"data": {}}], "Parameter 'actions[0].type' is missing"),
    ([{"type": 1, "data": {}}], "Invalid parameter type for 'actions[0].type', expected: string"),
    ([{"type": "foo", "data": {}}], "Parameter 'type' does not accept value 'foo'"),
    ([{"type": "drive-backup", "data": {}}],
     "Parameter 'type' does not accept value 'drive-backup'"),
    ([{"type": "abort"}], "Parameter 'actions[0].data' is missing"),
    ([{"type": "abort", "data": []}],
     "Invalid parameter type for 'actions[0].data', expected: object"),
    ([{"type": "abort", "data": {"x": 1}}], "Parameter 'actions[0].data.x' is unexpected"),
    ([{"type": "abort", "data": {}, "x": 1}], "Parameter 'actions[0].x' is unexpected"),
    # every action's arguments are checked before any runs
    ([action("add", name="new"), action("add")],
     "Parameter 'actions[1].data.name' is missing"),
    ([action("add", name="new"), action("add", name="g", granularity="x")],
     "Parameter 'actions[1].data.granularity' expects uint64"),
    ([action("add", name="new"), action("add", name="g", granularity=-2)],
     "Parameter 'granularity' expects uint32_t"),
    ([action("add", name="new"), action("merge", target="b", bitmaps=[None])],
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ([action("add", name="new"), action("merge", target="b", bitmaps=[{"name": "b"}])],
     "Parameter 'actions[1].data.bitmaps[0].node' is missing"),
])
def test_transaction_argument_refusals(actions: Any, message: str) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        assert await fails(engine, "transaction", {"actions": actions}) == message
        assert await names(engine, "n") == []
    run(body)


@pytest.mark.parametrize(("properties", "message"), [
    ({"completion-mode": "grouped"}, "Action 'block-dirty-bitmap-add' does not support "
                                     "Transaction property completion-mode = grouped"),
    ({"completion-mode": "bad"}, "Parameter 'completion-mode' does not accept value 'bad'"),
    ({"completion-mode": 1},
     "Invalid parameter type for 'properties.completion-mode', expected: string"),
    ({"x": 1}, "Parameter 'properties.x' is unexpected"),
    ([], "Invalid parameter type for 'properties', expected: object"),
])
def test_transaction_properties(properties: Any, message: str) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        assert await fails(engine, "transaction", {
            "actions": [action("add", name="b")], "properties": properties}) == message
        assert await engine.execute("transaction", {
            "actions": [action("add", name="b")],
            "properties": {"completion-mode": "individual"}}) == {}
        assert await engine.execute("transaction", {
            "actions": [], "properties": {"completion-mode": "grouped"}}) == {}
        assert await names(engine, "n") == ["b"]
    run(body)


# -- persistent bitmaps: the node's API, where it has one ------------------------------------


class Store:
    """What a node that stores bitmaps (qcow2) offers, recording its calls."""

    def __init__(self, refuse: str | None = None, fail_remove: bool = False) -> None:
        self.refuse = refuse
        self.fail_remove = fail_remove
        self.calls: list[tuple[str, ...]] = []

    def check_persistent_bitmap(self, name: str, granularity: int) -> None:
        self.calls.append(("check", name, str(granularity)))
        if self.refuse:
            raise BitmapError(self.refuse)

    async def remove_persistent_bitmap(self, name: str) -> None:
        self.calls.append(("remove", name))
        await asyncio.sleep(0)
        if self.fail_remove:
            raise OSError(5, "Input/output error")


async def storing(engine: Engine, store: Store) -> None:
    await memory(engine, "n")
    real = shown(engine.node("n"))
    real.check_persistent_bitmap = store.check_persistent_bitmap  # type: ignore[attr-defined]
    real.remove_persistent_bitmap = store.remove_persistent_bitmap  # type: ignore[attr-defined]


def test_persistent_bitmaps_go_through_the_nodes_store() -> None:
    store = Store()

    async def body(engine: Engine) -> None:
        await storing(engine, store)
        await add(engine, "n", "p", persistent=True, granularity=4096)
        await add(engine, "n", "t")
        assert (await infos(engine, "n"))[1]["persistent"] is True
        assert store.calls == [("check", "p", "4096")]
        await write(engine, "n", 0, 1)
        assert await engine.execute("transaction", {"actions": [
            action("clear", name="t"), action("remove", name="p"), action("add", name="q")]}) == {}
        assert store.calls[1:] == [("remove", "p")]
        assert await names(engine, "n") == ["q", "t"]
        assert runs(bitmap(engine, "n", "t")) == []
        await engine.execute("block-dirty-bitmap-remove", {"node": "n", "name": "t"})
        assert store.calls[2:] == []  # not persistent: nothing to take out of the image
    run(body)


def test_persistent_refusals_and_failed_removals_change_nothing() -> None:
    store = Store(refuse="Can't make bitmap 'p' persistent in 'n': too many", fail_remove=True)

    async def body(engine: Engine) -> None:
        await storing(engine, store)
        assert await fails(engine, "block-dirty-bitmap-add", {
            "node": "n", "name": "p", "persistent": True}) == (
            "Can't make bitmap 'p' persistent in 'n': too many")
        store.refuse = None
        await add(engine, "n", "p", persistent=True)
        await add(engine, "n", "t")
        await write(engine, "n", 0, 1)
        assert await fails(engine, "transaction", {"actions": [
            action("clear", name="t"), action("remove", name="p")]}) == (
            "Failed to update bitmap extension: Input/output error")
        assert await names(engine, "n") == ["t", "p"]
        assert runs(bitmap(engine, "n", "t")) == [(0, 65536)]
        assert bitmap(engine, "n", "p").busy == 0
        # a removal refused before the image is touched does not touch it
        bitmap(engine, "n", "p").busy += 1
        calls = len(store.calls)
        assert await fails(engine, "block-dirty-bitmap-remove",
                           {"node": "n", "name": "p"}) == BUSY.format("p")
        assert len(store.calls) == calls
    run(body)


# -- exports -----------------------------------------------------------------------------------


def export(export_id: str, node: str = "n", **extra: Any) -> dict[str, Any]:
    return {"type": "nbd", "id": export_id, "node-name": node, "name": export_id, **extra}


def test_exported_bitmaps_are_busy_until_the_export_is_gone(tmp_path: Path) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await memory(engine, "o")
        await add(engine, "n", "b")
        await add(engine, "o", "ob")
        await serve(engine, tmp_path)
        assert await engine.execute("block-export-add", export(
            "w", writable=True, bitmaps=["b", {"node": "o", "name": "ob"}])) == {}
        e = engine.table.lookup("w")
        assert e is not None
        assert e.meta_contexts[-2:] == ("qemu:dirty-bitmap:b", "qemu:dirty-bitmap:ob")
        assert [i["busy"] for i in await infos(engine, "n")] == [True]
        await add(engine, "n", "c")
        cases: list[tuple[str, dict[str, Any]]] = [
                ("block-dirty-bitmap-remove", {"name": "b"}),
                ("block-dirty-bitmap-clear", {"name": "b"}),
                ("block-dirty-bitmap-enable", {"name": "b"}),
                ("block-dirty-bitmap-disable", {"name": "b"}),
                ("block-dirty-bitmap-merge", {"target": "b", "bitmaps": []}),
                ("block-dirty-bitmap-merge", {"target": "c", "bitmaps": ["b"]}),
                ("block-export-add", {"type": "nbd", "id": "w2", "name": "w2",
                                      "writable": True, "bitmaps": ["b"]})]
        for command, args in cases:
            key = "node-name" if command == "block-export-add" else "node"
            assert await fails(engine, command, {key: "n", **args}) == BUSY.format("b")
        # a node whose bitmap an export offers is in use by it
        assert await fails(engine, "blockdev-del", {"node-name": "o"}) == (
            "Node 'o' is busy: in use by block export 'w'")
        await engine.execute("block-export-del", {"id": "w"})
        for _ in range(100):
            if "w" not in engine.exports:
                break
            await asyncio.sleep(0.01)
        assert [i["busy"] for i in await infos(engine, "n")] == [False, False]
        assert await engine.execute("blockdev-del", {"node-name": "o"}) == {}
        await engine.execute("block-export-add", export("w", writable=True, bitmaps=["b"]))
        assert await engine.execute("nbd-server-stop", {}) == {}
        assert bitmap(engine, "n", "b").busy == 0
        assert await engine.execute("block-dirty-bitmap-remove",
                                    {"node": "n", "name": "b"}) == {}
    run(body)


def test_export_bitmap_refusals(tmp_path: Path) -> None:
    async def body(engine: Engine) -> None:
        await memory(engine, "n")
        await add(engine, "n", "on")
        await add(engine, "n", "off", disabled=True)
        await add(engine, "n", "bad", disabled=True)
        bitmap(engine, "n", "bad").inconsistent = True
        await memory(engine, "o")
        await add(engine, "o", "ob")
        await serve(engine, tmp_path)
        for bitmaps, message in [
                (["zz"], "Bitmap 'zz' is not found"),
                (["ob"], "Bitmap 'ob' is not found"),
                (["on"], "Enabled bitmap 'on' incompatible with readonly export"),
                (["off", "on"], "Enabled bitmap 'on' incompatible with readonly export"),
                (["bad"], "Bitmap 'bad' is inconsistent and cannot be used"),
                ([{"node": "zz", "name": "ob"}], "Node 'zz' not found"),
                ([{"node": "o", "name": "zz"}], "Dirty bitmap 'zz' not found"),
                ([7], "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
                ([{"node": "o"}], "Parameter 'bitmaps[0].name' is missing")]:
            assert await fails(engine, "block-export-add", export("e", bitmaps=bitmaps)) == (
                message)
        assert engine.exports == {}
        assert not any(b.busy for b in shown(engine.node("n")).bitmaps or ())
        # enabled bitmaps of another node, or on a read-only export of a disabled one
        assert await engine.execute("block-export-add", export(
            "e", bitmaps=["off", {"node": "o", "name": "ob"}])) == {}
    run(body)


def test_a_name_is_looked_up_down_the_backing_chain(tmp_path: Path) -> None:
    for name in ("base", "top"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / name), "4M"],
                       check=True, timeout=30)

    async def body(engine: Engine) -> None:
        for name in ("base", "top"):
            await engine.execute("blockdev-add", {
                "driver": "file", "node-name": f"{name}-file",
                "filename": str(tmp_path / name)})
        await engine.execute("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                              "file": "base-file", "read-only": True})
        await engine.execute("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                              "file": "top-file", "backing": "base"})
        await add(engine, "base", "bb")
        await add(engine, "top", "tb", disabled=True)
        await serve(engine, tmp_path)
        # found on the backing node, which is read-only: an enabled bitmap is fine
        assert await engine.execute("block-export-add", export(
            "e", "top", bitmaps=["tb", "bb"])) == {}
        assert bitmap(engine, "base", "bb").busy == 1
    run(body)
