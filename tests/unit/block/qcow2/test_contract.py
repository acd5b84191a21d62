"""The node contract (every layer, and the state machine) over qcow2 nodes in memory,
plus a state machine whose every image must pass ``qemu-img check`` and compare equal."""

from __future__ import annotations

import functools
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from tests.unit.block.contract import NodeContract, _offered
from tests.unit.block.machine import NodeMachine
from tests.unit.block.qcow2.images import (
    assert_clean,
    create,
    in_new_loop,
    needs_qemu,
    same_as_raw,
)
from tests.unit.block.support import MODEL_SIZE, Stack, read

from pynbd.block.file import FileNode
from pynbd.block.memory import MemoryNode
from pynbd.block.qcow2 import Qcow2Node

if TYPE_CHECKING:
    import pathlib

    from pynbd.block.node import Node

pytestmark = needs_qemu


@functools.cache
def _template(size: int, options: tuple[str, ...]) -> bytes:
    """A fresh image of virtual size ``size`` (set exactly: qemu-img rounds it up)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = bytearray(create(Path(tmp) / "t.qcow2", -(-size // 512) * 512,
                                *options).read_bytes())
    struct.pack_into(">Q", data, 24, size)
    return bytes(data)


def qcow2_in_memory(size: int, options: tuple[str, ...]) -> Qcow2Node:
    data = _template(size, options)
    file = MemoryNode(len(data))
    in_new_loop(lambda: file.pwrite(data, 0))
    return in_new_loop(lambda: Qcow2Node.open(file))


class _Qcow2Contract(NodeContract):
    options: ClassVar[tuple[str, ...]] = ()

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        return qcow2_in_memory(size, self.options)

    # the qcow2 node is a format node, not a protocol node: it has a child, and fast
    # paths only where its file has them, so these two tests are replaced by qcow2's own
    def test_graph_facing_parts(self, stack: Stack) -> None:
        node = stack.top
        assert isinstance(stack.protocol, Qcow2Node)
        assert node.filename == stack.protocol.filename == stack.protocol.file.filename
        assert node.resolve().resolve() is node.resolve()
        assert stack.protocol.resolve() is stack.protocol
        assert isinstance(stack.protocol, Qcow2Node)
        assert stack.protocol.driver == "qcow2"
        assert list(stack.protocol.children) == ["file"]

    def test_layers_keep_every_fast_path(self, stack: Stack) -> None:
        # its file's nowait calls and sendfile, where the file (memory, file) has them
        assert isinstance(stack.protocol, Qcow2Node)
        offered = ({"pread_nowait", "pwrite_nowait", "sendfile_source"}
                   & _offered(stack.protocol.file.fast_paths()))
        assert {"pread_nowait", "pwrite_nowait"} <= offered
        assert _offered(stack.protocol.fast_paths()) == offered
        assert _offered(stack.top.resolve().fast_paths()) == offered
        assert _offered(stack.top.fast_paths()) == offered


class TestQcow2Default(_Qcow2Contract):
    options = ()


class TestQcow2OverFile(_Qcow2Contract):
    """Over a file, whose nowait calls give the qcow2 node its fast paths (taken
    whenever the clusters are mapped in memory)."""

    options = ("cluster_size=4k",)

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        image = tmp_path / "contract.qcow2"
        image.write_bytes(_template(size, self.options))
        return in_new_loop(lambda: Qcow2Node.open(FileNode(str(image))))


class TestQcow2ExtendedL2(_Qcow2Contract):
    options = ("extended_l2=on", "cluster_size=16k")


def _machine_with_qemu_check(options: tuple[str, ...], tmp: Path) -> type[NodeMachine]:
    class Machine(NodeMachine):
        def make_stack(self) -> Stack:
            node = qcow2_in_memory(MODEL_SIZE, options)
            return Stack(node, node)

        def teardown(self) -> None:
            node = self.node
            assert isinstance(node, Qcow2Node)
            file = node.file
            contents = self.run(read(node, 0, node.size))
            self.run(node.close())  # frees its spare clusters (closing again is a no-op)
            image = self.run(read(file, 0, file.size))
            super().teardown()
            path, raw = tmp / "m.qcow2", tmp / "m.raw"
            path.write_bytes(image)
            # qemu sees a qcow2 size rounded down to whole sectors: compare those
            raw.write_bytes(contents[:len(contents) // 512 * 512])
            assert_clean(path)
            assert same_as_raw(path, raw)

    return Machine


def test_state_machine_images_pass_qemu_check(tmp_path: pathlib.Path) -> None:
    for options in (("cluster_size=512", "refcount_bits=2"), ("extended_l2=on",),
                    ("compat=0.10", "cluster_size=512")):
        run_state_machine_as_test(
            _machine_with_qemu_check(options, tmp_path),
            settings=settings(max_examples=25, stateful_step_count=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow]))
