"""What the qcow2 tests share: qemu-img/qemu-io as the oracle, opening nodes, mirrors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import subprocess
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from pynbd.block.file import FileNode
from pynbd.block.memory import MemoryNode
from pynbd.block.qcow2 import Qcow2Node

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Awaitable, Callable

_T = TypeVar("_T")

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are needed")


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):  # compare: 1 means "different"
        raise AssertionError(f"qemu-img {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def create(path: pathlib.Path, size: int | str, *options: str) -> pathlib.Path:
    """``qemu-img create -f qcow2`` with ``-o`` options."""
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(options)]
    qemu_img(*args, str(path), str(size))
    return path


def qemu_io(path: pathlib.Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    done = subprocess.run([*args, str(path)], capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    if done.returncode or "failed" in output.lower() or "pattern verification" in output:
        raise AssertionError(f"qemu-io {commands}: {output.strip()}")


def check(path: pathlib.Path) -> dict[str, Any]:
    """``qemu-img check --output=json`` (corruptions and leaks)."""
    done = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                          capture_output=True, text=True, check=False)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def assert_clean(path: pathlib.Path, *, leaks_allowed: bool = False) -> None:
    result = check(path)
    assert result.get("corruptions", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    if not leaks_allowed:
        assert result.get("leaks", 0) == 0, result


def same_as_raw(image: pathlib.Path, raw: pathlib.Path) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw",
                           str(image), str(raw)], capture_output=True, text=True, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def to_raw(image: pathlib.Path, out: pathlib.Path) -> bytes:
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(out))
    return out.read_bytes()


def in_new_loop(make: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine on its own event loop, even from inside a running one."""
    async def main() -> _T:
        return await make()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def open_file(path: pathlib.Path, *, backing: Any = None, read_only: bool = False,
              cache_size: int | None = None) -> Qcow2Node:
    """A node over ``FileNode(path)``, opened on a loop of its own."""
    file = FileNode(str(path), read_only=read_only)
    return in_new_loop(lambda: Qcow2Node.open(file, backing=backing, read_only=read_only,
                                              cache_size=cache_size))


def memory_copy(path: pathlib.Path) -> MemoryNode:
    """A ``MemoryNode`` holding the bytes of the file at ``path``."""
    data = path.read_bytes()
    node = MemoryNode(len(data))
    in_new_loop(lambda: node.pwrite(data, 0))
    return node


async def close_node(node: Qcow2Node) -> None:
    """Close a qcow2 node and the nodes under it (as the graph would)."""
    children = list(node.children.values())
    await node.close()
    for child in children:
        if isinstance(child, Qcow2Node):
            await close_node(child)
        else:
            await child.close()
