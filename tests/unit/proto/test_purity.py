"""The protocol core stays sans-IO: no module in pynbd.proto imports I/O, clocks or logging."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pynbd.proto

BANNED = frozenset({"asyncio", "socket", "ssl", "os", "time", "logging", "selectors",
                    "threading", "subprocess"})
PROTO_DIR = Path(pynbd.proto.__file__).parent
MODULES = sorted(PROTO_DIR.glob("*.py"))


def banned_imports(source: str, filename: str = "<string>") -> list[str]:
    """Every banned module that ``source`` imports, however it spells it."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names = [node.module]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute)
                       and node.func.attr == "import_module"))):
            names = [node.args[0].value]
        line = getattr(node, "lineno", 0)
        found += [f"{name} (line {line})" for name in names if name.split(".")[0] in BANNED]
    return found


def test_every_proto_module_is_checked() -> None:
    names = {path.name for path in MODULES}
    assert {"__init__.py", "constants.py", "wire.py", "errors.py", "events.py",
            "negotiated.py", "handshake.py", "transmission.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_proto_module_imports_no_io(path: Path) -> None:
    assert banned_imports(path.read_text(encoding="utf-8"), str(path)) == []


@pytest.mark.parametrize("source", [
    "import os",
    "import os.path",
    "import asyncio as aio",
    "import struct, socket",
    "from ssl import SSLContext",
    "from time import monotonic",
    "from logging.handlers import QueueHandler",
    "def f():\n    import selectors\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import threading\n",
    "try:\n    import subprocess\nexcept ImportError:\n    pass\n",
    "mod = __import__('os')",
    "import importlib\nmod = importlib.import_module('socket')",
])
def test_the_checker_catches_every_spelling(source: str) -> None:
    assert len(banned_imports(source)) == 1


@pytest.mark.parametrize("source", [
    "import struct",
    "from . import os",
    "from .time import x",
    "import ostree",
    "from errno import EINVAL",
    "from collections.abc import Iterable",
])
def test_the_checker_allows_harmless_imports(source: str) -> None:
    assert banned_imports(source) == []
