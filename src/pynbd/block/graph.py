"""The block graph: named nodes, who uses whom, and how the whole is described and closed.

Rules of this module:
- Every node an export or another node may name is in the graph under its
  node-name; children a command gave inline without a name get qemu's
  generated names (``#block001``, ...), which no user name can take (user
  names start with a letter).
- A node is removed only when no other node uses it; its children with
  generated names go with it unless something else still uses them, as in
  qemu.  Removed nodes are closed, parents before children (a format node may
  still write to its child while it closes).
- A node's data is shared by every caller only if the same holds for every
  node under it (``one_store``): the one rule the export's multi-conn flag is
  computed from.
- Closing the graph flushes every writable node that no writable node above
  it covers (a flush goes down the whole chain), and then closes every node
  once, parents first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("pynbd.block")

_T = TypeVar("_T")
#: how the graph waits for a step at shutdown (the server reports slow ones)
StopWait = Callable[[Awaitable[Any], str], Awaitable[Any]]


async def _plain_wait(step: Awaitable[_T], what: str) -> _T:
    return await step


def _user_named(node: Node) -> bool:
    return bool(node.node_name) and not node.node_name.startswith("#")


def _of(node: Node) -> str:
    """`` of node 'NAME'`` for a node the user named, else nothing (messages)."""
    return f" of node {node.node_name!r}" if _user_named(node) else ""


def _uses(parent: Node, node: Node) -> bool:
    for child in parent.children.values():
        if child is node or (not child.node_name and _uses(child, node)):
            return True
    return False


class GraphError(ValueError):
    """A graph change that cannot be made; the message uses qemu's wording."""


def subtree(node: Node) -> Iterator[Node]:
    """``node`` and every node under it, each once (depth first, ``node`` first)."""
    seen: set[int] = set()
    order: list[Node] = []

    def visit(current: Node) -> None:
        if id(current) in seen:
            return
        seen.add(id(current))
        order.append(current)
        for child in current.children.values():
            visit(child)

    visit(node)
    return iter(order)


def parents_first(roots: list[Node]) -> list[Node]:
    """Every node under ``roots``, each once, every node after all its parents
    (a node two parents share comes after both)."""
    nodes = {id(each): each for root in roots for each in subtree(root)}
    waiting = dict.fromkeys(nodes, 0)
    for node in nodes.values():
        for child in {id(c): c for c in node.children.values()}:
            waiting[child] += 1
    ready = [node for key, node in nodes.items() if not waiting[key]]
    order: list[Node] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for key in {id(c): c for c in node.children.values()}:
            waiting[key] -= 1
            if not waiting[key]:
                ready.append(nodes[key])
    return order


async def close_subtree(node: Node) -> None:
    """Close ``node`` and every node under it, each once, parents first (nodes
    built without a graph: tests, tools)."""
    for each in parents_first([node]):
        await each.close()


def one_store(node: Node) -> bool:
    """Whether every caller of ``node`` sees the same data (no node under it keeps a
    private copy): the condition for NBD_FLAG_CAN_MULTI_CONN."""
    return all(each.capabilities.can_multi_conn for each in subtree(node))


def backing_depth(node: Node) -> int:
    """How many backing nodes hang below ``node`` (qemu's ``backing_file_depth``)."""
    depth = 0
    current = node.children.get("backing")
    while current is not None:
        depth += 1
        current = current.children.get("backing")
    return depth


def shown(node: Node) -> Node:
    """The node a user sees: an implicit filter shows the node under it."""
    while node.implicit:
        children = list(node.children.values())
        if len(children) != 1:
            break
        node = children[0]
    return node


def _cache_flags(node: Node) -> dict[str, Any]:
    """``cache`` and ``detect_zeroes`` of a node as qemu shows them: from the implicit
    filters over it (``no-flush``, ``writethrough``, ``detect-zeroes``) and the node
    itself (``cache_direct``)."""
    writeback, no_flush, detect_zeroes = True, False, "off"
    while node.implicit:
        if node.driver == "writethrough":
            writeback = False
        elif node.driver == "no-flush":
            no_flush = True
        elif node.driver == "detect-zeroes":
            detect_zeroes = "unmap" if getattr(node, "unmap", False) else "on"
        children = list(node.children.values())
        if len(children) != 1:
            break
        node = children[0]
    return {"detect_zeroes": detect_zeroes,
            "cache": {"writeback": writeback, "direct": node.cache_direct,
                      "no-flush": no_flush}}


def _image_info(node: Node) -> dict[str, Any]:
    """qemu's ImageInfo of a node: its file, format and size, and its backing
    image's, nested, down the chain."""
    image: dict[str, Any] = {"filename": node.filename, "format": node.driver,
                             "virtual-size": node.size}
    backing = node.children.get("backing")
    if backing is not None:
        below = shown(backing)
        image["backing-filename"] = below.filename
        image["backing-image"] = _image_info(below)
    return image


def _dirty_bitmaps(node: Node) -> dict[str, Any]:
    """``dirty-bitmaps``: qemu's BlockDirtyInfo of each bitmap of the node, newest
    first (``inconsistent`` only when true); nothing when it has none."""
    if not node.bitmaps:
        return {}
    return {"dirty-bitmaps": [
        {"name": b.name, "recording": b.enabled, "persistent": b.persistent,
         "busy": b.busy > 0, "granularity": b.granularity, "count": b.count(),
         **({"inconsistent": True} if b.inconsistent else {})}
        for b in reversed(list(node.bitmaps))]}


class BlockGraph:
    """The named nodes of one server or daemon."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._generated = 0

    def __contains__(self, name: str) -> bool:
        return name in self._nodes

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def get(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def generated_name(self) -> str:
        """A new name for a node given without one (qemu's ``#blockNNN``)."""
        self._generated += 1
        return f"#block{self._generated:03d}"

    def add(self, node: Node, name: str) -> None:
        """Put ``node`` in the graph under ``name``."""
        if name in self._nodes:
            raise GraphError(f"Duplicate nodes with node-name='{name}'")
        node.node_name = name
        real = shown(node)
        if real is not node:  # the node under implicit filters: named in messages only
            real.shown_name = name
        self._nodes[name] = node

    def parents(self, node: Node) -> list[Node]:
        """The nodes of the graph that use ``node`` as a child (directly, or through
        unnamed nodes under them, such as the node under an implicit filter)."""
        return [each for each in self._nodes.values() if each is not node
                and _uses(each, node)]

    async def remove(self, name: str) -> None:
        """Take the node out of the graph and close it (and its generated children).

        Raises:
            GraphError: no such node, or another node uses it.
        """
        node = self._nodes.get(name)
        if node is None:
            raise GraphError(f"Failed to find node with node-name='{name}'")
        users = self.parents(node)
        if users:
            raise GraphError(f"Node '{name}' is busy: in use by "
                             + ", ".join(f"node '{user.node_name}'" for user in users))
        del self._nodes[name]
        await self._close_unused([node])

    async def _close_unused(self, removed: list[Node]) -> None:
        """Close ``removed`` and the children only they used: unnamed ones (under an
        implicit filter) and generated-name ones no other node uses."""
        closing: list[Node] = []
        pending = list(removed)
        while pending:
            node = pending.pop(0)
            closing.append(node)
            for child in node.children.values():
                name = child.node_name
                if not name:
                    pending.append(child)
                elif (name.startswith("#") and self._nodes.get(name) is child
                      and not self.parents(child)):
                    del self._nodes[name]
                    pending.append(child)
        for node in closing:
            await node.close()

    def roots(self) -> list[Node]:
        """The nodes no other node uses, directly or through nodes in between."""
        below = {id(each) for node in self._nodes.values()
                 for child in node.children.values() for each in subtree(child)}
        return [node for node in self._nodes.values() if id(node) not in below]

    def _to_flush(self) -> list[Node]:
        """The writable nodes reached from a root with no writable node above them
        (whose flush would have gone down to them), each once, top first."""
        chosen: list[Node] = []

        def walk(node: Node, covered: bool) -> None:
            caps = node.capabilities
            if caps.can_write and caps.can_flush and not covered:
                if not any(node is each for each in chosen):
                    chosen.append(node)
                covered = True
            for child in node.children.values():
                walk(child, covered)

        for root in self.roots():
            walk(root, False)
        return chosen

    async def close(self, wait: StopWait = _plain_wait) -> None:
        """Flush every writable node no writable node above covers, then close every
        node once, parents first."""
        for node in self._to_flush():
            try:
                await wait(node.flush(), "the final flush" + _of(node))
            except OSError as err:
                log.error("final flush%s failed: %s", _of(node), err)
        for node in parents_first(self.roots()):
            await wait(node.close(), f"node {node.node_name!r} to close"
                       if _user_named(node) else "the storage to close")
        self._nodes.clear()

    def describe(self, name: str, node: Node) -> dict[str, Any]:
        """One entry of ``query-named-block-nodes``, as qemu shows a node."""
        real = shown(node)
        image = _image_info(real)
        backing = real.children.get("backing")
        extra = {} if backing is None else {"backing_file": shown(backing).filename}
        return {
            **extra,
            "node-name": name, "drv": real.driver, "ro": not real.capabilities.can_write,
            "file": real.filename, "backing_file_depth": backing_depth(real),
            "encrypted": False, **_cache_flags(node),
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "write_threshold": 0,
            "image": image,
            **_dirty_bitmaps(real),
        }

    def query(self) -> list[dict[str, Any]]:
        """``query-named-block-nodes``: every named node."""
        return [self.describe(name, node) for name, node in self._nodes.items()]
