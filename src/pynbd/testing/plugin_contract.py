"""The storage plugins' contract: the node contract run against a plugin class.

A plugin author's test module holds one class::

    from pynbd.testing.plugin_contract import PluginContract
    from mydisk import MyDisk

    class TestMyDisk(PluginContract):
        plugin = MyDisk
        options = {"size": "1M"}

and ``pytest`` runs every test of ``pynbd.testing.contract.NodeContract`` on
nodes of the plugin, alone and under raw windows and filters, with the
hypothesis state machine among them, plus the checks below.

What the contract asks for, and the hooks that give it:

- ``plugin_options(tmp_path, size)``: the options of a fresh plugin of exactly
  ``size`` bytes; by default ``options`` with ``size_option`` (``"size"``) set
  to the number.  A plugin whose size is not an option overrides it (write a
  file of that size, serve it, and return its URL).
- A plugin that can write starts as zeroes.  One that cannot starts as
  ``expected(size)`` (the whole contents of a fresh plugin of ``size`` bytes),
  or, if that returns None, as whatever it reads at first (then only
  consistency is checked: every layer and every read agree).
- Each test runs on one event loop (``support.shared_loop``), as in the server,
  so a plugin may keep connections and locks from call to call.

Rules of this module: it is for tests only (pytest and hypothesis); pynbd's
run time never imports it.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, ClassVar

import pytest

from ..block.graph import close_subtree
from ..block.plugin import PluginNode, open_class
from ..block.pluginload import PluginError, describe
from .contract import NodeContract
from .support import first_difference, outcome, pattern, read, run, shared_loop

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator, Mapping

    from .support import Stack


class PluginContract(NodeContract):
    """The node contract for the plugin class ``plugin``; see the module docstring."""

    #: the plugin class under test
    plugin: ClassVar[type]
    #: options every plugin under test gets (strings, as on the command line)
    options: ClassVar[Mapping[str, str]] = {}
    #: the option that sets the size (None: override ``plugin_options``)
    size_option: ClassVar[str | None] = "size"

    def plugin_options(self, tmp_path: pathlib.Path, size: int) -> dict[str, str]:
        """Options for a fresh plugin of exactly ``size`` bytes."""
        if self.size_option is None:
            raise NotImplementedError("override plugin_options: the size is not an option")
        return {**self.options, self.size_option: str(size)}

    def expected(self, size: int) -> bytes | None:
        """The contents of a fresh read-only plugin of ``size`` bytes (None: unknown)."""
        return None

    @pytest.fixture(autouse=True)
    def _one_loop(self) -> Iterator[None]:
        with shared_loop():
            yield

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> PluginNode:
        try:
            node = run(open_class(self.plugin, self.plugin_options(tmp_path, size)))
        except PluginError as err:
            pytest.fail(str(err))
        if node.size != size:
            run(node.close())
            pytest.fail(f"the plugin made with {self.plugin_options(tmp_path, size)} has "
                        f"{node.size} bytes, not {size}")
        return node

    def initial_contents(self, stack: Stack) -> bytes:
        if stack.protocol.capabilities.can_write:
            return bytes(stack.top.size)
        whole = self.expected(stack.protocol.size)
        if whole is None:  # what the plugin itself reads there
            return run(read(stack.protocol, stack.shift, stack.top.size))
        assert len(whole) == stack.protocol.size, "expected() returned the wrong size"
        return whole[stack.shift:stack.shift + stack.top.size]

    # -- checks of the plugin itself ---------------------------------------------------

    def test_is_a_plugin(self) -> None:
        """The class has read() and size(), and its optional attributes are booleans."""
        try:
            describe(self.plugin, "python", self.plugin.__qualname__)
        except PluginError as err:
            pytest.fail(str(err))

    def test_reads_agree(self, stack: Stack) -> None:
        """Reads at any offset, alone or many at once, return the contents."""
        node = stack.top
        want = self.initial_contents(stack)
        spots = [(0, 1), (1, 7), (7, 9), (node.size - 1, 1), (node.size - 13, 13),
                 (4093, 4099), (65535, 131075)]
        spots += [(i * 4099 % node.size, min(3000 + i, node.size - i * 4099 % node.size))
                  for i in range(64)]

        async def body() -> list[bytes]:
            return await asyncio.gather(*(read(node, offset, length)
                                          for offset, length in spots))

        for (offset, length), got in zip(spots, run(body()), strict=True):
            assert got == want[offset:offset + length], (
                f"read at {offset}: " + first_difference(got, want[offset:offset + length]))

    def test_read_only_refuses_writes(self, stack: Stack) -> None:
        """A plugin without write() fails writes (the node itself with EROFS), changing
        nothing."""
        node = stack.top
        if stack.protocol.capabilities.can_write:
            pytest.skip("the plugin can write")
        before = run(read(node, 0, 4096))
        for target in (stack.protocol, node):
            for call in (target.pwrite(pattern(1, 4096), 0), target.write_zeroes(0, 4096),
                         target.trim(0, 4096)):
                code = run(outcome(call))
                assert code == errno.EROFS if target is stack.protocol else code != 0
        assert run(read(node, 0, 4096)) == before

    def test_read_only_node_of_a_writable_plugin(self, tmp_path: pathlib.Path) -> None:
        """``read-only`` turns writes off whatever the plugin defines."""
        node = run(open_class(self.plugin, self.plugin_options(tmp_path, self.size),
                              read_only=True))
        try:
            assert not node.capabilities.can_write
            assert run(outcome(node.pwrite(b"x", 0))) == errno.EROFS
        finally:
            run(close_subtree(node))
