"""BlockGraph: named nodes, who uses whom, removal, closing, and how qemu's
``query-named-block-nodes`` shows them; ``one_store`` (the multi-conn rule)."""

from __future__ import annotations

import dataclasses
import errno
import logging
from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.block.support import run

from pynbd.block import (
    BlockGraph,
    FileNode,
    FilterNode,
    GraphError,
    MemoryNode,
    RawNode,
    one_store,
)
from pynbd.block.faults import FaultFilter
from pynbd.block.graph import backing_depth, shown, subtree

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Awaitable

    from pynbd.block.node import Node

#: what the recording nodes did, in order: (what, label)
Log = list[tuple[str, str]]


class Recorded(MemoryNode):
    """A memory node that logs its flushes and closes."""

    def __init__(self, log: Log, label: str, size: int = 4096, *,
                 writable: bool = True, fail_flush: bool = False) -> None:
        super().__init__(size)
        self.log, self.label, self.fail_flush = log, label, fail_flush
        if not writable:
            self.capabilities = dataclasses.replace(self.capabilities, can_write=False)

    async def flush(self) -> None:
        self.log.append(("flush", self.label))
        if self.fail_flush:
            raise OSError(errno.EIO, "simulated flush failure")

    async def close(self) -> None:
        self.log.append(("close", self.label))
        await super().close()


class RecordedRaw(RawNode):
    """A raw node that logs its flushes and closes."""

    def __init__(self, log: Log, label: str, file: Node, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.log, self.label = log, label

    async def flush(self) -> None:
        self.log.append(("flush", self.label))
        await super().flush()

    async def close(self) -> None:
        self.log.append(("close", self.label))


class Overlay(FilterNode):
    """A format node with a backing child (as qcow2 over a base image)."""

    driver = "x-overlay"

    def __init__(self, file: Node, backing: Node) -> None:
        super().__init__(file)
        self.backing = backing

    @property
    def children(self) -> dict[str, Node]:
        return {"file": self.child, "backing": self.backing}


def closes(log: Log) -> list[str]:
    return [label for what, label in log if what == "close"]


def flushes(log: Log) -> list[str]:
    return [label for what, label in log if what == "flush"]


# -- names -----------------------------------------------------------------------------------


def test_add_get_and_duplicate_names() -> None:
    graph = BlockGraph()
    node = MemoryNode(10)
    graph.add(node, "disk")
    assert node.node_name == "disk"
    assert graph.get("disk") is node
    assert "disk" in graph
    assert graph.get("other") is None
    assert "other" not in graph
    assert list(graph) == [node]
    with pytest.raises(GraphError, match=r"^Duplicate nodes with node-name='disk'$"):
        graph.add(MemoryNode(10), "disk")
    assert graph.get("disk") is node


def test_generated_names_are_qemus() -> None:
    graph = BlockGraph()
    assert [graph.generated_name() for _ in range(3)] == ["#block001", "#block002",
                                                          "#block003"]
    other = BlockGraph()
    assert other.generated_name() == "#block001", "each graph counts its own"


def test_parents_and_roots() -> None:
    graph = BlockGraph()
    base = MemoryNode(4096)
    first, second = RawNode(base), RawNode(base, offset=512)
    lone = MemoryNode(10)
    for node, name in ((base, "base"), (first, "first"), (second, "second"), (lone, "lone")):
        graph.add(node, name)
    assert graph.parents(base) == [first, second]
    assert graph.parents(first) == []
    assert graph.roots() == [first, second, lone]
    assert list(subtree(first)) == [first, base]


# -- removal ---------------------------------------------------------------------------------


def test_remove_refuses_a_node_in_use_and_an_unknown_name() -> None:
    graph = BlockGraph()
    base = MemoryNode(4096)
    graph.add(base, "base")
    graph.add(RawNode(base), "raw")
    graph.add(RawNode(base), "raw2")
    with pytest.raises(GraphError,
                       match=r"^Node 'base' is busy: in use by node 'raw', node 'raw2'$"):
        run(graph.remove("base"))
    with pytest.raises(GraphError, match=r"^Failed to find node with node-name='nope'$"):
        run(graph.remove("nope"))
    assert graph.get("base") is base


def test_remove_closes_generated_children_with_their_parent_but_not_named_ones() -> None:
    log: Log = []
    graph = BlockGraph()
    generated = Recorded(log, "generated")
    named = Recorded(log, "named")
    graph.add(generated, graph.generated_name())
    graph.add(named, "named")
    graph.add(RecordedRaw(log, "over-generated", generated), "a")
    graph.add(RecordedRaw(log, "over-named", named), "b")
    run(graph.remove("a"))
    assert closes(log) == ["over-generated", "generated"], "parents before children"
    assert "#block001" not in graph
    run(graph.remove("b"))
    assert closes(log) == ["over-generated", "generated", "over-named"]
    assert graph.get("named") is named, "a user-named child stays"
    run(graph.remove("named"))
    assert closes(log)[-1] == "named"
    assert list(graph) == []


def test_a_generated_child_another_node_uses_stays() -> None:
    log: Log = []
    graph = BlockGraph()
    shared = Recorded(log, "shared")
    graph.add(shared, graph.generated_name())
    graph.add(RecordedRaw(log, "a", shared), "a")
    graph.add(RecordedRaw(log, "b", shared), "b")
    run(graph.remove("a"))
    assert closes(log) == ["a"]
    assert graph.get("#block001") is shared
    run(graph.remove("b"))
    assert closes(log) == ["a", "b", "shared"]


def test_remove_closes_unnamed_nodes_under_an_implicit_filter() -> None:
    """An implicit filter is named; the node under it has no name of its own."""
    log: Log = []
    graph = BlockGraph()
    inner = Recorded(log, "inner")
    wrapper = FaultFilter(inner, seed=1)
    wrapper.implicit = True
    graph.add(wrapper, "disk")
    run(graph.remove("disk"))
    assert closes(log) == ["inner"]
    assert list(graph) == []


def test_a_child_two_parents_share_closes_after_both() -> None:
    """Closing goes parents first across the whole graph: depth first would close
    the shared child between its two parents (the second could still write to it)."""
    log: Log = []
    graph = BlockGraph()
    shared = Recorded(log, "shared")
    graph.add(shared, "shared")
    graph.add(RecordedRaw(log, "a", shared), "a")
    graph.add(RecordedRaw(log, "b", shared, read_only=True), "b")
    run(graph.close())
    assert closes(log)[-1] == "shared"
    assert sorted(closes(log)) == ["a", "b", "shared"]


# -- closing ---------------------------------------------------------------------------------


def test_close_flushes_writable_roots_then_closes_every_node_once_parents_first() -> None:
    log: Log = []
    graph = BlockGraph()
    base = Recorded(log, "base", 8192)
    readonly = Recorded(log, "readonly", writable=False)
    graph.add(base, "base")
    graph.add(RecordedRaw(log, "first", base), "first")
    graph.add(RecordedRaw(log, "second", base, offset=4096), "second")
    graph.add(readonly, "readonly")
    graph.add(RecordedRaw(log, "ro-raw", MemoryNode(10), read_only=True), "ro-raw")
    run(graph.close())
    # a flush goes down the chain: each writable root's flush reaches base
    assert flushes(log) == ["first", "base", "second", "base"]
    assert log.index(("flush", "base")) < log.index(("close", "first"))
    # base, which both raw nodes use, closes after both of them
    assert closes(log) == ["first", "second", "readonly", "ro-raw", "base"]
    assert list(graph) == []


def test_close_flushes_a_writable_node_that_only_read_only_nodes_use() -> None:
    """An export may write to ``base`` directly while a read-only raw node reads it:
    what was written must be flushed at shutdown all the same."""
    log: Log = []
    graph = BlockGraph()
    base = Recorded(log, "base")
    graph.add(base, "base")
    graph.add(RecordedRaw(log, "ro", base, read_only=True), "ro")
    run(graph.close())
    assert flushes(log) == ["base"]
    assert closes(log) == ["ro", "base"]


def test_close_goes_on_after_a_failed_flush(caplog: pytest.LogCaptureFixture) -> None:
    log: Log = []
    graph = BlockGraph()
    graph.add(Recorded(log, "bad", fail_flush=True), "bad")
    graph.add(Recorded(log, "good"), "good")
    with caplog.at_level(logging.ERROR, logger="pynbd.block"):
        run(graph.close())
    assert flushes(log) == ["bad", "good"]
    assert closes(log) == ["bad", "good"]
    (record,) = caplog.records
    assert "final flush" in record.getMessage()
    assert "'bad'" in record.getMessage()
    assert "simulated flush failure" in record.getMessage()


def test_close_waits_through_the_callers_wait() -> None:
    graph = BlockGraph()
    graph.add(MemoryNode(10), "disk")
    steps: list[str] = []

    async def wait(step: Awaitable[Any], what: str) -> Any:
        steps.append(what)
        return await step

    run(graph.close(wait))
    flush, close = steps
    assert "final flush" in flush
    assert "'disk'" in flush
    assert "close" in close
    assert "'disk'" in close


# -- query-named-block-nodes -----------------------------------------------------------------


def test_query_shows_nodes_as_qemu_does(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(3 * 4096))
    graph = BlockGraph()
    file = FileNode(str(path))
    graph.add(file, "#block001")
    graph.add(RawNode(file, offset=4096, read_only=True), "disk")
    graph.add(MemoryNode(1000), "mem")
    entries = {entry["node-name"]: entry for entry in graph.query()}
    assert list(entries) == ["#block001", "disk", "mem"]
    shape = {name: (e["drv"], e["ro"], e["file"], e["backing_file_depth"],
                    e["image"]["virtual-size"]) for name, e in entries.items()}
    assert shape == {"#block001": ("file", False, str(path), 0, 3 * 4096),
                     "disk": ("raw", True, str(path), 0, 2 * 4096),
                     "mem": ("memory", False, "", 0, 1000)}
    disk = entries["disk"]
    assert disk["image"] == {"filename": str(path), "format": "raw",
                             "virtual-size": 2 * 4096}
    assert (disk["encrypted"], disk["detect_zeroes"]) == (False, "off")
    run(graph.close())


def test_query_counts_the_backing_chain() -> None:
    graph = BlockGraph()
    base = MemoryNode(100)
    middle = Overlay(MemoryNode(100), base)
    top = Overlay(MemoryNode(100), middle)
    graph.add(top, "top")
    graph.add(middle, "middle")
    graph.add(base, "base")
    depths = {e["node-name"]: e["backing_file_depth"] for e in graph.query()}
    assert depths == {"top": 2, "middle": 1, "base": 0}
    assert backing_depth(top) == 2


def test_an_implicit_filter_shows_the_node_under_it() -> None:
    graph = BlockGraph()
    raw = RawNode(MemoryNode(2000), offset=500, read_only=True)
    wrapper = FaultFilter(raw, seed=1)
    wrapper.implicit = True
    graph.add(wrapper, "disk")
    assert shown(wrapper) is raw
    (entry,) = graph.query()
    assert (entry["node-name"], entry["drv"], entry["ro"], entry["image"]["virtual-size"]) == (
        "disk", "raw", True, 1500)
    # an explicit filter shows itself
    wrapper.implicit = False
    assert graph.query()[0]["drv"] == "x-faults"


# -- one_store (NBD_FLAG_CAN_MULTI_CONN) -----------------------------------------------------


def test_one_store_needs_every_node_under() -> None:
    base = MemoryNode(4096)
    raw = RawNode(base)
    stack = FaultFilter(RawNode(base, offset=100), seed=1)
    assert one_store(base)
    assert one_store(raw)
    assert one_store(stack)
    base.capabilities = dataclasses.replace(base.capabilities, can_multi_conn=False)
    assert not one_store(base)
    assert not one_store(raw), "the raw node's own capabilities are copied, but not enough"
    assert not one_store(stack)
    backing = MemoryNode(4096)
    backing.capabilities = dataclasses.replace(backing.capabilities, can_multi_conn=False)
    assert not one_store(Overlay(MemoryNode(4096), backing))
