"""blockdev.build: nodes from qemu's blockdev options, inline children with generated
names, and every refusal in qemu's wording, leaving the graph as it was."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.block.support import run

from pynbd.block import BlockGraph, FileNode, GraphError, MemoryNode, RawNode
from pynbd.block.blockdev import BlockdevError, add_all, build
from pynbd.block.faults import FaultFilter

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

    from pynbd.block.node import Node

Options = dict[str, Any]


@pytest.fixture
def image(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(8192))
    return str(path)


@pytest.fixture
def graph() -> Iterator[BlockGraph]:
    graph = BlockGraph()
    yield graph
    run(graph.close())


def build_now(*args: Any, **kwargs: Any) -> list[tuple[str, Node]]:
    """``build`` (a coroutine) run to its end on a new event loop."""
    return run(build(*args, **kwargs))


def closed(node: Node) -> bool:
    """Whether a file or memory node has let go of its fd."""
    assert isinstance(node, FileNode | MemoryNode)
    return node._fd == -1


def refused(graph: BlockGraph, options: Options, message: str) -> list[Node]:
    """Build ``options``, which must fail with exactly ``message`` and leave the graph
    as it was; returns the nodes it opened (closed here)."""
    before = list(graph)
    opened: list[Node] = []
    with pytest.raises(BlockdevError) as info:
        build_now(graph, options, opened)
    assert str(info.value) == message
    assert list(graph) == before
    for node in opened:
        run(node.close())
    return opened


# -- what is built ---------------------------------------------------------------------------


def test_raw_over_an_inline_file_child_gets_a_generated_name(graph: BlockGraph,
                                                             image: str) -> None:
    opened: list[Node] = []
    made = build_now(graph, {"driver": "raw", "node-name": "disk",
                         "file": {"driver": "file", "filename": image}}, opened)
    assert [name for name, _ in made] == ["#block001", "disk"]
    (_, file), (_, raw) = made
    assert isinstance(file, FileNode)
    assert isinstance(raw, RawNode)
    assert raw.child is file
    assert (file.read_only, file.discard) == (False, False)
    assert opened == [file, raw]
    assert list(graph) == [], "build adds nothing"
    assert add_all(graph, made) is raw
    assert graph.get("#block001") is file
    assert graph.get("disk") is raw
    entry = next(e for e in graph.query() if e["node-name"] == "disk")
    assert (entry["drv"], entry["file"], entry["image"]["virtual-size"]) == ("raw", image, 8192)
    # the generated child goes with its parent
    run(graph.remove("disk"))
    assert list(graph) == []
    assert closed(file)


def test_names_given_and_generated(graph: BlockGraph) -> None:
    made = build_now(graph, {"driver": "raw", "node-name": "disk",
                         "file": {"driver": "memory", "size": 1000, "node-name": "m"}}, [])
    assert [name for name, _ in made] == ["m", "disk"]
    add_all(graph, made)
    # without a node-name the top node gets one too (the command line), before its
    # child; ``made`` lists children first
    made = build_now(graph, {"driver": "raw", "file": {"driver": "memory", "size": 10}}, [])
    assert [name for name, _ in made] == ["#block002", "#block001"]
    assert isinstance(made[-1][1], RawNode)
    add_all(graph, made)
    made = build_now(graph, {"driver": "memory", "size": 10}, [])
    assert [name for name, _ in made] == ["#block003"]
    add_all(graph, made)


def test_raw_over_a_named_node(graph: BlockGraph) -> None:
    memory = MemoryNode(4096)
    graph.add(memory, "mem")
    opened: list[Node] = []
    made = build_now(graph, {"driver": "raw", "node-name": "window", "file": "mem",
                         "offset": 512, "size": 1024}, opened)
    ((name, raw),) = made
    assert name == "window"
    assert isinstance(raw, RawNode)
    assert (raw.child, raw.offset, raw.size) == (memory, 512, 1024)
    assert opened == [raw]
    add_all(graph, made)
    assert graph.parents(memory) == [raw]
    made = build_now(graph, {"driver": "raw", "node-name": "ro", "file": "mem", "read-only": True},
                 [])
    assert not made[0][1].capabilities.can_write
    add_all(graph, made)


def test_file_options(graph: BlockGraph, image: str) -> None:
    cases: list[tuple[Options, bool, bool]] = [
            ({}, False, False), ({"discard": "unmap"}, False, True),
            ({"discard": "ignore"}, False, False), ({"read-only": True}, True, False)]
    for options, read_only, discard in cases:
        ((_, node),) = build_now(graph, {"driver": "file", "filename": image, **options}, [])
        assert isinstance(node, FileNode)
        assert (node.read_only, node.discard) == (read_only, discard), options
        run(node.close())


def test_wrap_puts_a_filter_over_every_node_built(graph: BlockGraph) -> None:
    def implicit_faults(node: Node) -> Node:
        wrapper = FaultFilter(node, seed=1)
        wrapper.implicit = True
        return wrapper

    opened: list[Node] = []
    made = build_now(graph, {"driver": "raw", "node-name": "disk",
                         "file": {"driver": "memory", "size": 4096}}, opened,
                 wrap=implicit_faults)
    (child_name, child), (name, top) = made
    assert (child_name, name) == ("#block001", "disk")
    assert isinstance(child, FaultFilter)
    assert isinstance(top, FaultFilter)
    raw = top.child
    assert isinstance(raw, RawNode)
    assert raw.child is child, "parents use the wrapper"
    memory = child.child
    assert opened == [memory, child, raw, top]
    add_all(graph, made)
    shown = {e["node-name"]: e["drv"] for e in graph.query()}
    assert shown == {"#block001": "memory", "disk": "raw"}
    run(graph.remove("disk"))
    assert list(graph) == []
    assert closed(memory)


def test_check_child_sees_each_inline_child_with_its_name(graph: BlockGraph) -> None:
    seen: list[tuple[Options, str]] = []

    def check(options: Options, role: str) -> Options:
        seen.append((options, role))
        return {**options, "size": 2048}

    made = build_now(graph, {"driver": "raw", "node-name": "disk",
                             "file": {"driver": "memory", "size": 1}}, [], check_child=check)
    assert seen == [({"driver": "memory", "size": 1, "node-name": "#block001"}, "file")]
    assert made[-1][1].size == 2048
    add_all(graph, made)


# -- refusals --------------------------------------------------------------------------------


def test_errors_are_graph_errors() -> None:
    assert issubclass(BlockdevError, GraphError)
    assert issubclass(BlockdevError, ValueError)


def test_a_missing_node(graph: BlockGraph) -> None:
    # pynbd's long-standing wording (the QMP tests pin it); qemu 7.2 quotes the names
    assert refused(graph, {"driver": "raw", "node-name": "r", "file": "nope"},
                   "Cannot find device=nope nor node-name=nope") == []


def test_duplicate_names(graph: BlockGraph) -> None:
    graph.add(MemoryNode(10), "mem")
    assert refused(graph, {"driver": "memory", "size": 10, "node-name": "mem"},
                   "Duplicate nodes with node-name='mem'") == []
    assert refused(graph, {"driver": "raw", "node-name": "r",
                           "file": {"driver": "memory", "size": 10, "node-name": "mem"}},
                   "Duplicate nodes with node-name='mem'") == []
    # an inline child that takes its parent's name: both were opened
    opened = refused(graph, {"driver": "raw", "node-name": "x",
                             "file": {"driver": "memory", "size": 10, "node-name": "x"}},
                     "Duplicate nodes with node-name='x'")
    assert [type(node) for node in opened] == [MemoryNode, RawNode]


@pytest.mark.parametrize(("name", "message"), [
    ("", "Invalid node-name: ''"),
    ("1disk", "Invalid node-name: '1disk'"),
    ("#block001", "Invalid node-name: '#block001'"),
    ("dísk", "Invalid node-name: 'dísk'"),
    ("a" * 32, "Node name too long"),
])
def test_invalid_node_names(graph: BlockGraph, name: str, message: str) -> None:
    assert refused(graph, {"driver": "memory", "size": 10, "node-name": name}, message) == []


def test_the_longest_and_oddest_valid_names(graph: BlockGraph) -> None:
    for name in ("a" * 31, "Z.9_-x"):
        add_all(graph, build_now(graph, {"driver": "memory", "size": 10, "node-name": name}, []))
        assert name in graph


def test_a_read_only_child_under_a_writable_raw(graph: BlockGraph, image: str) -> None:
    graph.add(FileNode(image, read_only=True), "ro")
    assert refused(graph, {"driver": "raw", "node-name": "r", "file": "ro"},
                   "Node 'ro' is read-only; add the raw node with 'read-only': true") == []
    opened = refused(graph, {"driver": "raw", "node-name": "r",
                             "file": {"driver": "file", "filename": image, "read-only": True}},
                     "Node '#block001' is read-only; add the raw node with "
                     "'read-only': true")
    assert [type(node) for node in opened] == [FileNode]
    made = build_now(graph, {"driver": "raw", "node-name": "r", "read-only": True,
                             "file": "ro"}, [])
    assert not made[0][1].capabilities.can_write
    add_all(graph, made)


@pytest.mark.parametrize(("window", "numbers"), [
    ({"offset": 2000}, ("2000", "1000")),
    ({"offset": 100, "size": 1000}, ("100", "1000")),
    ({"size": 1001}, ("1001", "1000")),
])
def test_a_window_that_does_not_fit(graph: BlockGraph, window: Options,
                                    numbers: tuple[str, str]) -> None:
    before = list(graph)
    opened: list[Node] = []
    with pytest.raises(BlockdevError) as info:
        build_now(graph, {"driver": "raw", "node-name": "r", **window,
                      "file": {"driver": "memory", "size": 1000}}, opened)
    assert all(number in str(info.value) for number in numbers), str(info.value)
    assert [type(node) for node in opened] == [MemoryNode], "the child was opened"
    assert list(graph) == before
    run(opened[0].close())


@pytest.mark.parametrize(("window", "message"), [
    ({"offset": 2000}, "Offset (2000) cannot be greater than size of the containing file "
                       "(1000)"),
    ({"offset": 100, "size": 1000},
     "The sum of offset (100) and size (1000) has to be smaller or equal to the  actual "
     "size of the containing file (1000)"),
])
def test_a_window_that_does_not_fit_in_qemus_words(graph: BlockGraph, window: Options,
                                                   message: str) -> None:
    refused(graph, {"driver": "raw", "node-name": "r", **window,
                    "file": {"driver": "memory", "size": 1000}}, message)


def test_other_refusals(graph: BlockGraph, tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "absent.img")
    assert refused(graph, {"driver": "file", "filename": missing},
                   f"Could not open '{missing}': No such file or directory") == []
    assert refused(graph, {"driver": "memory", "size": -1},
                   "Parameter 'size': size must not be negative, got -1") == []
    assert refused(graph, {"driver": "vmdk", "node-name": "q"}, "Unknown driver 'vmdk'") == []
    assert refused(graph, {"driver": "raw", "node-name": "r", "file": 5},
                   "Invalid parameter type for 'file', expected: object or string") == []
    # checked before anything connects to a cluster
    assert refused(graph, {"driver": "rbd", "node-name": "i", "pool": "p", "image": "i",
                           "snapshot": "s"},
                   "Snapshot 's' is read-only; add the node with 'read-only': true") == []
